//! GPUDirect Storage (cuFile) against the real library: NVIDIA's `libcufile.so.0` from the
//! `nvidia-cufile` wheel (found in the Python test environment, or at `PEERMEM_TEST_CUFILE`).
//! cuFile's driver is opened once per process, so each case runs in a child process of this test
//! binary with its own environment. Without a GPU the driver's open fails with cuFile's own
//! error; with one, a file is read straight into device memory and compared.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use peermem_cuda::{gds, Cuda, CudaError, Gds};

/// The wheel's libcufile: `PEERMEM_TEST_CUFILE`, else the first `gds::wheel_dirs` hit under
/// the site-packages of the Python test environment (`python/run-tests` installs torch there,
/// which brings `nvidia-cufile`).
fn wheel_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PEERMEM_TEST_CUFILE") {
        return Some(PathBuf::from(p));
    }
    let home = PathBuf::from(std::env::var_os("HOME")?);
    let venvs: Vec<PathBuf> = match std::env::var_os("PEERMEM_PYVENV") {
        Some(v) => vec![PathBuf::from(v)],
        None => dirs(&home.join(".cache/peermem")).into_iter().filter(|d| name_starts(d, "pyvenv-")).collect(),
    };
    let libs = venvs.iter().flat_map(|v| dirs(&v.join("lib"))).filter(|d| name_starts(d, "python3"));
    let mut found = libs.flat_map(|l| gds::wheel_dirs(&l.join("site-packages/nvidia")));
    found.next().map(|d| d.join("libcufile.so.0"))
}

fn dirs(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix))
}

/// Runs case `case` in a child process with `env` set (and `PEERMEM_CUFILE` removed unless
/// given); its stderr, which says what it found.
fn child(case: &str, env: &[(&str, &Path)]) -> String {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "case_in_a_child_process", "--nocapture", "--include-ignored", "--test-threads=1"]);
    c.env_remove(gds::ENV_LIBRARY).env("GDS_CASE", case);
    // cuFile writes its log to the working directory by default.
    let log = std::env::temp_dir().join(format!("peermem-cufile-test-{}.log", std::process::id()));
    c.env("CUFILE_LOGFILE_PATH", &log);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "case {case} failed:\n{}\n{err}", String::from_utf8_lossy(&out.stdout));
    let _ = std::fs::remove_file(log);
    err
}

#[test]
fn an_explicit_library_that_is_missing_is_reported_and_nothing_else_is_tried() {
    let err = child("missing", &[(gds::ENV_LIBRARY, Path::new("/nonexistent/libcufile.so.0"))]);
    assert!(err.contains("missing: ok"), "{err}");
}

#[test]
fn the_wheel_library_loads_by_path_by_directory_and_as_an_added_directory() {
    let Some(lib) = wheel_library() else {
        eprintln!(
            "no libcufile.so.0 of the nvidia-cufile wheel found (python/run-tests' venv, PEERMEM_TEST_CUFILE): skipped"
        );
        return;
    };
    eprintln!("libcufile: {}", lib.display());
    let dir = lib.parent().unwrap();
    for (case, env) in [
        ("path", vec![(gds::ENV_LIBRARY, lib.as_path())]),
        ("path", vec![(gds::ENV_LIBRARY, dir)]),
        ("added", vec![("GDS_ADD_DIR", dir)]),
    ] {
        let err = child(case, &env);
        assert!(err.contains(&format!("{case}: ok")), "{err}");
        eprintln!("{}", err.lines().filter(|l| l.starts_with(case)).collect::<Vec<_>>().join("\n"));
    }
}

/// One case, in a child process (`GDS_CASE` says which; ignored when run directly).
#[test]
#[ignore = "run by the other tests in a child process"]
fn case_in_a_child_process() {
    let Ok(case) = std::env::var("GDS_CASE") else { return };
    if let Some(d) = std::env::var_os("GDS_ADD_DIR") {
        gds::search_also(d);
    }
    match (case.as_str(), Gds::open()) {
        ("missing", Err(e @ CudaError::NoCufile { .. })) => {
            let s = e.to_string();
            assert!(s.contains("tried /nonexistent/libcufile.so.0)"), "only the explicit library is tried: {s}");
            assert!(s.contains("PEERMEM_CUFILE"), "{s}");
        }
        ("path" | "added", Err(CudaError::CufileDriver { call, here })) => {
            // The library loaded: its driver refused to open, in its own words.
            assert!(call.name.starts_with("CU_FILE_"), "cuFile's own name for the error: {call}");
            match Cuda::driver_version() {
                Err(_) => {
                    assert_eq!(call.call, "cuFileDriverOpen", "{call}");
                    assert!(here.contains("libcuda.so.1 not loadable"), "{here}");
                    eprintln!("{case}: cuFile loaded, its driver refused to open without CUDA: {call}{here}");
                }
                // This machine's answer (no nvidia-fs, no P2PDMA support): reported, not a failure.
                Ok(v) => eprintln!("{case}: cuFile loaded; with CUDA {v} its driver refused to open: {call}{here}"),
            }
        }
        ("path" | "added", Ok(g)) => read_into_the_gpu(&case, g),
        (c, r) => panic!("case {c}: unexpected {r:?}"),
    }
    eprintln!("{case}: ok");
}

/// With a GPU and a driver that opened: a file read straight into device memory.
fn read_into_the_gpu(case: &str, g: Gds) {
    eprintln!("{case}: {}", g.info().describe());
    let dev = Cuda::open(0).expect("cuFile opened, so CUDA is here");
    // In the working directory: /tmp may be a tmpfs, which refuses O_DIRECT.
    let dir = tempfile::tempdir_in(".").unwrap();
    let p = dir.path().join("f");
    let data: Vec<u8> = (0..(4 << 20) + 4096).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p);
    let f = match f {
        Ok(f) => Arc::new(f),
        Err(e) => return eprintln!("{case}: O_DIRECT refused on {}: {e}: read skipped", p.display()),
    };
    let vram = dev.allocate(8 << 20).unwrap();
    match g.register(f) {
        Ok(h) => {
            let n = h.read(&vram, 4096, 4096, 4 << 20).unwrap();
            assert_eq!(n, 4 << 20);
            let mut back = vec![0u8; 4 << 20];
            dev.read(&vram, 4096, &mut back).unwrap();
            assert!(back == data[4096..], "{case}: bytes read through cuFile differ");
            eprintln!("{case}: 4 MiB through cuFileRead arrived intact");
        }
        Err(e) => eprintln!("{case}: the temporary file cannot be read through cuFile: {e}"),
    }
}
