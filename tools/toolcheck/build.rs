//! Stops a build that includes peermem-rdma with one line naming what to install when the tools
//! `rdma-mummy-sys` needs to build its verbs bindings are missing: cmake (it builds the vendored
//! rdma-core) and libclang (bindgen loads it). Without this, `rdma-mummy-sys`'s build script
//! fails with cmake's or bindgen's panic buried in pages of build output.
//!
//! Why a crate of its own, that core depends on: cargo orders a build script only after its own
//! build dependencies, never against its package's other dependencies (and `rdma-mummy-sys`
//! declares no `links`), so a build script in peermem-rdma is unordered against
//! `rdma-mummy-sys`'s. Among the jobs that are ready, cargo starts those with the most dependents
//! first: a build script of peermem-rdma has a handful and waits behind the whole dependency
//! tree (by then `rdma-mummy-sys`'s has failed), while this crate, below core, has every unit of
//! the workspace as a dependent, so its script runs first; once it fails, cargo starts no new
//! job. peermem-rdma turns the check on with the `rdma` feature (features are unified over the
//! build), so builds without peermem-rdma (the CLI's, the Python package's) pass at once.
//!
//! The libclang search is clang-sys's (LIBCLANG_PATH, llvm-config, LD_LIBRARY_PATH, then the
//! usual library directories), so it finds what bindgen would find.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    // A passing check needs no rerun (the bindings it guards are built once); a failing one
    // reruns on the next build anyway.
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_RDMA").is_none() {
        return;
    }
    let mut missing = Vec::new();
    if !cmake_runs() {
        missing.push("cmake");
    }
    if !libclang_found() {
        missing.push("libclang");
    }
    if !missing.is_empty() {
        println!(
            "cargo::error=peermem-rdma needs {} to build its verbs bindings (rdma-mummy-sys): apt-get install \
             cmake libclang-dev (or set CMAKE, LIBCLANG_PATH)",
            missing.join(" and ")
        );
    }
}

/// `cmake --version` runs (`CMAKE` names the binary, as for the cmake crate).
fn cmake_runs() -> bool {
    let cmake = env::var_os("CMAKE").unwrap_or_else(|| "cmake".into());
    runs(&cmake, "--version").is_some()
}

/// The standard output of `program arg`, when it runs and succeeds.
fn runs(program: &OsString, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where clang-sys looks for libclang on Linux, after the environment and llvm-config.
const DIRECTORIES: &[&str] = &[
    "/usr/local/llvm*/lib*",
    "/usr/local/lib*/*/*",
    "/usr/local/lib*/*",
    "/usr/local/lib*",
    "/usr/lib*/*/*",
    "/usr/lib*/*",
    "/usr/lib*",
];

fn libclang_found() -> bool {
    let mut dirs = Vec::new();
    if let Some(p) = env::var_os("LIBCLANG_PATH").map(PathBuf::from) {
        if p.is_file() {
            return is_elf(&p);
        }
        dirs.push(p);
    }
    let llvm_config = env::var_os("LLVM_CONFIG_PATH").unwrap_or_else(|| "llvm-config".into());
    if let Some(libdir) = runs(&llvm_config, "--libdir") {
        dirs.push(PathBuf::from(libdir));
    }
    if let Some(ld) = env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(env::split_paths(&ld));
    }
    for pattern in DIRECTORIES {
        dirs.extend(expand(Path::new("/"), pattern.trim_start_matches('/').split('/').collect::<Vec<_>>().as_slice()));
    }
    dirs.iter().any(|d| has_libclang(d))
}

/// The directories below `base` that match the `/`-separated glob `parts` (`*` within a name).
fn expand(base: &Path, parts: &[&str]) -> Vec<PathBuf> {
    let Some((first, rest)) = parts.split_first() else { return vec![base.to_path_buf()] };
    let names: Vec<String> = match first.contains('*') {
        false => vec![first.to_string()],
        true => fs::read_dir(base)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default(),
    };
    names
        .iter()
        .filter(|n| matches(first, n))
        .map(|n| base.join(n))
        .filter(|p| p.is_dir())
        .flat_map(|p| expand(&p, rest))
        .collect()
}

/// `name` matches `pattern`, whose `*`s stand for any run of characters.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.starts_with(head)
                && (0..=name.len() - head.len())
                    .any(|i| name.is_char_boundary(head.len() + i) && matches(tail, &name[head.len() + i..]))
        }
    }
}

/// A libclang shared library in `dir`: `libclang.so`, `libclang-N.so`, or either with a version
/// suffix, that is an ELF file (a hidden or broken one is not).
fn has_libclang(dir: &Path) -> bool {
    let Ok(rd) = fs::read_dir(dir) else { return false };
    rd.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        ["libclang.so", "libclang-*.so", "libclang.so.*", "libclang-*.so.*"].iter().any(|p| matches(p, &name))
            && is_elf(&e.path())
    })
}

fn is_elf(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::metadata(p).is_ok_and(|m| m.is_file())
        && fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && magic == *b"\x7fELF"
}
