//! Reading a sysroot: a directory laid out like `/` (live, or captured with `peermem capture`).
//!
//! Owns: every file read under the root, confined to it (`openat2` with `RESOLVE_IN_ROOT`: `..`
//! and absolute symlinks stay inside), type-checked (only regular files are read; a FIFO or a
//! device node is an error, never a hang) and size-capped; lexical symlink resolution that never
//! escapes the root; attribute parsing with errors that name the file and what was wrong.
//! Must not: interpret what the attributes mean (that is `pci::topology` and `platform`).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// The most an attribute file may hold (sysfs attributes are at most a page; `config` 4096).
pub const MAX_ATTR: usize = 1 << 20;
/// The most a large text file (`proc/cpuinfo` of a many-core machine) may hold.
pub const MAX_TEXT: usize = 64 << 20;
/// The most entries one directory may list.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// The most entries a [`SubDir`] keeps in memory to answer lookups without a system call; a
/// bigger directory is read the way the root reads it, name by name.
pub const MAX_LISTED: usize = 4096;
/// The most entries a listing is kept for after its [`SubDir`] is gone (a PCI function's
/// directory holds a few dozen), so that what is kept grows with the number of directories only.
pub const MAX_KEPT: usize = 256;

/// An error reading the sysroot. Each names the file (relative to the root) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum SysrootError {
    #[error("sysroot {root}: {why}")]
    BadRoot { root: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: malformed: {why} (content {content:?})")]
    Malformed { path: PathBuf, why: String, content: String },
    #[error("{path}: symlink target {target} escapes the sysroot")]
    Escapes { path: PathBuf, target: PathBuf },
    #[error("{path}: not a regular file ({kind}): refusing to read it")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: more than {max} bytes: refusing to read it")]
    TooLarge { path: PathBuf, max: usize },
}

impl SysrootError {
    /// True when the file is simply absent or not readable by this user: a fact that becomes
    /// unknown, not a broken sysroot.
    pub fn is_unreadable(&self) -> bool {
        matches!(self, SysrootError::Io { source, .. } if matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied))
    }
}

/// A root directory to read sysfs/procfs from.
#[derive(Debug, Clone)]
pub struct Sysroot {
    root: PathBuf,
    dir: Arc<OwnedFd>,
}

/// One directory entry: its name and whether it is a directory (symlinks are not followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
}

/// How a refusal names what a path holds instead of a regular file.
fn kind_name(t: FileType) -> &'static str {
    match t {
        FileType::Directory => "a directory",
        FileType::Fifo => "a FIFO",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Socket => "a socket",
        _ => "not a file",
    }
}

fn file_type(m: &fs::Metadata) -> FileType {
    use std::os::unix::fs::MetadataExt;
    FileType::from_raw_mode(m.mode())
}

