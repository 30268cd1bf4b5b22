//! The module's only `unsafe`: the buffer protocol's raw `Py_buffer`, DLPack capsules (raw
//! tensors handed to a consumer with a C deleter), and spans over memory a Python object lends.
//!
//! Owns: every raw pointer the module touches, and the buffer protocol's `unsafe` slot
//! (`buffer_protocol!`, stamped onto each class that lends its bytes). Must not: hand out a
//! pointer whose memory is not kept alive by an owner the pointer's holder also keeps (a
//! `Py_buffer` keeps its exporter; a DLPack tensor keeps an `Arc` of the region; a lent span
//! keeps the Python buffer export), or import a module of the package above it (the classes
//! say what they lend through `Lent`; only `errors` is below this one).

use std::ffi::{c_int, c_void, CStr};
use std::ptr::NonNull;
use std::sync::Arc;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use peermem::mem::MappedSpan;
use peermem::{Backing, PeerMemory, Provider};

use crate::errors::peermem_err;

/// DLPack's `(kDLCPU, 0)`.
pub const DLPACK_CPU: (i32, i32) = (1, 0);
/// DLPack's `kDLCUDA` device type.
pub const DLPACK_CUDA: i32 = 2;

/// Fills `view` with the owned memory's CPU mapping (1-D, unsigned bytes, writable).
///
/// # Safety
/// `view` must be the `Py_buffer` CPython passed to `bf_getbuffer` for `obj`.
unsafe fn fill_view(
    obj: &Bound<'_, PyAny>,
    region: &dyn PeerMemory,
    nbytes: u64,
    view: *mut ffi::Py_buffer,
    flags: c_int,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("null Py_buffer"));
    }
    let span = region
        .cpu_mapping()
        .ok_or_else(|| PyBufferError::new_err("the buffer has no CPU mapping (device-only memory)"))?;
    let len = isize::try_from(nbytes).map_err(|_| PyBufferError::new_err("buffer too large"))?;
    // SAFETY: `view` is CPython's Py_buffer for this request (the caller's contract). The
    // pointer is the region's CPU mapping of at least `nbytes` bytes, mapped read/write; the
    // view keeps a reference to `obj` (FillInfo increments it), and `obj` keeps the region, so
    // the mapping outlives every consumer of the view.
    let rc = unsafe { ffi::PyBuffer_FillInfo(view, obj.as_ptr(), span.addr().raw() as *mut c_void, len, 0, flags) };
    if rc != 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    Ok(())
}

/// What an object lends through the buffer protocol: the first `nbytes` bytes of `region`'s
/// CPU mapping as writable unsigned bytes, one-dimensional, or with `rows` a `[rows, cols]`
/// array whose rows are `strides[0]` bytes apart (`strides` is `[row stride, 1]`).
pub struct Lent<'a> {
    pub region: &'a dyn PeerMemory,
    pub nbytes: u64,
    /// The shape and strides, owned by the lending object: CPython reads them for the view's
    /// life.
    pub rows: Option<(&'a [isize; 2], &'a [isize; 2])>,
}

/// Fills `view` with what `lent` describes (`flags` says whether the consumer takes a shape
/// and strides).
///
/// # Safety
/// `view` must be the `Py_buffer` CPython passed to `bf_getbuffer` for `obj`, and what `lent`
/// borrows must be owned by `obj` (the view keeps `obj`, and so them, alive).
pub unsafe fn fill_buffer(
    obj: &Bound<'_, PyAny>,
    lent: Lent<'_>,
    view: *mut ffi::Py_buffer,
    flags: c_int,
) -> PyResult<()> {
    // SAFETY: the caller's contract, passed on.
    unsafe { fill_view(obj, lent.region, lent.nbytes, view, flags)? };
    let Some((shape, strides)) = lent.rows else { return Ok(()) };
    // SAFETY: `view` was filled above; `shape` and `strides` live in `obj`, which the view keeps
    // alive (FillInfo took a reference), and CPython only reads them. `len` is the bytes the
    // shape covers (the span also holds the gaps between rows).
    unsafe {
        (*view).len = shape[0] * shape[1];
        if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
            (*view).ndim = 2;
            (*view).shape = shape.as_ptr().cast_mut();
        }
        if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
            (*view).strides = strides.as_ptr().cast_mut();
        }
    }
    Ok(())
}

