//! GPUDirect Storage through NVIDIA's cuFile library: where the library is looked for, its
//! driver opened once per process, files registered, and reads from a file straight into CUDA
//! memory (the storage device writes the GPU's memory; no host staging buffer).
//!
//! Owns: the search order for libcufile, the process's one cuFile driver, and the words for why
//! cuFile cannot serve (the library, the driver, the file). Must not: decide whether a load
//! reads through cuFile (the loader's planner does, from these facts and the registry's route)
//! or call the library except through `sys::cufile`.
//!
//! Where libcufile is looked for, first hit wins:
//! 1. `PEERMEM_CUFILE`, when set: that library, or `libcufile.so.0` in that directory, and
//!    nothing else (an explicit choice that fails is reported, not silently replaced);
//! 2. the dynamic loader's own search (`LD_LIBRARY_PATH`, the cache): `libcufile.so.0`, then
//!    `libcufile.so`;
//! 3. directories added with [`search_also`] (the Python package adds the `nvidia-cufile`
//!    wheel's library directories).
//!
//! cuFile's compatibility mode (its own reads through host bounce buffers) is switched off
//! before the driver opens, where the library has that setting: a file cuFile cannot read
//! directly is then refused with cuFile's reason, and the loader stages it itself, saying so.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{CudaError, CufileCall};
use crate::region::CudaRegion;
use crate::sys::cufile::{self, Handle, Lib, LoadFailed, ReadFailed};

/// The variable naming the library (or its directory).
pub const ENV_LIBRARY: &str = "PEERMEM_CUFILE";
/// The names the dynamic loader is asked for.
const NAMES: &[&str] = &["libcufile.so.0", "libcufile.so"];

static ALSO: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Adds a directory to look for `libcufile.so.0` in, after the loader's own search. Takes effect
/// only before the first [`Gds::open`] of the process (the outcome is kept).
pub fn search_also(dir: impl Into<PathBuf>) {
    let dir = dir.into();
    let mut v = ALSO.lock().unwrap_or_else(|p| p.into_inner());
    if !v.contains(&dir) {
        v.push(dir);
    }
}

/// The library directories of NVIDIA's pip wheels under `nvidia` (a directory of the `nvidia`
/// namespace package in a site-packages) that hold `libcufile.so.0`: `nvidia/cu13/lib` for
/// `nvidia-cufile` (CUDA 13), `nvidia/cufile/lib` for `nvidia-cufile-cu12`. Sorted.
pub fn wheel_dirs(nvidia: &std::path::Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(nvidia) else { return Vec::new() };
    let mut v: Vec<PathBuf> =
        rd.filter_map(|e| e.ok()).map(|e| e.path().join("lib")).filter(|d| d.join(NAMES[0]).is_file()).collect();
    v.sort();
    v
}

/// The libraries to try, in order: `env` (`PEERMEM_CUFILE`) alone when set, else the loader's
/// names, then `libcufile.so.0` in each of `also`.
pub fn candidates(env: Option<OsString>, also: &[PathBuf]) -> Vec<OsString> {
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        let p = PathBuf::from(&e);
        return vec![if p.is_dir() { p.join(NAMES[0]).into_os_string() } else { e }];
    }
    NAMES.iter().map(OsString::from).chain(also.iter().map(|d| d.join(NAMES[0]).into_os_string())).collect()
}

/// What the cuFile driver said about itself when it opened.
#[derive(Debug, Clone)]
pub struct GdsInfo {
    /// The library that was loaded, as it was found.
    pub library: String,
    /// `cuFileGetVersion` (1170 for 1.17), where the library answers it.
    pub version: Option<i32>,
    /// The nvidia-fs kernel driver's version ((0, 0) when it is not loaded).
    pub nvfs_version: (u32, u32),
    /// The storage kinds the driver reads directly (`NVME`, `NVME_P2P`, ...).
    pub storage: Vec<String>,
    /// The largest single direct I/O, in bytes.
    pub max_direct_io: u64,
    /// Compatibility mode was switched off before the open (false: the library lacks the
    /// setting, and cuFile may read some files through host memory itself).
    pub compat_off: bool,
}

