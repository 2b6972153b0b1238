//! `nifty cp`: files and trees between the host and an instance's merged
//! root, running or stopped, by the rules of [`super::files`].
//!
//! The container's side is tenant-controlled. Every name in it is opened
//! relative to a directory fd already held, with `openat2` refusing any
//! symlink (`RESOLVE_NO_SYMLINKS`) and any `..` above that directory; a
//! path the user names may not hold `..` at all. Only regular files and
//! directories are copied: a FIFO, socket or device named by the user is
//! refused, one met inside a tree is skipped and reported, and so is a
//! symlink met inside a tree copied out (it is never followed, nor made
//! on the host). A file copied out is read for at most the size it had
//! when opened, and refused if that does not fit where it goes. Files
//! copied in are written to a temp name, owned by the container user they
//! are for (mapped into the instance's ID range), then renamed into place;
//! setuid and setgid bits are dropped both ways.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use super::files::{Root, User};
use crate::{Error, Result};

/// Beneath a directory fd: no symlink, no magic link, no `..` out of it.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Trees deeper than this are refused (each level holds a directory fd).
const MAX_DEPTH: usize = 256;

/// What `nifty cp` is asked for.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Copy directories and their contents.
    pub recursive: bool,
    /// The container user files copied in belong to; `None`: the owner
    /// of the directory they land in.
    pub owner: Option<String>,
}

/// What a copy did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CopyReport {
    pub files: u64,
    pub directories: u64,
    pub bytes: u64,
    /// Entries left out (links, FIFOs, devices, sockets), with why.
    pub skipped: Vec<String>,
}

/// Checks a path inside a container as the user gave it: no `..`, no NUL.
/// A relative path is taken from `home`.
pub fn container_path(name: &str, path: &str, home: &str) -> Result<String> {
    if path.contains('\0') {
        return Err(Error::Invalid(format!(
            "instance {name:?}: a path holds a NUL byte"
        )));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(Error::Invalid(format!(
            "instance {name:?}: {path:?} holds `..`; give a path inside the instance without it"
        )));
    }
    let full = if path.starts_with('/') {
        path.to_string()
    } else if path.is_empty() || path == "." {
        home.to_string()
    } else {
        format!("{}/{path}", home.trim_end_matches('/'))
    };
    // Normalise: drop empty and `.` components.
    let parts: Vec<&str> = full
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    Ok(format!("/{}", parts.join("/")))
}

fn kind(mode: u32) -> FileType {
    FileType::from_raw_mode(mode)
}

fn kind_name(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// Splits a normalised absolute container path into its parent and name.
fn parent_and_name(path: &str) -> Option<(&str, &str)> {
    let (p, n) = path.rsplit_once('/')?;
    (!n.is_empty()).then_some((if p.is_empty() { "/" } else { p }, n))
}

impl Root {
    /// Looks a container path up without following any link: what is
    /// there, or `None`.
    fn lookup(&self, path: &str) -> Result<Option<rustix::fs::Stat>> {
        match self.open_at(path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC) {
            Ok(fd) => Ok(Some(
                rustix::fs::fstat(&fd).map_err(self.err("stat", path))?,
            )),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.err("open", path)(e)),
        }
    }

    /// The container ID a host ID maps to, if it is in the instance's range.
    fn container_id(&self, host: u32) -> Option<u32> {
        host.checked_sub(self.base())
            .filter(|id| *id < super::userns::RANGE)
    }

    /// The owner that files copied into `dir` get.
    fn owner_of(&self, dir: BorrowedFd<'_>, path: &str, opts: &Owner) -> Result<(u32, u32)> {
        if let Some(u) = &opts.user {
            return Ok((u.uid, u.gid));
        }
        let st = rustix::fs::fstat(dir).map_err(self.err("stat", path))?;
        match (self.container_id(st.st_uid), self.container_id(st.st_gid)) {
            (Some(u), Some(g)) => Ok((u, g)),
            _ => Err(Error::Invalid(format!(
                "instance {:?}: {path} is owned by host ID {}:{}, outside the instance's IDs; give --owner",
                self.name(),
                st.st_uid,
                st.st_gid
            ))),
        }
    }
}

/// The owner of what is copied in, once looked up.
struct Owner {
    user: Option<User>,
}

