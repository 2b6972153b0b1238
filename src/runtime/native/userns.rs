//! User namespaces: container root is an unprivileged host UID.
//!
//! Every instance owns a distinct range of 65536 host IDs (like
//! `systemd-nspawn --private-users=pick`), so that a root escaping one
//! container owns nothing of another. Ranges are claimed at create time by
//! an atomic symlink `uids/<index> -> <name>` and released at `rm`; the
//! range is recorded in instance.toml. The shared template stays one set of
//! root-owned files: each container sees it through an idmapped mount
//! (Linux >= 5.19 for overlayfs on idmapped layers) that shows host UID 0
//! as the container's root; the instance's upper layer is owned by its
//! range on the host.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use crate::sys;
use crate::{Error, Result};

/// IDs per container.
pub const RANGE: u32 = 65536;
/// First host ID handed out (nspawn's pick range starts here too).
pub const FIRST: u32 = 0x0008_0000;
/// Number of ranges: up to nspawn's upper bound 0x6FFF0000.
pub const SLOTS: u32 = (0x6FFF_0000 - FIRST) / RANGE;

/// Claims a free range for `name` under `dir`; returns its first host ID.
/// `hint` (e.g. the instance number) is tried first, which keeps ranges
/// predictable and makes a claim O(1) in the common case.
pub fn claim(dir: &Path, name: &str, hint: Option<u32>) -> Result<u32> {
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let start = hint.unwrap_or(0) % SLOTS;
    for i in 0..SLOTS {
        let slot = (start + i) % SLOTS;
        match std::os::unix::fs::symlink(name, dir.join(slot.to_string())) {
            Ok(()) => return Ok(FIRST + slot * RANGE),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::io(
                    "create uid range claim",
                    dir.join(slot.to_string()),
                )(e))
            }
        }
    }
    Err(Error::Host(format!(
        "no free UID range left for instance {name:?}"
    )))
}

/// Releases the range starting at `base` if `name` holds it.
pub fn release(dir: &Path, name: &str, base: u32) {
    let link = dir.join(((base - FIRST) / RANGE).to_string());
    if std::fs::read_link(&link).is_ok_and(|p| p == Path::new(name)) {
        let _ = std::fs::remove_file(link);
    }
}

/// Makes a user namespace mapping container IDs 0..65535 to host IDs
/// `base..base+65535` and returns an fd for it. A short-lived child holds
/// the namespace while its maps are written; the fd keeps it alive.
pub fn create(base: u32) -> Result<OwnedFd> {
    let (r, w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(Error::sys("pipe2()"))?;
    let parent = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(Error::sys("pidfd_open(self)"))?;
    // The holder shares nifty's memory (no fork of a big, threaded
    // process): it only waits until the maps are written.
    let mut stack = vec![0u8; 16 << 10];
    let mut hold = || i32::from(!sys::wait_for_parent(r.as_fd(), parent.as_fd()));
    let (pid, _pidfd) =
        sys::clone_vm(libc::CLONE_NEWUSER, &mut stack, &mut hold).map_err(|e| Error::Sys {
            call: "clone(CLONE_VM|CLONE_NEWUSER)".into(),
            source: e,
        })?;
    let result = (|| {
        let map = format!("0 {base} {RANGE}\n");
        for f in ["uid_map", "gid_map"] {
            let p = format!("/proc/{pid}/{f}");
            std::fs::write(&p, &map).map_err(|e| Error::Sys {
                call: format!("write({p}, {map:?})"),
                source: e,
            })?;
        }
        let p = format!("/proc/{pid}/ns/user");
        rustix::fs::open(
            &p,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(Error::sys(format!("open({p})")))
    })();
    let _ = rustix::io::write(&w, b"x");
    drop(w);
    let _ = rustix::process::waitpid(
        rustix::process::Pid::from_raw(pid),
        rustix::process::WaitOptions::empty(),
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_distinct_and_released() {
        let d = tempfile::tempdir().unwrap();
        let a = claim(d.path(), "1", Some(1)).unwrap();
        assert_eq!(a, FIRST + RANGE);
        // Slot taken: the next free one, never the same range.
        let b = claim(d.path(), "x", Some(1)).unwrap();
        assert_eq!(b, FIRST + 2 * RANGE);
        let c = claim(d.path(), "y", None).unwrap();
        assert_eq!(c, FIRST);
        release(d.path(), "1", a);
        assert_eq!(claim(d.path(), "z", Some(1)).unwrap(), a);
        // Releasing with the wrong owner does nothing.
        release(d.path(), "nope", b);
        assert!(d.path().join("2").symlink_metadata().is_ok());
        assert!(u64::from(FIRST) + u64::from(SLOTS) * u64::from(RANGE) <= 0x6FFF_0000);
    }
}
