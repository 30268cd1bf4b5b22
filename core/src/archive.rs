//! Capture archives: a sysroot in one `.tar`, `.tar.gz`, `.tar.bz2` or `.tar.xz` file, which is
//! how bug reports carry captures. `--root FILE` unpacks one into a directory; `capture
//! --archive FILE` writes one.
//!
//! Owns: the format checks (compression by magic bytes, a single top directory), the safety
//! checks made on every member BEFORE anything is written (no absolute paths, no `..`, no member
//! below a symlink member, only files, directories and symlinks), and the size caps. Must not:
//! interpret the sysroot (the topology reader does, confined to the root).

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// The most bytes an archive may unpack to.
pub const MAX_UNPACKED: u64 = 512 << 20;
/// The most members an archive may hold.
pub const MAX_MEMBERS: usize = 200_000;
/// The largest member file.
pub const MAX_MEMBER: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{archive}: member {member:?}: {why}: refusing the archive (nothing was written)")]
    Unsafe { archive: PathBuf, member: String, why: &'static str },
    #[error("{archive}: {why}")]
    Format { archive: PathBuf, why: String },
    #[error("{archive}: unpacks to more than {limit} {what}: refusing it")]
    TooLarge { archive: PathBuf, limit: u64, what: &'static str },
}

/// Compression of an archive, from its first bytes (or, when writing, its file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
}

impl Compression {
    fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Compression::Xz
        } else {
            Compression::None
        }
    }

    /// From a file name: `.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`/`.tbz2`, `.tar.xz`/`.txz`.
    pub fn from_name(name: &Path) -> Option<(Compression, String)> {
        let n = name.file_name()?.to_str()?;
        for (ext, c) in [
            (".tar.gz", Compression::Gzip),
            (".tgz", Compression::Gzip),
            (".tar.bz2", Compression::Bzip2),
            (".tbz2", Compression::Bzip2),
            (".tar.xz", Compression::Xz),
            (".txz", Compression::Xz),
            (".tar", Compression::None),
        ] {
            if let Some(stem) = n.strip_suffix(ext).filter(|s| !s.is_empty()) {
                return Some((c, stem.to_string()));
            }
        }
        None
    }
}

/// A writer that fails once more than `limit` bytes were written.
struct Capped<'a> {
    out: &'a mut Vec<u8>,
    limit: u64,
}

impl Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() as u64 + buf.len() as u64 > self.limit {
            return Err(io::Error::other("size cap reached"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads and decompresses `archive` into memory, capped at [`MAX_UNPACKED`] plus tar overhead.
fn decompress(archive: &Path) -> Result<Vec<u8>, ArchiveError> {
    let io = |source| ArchiveError::Io { path: archive.to_path_buf(), source };
    let f = fs::File::open(archive).map_err(io)?;
    let m = f.metadata().map_err(io)?;
    if !m.is_file() {
        return Err(ArchiveError::Format { archive: archive.to_path_buf(), why: "not a regular file".into() });
    }
    decompress_from(archive, io::BufReader::new(f))
}

/// Decompresses the archive read from `r` (`archive` names it in errors), capped like
/// [`decompress`].
pub(crate) fn decompress_from(archive: &Path, mut r: impl io::BufRead) -> Result<Vec<u8>, ArchiveError> {
    let io = |source| ArchiveError::Io { path: archive.to_path_buf(), source };
    let head = r.fill_buf().map_err(io)?.to_vec();
    let limit = MAX_UNPACKED + MAX_UNPACKED / 8;
    let mut out = Vec::new();
    let too_large = || ArchiveError::TooLarge { archive: archive.to_path_buf(), limit: MAX_UNPACKED, what: "bytes" };
    let bad =
        |what: &str, e: io::Error| ArchiveError::Format { archive: archive.to_path_buf(), why: format!("{what}: {e}") };
    match Compression::sniff(&head) {
        Compression::None => {
            r.take(limit + 1).read_to_end(&mut out).map_err(io)?;
        }
        Compression::Gzip => {
            flate2::bufread::MultiGzDecoder::new(r)
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad("gzip", e))?;
        }
        Compression::Bzip2 => {
            bzip2::bufread::MultiBzDecoder::new(r)
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad("bzip2", e))?;
        }
        Compression::Xz => {
            let mut w = Capped { out: &mut out, limit };
            // lzma-rs 0.3 overflows an u32 on a footer whose backward size is 0xffffffff (a
            // panic where overflow checks are on, found by the archive fuzz target): a panic of
            // the decoder is a malformed archive, not the end of the process.
            let decoded =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lzma_rs::xz_decompress(&mut r, &mut w)))
                    .map_err(|_| ArchiveError::Format {
                        archive: archive.to_path_buf(),
                        why: "xz: malformed stream (the decoder gave up)".into(),
                    })?;
            match decoded {
                Ok(()) => {}
                Err(lzma_rs::error::Error::IoError(e)) if e.to_string().contains("size cap") => return Err(too_large()),
                Err(e) => return Err(ArchiveError::Format { archive: archive.to_path_buf(), why: format!("xz: {e}") }),
            }
        }
    }
    if out.len() as u64 > limit {
        return Err(too_large());
    }
    // Every tar header (ustar, GNU, pax) carries "ustar" at offset 257.
    if out.get(257..262) != Some(b"ustar".as_slice()) {
        return Err(ArchiveError::Format {
            archive: archive.to_path_buf(),
            why: "not a capture archive (a .tar, optionally gzip, bzip2 or xz compressed) nor a directory".into(),
        });
    }
    Ok(out)
}