impl Sysroot {
    /// Opens `root`; it must be an existing directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Sysroot, SysrootError> {
        let root = root.into();
        let bad = |why: String| SysrootError::BadRoot { root: root.clone(), why };
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad("not a directory".into())),
            Err(e) => return Err(bad(e.to_string())),
        }
        let dir = rustix::fs::open(&root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| bad(io::Error::from(e).to_string()))?;
        Ok(Sysroot { root, dir: Arc::new(dir) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute host path of `rel` (a root-relative path like `sys/bus/pci/devices`).
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    fn io_err(&self, rel: &Path, e: io::Error) -> SysrootError {
        SysrootError::Io { path: rel.to_path_buf(), source: e }
    }

    /// Opens `rel` inside the root without blocking (a FIFO opens at once) and without leaving
    /// it: symlinks and `..` resolve as if the root were `/`.
    fn open_in_root(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let rel = normalize(rel).unwrap_or_default();
        let rel = if rel.as_os_str().is_empty() { PathBuf::from(".") } else { rel };
        let flags = flags | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(&*self.dir, &rel, flags, Mode::empty(), resolve) {
            Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) if self.root == Path::new("/") => {
                // Kernels before 5.6 (or a seccomp filter) lack openat2; at `/` there is
                // nothing to escape from.
                Ok(rustix::fs::openat(&*self.dir, &rel, flags, Mode::empty())?)
            }
            // No openat2 (a kernel before 5.6, a seccomp filter, valgrind): the same confinement,
            // one component at a time.
            Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) => self.open_walk(&rel, flags),
            r => Ok(r?),
        }
    }

    /// Opens `rel` the way `openat2(RESOLVE_IN_ROOT)` does, by hand: each component is opened
    /// with `O_PATH | O_NOFOLLOW` below the previous one; a symlink's target is spliced into the
    /// path (an absolute one restarts at the root), `..` never climbs above the root, and more
    /// than 40 links is `ELOOP`. Only the last component is opened with `flags` (and
    /// `O_NOFOLLOW`).
    fn open_walk(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        const MAX_LINKS: usize = 40;
        let push = |pending: &mut Vec<std::ffi::OsString>, p: &Path| {
            for c in p.components().rev() {
                match c {
                    Component::Normal(n) => pending.push(n.to_os_string()),
                    Component::ParentDir => pending.push("..".into()),
                    Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                }
            }
        };
        let mut pending = Vec::new();
        push(&mut pending, rel);
        // The directories walked so far below the root (empty: at the root).
        let mut dirs: Vec<OwnedFd> = Vec::new();
        let mut links = 0;
        while let Some(name) = pending.pop() {
            if name == ".." {
                dirs.pop();
                continue;
            }
            let at = dirs.last().unwrap_or(&*self.dir);
            let fd = rustix::fs::openat(at, &name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
            if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == rustix::fs::FileType::Symlink {
                links += 1;
                if links > MAX_LINKS {
                    return Err(rustix::io::Errno::LOOP.into());
                }
                let target = rustix::fs::readlinkat(at, &name, Vec::new())?;
                let target = Path::new(std::ffi::OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    dirs.clear();
                }
                push(&mut pending, target);
                continue;
            }
            if pending.is_empty() {
                return Ok(rustix::fs::openat(at, &name, flags | OFlags::NOFOLLOW, Mode::empty())?);
            }
            dirs.push(fd);
        }
        Ok(rustix::fs::openat(dirs.last().unwrap_or(&*self.dir), ".", flags, Mode::empty())?)
    }

    /// Reads a binary file of at most `max` bytes. `Ok(None)` if it does not exist.
    pub fn read_bytes_opt_max(&self, rel: impl AsRef<Path>, max: usize) -> Result<Option<Vec<u8>>, SysrootError> {
        let rel = rel.as_ref();
        let fd = match self.open_in_root(rel, OFlags::empty()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err(rel, e)),
        };
        read_open(fd, max, &|| rel.to_path_buf()).map(Some)
    }

    /// Opens the directory `rel` once, so that the files in it are read without walking the
    /// path from the root again (see [`SubDir`]).
    pub fn subdir(&self, rel: impl Into<PathBuf>) -> SubDir<'_> {
        let rel = rel.into();
        let fd = self.open_in_root(&rel, OFlags::DIRECTORY).ok();
        SubDir { sys: self, rel, fd, listing: OnceCell::new(), short_is_end: OnceCell::new() }
    }

    /// As [`Sysroot::subdir`], answering from `listing` (what [`SubDir::into_listing`] kept of
    /// the same directory) instead of listing it again.
    pub fn subdir_listed<'s>(&'s self, rel: impl Into<PathBuf>, listing: Option<&'s Listing>) -> SubDir<'s> {
        let sub = self.subdir(rel);
        if let Some(l) = listing {
            let _ = sub.listing.set(Some(Cow::Borrowed(l)));
        }
        sub
    }

    /// Reads a binary file (at most [`MAX_ATTR`] bytes). `Ok(None)` if it does not exist.
    pub fn read_bytes_opt(&self, rel: impl AsRef<Path>) -> Result<Option<Vec<u8>>, SysrootError> {
        self.read_bytes_opt_max(rel, MAX_ATTR)
    }

    pub(crate) fn text(rel: &Path, b: Vec<u8>) -> Result<String, SysrootError> {
        Self::text_of(b, || rel.to_path_buf())
    }

    /// `b` as text, trimmed in place; `rel` names the file when it is not UTF-8.
    fn text_of(b: Vec<u8>, rel: impl FnOnce() -> PathBuf) -> Result<String, SysrootError> {
        match String::from_utf8(b) {
            Ok(mut s) => {
                let t = s.trim_end_matches(['\n', '\0']).trim();
                let (start, len) = (t.as_ptr() as usize - s.as_ptr() as usize, t.len());
                s.truncate(start + len);
                s.drain(..start);
                Ok(s)
            }
            Err(e) => Err(SysrootError::Malformed {
                path: rel(),
                why: "not UTF-8 text".into(),
                content: String::from_utf8_lossy(e.as_bytes()).chars().take(40).collect(),
            }),
        }
    }

    /// Reads a text attribute, trimmed. `Ok(None)` if the file does not exist.
    pub fn read_opt(&self, rel: impl AsRef<Path>) -> Result<Option<String>, SysrootError> {
        let rel = rel.as_ref();
        self.read_bytes_opt(rel)?.map(|b| Self::text(rel, b)).transpose()
    }

    /// Reads a large text file (at most [`MAX_TEXT`] bytes), trimmed. `Ok(None)` if absent.
    pub fn read_text_opt_max(&self, rel: impl AsRef<Path>, max: usize) -> Result<Option<String>, SysrootError> {
        let rel = rel.as_ref();
        self.read_bytes_opt_max(rel, max)?.map(|b| Self::text(rel, b)).transpose()
    }

    /// Reads a free-text attribute (DMI strings, model names) whose bytes firmware chose: bytes
    /// that are not UTF-8 become U+FFFD instead of an error.
    pub fn read_lossy_opt(&self, rel: impl AsRef<Path>) -> Result<Option<String>, SysrootError> {
        Ok(self
            .read_bytes_opt(rel)?
            .map(|b| String::from_utf8_lossy(&b).trim_end_matches(['\n', '\0']).trim().to_string()))
    }

    /// Reads a text attribute that must exist.
    pub fn read(&self, rel: impl AsRef<Path>) -> Result<String, SysrootError> {
        let rel = rel.as_ref();
        self.read_opt(rel)?.ok_or_else(|| self.io_err(rel, io::Error::from(io::ErrorKind::NotFound)))
    }

    /// The entries of a directory, sorted by name, symlinks not followed. `Ok(None)` if it does
    /// not exist.
    pub fn entries(&self, rel: impl AsRef<Path>) -> Result<Option<Vec<DirEntry>>, SysrootError> {
        let rel = rel.as_ref();
        let fd = match self.open_in_root(rel, OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err(rel, e)),
        };
        let mut dir = rustix::fs::Dir::new(fd).map_err(|e| self.io_err(rel, e.into()))?;
        let mut out = Vec::new();
        while let Some(ent) = dir.read() {
            let ent = ent.map_err(|e| self.io_err(rel, e.into()))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(SysrootError::TooLarge { path: rel.to_path_buf(), max: MAX_DIR_ENTRIES });
            }
            let is_dir = match ent.file_type() {
                rustix::fs::FileType::Directory => true,
                rustix::fs::FileType::Unknown => {
                    fs::symlink_metadata(self.path(rel).join(&name)).map(|m| m.is_dir()).unwrap_or(false)
                }
                _ => false,
            };
            out.push(DirEntry { name, is_dir });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(out))
    }

    /// Names of the entries of a directory, sorted. `Ok(None)` if it does not exist.
    pub fn list_dir(&self, rel: impl AsRef<Path>) -> Result<Option<Vec<String>>, SysrootError> {
        Ok(self.entries(rel)?.map(|v| v.into_iter().map(|e| e.name).collect()))
    }

    /// Resolves the symlink at `rel` lexically, relative to its directory, to a root-relative
    /// path. Absolute targets are taken as root-relative (a live `/` and a capture agree).
    /// `Ok(None)` if `rel` does not exist or is not a symlink.
    pub fn resolve_link(&self, rel: impl AsRef<Path>) -> Result<Option<PathBuf>, SysrootError> {
        let rel = rel.as_ref();
        let target = match fs::read_link(self.path(rel)) {
            Ok(t) => t,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::InvalidInput) => return Ok(None),
            Err(e) => return Err(self.io_err(rel, e)),
        };
        resolve_target(rel, target).map(Some)
    }

    /// The last path component of a symlink's target (e.g. a driver name), if the link exists.
    pub fn link_name(&self, rel: impl AsRef<Path>) -> Result<Option<String>, SysrootError> {
        Ok(self.resolve_link(rel)?.and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())))
    }
}

