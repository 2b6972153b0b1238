//! Writing into an instance's files from the host (host keys, passwords,
//! authorized keys) without ever following a link the container planted.
//!
//! Every access goes through the instance's *merged* root, so overlayfs does
//! the copy-up exactly as when the container writes: for a running
//! instance that is `/proc/<init>/root`; for a stopped one, a detached
//! overlay mount made with the new mount API (fsopen/fsconfig/fsmount, its
//! layers given as file descriptors, the template idmapped like at boot)
//! that no mount namespace ever sees and that goes away with its fd.
//! Paths are resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)`:
//! a symlink anywhere on the way is refused, not followed.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::userns;
use crate::error::SysError;
use crate::store::{Instance, Store};
use crate::{sys, Error, Result};

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// The merged root of an instance, open for safe reads and writes.
pub struct Root {
    name: String,
    fd: OwnedFd,
    /// Host ID that the container's ID 0 maps to.
    base: u32,
    _lock: Option<OwnedFd>,
}

/// A user of the container.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

impl User {
    /// The container's root.
    pub fn root() -> User {
        User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
        }
    }
}

/// Opens the merged root of an instance, running or not. A stopped
/// instance stays locked (no start) while the root is open. `running`
/// finds the init of a running instance (whichever backend runs it); it
/// is asked under the instance's lock.
pub fn open_root(
    store: &Store,
    inst: &Instance,
    running: impl Fn(&Instance) -> Option<i32>,
) -> Result<Root> {
    let base = inst.security.uid_base.unwrap_or(0);
    let lock = super::proc::lock(&store.instance_dir(&inst.name))?;
    if let Some(pid) = running(inst) {
        return Root::of_running(&inst.name, pid, base);
    }
    let fd = detached_overlay(store, inst)?;
    Ok(Root {
        name: inst.name.clone(),
        fd,
        base,
        _lock: Some(lock),
    })
}

impl Root {
    /// The merged root of a running container, as its init `pid` sees it
    /// (`/proc/<pid>/root`), for reads; `base` is the host ID its root
    /// maps to. No instance lock is taken.
    pub fn of_running(name: &str, pid: i32, base: u32) -> Result<Root> {
        let p = format!("/proc/{pid}/root");
        let fd = rustix::fs::open(
            &p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(Error::sys(format!("open({p})")))?;
        Ok(Root {
            name: name.to_string(),
            fd,
            base,
            _lock: None,
        })
    }
}

/// The overlay of an instance (the template idmapped to its range,
/// under its upper layer) as a detached mount: for host-side writes to a
/// stopped instance, and for the systemd backend's root.
pub(crate) fn detached_overlay(store: &Store, inst: &Instance) -> Result<OwnedFd> {
    let (upper, work) = store.instance_layers(inst)?;
    let lower = super::shift::lower(store, inst)?;
    let ns = match inst.security.uid_base {
        Some(base) if lower.idmap => Some(userns::create(base)?),
        _ => None,
    };
    super::overlay::overlay(&lower.path, &upper, &work, ns.as_ref().map(|n| n.as_fd())).map_err(
        |e| {
            Error::from(SysError {
                call: format!("instance {:?}: {}", inst.name, e.call),
                ..e
            })
        },
    )
}

impl Root {
    /// The error of a failed call on a container path, with a hint for
    /// what `openat2`'s resolve flags refused.
    pub(crate) fn err(
        &self,
        what: &str,
        path: &str,
    ) -> impl FnOnce(rustix::io::Errno) -> Error + '_ {
        let msg = format!("instance {:?}: {what} {path}", self.name);
        move |e| {
            let hint = match e {
                rustix::io::Errno::LOOP => {
                    " (a symlink is on the way; nifty does not follow links inside containers)"
                }
                rustix::io::Errno::XDEV => " (another mount is on the way)",
                _ => "",
            };
            Error::Sys {
                call: format!("{msg}{hint}"),
                err: std::io::Error::from_raw_os_error(e.raw_os_error()),
            }
        }
    }

    /// Opens a directory of the container, never through a symlink.
    fn dir(&self, path: &str) -> Result<OwnedFd> {
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(self.err("open directory", path))
    }