/// One member, checked.
pub(crate) enum Member {
    Dir(PathBuf),
    File(PathBuf, u64),
    Link(PathBuf, PathBuf),
}

/// A member name without `.`; `..` and absolute names are refused.
fn clean_member(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut clean = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' in the path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(clean)
}

/// Checks every member of the tar in `bytes`; returns them and the single top directory.
pub(crate) fn check_members(archive: &Path, bytes: &[u8]) -> Result<(Vec<Member>, String), ArchiveError> {
    let unsafe_ = |member: &Path, why| ArchiveError::Unsafe {
        archive: archive.to_path_buf(),
        member: member.display().to_string(),
        why,
    };
    let fmt = |why: String| ArchiveError::Format { archive: archive.to_path_buf(), why };
    let mut ar = tar::Archive::new(bytes);
    let mut members = Vec::new();
    let mut links: HashSet<PathBuf> = HashSet::new();
    let mut top: Option<String> = None;
    let mut total = 0u64;
    for e in ar.entries().map_err(|e| fmt(format!("not a tar archive: {e}")))? {
        let e = e.map_err(|e| fmt(format!("bad tar member: {e}")))?;
        let raw = e.path().map_err(|e| fmt(format!("bad member name: {e}")))?.into_owned();
        let clean = clean_member(&raw).map_err(|why| unsafe_(&raw, why))?;
        if clean.as_os_str().is_empty() {
            continue;
        }
        if clean.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(unsafe_(&raw, "lies below a symlink member"));
        }
        let first = clean.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        match &top {
            None => top = Some(first),
            Some(t) if *t != first => {
                return Err(fmt(format!(
                    "more than one top directory ({t:?} and {first:?}): a capture archive holds one sysroot directory"
                )))
            }
            _ => {}
        }
        if members.len() >= MAX_MEMBERS {
            return Err(ArchiveError::TooLarge {
                archive: archive.to_path_buf(),
                limit: MAX_MEMBERS as u64,
                what: "members",
            });
        }
        let ty = e.header().entry_type();
        members.push(if ty.is_dir() {
            Member::Dir(clean)
        } else if ty.is_file() {
            let size = e.header().size().map_err(|e| fmt(format!("bad size: {e}")))?;
            if size > MAX_MEMBER {
                return Err(ArchiveError::TooLarge {
                    archive: archive.to_path_buf(),
                    limit: MAX_MEMBER,
                    what: "bytes in one member",
                });
            }
            total += size;
            if total > MAX_UNPACKED {
                return Err(ArchiveError::TooLarge {
                    archive: archive.to_path_buf(),
                    limit: MAX_UNPACKED,
                    what: "bytes",
                });
            }
            Member::File(clean, size)
        } else if ty.is_symlink() {
            let target =
                e.link_name().ok().flatten().ok_or_else(|| unsafe_(&raw, "symlink without a target"))?.into_owned();
            links.insert(clean.clone());
            Member::Link(clean, target)
        } else {
            return Err(unsafe_(&raw, "not a file, directory or symlink (hard links, devices and FIFOs are refused)"));
        });
    }
    let top = top.ok_or_else(|| fmt("empty archive".into()))?;
    if members.iter().any(|m| matches!(m, Member::File(p, _) | Member::Link(p, _) if p.components().count() == 1)) {
        return Err(fmt(format!("top-level member {top:?} is not a directory")));
    }
    Ok((members, top))
}