/// Reads an opened file of at most `max` bytes; `rel` names it in errors. Only a regular file is
/// read (a FIFO or device node is refused).
fn read_open(fd: OwnedFd, max: usize, rel: &dyn Fn() -> PathBuf) -> Result<Vec<u8>, SysrootError> {
    use std::io::Read;
    let err = |e: io::Error| SysrootError::Io { path: rel(), source: e };
    let mut f = fs::File::from(fd);
    let m = f.metadata().map_err(err)?;
    if !m.is_file() {
        return Err(SysrootError::NotRegular { path: rel(), kind: kind_name(file_type(&m)) });
    }
    // sysfs attributes report 4096 whatever they hold, so the size only bounds the first read:
    // a first read that returns exactly the reported (non-zero) size within `max` has the whole
    // file, and the read that would confirm the end is skipped.
    let size = usize::try_from(m.len()).unwrap_or(usize::MAX);
    let mut buf = Vec::with_capacity(4096.min(max + 1));
    if size > 0 && size <= max {
        buf.resize(size, 0);
        let n = f.read(&mut buf).map_err(err)?;
        buf.truncate(n);
        if n == size {
            return Ok(buf);
        }
    }
    let done = buf.len() as u64;
    (&mut f).take(max as u64 + 1 - done).read_to_end(&mut buf).map_err(err)?;
    if buf.len() > max {
        return Err(SysrootError::TooLarge { path: rel(), max });
    }
    Ok(buf)
}

/// The root-relative path a symlink at `rel` with `target` leads to, resolved lexically.
fn resolve_target(rel: &Path, target: PathBuf) -> Result<PathBuf, SysrootError> {
    let base = rel.parent().unwrap_or(Path::new(""));
    let joined = if target.is_absolute() { target.clone() } else { base.join(&target) };
    normalize(&joined).ok_or(SysrootError::Escapes { path: rel.to_path_buf(), target })
}

/// Reads a file that its directory's listing shows as a regular file, without asking its type
/// again: `short_is_end` says that a first read shorter than asked for (and than a page) is the
/// whole file, so the read that would confirm the end is skipped (see [`SubDir`]).
///
/// The listing may be stale: another process can put something else under the name after it.
/// The open never follows a symlink, never crosses a mount and never blocks (`O_NONBLOCK`), and
/// at most `max + 1` bytes are read, so every case ends in bounded time: a FIFO without a writer
/// reads empty, and an empty read is type-checked (`NotRegular`, as the root reports it); a FIFO
/// whose writer has written nothing fails with `EAGAIN`; a directory fails with `EISDIR`; a FIFO
/// or device that yields bytes is read like a file, within the cap (`TooLarge` beyond it). What
/// can therefore happen is that bytes a racing writer put in a FIFO are taken as the content;
/// what cannot is a hang, an unbounded read or a read outside the directory.
fn read_listed(
    fd: OwnedFd,
    max: usize,
    short_is_end: bool,
    rel: &dyn Fn() -> PathBuf,
) -> Result<Vec<u8>, SysrootError> {
    use std::io::Read;
    const PAGE: usize = 4096;
    let err = |e: io::Error| SysrootError::Io { path: rel(), source: e };
    // The first read lands on the stack: the result is allocated at its size.
    let mut first_buf = [MaybeUninit::<u8>::uninit(); PAGE + 1];
    let first = max.saturating_add(1).min(PAGE + 1);
    let mut buf = loop {
        match rustix::io::read(&fd, &mut first_buf[..first]) {
            Ok((got, _)) => break got.to_vec(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(err(e.into())),
        }
    };
    let n = buf.len();
    let mut f = fs::File::from(fd);
    if n == 0 {
        let m = f.metadata().map_err(err)?;
        if !m.is_file() {
            return Err(SysrootError::NotRegular { path: rel(), kind: kind_name(file_type(&m)) });
        }
        return Ok(buf);
    }
    // A partial read of a page-cache file stops on a page boundary, so a read shorter than a
    // page at offset 0 is the end; a sysfs attribute returns all it holds in its first read.
    if short_is_end && n < first && n < PAGE {
        return Ok(buf);
    }
    (&mut f).take((max as u64).saturating_add(1) - n as u64).read_to_end(&mut buf).map_err(err)?;
    if buf.len() > max {
        return Err(SysrootError::TooLarge { path: rel(), max });
    }
    Ok(buf)
}

/// Filesystems whose regular files (sysfs: attributes) end where a first read shorter than
/// asked for, and than a page, ends: sysfs, tmpfs, ext2/3/4, XFS, Btrfs. procfs is not one (a
/// seq file may return a record at a time), nor are network and FUSE filesystems.
fn short_read_is_end(fs_type: u32) -> bool {
    const SYSFS: u32 = 0x6265_6572;
    const TMPFS: u32 = 0x0102_1994;
    const EXT: u32 = 0xef53;
    const XFS: u32 = 0x5846_5342;
    const BTRFS: u32 = 0x9123_683e;
    matches!(fs_type, SYSFS | TMPFS | EXT | XFS | BTRFS)
}

/// What a directory's one listing says a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Link,
    /// A directory, FIFO, device or socket: never read.
    Other(FileType),
    /// The filesystem does not say (`DT_UNKNOWN`): asked the usual way.
    Unknown,
}