/// Gives the frozen pyclass `$class` the buffer protocol, lending what its
/// `fn lend(&self, flags: c_int) -> PyResult<Lent<'_>>` says. PyO3 requires the
/// `__getbuffer__` slot to be an `unsafe fn`, so it is written here, once, and stamped onto
/// each class by the module that defines the class: this module names no class of the package.
macro_rules! buffer_protocol {
    ($class:ident) => {
        #[allow(unsafe_code)]
        #[pyo3::pymethods]
        impl $class {
            unsafe fn __getbuffer__(
                slf: pyo3::Bound<'_, Self>,
                view: *mut pyo3::ffi::Py_buffer,
                flags: std::ffi::c_int,
            ) -> pyo3::PyResult<()> {
                let lent = slf.get().lend(flags)?;
                // SAFETY: forwarded from CPython's bf_getbuffer for `slf`; `lent` borrows from
                // the object `slf` holds.
                unsafe { $crate::sys::fill_buffer(slf.as_any(), lent, view, flags) }
            }
        }
    };
}
pub(crate) use buffer_protocol;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

/// DLPack >= 1.0: versioned, with flags (no flag set: writable, not a copy).
#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// What a DLPack tensor owns: the tensor first (its address is the tensor's), its shape, and
/// the region that keeps the memory mapped.
#[repr(C)]
struct Managed<T> {
    tensor: T,
    shape: [i64; 2],
    strides: [i64; 2],
    _keep: Arc<dyn PeerMemory>,
}

const DLTENSOR: &CStr = c"dltensor";
const DLTENSOR_VERSIONED: &CStr = c"dltensor_versioned";

/// The deleter DLPack consumers call when done with a legacy tensor.
unsafe extern "C" fn legacy_deleter(t: *mut DLManagedTensor) {
    if !t.is_null() {
        // SAFETY: every legacy tensor this module hands out is the first field of a
        // `Box<Managed<DLManagedTensor>>` leaked by `dlpack`; DLPack calls the deleter once.
        drop(unsafe { Box::from_raw(t.cast::<Managed<DLManagedTensor>>()) });
    }
}

/// The deleter of a versioned tensor.
unsafe extern "C" fn versioned_deleter(t: *mut DLManagedTensorVersioned) {
    if !t.is_null() {
        // SAFETY: as for `legacy_deleter`, with `Managed<DLManagedTensorVersioned>`.
        drop(unsafe { Box::from_raw(t.cast::<Managed<DLManagedTensorVersioned>>()) });
    }
}

/// The capsule destructor: frees the tensor unless a consumer took it (renamed the capsule to
/// `used_dltensor[_versioned]` and took over calling the deleter).
unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: CPython calls this with the capsule being destroyed; the name tells which tensor
    // type the pointer is, and a consumed capsule (renamed) is left alone.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            legacy_deleter(ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()).cast());
        } else if ffi::PyCapsule_IsValid(capsule, DLTENSOR_VERSIONED.as_ptr()) == 1 {
            versioned_deleter(ffi::PyCapsule_GetPointer(capsule, DLTENSOR_VERSIONED.as_ptr()).cast());
        } else {
            ffi::PyErr_Clear();
        }
    }
}

/// Wraps a leaked `Managed` box in a capsule named `name`; reclaims it on failure.
///
/// # Safety
/// `raw` must come from `Box::into_raw` of a `Managed<T>` that `capsule_destructor` frees by
/// `name`, and must not be used by the caller afterwards.
unsafe fn capsule<'py, T>(py: Python<'py>, raw: *mut Managed<T>, name: &'static CStr) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: the caller's contract; on success the capsule (or its consumer) owns the box.
    unsafe {
        let cap = ffi::PyCapsule_New(raw.cast(), name.as_ptr(), Some(capsule_destructor));
        if cap.is_null() {
            drop(Box::from_raw(raw));
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, cap))
    }
}

