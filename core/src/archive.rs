//! Capture archives: a sysroot in one `.tar`, `.tar.gz`, `.tar.bz2` or `.tar.xz` file, which is
//! how bug reports carry captures. `--root FILE` unpacks one into a directory; `capture
//! --archive FILE` writes one.
//!
//! Owns: the format checks (compression by magic bytes, a single top directory), the safety
//! checks made on every member BEFORE anything is written (no absolute paths, no `..`, no member
//! below a symlink member, only files, directories and symlinks), and the size caps. An archive
//! is judged by its headers as it streams: the decompressed tar is never held in memory, a
//! member is refused from its header before its data is read, and what is read at all is bounded
//! by the caps. So the archive is read twice: once to check every member, once to write them.
//! Must not: interpret the sysroot (the topology reader does, confined to the root).

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, Read, Seek, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

/// The most bytes an archive may unpack to.
pub const MAX_UNPACKED: u64 = 512 << 20;
/// The most members an archive may hold.
pub const MAX_MEMBERS: usize = 200_000;
/// The largest member file.
pub const MAX_MEMBER: u64 = 64 << 20;
/// The largest extension header (a GNU long name or link, a pax header): names are at most a few
/// KiB (`PATH_MAX` is 4096).
pub const MAX_EXTENSION: u64 = 64 << 10;
/// The most memory the xz decoder may take, in KiB: its dictionary, which the stream's header
/// declares (`xz -9` needs 64 MiB); a stream that declares more is refused before it is decoded.
pub const MAX_XZ_MEMORY_KIB: u32 = 96 << 10;

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
    /// The xz stream declares a dictionary larger than [`MAX_XZ_MEMORY_KIB`] allows.
    #[error("{archive}: the xz stream needs more than {limit_kib} KiB of decoder memory: refusing it")]
    XzMemory { archive: PathBuf, limit_kib: u32 },
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

    fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
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

/// The decompressed stream of `r` (compression sniffed from its first bytes). Decoding happens
/// as the stream is read; an xz stream that declares more than [`MAX_XZ_MEMORY_KIB`] of
/// dictionary fails on its first read.
fn decoder<'r>(archive: &Path, mut r: impl BufRead + 'r) -> Result<(Compression, Box<dyn Read + 'r>), ArchiveError> {
    let head = r.fill_buf().map_err(|source| ArchiveError::Io { path: archive.to_path_buf(), source })?;
    let c = Compression::sniff(head);
    let d: Box<dyn Read> = match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new_mem_limit(r, true, MAX_XZ_MEMORY_KIB)),
    };
    Ok((c, d))
}

/// One member, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Member {
    Dir(PathBuf),
    File(PathBuf, u64),
    Link(PathBuf, PathBuf),
}

impl Member {
    fn path(&self) -> &Path {
        match self {
            Member::Dir(p) | Member::File(p, _) | Member::Link(p, _) => p,
        }
    }
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

/// What extension headers (GNU long name or link, pax) said about the member that follows them.
#[derive(Debug, Default)]
struct Extension {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
}

/// The checks made on each member from its header, in archive order, and what they keep: the
/// symlink members, the top directory, the running totals.
struct Checker<'a> {
    archive: &'a Path,
    links: HashSet<PathBuf>,
    /// The one top directory (a name kept as bytes: it need not be UTF-8).
    top: Option<PathBuf>,
    total: u64,
    members: usize,
    pending: Extension,
}