/// The names in one directory with their kinds, sorted, all names in one string (kept from a
/// [`SubDir`] by [`SubDir::into_listing`]).
#[derive(Debug, Default, Clone)]
pub struct Listing {
    names: String,
    /// (start, end) of the name in `names`, and its kind.
    entries: Vec<(u32, u32, Kind)>,
    /// Names that are not UTF-8 were left out.
    lossy: bool,
}

impl Listing {
    /// Lists `dir` with getdents64. `None` when it cannot be listed or holds more than `limit`
    /// entries (then the caller asks name by name, as without a listing).
    fn read(dir: &OwnedFd, limit: usize) -> Option<Listing> {
        let mut buf = [MaybeUninit::<u8>::uninit(); 8192];
        let mut raw = rustix::fs::RawDir::new(dir, &mut buf);
        let mut l = Listing { names: String::with_capacity(512), entries: Vec::with_capacity(32), lossy: false };
        while let Some(ent) = raw.next() {
            let ent = ent.ok()?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            // A name that is not UTF-8 is never asked for (names are `&str`).
            let Ok(name) = std::str::from_utf8(name) else {
                l.lossy = true;
                continue;
            };
            if l.entries.len() >= limit {
                return None;
            }
            let kind = match ent.file_type() {
                FileType::RegularFile => Kind::File,
                FileType::Symlink => Kind::Link,
                FileType::Unknown => Kind::Unknown,
                t => Kind::Other(t),
            };
            let start = l.names.len() as u32;
            l.names.push_str(name);
            l.entries.push((start, l.names.len() as u32, kind));
        }
        let names = &l.names;
        l.entries.sort_unstable_by(|a, b| names[a.0 as usize..a.1 as usize].cmp(&names[b.0 as usize..b.1 as usize]));
        Some(l)
    }

    fn name(&self, e: &(u32, u32, Kind)) -> &str {
        &self.names[e.0 as usize..e.1 as usize]
    }

    /// The kind of `name`, `None` when the directory does not hold it.
    fn get(&self, name: &str) -> Option<Kind> {
        self.entries.binary_search_by(|e| self.name(e).cmp(name)).ok().map(|i| self.entries[i].2)
    }
}

/// A directory of a [`Sysroot`] opened once (a device's sysfs directory): a file in it, or in a
/// plain subdirectory of it, is opened relative to it instead of from the root, with the same
/// results as the root's own methods: a name whose path holds a symlink (or that cannot be
/// opened so) is read through the root, where symlinks resolve inside it.
///
/// On first use the directory is listed once (getdents64, keeping each entry's type), and a
/// name in it is then answered from the listing where it can be: a name it lacks (or a path
/// whose first component it lacks) is absent without a system call; a regular file is opened
/// and read without asking its type again, and on sysfs and local disk filesystems without the
/// read that confirms the end; a directory, FIFO, device or socket is refused without opening
/// it; a symlink is read through the root. A name of unknown type, a directory that could not
/// be listed or holds more than [`MAX_LISTED`] entries: each name is asked for as without a
/// listing.
#[derive(Debug)]
pub struct SubDir<'s> {
    sys: &'s Sysroot,
    rel: PathBuf,
    /// `None` when the directory could not be opened: every read goes through the root.
    fd: Option<OwnedFd>,
    /// The listing, read on first use (or handed over); `None` inside when it could not be had.
    listing: OnceCell<Option<Cow<'s, Listing>>>,
    /// Whether the directory's filesystem ends a file where a short first read ends.
    short_is_end: OnceCell<bool>,
}

impl<'s> SubDir<'s> {
    /// The listing, read on first use.
    fn listing(&self, dir: &OwnedFd) -> Option<&Listing> {
        self.listing.get_or_init(|| Listing::read(dir, MAX_LISTED).map(Cow::Owned)).as_deref()
    }

    /// The names of the subdirectories (symlinks not followed), sorted: the directories among
    /// [`Sysroot::entries`] of `rel()`, from the listing where it has every entry's kind.
    pub fn subdirs(&self) -> Result<Option<Vec<String>>, SysrootError> {
        let listed = self.fd.as_ref().and_then(|dir| self.listing(dir)).filter(|l| !l.lossy);
        if let Some(l) = listed.filter(|l| l.entries.iter().all(|e| e.2 != Kind::Unknown)) {
            let dirs = l.entries.iter().filter(|e| e.2 == Kind::Other(FileType::Directory));
            return Ok(Some(dirs.map(|e| l.name(e).to_string()).collect()));
        }
        Ok(self.sys.entries(&self.rel)?.map(|v| v.into_iter().filter(|e| e.is_dir).map(|e| e.name).collect()))
    }

    /// Closes the directory and keeps its listing (when it was read and holds at most
    /// [`MAX_KEPT`] entries), for a later [`Sysroot::subdir_listed`] of the same directory:
    /// that one answers from what the directory held now.
    pub fn into_listing(self) -> Option<Listing> {
        let l = self.listing.into_inner().flatten()?;
        (l.entries.len() <= MAX_KEPT).then(|| l.into_owned())
    }

    /// The directory, relative to the root.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// `rel()/name`, the path errors and notes name.
    pub fn join(&self, name: &str) -> PathBuf {
        self.rel.join(name)
    }

    /// What the listing says `name` is: `Some(None)` for a name (or a first component) that
    /// the directory does not hold, `None` when the listing cannot say (no listing, a path
    /// that starts with `.` or `..`, or a name with more components whose first is present).
    fn listed(&self, dir: &OwnedFd, name: &str) -> Option<Option<Kind>> {
        let listing = self.listing(dir)?;
        match name.split_once('/') {
            None if !name.is_empty() && name != "." && name != ".." => Some(listing.get(name)),
            Some((first, _)) if !first.is_empty() && first != "." && first != ".." => {
                listing.get(first).is_none().then_some(None)
            }
            _ => None,
        }
    }