/// A DLPack capsule over the first `nbytes` bytes of `region` (1-D uint8, CPU, zero copy):
/// versioned (writable) when the consumer takes DLPack >= 1.0, legacy otherwise.
pub fn dlpack<'py>(
    py: Python<'py>,
    region: Arc<dyn PeerMemory>,
    nbytes: u64,
    max_version: Option<(u32, u32)>,
    dl_device: Option<(i32, i32)>,
    copy: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let n = i64::try_from(nbytes).map_err(|_| PyValueError::new_err("buffer too large"))?;
    dlpack_nd(py, region, nbytes, &[n], None, max_version, dl_device, copy)
}

/// As `dlpack`, shaped `dims` (one or two dimensions): C order, whose product is `nbytes`, or
/// with rows `row_stride` bytes apart (two dimensions, all rows within `nbytes`).
#[allow(clippy::too_many_arguments)]
pub fn dlpack_nd<'py>(
    py: Python<'py>,
    region: Arc<dyn PeerMemory>,
    nbytes: u64,
    dims: &[i64],
    row_stride: Option<i64>,
    max_version: Option<(u32, u32)>,
    dl_device: Option<(i32, i32)>,
    copy: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let span = region
        .cpu_mapping()
        .ok_or_else(|| peermem_err("the buffer has no CPU mapping (device-only memory): no DLPack tensor"))?;
    let data = Placed { data: span.addr().raw(), device: DLPACK_CPU };
    dlpack_at(py, region, data, Shape { nbytes, dims, row_stride }, max_version, dl_device, copy)
}

/// As `dlpack_nd`, over CUDA device memory: `region`'s bytes start at device pointer `ptr` of
/// device `ordinal` (DLPack's `(kDLCUDA, ordinal)`).
#[allow(clippy::too_many_arguments)]
pub fn dlpack_cuda<'py>(
    py: Python<'py>,
    region: Arc<dyn PeerMemory>,
    ptr: u64,
    ordinal: i32,
    nbytes: u64,
    dims: &[i64],
    row_stride: Option<i64>,
    max_version: Option<(u32, u32)>,
    dl_device: Option<(i32, i32)>,
    copy: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let data = Placed { data: ptr, device: (DLPACK_CUDA, ordinal) };
    dlpack_at(py, region, data, Shape { nbytes, dims, row_stride }, max_version, dl_device, copy)
}

/// Where a DLPack tensor's bytes are: the address, and DLPack's `(device type, id)`.
struct Placed {
    data: u64,
    device: (i32, i32),
}

/// A DLPack tensor's shape over `nbytes` bytes (see `dlpack_nd`).
struct Shape<'a> {
    nbytes: u64,
    dims: &'a [i64],
    row_stride: Option<i64>,
}