impl GdsInfo {
    /// One line for reports.
    pub fn describe(&self) -> String {
        let v = self.version.map_or_else(|| "version unknown".into(), |v| format!("{}.{}", v / 1000, v % 1000 / 10));
        let (a, b) = self.nvfs_version;
        let nvfs = if (a, b) == (0, 0) { "no nvidia-fs driver".into() } else { format!("nvidia-fs {a}.{b}") };
        let storage = if self.storage.is_empty() { "none".into() } else { self.storage.join(", ") };
        format!("cuFile {v} ({}), {nvfs}, direct storage: {storage}", self.library)
    }
}

/// Why the process's cuFile is unusable, kept to answer every later call the same way.
#[derive(Clone)]
enum Failure {
    NoLibrary(String),
    Symbol(String, &'static str),
    Driver(CufileCall),
}

/// The process's cuFile driver, opened (cheap to copy).
#[derive(Clone, Copy)]
pub struct Gds {
    lib: &'static Lib,
    info: &'static GdsInfo,
}

impl std::fmt::Debug for Gds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gds").field("info", self.info).finish()
    }
}

fn load() -> Result<(&'static Lib, String), Failure> {
    static LIB: OnceLock<Result<(Lib, String), Failure>> = OnceLock::new();
    let r = LIB.get_or_init(|| {
        let also = ALSO.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut tried = Vec::new();
        for c in candidates(std::env::var_os(ENV_LIBRARY), &also) {
            let name = c.to_string_lossy().into_owned();
            match Lib::load(&c) {
                Ok(lib) => return Ok((lib, name)),
                Err(LoadFailed::MissingSymbol(s)) => return Err(Failure::Symbol(name, s)),
                Err(LoadFailed::Open(why)) => {
                    tracing::debug!(%name, %why, "libcufile candidate not loaded");
                    tried.push(name);
                }
            }
        }
        Err(Failure::NoLibrary(tried.join(", ")))
    });
    r.as_ref().map(|(l, n)| (l, n.clone())).map_err(Clone::clone)
}

impl Gds {
    /// Loads libcufile and opens its driver, once per process (later calls get the same answer).
    pub fn open() -> Result<Gds, CudaError> {
        static OPENED: OnceLock<Result<GdsInfo, Failure>> = OnceLock::new();
        let r = OPENED.get_or_init(|| {
            let (lib, library) = load()?;
            let compat_off = lib.forbid_compat_mode().map_err(Failure::Driver)?;
            let p = lib.open_driver().map_err(Failure::Driver)?;
            let info = GdsInfo {
                library,
                version: lib.version(),
                nvfs_version: p.nvfs_version,
                storage: cufile::storage_names(p.storage_flags),
                max_direct_io: p.max_direct_io_size as u64,
                compat_off,
            };
            tracing::info!(info = %info.describe(), "cuFile driver opened");
            Ok(info)
        });
        match r {
            Ok(info) => Ok(Gds { lib: load().map_err(into_error)?.0, info }),
            Err(f) => Err(into_error(f.clone())),
        }
    }

    pub fn info(&self) -> &GdsInfo {
        self.info
    }

    /// Registers `file` with cuFile (`cuFileHandleRegister`): it must be open with O_DIRECT, on
    /// a filesystem and device cuFile reads directly. The handle keeps the file open.
    pub fn register(&self, file: Arc<File>) -> Result<GdsFile, CudaError> {
        direct_io(&file)?;
        let handle = self.lib.register(file.as_fd()).map_err(|call| {
            use cudarc::cufile::sys::CUfileOpError as E;
            let why = match call.code {
                c if c == E::CU_FILE_DIO_NOT_SET as i32 || c == E::CU_FILE_INVALID_FILE_OPEN_FLAG as i32 => {
                    "O_DIRECT not possible for this file (cuFile refused its open flags)"
                }
                c if c == E::CU_FILE_PERMISSION_DENIED as i32 => "cuFile may not read this file",
                _ => "the file's filesystem or device is not supported by cuFile",
            };
            CudaError::CufileFile { why, call }
        })?;
        Ok(GdsFile { handle, _file: file })
    }
}

fn into_error(f: Failure) -> CudaError {
    match f {
        Failure::NoLibrary(tried) => CudaError::NoCufile { tried },
        Failure::Symbol(library, symbol) => CudaError::CufileSymbol { library, symbol },
        Failure::Driver(call) => CudaError::CufileDriver { call, here: prerequisites() },
    }
}