/// Copies a host file or tree into an instance at `dest` (a normalised
/// container path, see [`container_path`]). Like `cp`: into `dest` if it
/// is a directory, else as `dest`.
pub fn copy_in(root: &Root, src: &Path, dest: &str, opts: &CopyOptions) -> Result<CopyReport> {
    let meta = std::fs::metadata(src).map_err(Error::io("stat", src))?;
    if meta.is_dir() && !opts.recursive {
        return Err(Error::Invalid(format!(
            "{} is a directory: give -r to copy it and its contents",
            src.display()
        )));
    }
    if !meta.is_dir() && !meta.is_file() {
        return Err(Error::Invalid(format!(
            "{} is not a regular file or a directory; nifty copies nothing else",
            src.display()
        )));
    }
    let owner = Owner {
        user: opts.owner.as_deref().map(|u| root.user(u)).transpose()?,
    };
    let base = src
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("{}: give a path with a name", src.display())))?
        .to_string();
    let (parent, name) = match root.lookup(dest)? {
        Some(st) if kind(st.st_mode) == FileType::Directory => (dest.to_string(), base),
        Some(st) if kind(st.st_mode) == FileType::RegularFile && meta.is_file() => {
            let (p, n) = parent_and_name(dest).expect("a file is not /");
            (p.to_string(), n.to_string())
        }
        Some(st) => {
            return Err(Error::Invalid(format!(
                "instance {:?}: {dest} is {}; nifty {} it",
                root.name(),
                kind_name(kind(st.st_mode)),
                if kind(st.st_mode) == FileType::Symlink {
                    "does not follow links inside containers nor replace"
                } else {
                    "does not replace"
                }
            )))
        }
        None => {
            let (p, n) = parent_and_name(dest).ok_or_else(|| {
                Error::Invalid(format!("instance {:?}: bad path {dest:?}", root.name()))
            })?;
            (p.to_string(), n.to_string())
        }
    };
    let dfd = root
        .open_at(
            &parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .map_err(root.err("open directory", &parent))?;
    let mut report = CopyReport::default();
    let shown = format!("{}/{name}", parent.trim_end_matches('/'));
    if meta.is_dir() {
        put_tree(root, &dfd, &name, &shown, src, &owner, &mut report, 0)?;
    } else {
        let (uid, gid) = root.owner_of(dfd.as_fd(), &parent, &owner)?;
        put_file(root, &dfd, &name, &shown, src, uid, gid, &mut report)?;
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn put_file(
    root: &Root,
    dfd: &OwnedFd,
    name: &str,
    shown: &str,
    src: &Path,
    uid: u32,
    gid: u32,
    report: &mut CopyReport,
) -> Result<()> {
    let mut input = std::fs::File::open(src).map_err(Error::io("open", src))?;
    let mode = input
        .metadata()
        .map_err(Error::io("stat", src))?
        .permissions()
        .mode()
        & 0o777;
    // What is there must be a regular file to be replaced.
    match rustix::fs::statat(dfd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if kind(st.st_mode) != FileType::RegularFile => {
            return Err(Error::Invalid(format!(
                "instance {:?}: {shown} is {}; nifty does not replace it",
                root.name(),
                kind_name(kind(st.st_mode))
            )))
        }
        Ok(_) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(root.err("stat", shown)(e)),
    }
    let n = root.replace_at(dfd, name, shown, (uid, gid, mode), &mut input)?;
    report.files += 1;
    report.bytes += n;
    Ok(())
}

/// Makes (or opens) directory `name` under `dfd`, never through a link.
fn ensure_dir(
    root: &Root,
    dfd: &OwnedFd,
    name: &str,
    shown: &str,
    uid: u32,
    gid: u32,
    mode: u32,
) -> Result<(OwnedFd, bool)> {
    let made = match rustix::fs::mkdirat(dfd, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(root.err("mkdir", shown)(e)),
    };
    let fd = rustix::fs::openat2(
        dfd,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        BENEATH,
    )
    .map_err(root.err("open directory", shown))?;
    if made {
        root.chown(&fd, shown, uid, gid, mode)?;
    }
    Ok((fd, made))
}

#[allow(clippy::too_many_arguments)]
fn put_tree(
    root: &Root,
    dfd: &OwnedFd,
    name: &str,
    shown: &str,
    src: &Path,
    owner: &Owner,
    report: &mut CopyReport,
    depth: usize,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::Invalid(format!(
            "{}: deeper than {MAX_DEPTH} levels; nifty copies no deeper",
            src.display()
        )));
    }
    let (uid, gid) = root.owner_of(dfd.as_fd(), shown, owner)?;
    let mode = std::fs::metadata(src)
        .map_err(Error::io("stat", src))?
        .mode()
        & 0o1777;
    let (sub, made) = ensure_dir(root, dfd, name, shown, uid, gid, mode)?;
    if made {
        report.directories += 1;
    }
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(Error::io("read directory", src))?
        .collect::<std::io::Result<_>>()
        .map_err(Error::io("read directory", src))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let Some(n) = e.file_name().to_str().map(String::from) else {
            report
                .skipped
                .push(format!("{}: a name that is not UTF-8", path.display()));
            continue;
        };
        let child = format!("{shown}/{n}");
        let ft = e.file_type().map_err(Error::io("stat", &path))?;
        if ft.is_dir() {
            put_tree(root, &sub, &n, &child, &path, owner, report, depth + 1)?;
        } else if ft.is_file() {
            let (u, g) = root.owner_of(sub.as_fd(), &child, owner)?;
            put_file(root, &sub, &n, &child, &path, u, g, report)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(Error::io("readlink", &path))?;
            match rustix::fs::symlinkat(&target, &sub, n.as_str()) {
                Ok(()) => {
                    let (u, g) = root.owner_of(sub.as_fd(), &child, owner)?;
                    let (hu, hg) = crate::sys::ids(root.base() + u, root.base() + g);
                    rustix::fs::chownat(
                        &sub,
                        n.as_str(),
                        Some(hu),
                        Some(hg),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(root.err("chown", &child))?;
                    report.files += 1;
                }
                Err(rustix::io::Errno::EXIST) => report
                    .skipped
                    .push(format!("{child}: exists; a link is not put over it")),
                Err(e) => return Err(root.err("symlink", &child)(e)),
            }
        } else {
            report.skipped.push(format!(
                "{}: not a regular file, directory or link",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Copies a file or tree of an instance (`src`, a normalised container
/// path) to the host. Like `cp`: into `dest` if it is a directory.
pub fn copy_out(root: &Root, src: &str, dest: &Path, opts: &CopyOptions) -> Result<CopyReport> {
    let fd = root
        .open_at(
            src,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        )
        .map_err(|e| match e {
            // O_NOFOLLOW on a trailing link: ELOOP, said plainly.
            rustix::io::Errno::LOOP => Error::Invalid(format!(
                "instance {:?}: {src} is or passes through a symlink; nifty does not follow links inside containers",
                root.name()
            )),
            e => root.err("open", src)(e),
        })?;
    let st = rustix::fs::fstat(&fd).map_err(root.err("stat", src))?;
    let t = kind(st.st_mode);
    if t == FileType::Directory && !opts.recursive {
        return Err(Error::Invalid(format!(
            "instance {:?}: {src} is a directory: give -r to copy it and its contents",
            root.name()
        )));
    }
    if t != FileType::Directory && t != FileType::RegularFile {
        return Err(Error::Invalid(format!(
            "instance {:?}: {src} is {}; nifty copies only regular files and directories",
            root.name(),
            kind_name(t)
        )));
    }
    let base = parent_and_name(src).map(|(_, n)| n).unwrap_or("root");
    let target = if dest.is_dir() {
        dest.join(base)
    } else {
        dest.to_path_buf()
    };
    let mut report = CopyReport::default();
    if t == FileType::Directory {
        get_tree(root, fd, src, &target, &mut report, 0)?;
    } else {
        get_file(root, fd, &st, src, &target, &mut report)?;
    }
    Ok(report)
}

/// Bytes free for an unprivileged writer where `path` would be written.
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

fn get_file(
    root: &Root,
    fd: OwnedFd,
    st: &rustix::fs::Stat,
    shown: &str,
    target: &Path,
    report: &mut CopyReport,
) -> Result<()> {
    let size = st.st_size.max(0) as u64;
    if let Some(free) = free_bytes(&absolute(target)) {
        if size > free {
            return Err(Error::Invalid(format!(
                "instance {:?}: {shown} claims {size} bytes, more than the {free} free at {}",
                root.name(),
                target.display()
            )));
        }
    }
    if target.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        return Err(Error::Invalid(format!(
            "{} exists and is not a regular file; nifty does not replace it",
            target.display()
        )));
    }
    let dir = absolute(target);
    let dir = dir.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".nifty-cp-")
        .tempfile_in(dir)
        .map_err(Error::io("create a temp file in", dir))?;
    // At most the size it had when opened: a file the tenant keeps
    // growing does not make nifty write more.
    let mut input = std::fs::File::from(fd).take(size);
    let n = std::io::copy(&mut input, tmp.as_file_mut()).map_err(Error::io("copy to", target))?;
    tmp.as_file_mut()
        .flush()
        .map_err(Error::io("write", target))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(st.st_mode & 0o777))
        .map_err(Error::io("chmod", tmp.path()))?;
    tmp.persist(target)
        .map_err(|e| Error::io("rename onto", target)(e.error))?;
    report.files += 1;
    report.bytes += n;
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn get_tree(
    root: &Root,
    dir: OwnedFd,
    shown: &str,
    target: &Path,
    report: &mut CopyReport,
    depth: usize,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::Invalid(format!(
            "instance {:?}: {shown} is deeper than {MAX_DEPTH} levels; nifty copies no deeper",
            root.name()
        )));
    }
    let st = rustix::fs::fstat(&dir).map_err(root.err("stat", shown))?;
    match std::fs::create_dir(target) {
        Ok(()) => report.directories += 1,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && target.is_dir() => {}
        Err(e) => return Err(Error::io("create directory", target)(e)),
    }
    std::fs::set_permissions(
        target,
        std::fs::Permissions::from_mode((st.st_mode & 0o777) | 0o700),
    )
    .map_err(Error::io("chmod", target))?;
    let mut names = Vec::new();
    let it = rustix::fs::Dir::read_from(&dir).map_err(root.err("read directory", shown))?;
    for entry in it {
        let entry = entry.map_err(root.err("read directory", shown))?;
        let n = entry.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        names.push(n.to_vec());
    }
    names.sort();
    for raw in names {
        let Ok(n) = String::from_utf8(raw.clone()) else {
            report.skipped.push(format!(
                "{shown}/{}: a name that is not UTF-8",
                crate::printer::escape_controls(&raw)
            ));
            continue;
        };
        let child = format!("{shown}/{n}");
        let shown_child = crate::printer::escape_controls(child.as_bytes());
        let fd = match rustix::fs::openat2(
            &dir,
            n.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH | ResolveFlags::NO_XDEV,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP) => {
                report.skipped.push(format!(
                    "{shown_child}: a symlink (not followed, not copied)"
                ));
                continue;
            }
            Err(rustix::io::Errno::XDEV) => {
                report
                    .skipped
                    .push(format!("{shown_child}: another mount (not crossed)"));
                continue;
            }
            Err(rustix::io::Errno::NXIO) | Err(rustix::io::Errno::OPNOTSUPP) => {
                report.skipped.push(format!("{shown_child}: a socket"));
                continue;
            }
            Err(e) => return Err(root.err("open", &shown_child)(e)),
        };
        let cst = rustix::fs::fstat(&fd).map_err(root.err("stat", &shown_child))?;
        match kind(cst.st_mode) {
            FileType::Directory => get_tree(root, fd, &child, &target.join(&n), report, depth + 1)?,
            FileType::RegularFile => {
                get_file(root, fd, &cst, &shown_child, &target.join(&n), report)?
            }
            t => report
                .skipped
                .push(format!("{shown_child}: {} (not copied)", kind_name(t))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_are_checked_and_normalised() {
        assert_eq!(
            container_path("7", "/etc/os-release", "/home/luser").unwrap(),
            "/etc/os-release"
        );
        assert_eq!(
            container_path("7", "f", "/home/luser").unwrap(),
            "/home/luser/f"
        );
        assert_eq!(
            container_path("7", "", "/home/luser/").unwrap(),
            "/home/luser"
        );
        assert_eq!(container_path("7", "//a/./b/", "/").unwrap(), "/a/b");
        assert_eq!(container_path("7", "/", "/").unwrap(), "/");
        let e = container_path("7", "/home/../../etc", "/").unwrap_err();
        assert!(e.to_string().contains("`..`"), "{e}");
        assert!(container_path("7", "../x", "/home/luser").is_err());
        assert!(container_path("7", "a\0b", "/").is_err());
    }

    #[test]
    fn names_split_off_their_parent() {
        assert_eq!(parent_and_name("/etc/hosts"), Some(("/etc", "hosts")));
        assert_eq!(parent_and_name("/x"), Some(("/", "x")));
        assert_eq!(parent_and_name("/"), None);
    }
}