    /// Reads a file of the container; `None` if it does not exist. The
    /// tenant controls it: it is opened without following a link and
    /// without blocking (a FIFO would hang nifty while it holds the
    /// instance's lock), refused unless it is a regular file, and read up
    /// to [`MAX_READ`] bytes (a sparse file could claim terabytes).
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let rel = path.trim_start_matches('/');
        match rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(self.err("stat", path))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    != rustix::fs::FileType::RegularFile
                {
                    return Err(Error::Invalid(format!(
                        "instance {:?}: {path} is not a regular file; nifty reads nothing else from a container",
                        self.name
                    )));
                }
                if st.st_size as u64 > MAX_READ {
                    return Err(Error::Invalid(format!(
                        "instance {:?}: {path} is {} bytes, more than the {} nifty reads from a container",
                        self.name, st.st_size, MAX_READ
                    )));
                }
                let mut v = Vec::new();
                std::fs::File::from(fd)
                    .take(MAX_READ + 1)
                    .read_to_end(&mut v)
                    .map_err(Error::io("read", path))?;
                if v.len() as u64 > MAX_READ {
                    return Err(Error::Invalid(format!(
                        "instance {:?}: {path} grew past the {MAX_READ} bytes nifty reads from a container",
                        self.name
                    )));
                }
                Ok(Some(v))
            }
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.err("open", path)(e)),
        }
    }

    /// Makes sure a directory exists (one level, under an existing parent),
    /// owned by the container's `uid:gid` with `mode`.
    pub fn mkdir(&self, path: &str, uid: u32, gid: u32, mode: u32) -> Result<()> {
        let (parent, name) = split(path)?;
        let dfd = self.dir(parent)?;
        match rustix::fs::mkdirat(&dfd, name, Mode::from_raw_mode(mode)) {
            Ok(()) => {
                let fd = rustix::fs::openat2(
                    &dfd,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                    Mode::empty(),
                    RESOLVE,
                )
                .map_err(self.err("open", path))?;
                self.own(&fd, path, uid, gid, mode)
            }
            Err(rustix::io::Errno::EXIST) => self.dir(path).map(drop),
            Err(e) => Err(self.err("mkdir", path)(e)),
        }
    }

    /// Replaces a file atomically (temp file + rename in the same
    /// directory), owned by the container's `uid:gid` with `mode`. A symlink
    /// at `path` is replaced, never followed.
    pub fn write(&self, path: &str, data: &[u8], uid: u32, gid: u32, mode: u32) -> Result<()> {
        let (parent, name) = split(path)?;
        let dfd = self.dir(parent)?;
        self.replace_at(&dfd, name, path, (uid, gid, mode), &mut &data[..])
            .map(drop)
    }

    /// Replaces `name` in the directory `dfd` with what `src` holds: a
    /// temp file of nifty's, owned by the container's `uid:gid` with
    /// `mode`, filled, synced and renamed over it (a link there is
    /// replaced, never followed). Returns the bytes written.
    pub(crate) fn replace_at(
        &self,
        dfd: &OwnedFd,
        name: &str,
        path: &str,
        (uid, gid, mode): (u32, u32, u32),
        src: &mut dyn Read,
    ) -> Result<u64> {
        let tmp = format!(".{name}.nifty-{}", std::process::id());
        let fd = rustix::fs::openat(
            dfd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(self.err("create", path))?;
        let result = (|| {
            self.own(&fd, path, uid, gid, mode)?;
            let mut f = std::fs::File::from(fd);
            let n = std::io::copy(src, &mut f).map_err(Error::io("write", path))?;
            f.flush().map_err(Error::io("write", path))?;
            f.sync_all().map_err(Error::io("fsync", path))?;
            rustix::fs::renameat(dfd, tmp.as_str(), dfd, name)
                .map_err(self.err("rename onto", path))?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(dfd, tmp.as_str(), rustix::fs::AtFlags::empty());
        }
        result
    }

    /// The instance's name, for messages.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The host ID the container's ID 0 maps to.
    pub(crate) fn base(&self) -> u32 {
        self.base
    }

    /// Opens a container path (absolute or relative to its root) with
    /// `flags`, never through a symlink nor above the root.
    pub(crate) fn open_at(&self, path: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        rustix::fs::openat2(&self.fd, rel, flags, Mode::empty(), RESOLVE)
    }

    /// Gives an open file to the container's `uid:gid` with `mode`.
    pub(crate) fn chown(
        &self,
        fd: &OwnedFd,
        path: &str,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<()> {
        self.own(fd, path, uid, gid, mode)
    }

    fn own(&self, fd: &OwnedFd, path: &str, uid: u32, gid: u32, mode: u32) -> Result<()> {
        let (u, g) = sys::ids(self.base + uid, self.base + gid);
        rustix::fs::fchown(fd, Some(u), Some(g)).map_err(self.err("chown", path))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(self.err("chmod", path))
    }

    /// Looks a user up in the container's /etc/passwd.
    pub fn user(&self, name: &str) -> Result<User> {
        let text = self.read("/etc/passwd")?.unwrap_or_default();
        for line in String::from_utf8_lossy(&text).lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 6 && f[0] == name {
                if let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) {
                    if uid < userns::RANGE && gid < userns::RANGE {
                        return Ok(User {
                            name: name.into(),
                            uid,
                            gid,
                            home: f[5].into(),
                        });
                    }
                }
            }
        }
        Err(Error::Invalid(format!(
            "instance {:?}: no user {name:?} in its /etc/passwd",
            self.name
        )))
    }
}

/// The most nifty reads of one file of a container (passwd, shadow,
/// authorized_keys: a few KiB in practice).
pub const MAX_READ: u64 = 4 << 20;

fn split(path: &str) -> Result<(&str, &str)> {
    match path.rsplit_once('/') {
        Some((p, n)) if !n.is_empty() && n != "." && n != ".." => {
            Ok((if p.is_empty() { "/" } else { p }, n))
        }
        _ => Err(Error::Invalid(format!("bad path {path:?}"))),
    }
}