/// Unpacks the capture archive `archive` into the existing empty directory `into` and returns
/// the sysroot directory (its single top directory). Every member is checked before anything
/// is written.
pub fn unpack(archive: &Path, into: &Path) -> Result<PathBuf, ArchiveError> {
    let bytes = decompress(archive)?;
    let (members, top) = check_members(archive, &bytes)?;
    let wio = |p: &Path, source| ArchiveError::Io { path: p.to_path_buf(), source };
    let mut ar = tar::Archive::new(&bytes[..]);
    let mut entries = ar.entries().map_err(|e| wio(archive, e))?;
    for m in &members {
        // The second pass sees the same members in the same order; skip the empty names.
        let mut e = loop {
            let e = entries
                .next()
                .ok_or_else(|| wio(archive, io::ErrorKind::UnexpectedEof.into()))?
                .map_err(|e| wio(archive, e))?;
            if e.path().map(|p| p.components().any(|c| matches!(c, Component::Normal(_)))).unwrap_or(false) {
                break e;
            }
        };
        match m {
            Member::Dir(p) => fs::create_dir_all(into.join(p)).map_err(|e| wio(p, e))?,
            Member::File(p, size) => {
                let to = into.join(p);
                if let Some(d) = to.parent() {
                    fs::create_dir_all(d).map_err(|e| wio(p, e))?;
                }
                let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&to).map_err(|e| wio(p, e))?;
                let n = io::copy(&mut (&mut e).take(*size), &mut f).map_err(|e| wio(p, e))?;
                if n != *size {
                    return Err(wio(p, io::ErrorKind::UnexpectedEof.into()));
                }
            }
            Member::Link(p, target) => {
                let to = into.join(p);
                if let Some(d) = to.parent() {
                    fs::create_dir_all(d).map_err(|e| wio(p, e))?;
                }
                std::os::unix::fs::symlink(target, &to).map_err(|e| wio(p, e))?;
            }
        }
    }
    Ok(into.join(top))
}