/// The capsule of `dlpack_nd` and `dlpack_cuda`.
fn dlpack_at<'py>(
    py: Python<'py>,
    region: Arc<dyn PeerMemory>,
    at: Placed,
    shape: Shape<'_>,
    max_version: Option<(u32, u32)>,
    dl_device: Option<(i32, i32)>,
    copy: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    if dl_device.is_some_and(|d| d != at.device) {
        return Err(PyValueError::new_err(format!("dl_device {dl_device:?}: only {:?} is offered", at.device)));
    }
    if copy == Some(true) {
        return Err(PyValueError::new_err("copy=True: the buffer is exported without copies only"));
    }
    let Shape { nbytes, dims, row_stride } = shape;
    let ndim = dims.len();
    let covered = match (dims, row_stride) {
        (&[rows, cols], Some(st)) if rows > 0 && cols > 0 && st >= cols => {
            (rows - 1).checked_mul(st).and_then(|x| x.checked_add(cols)).is_some_and(|e| e <= nbytes as i64)
        }
        (_, Some(_)) => false,
        _ => dims.iter().try_fold(1i64, |a, &d| a.checked_mul(d)) == i64::try_from(nbytes).ok(),
    };
    if !(1..=2).contains(&ndim) || !covered {
        return Err(PyValueError::new_err(format!(
            "shape {dims:?} (row stride {row_stride:?}) does not fit {nbytes} bytes"
        )));
    }
    let mut shape = [0i64; 2];
    shape[..ndim].copy_from_slice(dims);
    let strides = [row_stride.unwrap_or(0), 1];
    let tensor = DLTensor {
        data: at.data as *mut c_void,
        device: DLDevice { device_type: at.device.0, device_id: at.device.1 },
        ndim: ndim as i32,
        dtype: DLDataType { code: 1, bits: 8, lanes: 1 },
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    if max_version.is_some_and(|(major, _)| major >= 1) {
        let raw = Box::into_raw(Box::new(Managed {
            tensor: DLManagedTensorVersioned {
                version: DLPackVersion { major: 1, minor: 0 },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(versioned_deleter),
                flags: 0,
                dl_tensor: tensor,
            },
            shape,
            strides,
            _keep: region.clone(),
        }));
        // SAFETY: `raw` is a live, unaliased box; the shape and stride arrays live in it, so the
        // tensor's pointers to them are valid for the tensor's life. Ownership passes to the
        // capsule.
        unsafe {
            (*raw).tensor.dl_tensor.shape = (*raw).shape.as_mut_ptr();
            if row_stride.is_some() {
                (*raw).tensor.dl_tensor.strides = (*raw).strides.as_mut_ptr();
            }
            (*raw).tensor.manager_ctx = raw.cast();
            capsule(py, raw, DLTENSOR_VERSIONED)
        }
    } else {
        let raw = Box::into_raw(Box::new(Managed {
            tensor: DLManagedTensor {
                dl_tensor: tensor,
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(legacy_deleter),
            },
            shape,
            strides,
            _keep: region.clone(),
        }));
        // SAFETY: as above.
        unsafe {
            (*raw).tensor.dl_tensor.shape = (*raw).shape.as_mut_ptr();
            if row_stride.is_some() {
                (*raw).tensor.dl_tensor.strides = (*raw).strides.as_mut_ptr();
            }
            (*raw).tensor.manager_ctx = raw.cast();
            capsule(py, raw, DLTENSOR)
        }
    }
}

/// The bytes of a writable, C-contiguous Python buffer (numpy array, bytearray, memoryview...),
/// as a host region. The buffer export is held for the region's life, so the object cannot be
/// resized or freed under a load.
pub struct PyBufferRegion {
    buf: PyUntypedBuffer,
    ptr: NonNull<u8>,
    len: u64,
}

impl PyBufferRegion {
    /// Exports `obj`'s buffer; `name` is the argument's name in error messages.
    pub fn new(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<PyBufferRegion> {
        let tname = || obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        let buf = PyUntypedBuffer::get(obj).map_err(|e| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "{name}: a HostBuffer, a VulkanBuffer or a writable buffer, not {} ({e})",
                tname()
            ))
        })?;
        if buf.readonly() {
            return Err(PyValueError::new_err(format!("{name}: the {} buffer is read-only", tname())));
        }
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("{name}: the {} buffer is not C-contiguous", tname())));
        }
        let len = buf.len_bytes() as u64;
        let ptr = NonNull::new(buf.buf_ptr().cast::<u8>())
            .filter(|_| len > 0)
            .ok_or_else(|| PyValueError::new_err(format!("{name}: the {} buffer is empty", tname())))?;
        Ok(PyBufferRegion { buf, ptr, len })
    }
}

