//! Extracting image layers and root filesystem tarballs that someone else
//! made, without ever writing outside the tree.
//!
//! An archive is tenant input: its names may hold `..`, its symlinks may
//! point anywhere, a later entry may be written through a link an earlier
//! one planted. So every parent directory is resolved from the tree's
//! directory fd with `openat2(RESOLVE_IN_ROOT)` (a link is followed as the
//! container would, and can never leave the tree), and the last component
//! is created with `*at` calls that do not follow it (`O_NOFOLLOW`,
//! `O_EXCL`, `AT_SYMLINK_NOFOLLOW`). Devices and FIFOs are not made (the
//! launchers bind a container's devices), setuid and setgid bits are
//! cleared, extended attributes (file capabilities) are dropped, and IDs
//! outside a container's 65536 are refused.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::{sys, Error, Result};

/// IDs a container has: files owned past these are refused.
pub const ID_LIMIT: u64 = 65536;

/// What an extraction did besides writing files.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub entries: u64,
    pub bytes: u64,
    /// Files whose setuid or setgid bit was cleared.
    pub setuid_cleared: Vec<String>,
    /// Devices and FIFOs not made.
    pub skipped: Vec<String>,
}

/// A directory being filled from archives.
pub struct Tree {
    path: PathBuf,
    fd: OwnedFd,
    pub report: Report,
}

fn err(what: &str, path: &str) -> impl FnOnce(rustix::io::Errno) -> Error {
    let call = format!("{what} {path}");
    move |e| Error::Sys {
        call,
        err: io::Error::from_raw_os_error(e.raw_os_error()),
    }
}

impl Tree {
    /// Makes `path` (which must not exist), mode 0755, owned by root.
    pub fn create(path: &Path) -> Result<Tree> {
        std::fs::create_dir(path).map_err(Error::io("create", path))?;
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(err("open", &path.display().to_string()))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
            .map_err(err("chmod", &path.display().to_string()))?;
        Ok(Tree {
            path: path.to_path_buf(),
            fd,
            report: Report::default(),
        })
    }