/// Replaces USER's password field in shadow text.
pub fn set_shadow_hash(shadow: &str, user: &str, hash: &str) -> Result<String> {
    let mut found = false;
    let mut out = String::with_capacity(shadow.len() + hash.len());
    for line in shadow.lines() {
        let mut f: Vec<&str> = line.split(':').collect();
        if f.len() >= 2 && f[0] == user {
            f[1] = hash;
            found = true;
            out.push_str(&f.join(":"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !found {
        return Err(Error::Invalid(format!("no user {user:?} in /etc/shadow")));
    }
    Ok(out)
}

/// Does a string look like a crypt(3) hash that glibc verifies?
pub fn is_crypt_hash(h: &str) -> bool {
    let parts: Vec<&str> = h.split('$').collect();
    parts.len() >= 4
        && parts[0].is_empty()
        && matches!(parts[1], "1" | "5" | "6" | "y" | "2b" | "2y")
        && !h.contains([':', '\n', ' '])
}

/// Console logs are rotated at start past this size.
const LOG_ROTATE: u64 = 1 << 20;

/// Opens (and rotates, past 1 MiB, to `console.log.1`) an instance's
/// console log for appending, and writes the start line; init's stdout
/// and stderr go there, on both backends.
///
/// A log in the disk store counts against the instance's limit: when that
/// is full, even the rename fails (btrfs reserves metadata for it), and
/// then the old log is removed (an unlink always frees), so that every
/// start gives the instance its room back.
pub fn open_console_log(path: &std::path::Path, name: &str) -> Result<OwnedFd> {
    let mut dropped = false;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE) {
        let old = path.with_extension("log.1");
        if std::fs::rename(path, &old).is_err() {
            let _ = std::fs::remove_file(&old);
            if std::fs::rename(path, &old).is_err() {
                dropped = std::fs::remove_file(path).is_ok();
            }
        }
    }
    let mut f = std::fs::File::from(append_console_log(path)?);
    if dropped {
        let _ =
            f.write_all(b"nifty: the last console log filled the instance's disk limit: removed\n");
    }
    // One write: the line never interleaves with the container's output.
    let line = format!(
        "nifty: starting instance {name} at {}\n",
        crate::store::now()
    );
    let _ = f.write_all(line.as_bytes());
    Ok(f.into())
}

/// Opens an instance's console log for appending (made if missing, never
/// through a symlink): where a process nifty starts in a running instance
/// writes its messages.
pub fn append_console_log(path: &std::path::Path) -> Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(Error::io("open", path))?;
    Ok(f.into())
}

/// Appends a line to an instance's console log (`nifty logs`), for what
/// nifty does to it that init would otherwise have printed (either
/// backend). A failure is only logged: the note is not worth a failed stop.
pub fn console_note(store: &Store, inst: &Instance, line: &str) {
    let r = append_console_log(&store.console_log(inst)).and_then(|fd| {
        rustix::io::write(&fd, format!("{line}\n").as_bytes())
            .map_err(Error::sys("write(console log)"))
    });
    if let Err(e) = r {
        tracing::debug!(instance = %inst.name, "console log: {e}");
    }
}

/// What a stop by nifty (rather than by init's own poweroff) writes to the
/// instance's console log, on either backend.
pub const POWERING_OFF: &str = "nifty: powering off: init stopped, SIGTERM to its processes";

/// Whether the init `pid` of instance `name` must power off by itself: its
/// root's `/etc/inittab` has `shutdown` actions, or cannot be read as
/// [`Root::read`] reads a tenant's file (a regular file, no link on the
/// way; BusyBox's built-in inittab, used without one, has some).
pub fn init_has_shutdown_actions(name: &str, pid: i32) -> bool {
    match Root::of_running(name, pid, 0).and_then(|root| root.read("/etc/inittab")) {
        Ok(Some(text)) => {
            !crate::template::inittab::shutdown_actions(&String::from_utf8_lossy(&text)).is_empty()
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_edit() {
        let s = "root:!:1:0:99999:7:::\nluser:*:1:0:99999:7:::\n";
        let t = set_shadow_hash(s, "luser", "$6$salt$hash").unwrap();
        assert_eq!(
            t,
            "root:!:1:0:99999:7:::\nluser:$6$salt$hash:1:0:99999:7:::\n"
        );
        assert!(set_shadow_hash(s, "bob", "$6$x$y").is_err());
    }

    #[test]
    fn hashes() {
        assert!(is_crypt_hash("$6$abc$def"));
        assert!(is_crypt_hash("$y$j9T$salt$hash"));
        assert!(!is_crypt_hash("plain"));
        assert!(!is_crypt_hash("$6$a:b$c"));
        assert!(!is_crypt_hash("$9$a$b"));
    }

    #[test]
    fn paths() {
        assert_eq!(split("/etc/shadow").unwrap(), ("/etc", "shadow"));
        assert_eq!(split("/x").unwrap(), ("/", "x"));
        assert!(split("/etc/").is_err());
        assert!(split("/etc/..").is_err());
    }
}