/// Writes the directory `dir` as the archive `file` (compression from its name), with `top` as
/// the single top directory. Symlinks are stored as symlinks. Refuses to overwrite `file`.
pub fn pack(dir: &Path, file: &Path) -> Result<(), ArchiveError> {
    let (comp, top) = Compression::from_name(file).ok_or_else(|| ArchiveError::Format {
        archive: file.to_path_buf(),
        why: "name must end in .tar, .tar.gz, .tgz, .tar.bz2, .tbz2, .tar.xz or .txz".into(),
    })?;
    let wio = |source| ArchiveError::Io { path: file.to_path_buf(), source };
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    b.append_dir_all(&top, dir).map_err(wio)?;
    let tar = b.into_inner().map_err(wio)?;
    let out = fs::OpenOptions::new().write(true).create_new(true).open(file).map_err(wio)?;
    let mut out = io::BufWriter::new(out);
    match comp {
        Compression::None => out.write_all(&tar).map_err(wio)?,
        Compression::Gzip => {
            let mut z = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
            z.write_all(&tar).map_err(wio)?;
            z.finish().map_err(wio)?;
        }
        Compression::Bzip2 => {
            let mut z = bzip2::write::BzEncoder::new(&mut out, bzip2::Compression::default());
            z.write_all(&tar).map_err(wio)?;
            z.finish().map_err(wio)?;
        }
        Compression::Xz => lzma_rs::xz_compress(&mut &tar[..], &mut out).map_err(wio)?,
    }
    out.flush().map_err(wio)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, type, content, link target.
    type M<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>);

    fn tar_with(members: &[M<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, ty, data, link) in members {
            let mut h = tar::Header::new_gnu();
            // Write the raw name so that hostile names reach the reader unchanged.
            let raw = name.as_bytes();
            h.as_old_mut().name[..raw.len()].copy_from_slice(raw);
            h.set_entry_type(*ty);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn hostile_members_are_refused_before_anything_is_written() {
        use tar::EntryType as T;
        let cases: &[(&[M<'_>], &str)] = &[
            (&[("cap/", T::Directory, b"", None), ("cap/../../evil", T::Regular, b"x", None)], "'..'"),
            (&[("/etc/evil", T::Regular, b"x", None)], "absolute"),
            (
                &[
                    ("cap/", T::Directory, b"", None),
                    ("cap/l", T::Symlink, b"", Some("/etc")),
                    ("cap/l/passwd", T::Regular, b"x", None),
                ],
                "below a symlink",
            ),
            (&[("cap/", T::Directory, b"", None), ("cap/fifo", T::Fifo, b"", None)], "FIFOs"),
            (&[("cap/", T::Directory, b"", None), ("cap/h", T::Link, b"", Some("cap/x"))], "hard links"),
            (&[("a/", T::Directory, b"", None), ("b/", T::Directory, b"", None)], "more than one top directory"),
        ];
        for (members, why) in cases {
            let d = tempfile::tempdir().unwrap();
            let a = d.path().join("bad.tar");
            fs::write(&a, tar_with(members)).unwrap();
            let out = d.path().join("out");
            fs::create_dir(&out).unwrap();
            let e = unpack(&a, &out).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("bad.tar"), "{why}: {e}");
            assert_eq!(fs::read_dir(&out).unwrap().count(), 0, "{why}: something was written");
        }
    }

    #[test]
    fn every_compression_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("sys/devices/pci0000:00/0000:00:01.0")).unwrap();
        fs::write(src.join("sys/devices/pci0000:00/0000:00:01.0/vendor"), "0x1b36\n").unwrap();
        fs::create_dir_all(src.join("sys/bus/pci/devices")).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:00/0000:00:01.0",
            src.join("sys/bus/pci/devices/0000:00:01.0"),
        )
        .unwrap();
        for name in ["c.tar", "c.tar.gz", "c.tar.bz2", "c.tar.xz"] {
            let a = d.path().join(name);
            pack(&src, &a).unwrap();
            assert!(pack(&src, &a).is_err(), "{name}: must not overwrite");
            let out = d.path().join(format!("out-{name}"));
            fs::create_dir(&out).unwrap();
            let root = unpack(&a, &out).unwrap();
            assert_eq!(root, out.join("c"));
            assert_eq!(fs::read_to_string(root.join("sys/bus/pci/devices/0000:00:01.0/vendor")).unwrap(), "0x1b36\n");
        }
        assert!(pack(&src, &d.path().join("c.zip")).unwrap_err().to_string().contains(".tar.gz"));
    }

    #[test]
    fn garbage_is_a_format_error() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("x.tar.gz");
        fs::write(&a, [0x1f, 0x8b, 0, 1, 2, 3]).unwrap();
        let e = unpack(&a, d.path()).unwrap_err().to_string();
        assert!(e.contains("x.tar.gz") && e.contains("gzip"), "{e}");
        fs::write(&a, b"hello").unwrap();
        assert!(unpack(&a, d.path()).is_err());
    }

    #[test]
    fn an_xz_stream_that_trips_the_decoder_is_a_format_error() {
        // Found by the archive fuzz target: the decoder overflows on this footer.
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("x.tar.xz");
        fs::write(&a, include_bytes!("../../fuzz/corpus/archive/crash-xz-backward-size-overflow")).unwrap();
        let e = unpack(&a, d.path()).unwrap_err();
        assert!(matches!(e, ArchiveError::Format { .. }) && e.to_string().contains("xz"), "{e}");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "nothing was written");
    }
}