impl PyBufferRegion {
    /// The CPU address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl PeerMemory for PyBufferRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        Provider::Host { numa: None }
    }
    fn backing(&self) -> Backing<'_> {
        Backing::HostPages
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        let _held = &self.buf;
        // SAFETY: `ptr..ptr+len` is the writable, contiguous memory of a buffer export that
        // `self.buf` holds until `self` drops, so it stays mapped for the span's borrow of
        // `self`; Rust code never forms a reference over it (only the span's copies).
        Some(unsafe { MappedSpan::from_raw(self.ptr, self.len as usize) })
    }
}

// SAFETY: the region only lends the exported bytes through spans (copies); the export itself
// (`PyUntypedBuffer`) is Send and Sync and is released with the GIL attached.
unsafe impl Send for PyBufferRegion {}
// SAFETY: as for Send.
unsafe impl Sync for PyBufferRegion {}

/// A CUDA tensor handed in through DLPack: where its bytes are, and the capsule that keeps the
/// producer's tensor alive (left unconsumed: its own destructor releases the tensor when the
/// last holder drops it).
pub struct CudaTensor {
    pub ptr: u64,
    pub nbytes: u64,
    capsule: Py<PyAny>,
}

/// DLPack's flag for a tensor the consumer must not write.
const DLPACK_FLAG_READ_ONLY: u64 = 1;

/// The CUDA device ordinal `obj` says its DLPack tensor is on (`__dlpack_device__` of
/// `(kDLCUDA, N)`), or None for another device or an object without DLPack.
pub fn dlpack_cuda_device(obj: &Bound<'_, PyAny>) -> PyResult<Option<i32>> {
    if !obj.hasattr("__dlpack_device__")? || !obj.hasattr("__dlpack__")? {
        return Ok(None);
    }
    let (kind, ordinal): (i32, i32) = obj.call_method0("__dlpack_device__")?.extract()?;
    Ok((kind == DLPACK_CUDA).then_some(ordinal))
}

/// The CUDA tensor `obj` lends through DLPack, or None when `obj` is not on a CUDA device
/// (`__dlpack_device__` absent or another device type). The producer is asked with `stream=1`
/// (the legacy default stream) so its pending writes come before the loader's copies; a
/// non-contiguous or read-only tensor is a `ValueError`.
pub fn cuda_from_dlpack(obj: &Bound<'_, PyAny>) -> PyResult<Option<CudaTensor>> {
    let py = obj.py();
    if dlpack_cuda_device(obj)?.is_none() {
        return Ok(None);
    }
    let kw = pyo3::types::PyDict::new(py);
    kw.set_item("stream", 1)?;
    kw.set_item("max_version", (1, 0))?;
    let cap = match obj.call_method("__dlpack__", (), Some(&kw)) {
        Ok(c) => c,
        // A producer before DLPack 1.0 has no `max_version`.
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
            kw.del_item("max_version")?;
            obj.call_method("__dlpack__", (), Some(&kw))?
        }
        Err(e) => return Err(e),
    };
    let (t, flags) = capsule_tensor(&cap)?;
    if flags & DLPACK_FLAG_READ_ONLY != 0 {
        return Err(PyValueError::new_err("out: the CUDA tensor is read-only (DLPack flag)"));
    }
    if t.device.device_type != DLPACK_CUDA {
        return Err(PyValueError::new_err(format!("out: DLPack device type {} is not CUDA", t.device.device_type)));
    }
    let nbytes = contiguous_bytes(&t)?;
    let ptr = (t.data as u64)
        .checked_add(t.byte_offset)
        .ok_or_else(|| PyValueError::new_err("out: the tensor's byte_offset overflows"))?;
    Ok(Some(CudaTensor { ptr, nbytes, capsule: cap.unbind() }))
}