    /// As [`Sysroot::read_bytes_opt_max`] for `rel()/name`.
    pub fn read_bytes_opt_max(&self, name: &str, max: usize) -> Result<Option<Vec<u8>>, SysrootError> {
        let Some(dir) = &self.fd else { return self.sys.read_bytes_opt_max(self.join(name), max) };
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        match self.listed(dir, name) {
            Some(None) => return Ok(None),
            Some(Some(Kind::Other(t))) => {
                return Err(SysrootError::NotRegular { path: self.join(name), kind: kind_name(t) })
            }
            Some(Some(Kind::Link)) => return self.sys.read_bytes_opt_max(self.join(name), max),
            Some(Some(Kind::File)) => {
                // No symlink and no mount crossing: what opens lies on the directory's own
                // filesystem, whose `short_is_end` holds for it; anything else the root decides.
                let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_XDEV;
                return match rustix::fs::openat2(dir, name, flags, Mode::empty(), resolve) {
                    Ok(fd) => {
                        let short_is_end = *self
                            .short_is_end
                            .get_or_init(|| rustix::fs::fstatfs(dir).is_ok_and(|s| short_read_is_end(s.f_type as u32)));
                        read_listed(fd, max, short_is_end, &|| self.join(name)).map(Some)
                    }
                    Err(rustix::io::Errno::NOENT) => Ok(None),
                    Err(_) => self.sys.read_bytes_opt_max(self.join(name), max),
                };
            }
            Some(Some(Kind::Unknown)) | None => {}
        }
        let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH;
        match rustix::fs::openat2(dir, name, flags, Mode::empty(), resolve) {
            Ok(fd) => read_open(fd, max, &|| self.join(name)).map(Some),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            // A symlink on the way (ELOOP), a kernel without openat2, anything else: the
            // root's own walk decides.
            Err(_) => self.sys.read_bytes_opt_max(self.join(name), max),
        }
    }

    /// As [`Sysroot::read_opt`] for `rel()/name`.
    pub fn read_opt(&self, name: &str) -> Result<Option<String>, SysrootError> {
        self.read_bytes_opt_max(name, MAX_ATTR)?.map(|b| Sysroot::text_of(b, || self.join(name))).transpose()
    }

    /// As [`Sysroot::resolve_link`] for `rel()/name`.
    pub fn resolve_link(&self, name: &str) -> Result<Option<PathBuf>, SysrootError> {
        let Some(dir) = &self.fd else { return self.sys.resolve_link(self.join(name)) };
        match self.listed(dir, name) {
            // Absent, or present and not a symlink.
            Some(None) | Some(Some(Kind::File | Kind::Other(_))) => return Ok(None),
            Some(Some(Kind::Link | Kind::Unknown)) | None => {}
        }
        match rustix::fs::readlinkat(dir, name, Vec::new()) {
            Ok(t) => {
                let target =
                    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(t.into_bytes()));
                resolve_target(&self.join(name), target).map(Some)
            }
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::INVAL) => Ok(None),
            Err(_) => self.sys.resolve_link(self.join(name)),
        }
    }

    /// As [`Sysroot::link_name`] for `rel()/name`.
    pub fn link_name(&self, name: &str) -> Result<Option<String>, SysrootError> {
        Ok(self.resolve_link(name)?.and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())))
    }
}

/// Lexically normalizes a root-relative path: drops `.` and the root, applies `..`. `None` if
/// `..` would climb above the root.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out.iter().collect())
}

fn malformed(rel: &Path, why: impl Into<String>, content: &str) -> SysrootError {
    SysrootError::Malformed { path: rel.to_path_buf(), why: why.into(), content: content.chars().take(60).collect() }
}

/// Parses `0x`-prefixed (or bare) hex, as sysfs writes `vendor`, `class`, `resource`.
pub fn parse_hex(rel: &Path, s: &str) -> Result<u64, SysrootError> {
    let t = s.trim();
    let h = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    if h.is_empty() || h.len() > 16 {
        return Err(malformed(rel, "expected a hex number", s));
    }
    u64::from_str_radix(h, 16).map_err(|_| malformed(rel, "expected a hex number", s))
}

/// Parses a hex attribute that must fit `bits` bits.
pub fn parse_hex_bits(rel: &Path, s: &str, bits: u32) -> Result<u64, SysrootError> {
    let v = parse_hex(rel, s)?;
    if bits < 64 && v >> bits != 0 {
        return Err(malformed(rel, format!("value exceeds {bits} bits"), s));
    }
    Ok(v)
}

/// Parses a decimal integer attribute.
pub fn parse_dec<T: std::str::FromStr>(rel: &Path, s: &str) -> Result<T, SysrootError> {
    s.trim().parse::<T>().map_err(|_| malformed(rel, "expected a decimal integer", s))
}

/// Parses a `0`/`1` boolean attribute.
pub fn parse_bool(rel: &Path, s: &str) -> Result<bool, SysrootError> {
    match s.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(malformed(rel, "expected 0 or 1", s)),
    }
}