    /// The tree's directory fd (paths under it resolve with
    /// [`Tree::open`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` (a path inside the tree, links followed as the
    /// container would see them, never out of it) with `flags`.
    pub fn open(&self, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        let rel = rel.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        rustix::fs::openat2(
            &self.fd,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
    }

    /// Reads a regular file of the tree, up to `max` bytes; `None` if it
    /// does not exist.
    pub fn read(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let fd = match self.open(rel, OFlags::RDONLY | OFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(err("open", rel)(e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(err("stat", rel))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Error::Invalid(format!("{rel}: not a regular file")));
        }
        if st.st_size as u64 > max {
            return Err(Error::Invalid(format!(
                "{rel}: {} bytes, more than the {max} read",
                st.st_size
            )));
        }
        let mut data = Vec::new();
        std::fs::File::from(fd)
            .take(max)
            .read_to_end(&mut data)
            .map_err(Error::io("read", self.path.join(rel)))?;
        Ok(Some(data))
    }

    /// Writes a file in the tree (replacing one that is there), its
    /// directory made if missing; the last component is never followed.
    pub fn write(&self, rel: &str, data: &[u8], uid: u32, gid: u32, mode: u32) -> Result<()> {
        let comps = components(rel.as_bytes())?;
        let Some((name, dirs)) = comps.split_last() else {
            return Err(Error::Invalid(format!("{rel}: not a file name")));
        };
        let parent = self.parent(dirs, rel)?;
        remove_at(&parent, name, rel)?;
        let fd = create_file(&parent, name, rel)?;
        let mut f = std::fs::File::from(fd);
        f.write_all(data)
            .map_err(Error::io("write", self.path.join(rel)))?;
        set_owner_mode(f.as_fd(), uid, gid, mode, rel)
    }

    /// Makes a directory (and its parents) if missing, with this owner
    /// and mode.
    pub fn mkdir(&self, rel: &str, uid: u32, gid: u32, mode: u32) -> Result<()> {
        let comps = components(rel.as_bytes())?;
        let fd = self.parent(&comps, rel)?;
        set_owner_mode(fd.as_fd(), uid, gid, mode, rel)
    }

    /// Removes a path of the tree (a directory with all it holds), if it
    /// is there.
    pub fn remove(&self, rel: &str) -> Result<()> {
        let comps = components(rel.as_bytes())?;
        let Some((name, dirs)) = comps.split_last() else {
            return Ok(());
        };
        match self.existing_parent(dirs, rel)? {
            Some(parent) => remove_at(&parent, name, rel),
            None => Ok(()),
        }
    }

    /// Opens the directory `dirs` (made, mode 0755, where missing).
    fn parent(&self, dirs: &[&OsStr], shown: &str) -> Result<OwnedFd> {
        let mut fd = self
            .open(".", OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(err("open", "/"))?;
        for i in 0..dirs.len() {
            let sub = join(&dirs[..=i]);
            fd = match self.open(&sub, OFlags::RDONLY | OFlags::DIRECTORY) {
                Ok(next) => next,
                Err(rustix::io::Errno::NOENT) => {
                    // A link whose target is not in the tree: refused, not
                    // made (a directory at an absolute path of the host's
                    // choosing is no part of an image).
                    if let Ok(st) = rustix::fs::statat(&fd, dirs[i], AtFlags::SYMLINK_NOFOLLOW) {
                        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                            return Err(Error::Invalid(format!(
                                "{shown}: {sub} is a symlink to a directory that is not in the image"
                            )));
                        }
                    }
                    rustix::fs::mkdirat(&fd, dirs[i], Mode::from_raw_mode(0o755))
                        .map_err(err("mkdir", &sub))?;
                    self.open(&sub, OFlags::RDONLY | OFlags::DIRECTORY)
                        .map_err(err("open", &sub))?
                }
                Err(rustix::io::Errno::NOTDIR) => {
                    return Err(Error::Invalid(format!("{shown}: {sub} is not a directory")))
                }
                Err(e) => return Err(err("open", &sub)(e)),
            };
        }
        Ok(fd)
    }

    fn existing_parent(&self, dirs: &[&OsStr], shown: &str) -> Result<Option<OwnedFd>> {
        match self.open(&join(dirs), OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
            Err(e) => Err(err("open", shown)(e)),
        }
    }

    /// Applies one layer (an uncompressed tar stream). `whiteouts`: the
    /// OCI layer rules (`.wh.NAME` removes NAME, `.wh..wh..opq` empties
    /// the directory); a plain root filesystem tarball has none.
    pub fn apply<R: Read>(&mut self, layer: R, whiteouts: bool, origin: &str) -> Result<()> {
        let mut archive = tar::Archive::new(layer);
        let entries = archive
            .entries()
            .map_err(|e| Error::Invalid(format!("{origin}: not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| Error::Invalid(format!("{origin}: a broken tar entry: {e}")))?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let bad = |why: String| Error::Invalid(format!("{origin}: {shown}: {why}"));
            let comps = components(&raw).map_err(|e| bad(e.to_string()))?;
            let Some((name, dirs)) = comps.split_last() else {
                continue; // the root itself: it keeps 0755 root
            };
            // Named as the container sees it from here on.
            let shown = format!("/{}", join(&comps).trim_start_matches("./"));
            let bad = |why: String| Error::Invalid(format!("{origin}: {shown}: {why}"));
            self.report.entries += 1;
            let h = entry.header();
            let (uid, gid) = (
                h.uid().map_err(|e| bad(e.to_string()))?,
                h.gid().map_err(|e| bad(e.to_string()))?,
            );
            if uid >= ID_LIMIT || gid >= ID_LIMIT {
                return Err(bad(format!(
                    "owned by {uid}:{gid}; a container has the IDs 0 to {}",
                    ID_LIMIT - 1
                )));
            }
            let (uid, gid) = (uid as u32, gid as u32);
            let mut mode = h.mode().map_err(|e| bad(e.to_string()))? & 0o7777;
            let kind = h.entry_type();

            if whiteouts {
                let n = name.as_bytes();
                if n == b".wh..wh..opq" {
                    if let Some(dir) = self.existing_parent(dirs, &shown)? {
                        clear_dir(&dir, &shown)?;
                    }
                    continue;
                }
                if let Some(hidden) = n.strip_prefix(b".wh.") {
                    if let Some(dir) = self.existing_parent(dirs, &shown)? {
                        remove_at(&dir, OsStr::from_bytes(hidden), &shown)?;
                    }
                    continue;
                }
            }
            let parent = self.parent(dirs, &shown)?;
            match kind {
                tar::EntryType::Directory => {
                    let keep = matches!(
                        rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW),
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory
                    );
                    if !keep {
                        remove_at(&parent, name, &shown)?;
                        rustix::fs::mkdirat(&parent, *name, Mode::from_raw_mode(0o700))
                            .map_err(err("mkdir", &shown))?;
                    }
                    let fd = rustix::fs::openat(
                        &parent,
                        *name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(err("open", &shown))?;
                    set_owner_mode(fd.as_fd(), uid, gid, mode, &shown)?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    remove_at(&parent, name, &shown)?;
                    let fd = create_file(&parent, name, &shown)?;
                    let mut f = std::fs::File::from(fd);
                    let n = io::copy(&mut entry, &mut f).map_err(|e| bad(format!("write: {e}")))?;
                    self.report.bytes += n;
                    if mode & 0o6000 != 0 {
                        mode &= 0o1777;
                        self.report.setuid_cleared.push(shown.clone());
                    }
                    set_owner_mode(f.as_fd(), uid, gid, mode, &shown)?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| bad("a symlink without a target".into()))?
                        .into_owned();
                    remove_at(&parent, name, &shown)?;
                    rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, *name)
                        .map_err(err("symlink", &shown))?;
                    let (u, g) = sys::ids(uid, gid);
                    rustix::fs::chownat(
                        &parent,
                        *name,
                        Some(u),
                        Some(g),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(err("chown", &shown))?;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| bad("a hard link without a target".into()))?
                        .into_owned();
                    let tcomps = components(&target).map_err(|e| bad(e.to_string()))?;
                    let Some((tname, tdirs)) = tcomps.split_last() else {
                        return Err(bad("a hard link to the root".into()));
                    };
                    let tparent = self.existing_parent(tdirs, &shown)?.ok_or_else(|| {
                        bad(format!(
                            "a hard link to {}, which is not in the archive before it",
                            String::from_utf8_lossy(&target)
                        ))
                    })?;
                    remove_at(&parent, name, &shown)?;
                    rustix::fs::linkat(&tparent, *tname, &parent, *name, AtFlags::empty())
                        .map_err(err("link", &shown))?;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    self.report.skipped.push(shown.clone());
                }
                // PAX and GNU long-name records are folded into the
                // entries by the tar crate; anything else is not a file.
                _ => {}
            }
        }
        Ok(())
    }
}

/// The normal components of an archive path: `./`, `/` and empty parts
/// dropped, `..` refused.
pub fn components(raw: &[u8]) -> Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::Invalid(
                    "the path holds `..`: it would leave the root".into(),
                ))
            }
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