/// What this machine lacks of cuFile's prerequisites, as ` (here: ...)`: cuFile says only that
/// its driver did not initialise (its log, `cufile.log`, has the detail).
fn prerequisites() -> String {
    let mut v = Vec::new();
    if let Err(e) = crate::Cuda::driver_version() {
        v.push(if e.is_unavailable() { "libcuda.so.1 not loadable or no GPU".to_string() } else { e.to_string() });
    }
    if !std::path::Path::new("/proc/driver/nvidia-fs").exists() {
        v.push("no nvidia-fs driver (/proc/driver/nvidia-fs absent)".into());
    }
    if v.is_empty() {
        String::new()
    } else {
        format!(" (here: {})", v.join("; "))
    }
}

/// `Ok` when `file` is open with O_DIRECT.
fn direct_io(file: &File) -> Result<(), CudaError> {
    let flags =
        crate::sys::file_flags(file).map_err(|e| CudaError::NoDirectIo(format!("reading its open flags: {e}")))?;
    if flags & libc::O_DIRECT == 0 {
        return Err(CudaError::NoDirectIo(
            "the file is not open with O_DIRECT (the filesystem refused it, or it is read through the page cache)"
                .into(),
        ));
    }
    Ok(())
}

/// A file registered with cuFile. Reads from it land straight in CUDA memory.
pub struct GdsFile {
    handle: Handle,
    /// Kept open until the handle is deregistered (field order: the handle drops first).
    _file: Arc<File>,
}

impl std::fmt::Debug for GdsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GdsFile")
    }
}

impl GdsFile {
    /// Reads `len` bytes at `file_off` into `dst` at `doff` (`cuFileRead`). Blocks until cuFile
    /// returns: it takes no timeout, so a caller that must bound its wait runs this on a thread
    /// that holds `dst` (the loader does). Returns the bytes read (fewer only at the file's end).
    pub fn read(&self, dst: &CudaRegion, doff: u64, file_off: u64, len: u64) -> Result<u64, CudaError> {
        if len == 0 || doff.checked_add(len).is_none_or(|e| e > dst.mem.len) {
            return Err(CudaError::OutOfRange { which: "device memory", offset: doff, len, size: dst.mem.len });
        }
        self.handle.read(&dst.mem, doff, file_off, len).map_err(|e| match e {
            ReadFailed::Cufile(c) => CudaError::CufileRead(c.to_string()),
            ReadFailed::Os(e) => CudaError::CufileRead(format!("cuFileRead failed: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_library_is_the_only_candidate() {
        let c = candidates(Some("/opt/x/libcufile.so.0".into()), &[PathBuf::from("/wheel/lib")]);
        assert_eq!(c, vec![OsString::from("/opt/x/libcufile.so.0")]);
        let d = std::env::temp_dir();
        let c = candidates(Some(d.clone().into_os_string()), &[]);
        assert_eq!(c, vec![d.join("libcufile.so.0").into_os_string()], "a directory names the library in it");
    }

    #[test]
    fn wheel_directories_are_those_holding_the_library() {
        let d = tempfile::tempdir().unwrap();
        for (sub, with) in [("cu13", true), ("cublas", false), ("cufile", true)] {
            std::fs::create_dir_all(d.path().join(sub).join("lib")).unwrap();
            if with {
                std::fs::write(d.path().join(sub).join("lib/libcufile.so.0"), b"").unwrap();
            }
        }
        assert_eq!(wheel_dirs(d.path()), vec![d.path().join("cu13/lib"), d.path().join("cufile/lib")]);
        assert!(wheel_dirs(&d.path().join("absent")).is_empty());
    }

    #[test]
    fn without_the_variable_the_loader_path_comes_before_added_directories() {
        let c = candidates(None, &[PathBuf::from("/wheel/lib")]);
        let want: Vec<OsString> =
            vec!["libcufile.so.0".into(), "libcufile.so".into(), "/wheel/lib/libcufile.so.0".into()];
        assert_eq!(c, want);
        assert_eq!(candidates(Some(OsString::new()), &[]).len(), 2, "an empty variable is unset");
    }
}