/// The tensor in a DLPack capsule (legacy or versioned) and its flags.
fn capsule_tensor(cap: &Bound<'_, PyAny>) -> PyResult<(DLTensorView, u64)> {
    let p = cap.as_ptr();
    // SAFETY: `p` is a live object; the capsule checks below read only a capsule of these names,
    // whose pointer the DLPack protocol defines as a (versioned) managed tensor, alive while the
    // capsule is. Shape and strides are copied out while it is held.
    unsafe {
        if ffi::PyCapsule_IsValid(p, DLTENSOR_VERSIONED.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(p, DLTENSOR_VERSIONED.as_ptr()).cast::<DLManagedTensorVersioned>();
            return Ok((view_of(&(*m).dl_tensor)?, (*m).flags));
        }
        if ffi::PyCapsule_IsValid(p, DLTENSOR.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(p, DLTENSOR.as_ptr()).cast::<DLManagedTensor>();
            return Ok((view_of(&(*m).dl_tensor)?, 0));
        }
        ffi::PyErr_Clear();
    }
    Err(PyValueError::new_err("out: __dlpack__ returned no unconsumed DLPack capsule"))
}

/// What the loader needs of a DLTensor, copied out of it.
struct DLTensorView {
    data: *mut c_void,
    device: DLDevice,
    byte_offset: u64,
    dtype: DLDataType,
    shape: Vec<i64>,
    strides: Option<Vec<i64>>,
}

/// Copies the fields of `t`.
///
/// # Safety
/// `t` must be a live DLTensor whose `shape` (and `strides`, when not null) hold `ndim` values.
unsafe fn view_of(t: &DLTensor) -> PyResult<DLTensorView> {
    let ndim = usize::try_from(t.ndim).map_err(|_| PyValueError::new_err("out: negative ndim"))?;
    if ndim > 64 || (ndim > 0 && t.shape.is_null()) {
        return Err(PyValueError::new_err(format!("out: a DLPack tensor of {ndim} dimensions without a shape")));
    }
    // SAFETY: the caller's contract: `ndim` values behind each non-null pointer.
    let read = |p: *mut i64| unsafe { std::slice::from_raw_parts(p, ndim).to_vec() };
    Ok(DLTensorView {
        data: t.data,
        device: t.device,
        byte_offset: t.byte_offset,
        dtype: t.dtype,
        shape: if ndim == 0 { Vec::new() } else { read(t.shape) },
        strides: (!t.strides.is_null() && ndim > 0).then(|| read(t.strides)),
    })
}

/// The bytes of a C-contiguous tensor (strides absent or compact row-major); an error otherwise.
fn contiguous_bytes(t: &DLTensorView) -> PyResult<u64> {
    let bits = u64::from(t.dtype.bits) * u64::from(t.dtype.lanes);
    if bits == 0 || bits % 8 != 0 {
        return Err(PyValueError::new_err(format!("out: element of {bits} bits is not whole bytes")));
    }
    let mut expect = 1i64;
    if let Some(st) = &t.strides {
        for (d, s) in t.shape.iter().zip(st).rev() {
            if *d != 1 && *s != expect {
                return Err(PyValueError::new_err("out: the CUDA tensor is not C-contiguous"));
            }
            expect = expect.saturating_mul(*d);
        }
    }
    let n = t.shape.iter().try_fold(1u64, |a, &d| u64::try_from(d).ok().and_then(|d| a.checked_mul(d)));
    let bytes = n.and_then(|n| n.checked_mul(bits / 8)).filter(|&b| b > 0);
    bytes.ok_or_else(|| PyValueError::new_err(format!("out: the CUDA tensor of shape {:?} is empty", t.shape)))
}

/// Adopts the memory of `t` on `device` as a region that holds `t`'s capsule.
pub fn adopt_cuda(
    device: &peermem_cuda::Device,
    t: CudaTensor,
) -> Result<peermem_cuda::CudaRegion, peermem_cuda::CudaError> {
    let CudaTensor { ptr, nbytes, capsule, .. } = t;
    // SAFETY: the capsule, unconsumed, keeps the producer's tensor (and so its memory) alive
    // until the region drops it: its destructor is what releases the tensor.
    let f = unsafe { peermem_cuda::Foreign::new(peermem_cuda::DevicePtr::new(ptr), nbytes, Box::new(capsule)) };
    device.adopt(f)
}