impl<'a> Checker<'a> {
    fn new(archive: &'a Path) -> Checker<'a> {
        Checker { archive, links: HashSet::new(), top: None, total: 0, members: 0, pending: Extension::default() }
    }

    fn format(&self, why: String) -> ArchiveError {
        ArchiveError::Format { archive: self.archive.to_path_buf(), why }
    }

    fn too_large(&self, limit: u64, what: &'static str) -> ArchiveError {
        ArchiveError::TooLarge { archive: self.archive.to_path_buf(), limit, what }
    }

    fn unsafe_(&self, member: &Path, why: &'static str) -> ArchiveError {
        ArchiveError::Unsafe { archive: self.archive.to_path_buf(), member: member.display().to_string(), why }
    }

    /// Checks one raw entry from its header, before its data is read. An extension header is
    /// read (within [`MAX_EXTENSION`]) and kept for the member it describes; it, and a member
    /// whose name is empty (`./`), give `None`.
    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<Option<Member>, ArchiveError> {
        let h = e.header();
        let ty = h.entry_type();
        let size = h.entry_size().map_err(|e| self.format(format!("bad size: {e}")))?;
        if ty.is_gnu_longname() || ty.is_gnu_longlink() || ty.is_pax_local_extensions() {
            self.extension(ty, size, e)?;
            return Ok(None);
        }
        let ext = std::mem::take(&mut self.pending);
        let raw = PathBuf::from(std::ffi::OsString::from_vec(ext.name.unwrap_or_else(|| h.path_bytes().into_owned())));
        if ext.size.is_some_and(|s| s != size) {
            return Err(self.unsafe_(&raw, "its pax size disagrees with its header's"));
        }
        self.members += 1;
        if self.members > MAX_MEMBERS {
            return Err(self.too_large(MAX_MEMBERS as u64, "members"));
        }
        if size > MAX_MEMBER {
            return Err(self.too_large(MAX_MEMBER, "bytes in one member"));
        }
        self.total += size;
        if self.total > MAX_UNPACKED {
            return Err(self.too_large(MAX_UNPACKED, "bytes"));
        }
        let clean = clean_member(&raw).map_err(|why| self.unsafe_(&raw, why))?;
        if clean.as_os_str().is_empty() {
            return Ok(None);
        }
        if clean.ancestors().skip(1).any(|a| self.links.contains(a)) {
            return Err(self.unsafe_(&raw, "lies below a symlink member"));
        }
        self.check_top(&clean)?;
        Ok(Some(if ty.is_dir() {
            Member::Dir(clean)
        } else if ty.is_file() {
            Member::File(clean, size)
        } else if ty.is_symlink() {
            let target = ext.link.or_else(|| h.link_name_bytes().map(|l| l.into_owned()));
            let target =
                target.filter(|t| !t.is_empty()).ok_or_else(|| self.unsafe_(&raw, "symlink without a target"))?;
            self.links.insert(clean.clone());
            Member::Link(clean, PathBuf::from(std::ffi::OsString::from_vec(target)))
        } else {
            return Err(
                self.unsafe_(&raw, "not a file, directory or symlink (hard links, devices and FIFOs are refused)")
            );
        }))
    }

    /// Every member lies below one top directory.
    fn check_top(&mut self, clean: &Path) -> Result<(), ArchiveError> {
        let first = clean.components().next().map(|c| PathBuf::from(c.as_os_str())).unwrap_or_default();
        match &self.top {
            None => self.top = Some(first),
            Some(t) if *t != first => {
                return Err(self.format(format!(
                    "more than one top directory ({t:?} and {first:?}): a capture archive holds one sysroot directory"
                )))
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads an extension header of `size` bytes and keeps what it says for the next member.
    fn extension(&mut self, ty: tar::EntryType, size: u64, data: &mut impl Read) -> Result<(), ArchiveError> {
        if size > MAX_EXTENSION {
            return Err(self.too_large(MAX_EXTENSION, "bytes in one extension header"));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        data.take(size).read_to_end(&mut bytes).map_err(|e| self.format(format!("extension header: {e}")))?;
        let twice = |this: &Self| this.format("two extension headers of one kind for one member".into());
        if ty.is_pax_local_extensions() {
            for ext in tar::PaxExtensions::new(&bytes) {
                let ext = ext.map_err(|e| self.format(format!("bad pax header: {e}")))?;
                let slot = match ext.key_bytes() {
                    b"path" => &mut self.pending.name,
                    b"linkpath" => &mut self.pending.link,
                    b"size" => {
                        let s = ext.value().ok().and_then(|v| v.parse().ok());
                        self.pending.size = Some(s.ok_or_else(|| self.format("bad pax size".into()))?);
                        continue;
                    }
                    _ => continue,
                };
                if slot.replace(ext.value_bytes().to_vec()).is_some() {
                    return Err(twice(self));
                }
            }
            return Ok(());
        }
        // GNU long names end in NULs.
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        bytes.truncate(end);
        let slot = if ty.is_gnu_longname() { &mut self.pending.name } else { &mut self.pending.link };
        if slot.replace(bytes).is_some() {
            return Err(twice(self));
        }
        Ok(())
    }

    /// The checks that need every member: one top directory that is a directory.
    fn finish(self, members: &[Member]) -> Result<PathBuf, ArchiveError> {
        if self.pending.name.is_some() || self.pending.link.is_some() || self.pending.size.is_some() {
            return Err(self.format("an extension header describes no member".into()));
        }
        let top = self.top.clone().ok_or_else(|| self.format("empty archive".into()))?;
        if members
            .iter()
            .any(|m| matches!(m, Member::File(..) | Member::Link(..)) && m.path().components().count() == 1)
        {
            return Err(self.format(format!("top-level member {top:?} is not a directory")));
        }
        Ok(top)
    }
}

/// Walks the tar stream of `input` (compressed or not), checking every member from its header
/// before its data is read, and hands each checked member with its data to `each` (data `each`
/// leaves unread is skipped). Returns the members, in order.
fn walk(
    archive: &Path,
    input: impl BufRead,
    mut each: impl FnMut(usize, &Member, &mut dyn Read) -> Result<(), ArchiveError>,
) -> Result<(Vec<Member>, PathBuf), ArchiveError> {
    let (comp, stream) = decoder(archive, input)?;
    let bad = |e: io::Error| match (comp, e.kind()) {
        (Compression::Xz, io::ErrorKind::OutOfMemory) => {
            ArchiveError::XzMemory { archive: archive.to_path_buf(), limit_kib: MAX_XZ_MEMORY_KIB }
        }
        _ => ArchiveError::Format { archive: archive.to_path_buf(), why: format!("{}: {e}", comp.name()) },
    };
    // Every tar header (ustar, GNU, pax) carries "ustar" at offset 257: anything else is not a
    // capture archive, said before the tar reader reports a checksum.
    let mut first = Vec::with_capacity(512);
    let mut stream = stream;
    (&mut stream).take(512).read_to_end(&mut first).map_err(bad)?;
    if first.get(257..262) != Some(b"ustar".as_slice()) {
        return Err(ArchiveError::Format {
            archive: archive.to_path_buf(),
            why: "not a capture archive (a .tar, optionally gzip, bzip2 or xz compressed) nor a directory".into(),
        });
    }
    let mut ar = tar::Archive::new(io::Cursor::new(first).chain(stream));
    let mut check = Checker::new(archive);
    let mut members = Vec::new();
    // Raw entries: extension headers come to the checker, which caps them, instead of being read
    // whole by the tar reader.
    for e in ar.entries().map_err(bad)?.raw(true) {
        let mut e = e.map_err(|e| check.format(format!("bad tar member: {e}")))?;
        if let Some(m) = check.entry(&mut e)? {
            each(members.len(), &m, &mut e)?;
            members.push(m);
        }
    }
    let top = check.finish(&members)?;
    Ok((members, top))
}

/// Checks every member of the archive read from `input` (`archive` names it in errors) without
/// writing anything; returns them and the single top directory.
pub(crate) fn check_members(archive: &Path, input: impl BufRead) -> Result<(Vec<Member>, PathBuf), ArchiveError> {
    walk(archive, input, |_, _, _| Ok(()))
}

/// Unpacks the capture archive `archive` into the existing empty directory `into` and returns
/// the sysroot directory (its single top directory). Every member is checked before anything
/// is written.
pub fn unpack(archive: &Path, into: &Path) -> Result<PathBuf, ArchiveError> {
    let io = |source| ArchiveError::Io { path: archive.to_path_buf(), source };
    let mut f = fs::File::open(archive).map_err(io)?;
    if !f.metadata().map_err(io)?.is_file() {
        return Err(ArchiveError::Format { archive: archive.to_path_buf(), why: "not a regular file".into() });
    }
    let (checked, top) = check_members(archive, io::BufReader::new(&f))?;
    f.rewind().map_err(io)?;
    // The second pass reads the same open file: each member must be the one checked.
    let (written, _) = walk(archive, io::BufReader::new(&f), |i, m, data| {
        if checked.get(i) != Some(m) {
            return Err(ArchiveError::Format {
                archive: archive.to_path_buf(),
                why: format!("member {} changed while the archive was unpacked", m.path().display()),
            });
        }
        write_member(into, m, data)
    })?;
    if written.len() != checked.len() {
        return Err(ArchiveError::Format {
            archive: archive.to_path_buf(),
            why: "the archive changed while it was unpacked".into(),
        });
    }
    Ok(into.join(top))
}

/// Writes one checked member below `into`.
fn write_member(into: &Path, m: &Member, data: &mut dyn Read) -> Result<(), ArchiveError> {
    let wio = |p: &Path, source| ArchiveError::Io { path: p.to_path_buf(), source };
    let to = into.join(m.path());
    if let (Some(d), false) = (to.parent(), matches!(m, Member::Dir(_))) {
        fs::create_dir_all(d).map_err(|e| wio(m.path(), e))?;
    }
    match m {
        Member::Dir(p) => fs::create_dir_all(&to).map_err(|e| wio(p, e)),
        Member::File(p, size) => {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&to).map_err(|e| wio(p, e))?;
            let n = io::copy(&mut data.take(*size), &mut f).map_err(|e| wio(p, e))?;
            if n != *size {
                return Err(wio(p, io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(())
        }
        Member::Link(p, target) => std::os::unix::fs::symlink(target, &to).map_err(|e| wio(p, e)),
    }
}

/// The compressing writer of `pack`.
enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Bzip2(bzip2::write::BzEncoder<W>),
    Xz(lzma_rust2::XzWriter<W>),
}

impl<W: Write> Encoder<W> {
    fn new(c: Compression, w: W) -> io::Result<Encoder<W>> {
        Ok(match c {
            Compression::None => Encoder::None(w),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(w, flate2::Compression::default())),
            Compression::Bzip2 => Encoder::Bzip2(bzip2::write::BzEncoder::new(w, bzip2::Compression::default())),
            Compression::Xz => Encoder::Xz(lzma_rust2::XzWriter::new(w, lzma_rust2::XzOptions::with_preset(6))?),
        })
    }

    /// Ends the compressed stream and gives the writer back.
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(z) => z.finish(),
            Encoder::Bzip2(z) => z.finish(),
            Encoder::Xz(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(z) => z.write(buf),
            Encoder::Bzip2(z) => z.write(buf),
            Encoder::Xz(z) => z.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(z) => z.flush(),
            Encoder::Bzip2(z) => z.flush(),
            Encoder::Xz(z) => z.flush(),
        }
    }
}

/// Writes the directory `dir` as the archive `file` (compression from its name), with `top` as
/// the single top directory, streaming into the compressor. Symlinks are stored as symlinks.
/// Refuses to overwrite `file`.
pub fn pack(dir: &Path, file: &Path) -> Result<(), ArchiveError> {
    let (comp, top) = Compression::from_name(file).ok_or_else(|| ArchiveError::Format {
        archive: file.to_path_buf(),
        why: "name must end in .tar, .tar.gz, .tgz, .tar.bz2, .tbz2, .tar.xz or .txz".into(),
    })?;
    let wio = |source| ArchiveError::Io { path: file.to_path_buf(), source };
    let out = fs::OpenOptions::new().write(true).create_new(true).open(file).map_err(wio)?;
    let mut b = tar::Builder::new(Encoder::new(comp, io::BufWriter::new(out)).map_err(wio)?);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    b.append_dir_all(&top, dir).map_err(wio)?;
    let mut out = b.into_inner().map_err(wio)?.finish().map_err(wio)?;
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
    fn a_top_directory_whose_name_is_not_utf8_is_the_one_returned() {
        use std::os::unix::ffi::OsStrExt;
        let mut b = tar::Builder::new(Vec::new());
        for (name, ty, data) in
            [(&b"c\xffp/"[..], tar::EntryType::Directory, &b""[..]), (b"c\xffp/vendor", tar::EntryType::Regular, b"x")]
        {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(ty);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("c.tar");
        fs::write(&a, b.into_inner().unwrap()).unwrap();
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        let root = unpack(&a, &out).unwrap();
        assert_eq!(root, out.join(std::ffi::OsStr::from_bytes(b"c\xffp")));
        assert_eq!(fs::read(root.join("vendor")).unwrap(), b"x");
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

    /// A compressed stream of `zeros` zero bytes, made of one stream of `chunk` zeros repeated:
    /// gzip, bzip2 and xz readers decode concatenated streams as one, so a bomb of GiBs is
    /// built from one small compression.
    fn zeros(c: Compression, zeros: u64, chunk: usize) -> Vec<u8> {
        let one = compress(c, &vec![0u8; chunk]);
        assert_eq!(zeros % chunk as u64, 0);
        one.repeat((zeros / chunk as u64) as usize)
    }

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut e = Encoder::new(c, Vec::new()).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A capture archive `cap/` whose member `cap/zeros` (of type `ty`) declares and holds
    /// 2 GiB of zeros, compressed with `c`, in `dir`.
    fn bomb(dir: &Path, c: Compression, ty: tar::EntryType) -> PathBuf {
        const SIZE: u64 = 2 << 30;
        let mut head = Vec::new();
        for (name, ty, size) in [("cap/", tar::EntryType::Directory, 0), ("cap/zeros", ty, SIZE)] {
            let mut h = tar::Header::new_gnu();
            h.set_path(name).unwrap();
            h.set_entry_type(ty);
            h.set_size(size);
            h.set_mode(0o644);
            h.set_cksum();
            head.extend_from_slice(h.as_bytes());
        }
        let mut bytes = compress(c, &head);
        bytes.extend(zeros(c, SIZE, 1 << 20));
        // The end-of-archive blocks.
        bytes.extend(compress(c, &[0u8; 1024]));
        let name = match c {
            Compression::Gzip => "bomb.tar.gz",
            Compression::Bzip2 => "bomb.tar.bz2",
            Compression::Xz => "bomb.tar.xz",
            Compression::None => "bomb.tar",
        };
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    /// Counts the bytes read from the archive file.
    struct Counting<R>(R, std::rc::Rc<std::cell::Cell<u64>>);

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1.set(self.1.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn a_member_declaring_gibs_is_refused_from_its_header_before_its_data_is_decoded() {
        let d = tempfile::tempdir().unwrap();
        for c in [Compression::Gzip, Compression::Bzip2, Compression::Xz] {
            let a = bomb(d.path(), c, tar::EntryType::Regular);
            let out = d.path().join(format!("out-{}", c.name()));
            fs::create_dir(&out).unwrap();
            let e = unpack(&a, &out).unwrap_err();
            assert!(matches!(e, ArchiveError::TooLarge { limit: MAX_MEMBER, .. }), "{}: {e}", c.name());
            assert!(e.to_string().contains("bytes in one member"), "{e}");
            assert_eq!(fs::read_dir(&out).unwrap().count(), 0, "{}: something was written", c.name());
            // Judged by the header: only the start of the compressed file was read.
            let read = std::rc::Rc::new(std::cell::Cell::new(0));
            let f = Counting(fs::File::open(&a).unwrap(), read.clone());
            assert!(check_members(&a, io::BufReader::with_capacity(1024, f)).is_err());
            let len = fs::metadata(&a).unwrap().len();
            assert!(read.get() < len / 8, "{}: read {} of {len} bytes", c.name(), read.get());
        }
    }

    #[test]
    fn an_extension_header_declaring_gibs_is_refused_before_it_is_read() {
        let d = tempfile::tempdir().unwrap();
        for ty in [tar::EntryType::GNULongName, tar::EntryType::XHeader] {
            let a = bomb(d.path(), Compression::Xz, ty);
            let e = unpack(&a, d.path()).unwrap_err();
            assert!(matches!(e, ArchiveError::TooLarge { limit: MAX_EXTENSION, .. }), "{ty:?}: {e}");
            fs::remove_file(a).unwrap();
        }
    }

    /// CRC-32 (IEEE), as xz's headers carry it.
    fn crc32(data: &[u8]) -> u32 {
        !data
            .iter()
            .fold(!0u32, |c, &b| (0..8).fold(c ^ b as u32, |c, _| (c >> 1) ^ (0xedb8_8320 & (c & 1).wrapping_neg())))
    }

    #[test]
    fn an_xz_stream_declaring_a_dictionary_past_the_cap_is_refused_before_decoding() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("sys")).unwrap();
        let a = d.path().join("c.tar.xz");
        pack(&src, &a).unwrap();
        // The first block header follows the 12-byte stream header; its LZMA2 filter flags are
        // the filter ID 0x21, one property byte, and the dictionary size code (40: 4 GiB).
        let mut x = fs::read(&a).unwrap();
        let size = (x[12] as usize + 1) * 4;
        let h = &mut x[12..12 + size];
        let at = h.windows(2).position(|w| w == [0x21, 0x01]).unwrap() + 2;
        h[at] = 40;
        let crc = crc32(&h[..size - 4]);
        h[size - 4..].copy_from_slice(&crc.to_le_bytes());
        fs::write(&a, x).unwrap();
        let e = unpack(&a, d.path()).unwrap_err();
        assert!(matches!(e, ArchiveError::XzMemory { limit_kib: MAX_XZ_MEMORY_KIB, .. }), "{e}");
    }

    #[test]
    fn long_names_and_pax_paths_are_checked_like_any_name() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let deep = src.join("a".repeat(120)).join("b".repeat(120));
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("vendor"), "0x1b36\n").unwrap();
        let a = d.path().join("long.tar.gz");
        pack(&src, &a).unwrap();
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        let root = unpack(&a, &out).unwrap();
        let rel = deep.strip_prefix(&src).unwrap();
        assert_eq!(fs::read_to_string(root.join(rel).join("vendor")).unwrap(), "0x1b36\n");
        // A GNU long name that climbs out is refused like a short one.
        let long = format!("cap/{}/../../../evil\0", "x".repeat(200));
        let bad = d.path().join("bad.tar");
        use tar::EntryType as T;
        fs::write(
            &bad,
            tar_with(&[
                ("cap/", T::Directory, b"", None),
                ("././@LongLink", T::GNULongName, long.as_bytes(), None),
                ("cap/short", T::Regular, b"x", None),
            ]),
        )
        .unwrap();
        let out = d.path().join("out2");
        fs::create_dir(&out).unwrap();
        let e = unpack(&bad, &out).unwrap_err().to_string();
        assert!(e.contains("'..'"), "{e}");
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