/// Reports a malformed value (for parsers outside this module).
pub fn malformed_err(rel: &Path, why: impl Into<String>, content: &str) -> SysrootError {
    malformed(rel, why, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_applies_parent_and_refuses_escape() {
        assert_eq!(
            normalize(Path::new("sys/bus/pci/devices/../../../devices/pci0000:00/0000:00:01.0")).unwrap(),
            PathBuf::from("sys/devices/pci0000:00/0000:00:01.0")
        );
        assert!(normalize(Path::new("sys/../../etc")).is_none());
        assert_eq!(normalize(Path::new("/sys/./x")).unwrap(), PathBuf::from("sys/x"));
    }

    #[test]
    fn hex_and_dec_parsers_name_the_file() {
        let p = Path::new("sys/bus/pci/devices/0000:00:00.0/vendor");
        assert_eq!(parse_hex_bits(p, "0x8086", 16).unwrap(), 0x8086);
        let e = parse_hex_bits(p, "0x18086", 16).unwrap_err().to_string();
        assert!(e.contains("vendor") && e.contains("16 bits"), "{e}");
        assert!(parse_hex(p, "").is_err());
        assert!(parse_hex(p, "0xzz").is_err());
        assert!(parse_hex(p, "0x11112222333344445").is_err());
        assert_eq!(parse_dec::<i32>(p, "-1").unwrap(), -1);
        assert!(parse_dec::<i32>(p, "one").is_err());
        assert!(parse_bool(p, "2").is_err());
    }

    #[test]
    fn open_rejects_missing_root() {
        let e = Sysroot::open("/nonexistent/peermem-root").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/peermem-root"), "{e}");
    }

    #[test]
    fn links_resolve_within_root() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("sys/devices/pci0000:00/0000:00:01.0")).unwrap();
        fs::create_dir_all(d.path().join("sys/bus/pci/devices")).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:00/0000:00:01.0",
            d.path().join("sys/bus/pci/devices/0000:00:01.0"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../../../../../..", d.path().join("sys/bus/pci/devices/evil")).unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        assert_eq!(
            r.resolve_link("sys/bus/pci/devices/0000:00:01.0").unwrap().unwrap(),
            PathBuf::from("sys/devices/pci0000:00/0000:00:01.0")
        );
        assert!(matches!(r.resolve_link("sys/bus/pci/devices/evil"), Err(SysrootError::Escapes { .. })));
        assert!(r.resolve_link("sys/bus/pci/devices/none").unwrap().is_none());
    }

    #[test]
    fn hostile_files_are_refused_in_bounded_time_and_named() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("x");
        fs::create_dir_all(&dev).unwrap();
        // A FIFO: opening it for reading would block forever without O_NONBLOCK.
        let fifo = dev.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        // A huge sparse file.
        let big = fs::File::create(dev.join("big")).unwrap();
        big.set_len(1 << 40).unwrap();
        // A symlink loop and a link to the host's /dev/zero (confined: it names root/dev/zero).
        std::os::unix::fs::symlink("loop", dev.join("loop")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dev.join("zero")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../../../etc/hostname", dev.join("out")).unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        let e = r.read_bytes_opt("x/fifo").unwrap_err();
        assert!(matches!(e, SysrootError::NotRegular { .. }) && e.to_string().contains("x/fifo"), "{e}");
        let e = r.read_bytes_opt("x/big").unwrap_err();
        assert!(matches!(e, SysrootError::TooLarge { .. }) && e.to_string().contains("x/big"), "{e}");
        let e = r.read_bytes_opt("x/loop").unwrap_err();
        assert!(e.to_string().contains("x/loop"), "{e}");
        // Inside the root, /dev/zero is root/dev/zero (absent here): a missing file, not the host's device.
        assert!(r.read_bytes_opt("x/zero").unwrap().is_none());
        assert!(r.read_bytes_opt("x/out").unwrap().is_none());
        assert!(matches!(
            r.read_bytes_opt("x").unwrap_err(),
            SysrootError::NotRegular { .. } | SysrootError::Io { .. }
        ));
    }

    #[test]
    fn a_subdir_reads_what_the_root_reads_hostile_files_included() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("sys/dev");
        fs::create_dir_all(dev.join("real")).unwrap();
        fs::create_dir_all(d.path().join("sys/other")).unwrap();
        fs::write(dev.join("vendor"), "0x8086\n").unwrap();
        fs::write(dev.join("real/size"), "4096\n").unwrap();
        fs::write(d.path().join("sys/other/size"), "7\n").unwrap();
        fs::write(dev.join("config"), vec![0xabu8; 4096]).unwrap();
        fs::write(dev.join("large"), vec![b'x'; 5000]).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(dev.join("fifo")).status().unwrap().success());
        fs::File::create(dev.join("big")).unwrap().set_len(1 << 40).unwrap();
        let links = [
            ("loop", "loop"),
            ("zero", "/dev/zero"),
            ("out", "../../../../../../../../../../etc/hostname"),
            ("linked", "../other"),
            ("abs", "/sys/other/size"),
            ("driver", "../../bus/pci/drivers/nvme"),
        ];
        for (name, target) in links {
            std::os::unix::fs::symlink(target, dev.join(name)).unwrap();
        }
        let r = Sysroot::open(d.path()).unwrap();
        let sub = r.subdir("sys/dev");
        let names = [
            "vendor",
            "real/size",
            "config",
            "large",
            "fifo",
            "big",
            "loop",
            "zero",
            "out",
            "linked/size",
            "abs",
            "absent",
            "real",
            "driver",
        ];
        for name in names {
            let rel = Path::new("sys/dev").join(name);
            for max in [4, 4096, MAX_ATTR] {
                let (a, b) = (sub.read_bytes_opt_max(name, max), r.read_bytes_opt_max(&rel, max));
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "{name} (max {max})");
            }
            assert_eq!(format!("{:?}", sub.resolve_link(name)), format!("{:?}", r.resolve_link(&rel)), "{name}");
        }
        assert_eq!(sub.read_opt("linked/size").unwrap().unwrap(), "7");
        assert_eq!(sub.read_opt("abs").unwrap().unwrap(), "7");
        assert_eq!(sub.link_name("driver").unwrap().unwrap(), "nvme");
        assert_eq!(sub.read_bytes_opt_max("config", 4096).unwrap().unwrap().len(), 4096);
        assert!(matches!(sub.read_bytes_opt_max("large", 4096), Err(SysrootError::TooLarge { .. })));
        let e = sub.read_bytes_opt_max("fifo", MAX_ATTR).unwrap_err();
        assert!(matches!(e, SysrootError::NotRegular { .. }) && e.to_string().contains("sys/dev/fifo"), "{e}");
        // A directory that does not exist: every read goes through the root and finds nothing.
        let none = r.subdir("sys/none");
        assert!(none.read_opt("vendor").unwrap().is_none() && none.resolve_link("driver").unwrap().is_none());
    }

    #[test]
    fn the_walk_without_openat2_confines_like_openat2() {
        let d = tempfile::tempdir().unwrap();
        let x = d.path().join("x");
        fs::create_dir_all(x.join("sub")).unwrap();
        fs::write(x.join("sub/file"), b"in").unwrap();
        fs::write(d.path().join("top"), b"top").unwrap();
        assert!(std::process::Command::new("mkfifo").arg(x.join("fifo")).status().unwrap().success());
        let link = |target: &str, name: &str| std::os::unix::fs::symlink(target, x.join(name)).unwrap();
        link("sub/file", "rel");
        link("/top", "abs");
        link("../../../../../../../top", "climb");
        link("loop", "loop");
        link("/dev/zero", "zero");
        link("sub", "dirlink");
        let r = Sysroot::open(d.path()).unwrap();
        let read = |rel: &str| -> io::Result<Vec<u8>> {
            use std::io::Read;
            let fd = r.open_walk(Path::new(rel), OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC)?;
            let mut v = Vec::new();
            fs::File::from(fd).read_to_end(&mut v)?;
            Ok(v)
        };
        assert_eq!(read("x/sub/file").unwrap(), b"in");
        assert_eq!(read("x/rel").unwrap(), b"in");
        assert_eq!(read("x/abs").unwrap(), b"top");
        assert_eq!(read("x/climb").unwrap(), b"top", "'..' stops at the root");
        assert_eq!(read("x/dirlink/../sub/file").unwrap(), b"in");
        assert_eq!(read("x/loop").unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(read("x/zero").unwrap_err().kind(), io::ErrorKind::NotFound, "the root's dev/zero, absent");
        assert_eq!(read("x/sub/file/more").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        // A FIFO opens at once (O_NONBLOCK) and reads empty: the type check above the walk refuses it.
        assert!(r.open_walk(Path::new("x/fifo"), OFlags::RDONLY | OFlags::NONBLOCK).is_ok());
        assert!(r.open_walk(Path::new("x/dirlink"), OFlags::RDONLY | OFlags::DIRECTORY).is_ok());
        assert!(r.open_walk(Path::new(""), OFlags::RDONLY | OFlags::DIRECTORY).is_ok());
    }

    fn mkfifo(p: &Path) {
        assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success());
    }

    #[test]
    fn a_subdir_answers_absent_names_and_non_files_from_its_listing() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("sys/dev");
        fs::create_dir_all(dev.join("real")).unwrap();
        fs::write(dev.join("vendor"), "0x8086\n").unwrap();
        fs::write(dev.join("real/size"), "4096\n").unwrap();
        fs::write(dev.join("large"), vec![b'x'; 5000]).unwrap();
        mkfifo(&dev.join("fifo"));
        std::os::unix::fs::symlink("vendor", dev.join("link")).unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        let sub = r.subdir("sys/dev");
        assert_eq!(sub.read_opt("vendor").unwrap().unwrap(), "0x8086");
        // Created after the listing: the listing is what the directory held.
        fs::write(dev.join("late"), "1\n").unwrap();
        fs::create_dir_all(dev.join("later")).unwrap();
        fs::write(dev.join("later/size"), "1\n").unwrap();
        assert!(sub.read_opt("late").unwrap().is_none(), "an absent name costs no open");
        assert!(sub.read_opt("later/size").unwrap().is_none(), "nor does a path below an absent name");
        assert!(sub.resolve_link("late").unwrap().is_none());
        assert_eq!(sub.read_opt("real/size").unwrap().unwrap(), "4096", "a name with '/' below a listed one");
        let kind = |name: &str| match sub.read_bytes_opt_max(name, MAX_ATTR) {
            Err(SysrootError::NotRegular { path, kind }) => {
                assert_eq!(path, Path::new("sys/dev").join(name));
                kind
            }
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(kind("fifo"), "a FIFO");
        assert_eq!(kind("real"), "a directory");
        assert_eq!(sub.read_opt("link").unwrap().unwrap(), "0x8086", "a symlink reads through the root");
        assert_eq!(sub.resolve_link("link").unwrap().unwrap(), Path::new("sys/dev/vendor"));
        assert!(sub.resolve_link("vendor").unwrap().is_none(), "a regular file is not a link");
        assert!(matches!(sub.read_bytes_opt_max("large", 4999), Err(SysrootError::TooLarge { max: 4999, .. })));
        assert_eq!(sub.read_bytes_opt_max("large", 5000).unwrap().unwrap().len(), 5000);
        assert!(matches!(sub.read_bytes_opt_max("vendor", 6), Err(SysrootError::TooLarge { max: 6, .. })));
        assert_eq!(sub.read_bytes_opt_max("vendor", 7).unwrap().unwrap(), b"0x8086\n");
    }

    #[test]
    fn names_of_unknown_type_are_asked_for_as_without_a_listing() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("sys/dev");
        fs::create_dir_all(dev.join("real")).unwrap();
        fs::write(dev.join("vendor"), "0x8086\n").unwrap();
        mkfifo(&dev.join("fifo"));
        std::os::unix::fs::symlink("vendor", dev.join("link")).unwrap();
        std::os::unix::fs::symlink("loop", dev.join("loop")).unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        // What a filesystem without d_type lists: every name, no kind.
        let mut listing = Listing::read(r.subdir("sys/dev").fd.as_ref().unwrap(), MAX_LISTED).unwrap();
        listing.entries.iter_mut().for_each(|e| e.2 = Kind::Unknown);
        let sub = r.subdir_listed("sys/dev", Some(&listing));
        let dirs = |v: Option<Vec<DirEntry>>| v.map(|v| v.into_iter().filter(|e| e.is_dir).map(|e| e.name).collect());
        assert_eq!(
            sub.subdirs().unwrap(),
            dirs(r.entries("sys/dev").unwrap()),
            "entries of unknown kind are asked for"
        );
        for name in ["vendor", "fifo", "real", "link", "loop", "absent"] {
            let rel = Path::new("sys/dev").join(name);
            let (a, b) = (sub.read_bytes_opt_max(name, MAX_ATTR), r.read_bytes_opt_max(&rel, MAX_ATTR));
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{name}");
            assert_eq!(format!("{:?}", sub.resolve_link(name)), format!("{:?}", r.resolve_link(&rel)), "{name}");
        }
    }

    #[test]
    fn a_kept_listing_answers_as_the_directory_did() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("dev");
        fs::create_dir_all(dev.join("sub")).unwrap();
        fs::write(dev.join("vendor"), "0x8086\n").unwrap();
        mkfifo(&dev.join("fifo"));
        std::os::unix::fs::symlink("vendor", dev.join("link")).unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        let dirs = |v: Option<Vec<DirEntry>>| v.map(|v| v.into_iter().filter(|e| e.is_dir).map(|e| e.name).collect());
        let sub = r.subdir("dev");
        assert_eq!(sub.subdirs().unwrap(), Some(vec!["sub".to_string()]));
        assert_eq!(sub.subdirs().unwrap(), dirs(r.entries("dev").unwrap()));
        let kept = sub.into_listing().expect("a small directory's listing is kept");
        fs::write(dev.join("late"), "1\n").unwrap();
        let again = r.subdir_listed("dev", Some(&kept));
        assert_eq!(again.read_opt("vendor").unwrap().unwrap(), "0x8086");
        assert!(again.read_opt("late").unwrap().is_none(), "the kept listing is what the directory held");
        assert!(matches!(again.read_opt("fifo"), Err(SysrootError::NotRegular { kind: "a FIFO", .. })));
        assert_eq!(again.link_name("link").unwrap().unwrap(), "vendor");
        assert!(r.subdir_listed("dev", None).read_opt("late").unwrap().is_some());
        assert!(r.subdir("none").subdirs().unwrap().is_none(), "an absent directory has no entries");
        for i in 0..=MAX_KEPT {
            fs::write(dev.join(format!("f{i}")), "").unwrap();
        }
        let big = r.subdir("dev");
        assert_eq!(big.subdirs().unwrap(), dirs(r.entries("dev").unwrap()));
        assert!(big.into_listing().is_none(), "more than MAX_KEPT entries are not kept");
    }

    #[test]
    fn a_directory_too_big_to_list_is_read_name_by_name() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..5 {
            fs::write(d.path().join(format!("f{i}")), format!("{i}\n")).unwrap();
        }
        let r = Sysroot::open(d.path()).unwrap();
        let sub = r.subdir("");
        assert!(Listing::read(sub.fd.as_ref().unwrap(), 4).is_none(), "5 entries, limit 4");
        // A listing reads the directory from its start: a second one needs a fresh open.
        let l = Listing::read(r.subdir("").fd.as_ref().unwrap(), 5).unwrap();
        assert_eq!(l.get("f4"), Some(Kind::File));
        assert_eq!(l.get("f5"), None);
        sub.listing.set(None).unwrap();
        fs::write(d.path().join("late"), "x\n").unwrap();
        assert_eq!(sub.read_opt("late").unwrap().unwrap(), "x", "without a listing every name is opened");
    }

    #[test]
    fn a_file_swapped_after_the_listing_ends_in_bounded_time() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("dev");
        fs::create_dir_all(&dev).unwrap();
        for name in ["a", "b", "c", "e"] {
            fs::write(dev.join(name), "1\n").unwrap();
        }
        fs::write(d.path().join("target"), "outside\n").unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        let sub = r.subdir("dev");
        assert_eq!(sub.read_opt("e").unwrap().unwrap(), "1");
        // Listed as regular files, each now something else.
        fs::remove_file(dev.join("a")).unwrap();
        mkfifo(&dev.join("a"));
        fs::remove_file(dev.join("b")).unwrap();
        fs::create_dir(dev.join("b")).unwrap();
        fs::remove_file(dev.join("c")).unwrap();
        std::os::unix::fs::symlink("/target", dev.join("c")).unwrap();
        fs::remove_file(dev.join("e")).unwrap();
        let e = sub.read_bytes_opt_max("a", MAX_ATTR).unwrap_err();
        assert!(matches!(e, SysrootError::NotRegular { kind: "a FIFO", .. }), "{e}");
        assert!(matches!(sub.read_bytes_opt_max("b", MAX_ATTR), Err(SysrootError::Io { .. })));
        assert_eq!(sub.read_opt("c").unwrap().unwrap(), "outside", "a symlink resolves inside the root");
        assert!(sub.read_opt("e").unwrap().is_none(), "a file gone since the listing is absent");
    }

    #[test]
    fn a_short_read_ends_the_file_only_where_the_filesystem_says_so() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), vec![b'y'; 9000]).unwrap();
        fs::write(d.path().join("s"), "short\n").unwrap();
        fs::write(d.path().join("empty"), "").unwrap();
        let open = |n: &str| OwnedFd::from(fs::File::open(d.path().join(n)).unwrap());
        let name = || PathBuf::from("f");
        for short_is_end in [false, true] {
            assert_eq!(read_listed(open("f"), 9000, short_is_end, &name).unwrap().len(), 9000);
            assert!(matches!(read_listed(open("f"), 8999, short_is_end, &name), Err(SysrootError::TooLarge { .. })));
            assert_eq!(read_listed(open("s"), 4096, short_is_end, &name).unwrap(), b"short\n");
            assert!(read_listed(open("empty"), 4096, short_is_end, &name).unwrap().is_empty());
        }
        assert!(short_read_is_end(0x6265_6572), "sysfs");
        assert!(!short_read_is_end(rustix::fs::PROC_SUPER_MAGIC as u32), "procfs seq files return records");
        assert!(!short_read_is_end(rustix::fs::NFS_SUPER_MAGIC as u32));
    }

    #[test]
    fn non_utf8_free_text_is_lossy_not_an_error() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("vendor"), b"Gigabyte \xff\xfe Inc\n").unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        assert!(r.read_opt("vendor").is_err());
        assert_eq!(r.read_lossy_opt("vendor").unwrap().unwrap(), "Gigabyte \u{fffd}\u{fffd} Inc");
        let text = |b: &[u8]| Sysroot::text(Path::new("x"), b.to_vec()).unwrap();
        assert_eq!(text(b"  a b \n\0"), "a b");
        assert_eq!(text(b"\n\0"), "");
        assert_eq!(text(b"\t\xc3\xa9\n"), "\u{e9}");
    }
}