fn join(comps: &[&OsStr]) -> String {
    let mut s = String::from(".");
    for c in comps {
        s.push('/');
        s.push_str(&c.to_string_lossy());
    }
    s
}

fn create_file(parent: &OwnedFd, name: &OsStr, shown: &str) -> Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(err("create", shown))
}

fn set_owner_mode(fd: BorrowedFd, uid: u32, gid: u32, mode: u32, shown: &str) -> Result<()> {
    let (u, g) = sys::ids(uid, gid);
    rustix::fs::fchown(fd, Some(u), Some(g)).map_err(err("chown", shown))?;
    // After chown, which clears the setuid bits a mode would set.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(err("chmod", shown))
}

/// Removes `name` in `dir` (a directory with its contents), if there;
/// links are removed, never followed.
fn remove_at(dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(err("stat", shown)(e)),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("open", shown))?;
        clear_dir(&sub, shown)?;
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(err("remove", shown))
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(err("remove", shown))
    }
}

/// Removes everything in a directory.
fn clear_dir(dir: &OwnedFd, shown: &str) -> Result<()> {
    let mut names = Vec::new();
    let it = rustix::fs::Dir::read_from(dir).map_err(err("read directory", shown))?;
    for e in it {
        let e = e.map_err(err("read directory", shown))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(std::ffi::OsString::from_vec(n.to_vec()));
        }
    }
    for n in names {
        remove_at(dir, &n, shown)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        // The caller's own IDs: unit tests need no root.
        h.set_uid(rustix::process::getuid().as_raw().into());
        h.set_gid(rustix::process::getgid().as_raw().into());
        h
    }

    #[test]
    fn components_refuse_dotdot_and_drop_dots() {
        assert!(components(b"a/../b").is_err());
        assert!(components(b"../etc/passwd").is_err());
        let c = components(b"./usr//bin/./sh").unwrap();
        assert_eq!(c, ["usr", "bin", "sh"]);
        assert!(components(b"/").unwrap().is_empty());
    }

    #[test]
    fn a_planted_symlink_never_leads_out_of_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut t = Tree::create(&d.path().join("root")).unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        // etc -> <outside>, then etc/passwd: refused, nothing written.
        let escape = archive(|b| {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, "etc", &target).unwrap();
            let mut h = header(tar::EntryType::Regular, 0o644, 4);
            b.append_data(&mut h, "etc/passwd", &b"evil"[..]).unwrap();
        });
        let e = t.apply(&escape[..], true, "test").unwrap_err().to_string();
        assert!(e.contains("not in the image"), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        let followed = archive(|b| {
            // An absolute link is followed inside the tree, as the
            // container would: lib -> /usr/lib, then lib/x lands in usr/lib.
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut h, "usr/lib", io::empty()).unwrap();
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, "lib", "/usr/lib").unwrap();
            let mut h = header(tar::EntryType::Regular, 0o644, 1);
            b.append_data(&mut h, "lib/x", &b"1"[..]).unwrap();
            // A symlink as the last component is replaced, not written through.
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, "shadow", outside.path().join("shadow"))
                .unwrap();
            let mut h = header(tar::EntryType::Regular, 0o644, 4);
            b.append_data(&mut h, "shadow", &b"evil"[..]).unwrap();
        });
        t.apply(&followed[..], true, "test").unwrap();
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert_eq!(
            std::fs::read(d.path().join("root/usr/lib/x")).unwrap(),
            b"1"
        );
        let shadow = d.path().join("root/shadow");
        assert!(std::fs::symlink_metadata(&shadow).unwrap().is_file());
    }

    #[test]
    fn whiteouts_setuid_devices_and_ids() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tree::create(&d.path().join("root")).unwrap();
        let one = archive(|b| {
            for (p, mode) in [
                ("a/x", 0o644),
                ("a/y", 0o644),
                ("b/z", 0o644),
                ("su", 0o4755),
            ] {
                let mut h = header(tar::EntryType::Regular, mode, 1);
                b.append_data(&mut h, p, &b"1"[..]).unwrap();
            }
            let mut h = header(tar::EntryType::Char, 0o666, 0);
            b.append_data(&mut h, "null", io::empty()).unwrap();
        });
        t.apply(&one[..], true, "one").unwrap();
        let two = archive(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 0);
            b.append_data(&mut h, "a/.wh.x", io::empty()).unwrap();
            let mut h = header(tar::EntryType::Regular, 0o644, 0);
            b.append_data(&mut h, "b/.wh..wh..opq", io::empty())
                .unwrap();
        });
        t.apply(&two[..], true, "two").unwrap();
        let r = d.path().join("root");
        assert!(!r.join("a/x").exists() && r.join("a/y").exists());
        assert!(r.join("b").is_dir() && !r.join("b/z").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(r.join("su"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert_eq!(t.report.setuid_cleared, ["/su"]);
        assert_eq!(t.report.skipped, ["/null"]);
        assert!(!r.join("null").exists());

        let big = archive(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 1);
            h.set_uid(100_000);
            b.append_data(&mut h, "f", &b"1"[..]).unwrap();
        });
        let e = t.apply(&big[..], true, "three").unwrap_err().to_string();
        assert!(e.contains("100000") && e.contains("three: /f"), "{e}");
        let up = archive(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 1);
            b.append_data(&mut h, "x", &b"1"[..]).unwrap();
        });
        // The tar crate refuses `..` when writing: craft the header.
        let mut raw = up.clone();
        let mut h = tar::Header::new_gnu();
        h.as_mut_bytes().copy_from_slice(&raw[..512]);
        h.as_old_mut().name[..4].copy_from_slice(b"../x");
        h.set_cksum();
        raw[..512].copy_from_slice(h.as_bytes());
        let e = t.apply(&raw[..], true, "four").unwrap_err().to_string();
        assert!(e.contains("four: ../x") && e.contains(".."), "{e}");
        assert!(!d.path().join("x").exists());
    }
}
