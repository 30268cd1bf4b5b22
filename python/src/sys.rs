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
    if dl_device.is_some_and(|d| d != DLPACK_CPU) {
        return Err(PyValueError::new_err(format!("dl_device {dl_device:?}: only the CPU (1, 0) is offered")));
    }
    if copy == Some(true) {
        return Err(PyValueError::new_err("copy=True: the buffer is exported without copies only"));
    }
    let span = region
        .cpu_mapping()
        .ok_or_else(|| peermem_err("the buffer has no CPU mapping (device-only memory): no DLPack tensor"))?;
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
        data: span.addr().raw() as *mut c_void,
        device: DLDevice { device_type: DLPACK_CPU.0, device_id: DLPACK_CPU.1 },
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
