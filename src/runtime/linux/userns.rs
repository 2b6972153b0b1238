//! User namespaces: container root is an unprivileged host UID.
//!
//! Every instance owns a distinct range of 65536 host IDs (like
//! `systemd-nspawn --private-users=pick`), so that a root escaping one
//! container owns nothing of another. Ranges are claimed at create time
//! (`crate::claims::uid_range`) and recorded in instance.toml. The shared template stays one set of
//! root-owned files: each container sees it through an idmapped mount
//! (Linux >= 5.19 for overlayfs on idmapped layers) that shows host UID 0
//! as the container's root; the instance's upper layer is owned by its
//! range on the host.

use std::os::fd::{AsFd, OwnedFd};

use crate::sys;
use crate::{Error, Result};

/// IDs per container.
pub use crate::claims::RANGE;
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
    // process) and its fd table (none copied at its birth, none closed at
    // its exit: in `serve`, about 2% of a cold start's CPU): it only waits
    // until the maps are written. Its stack and its function (with the fds
    // it reads) are owned here, not on this frame, for they must outlive
    // it: it is reaped later (`later::reap`), not waited for.
    let mut stack = sys::Stack::new(16 << 10);
    let mut hold: Box<dyn FnMut() -> i32 + Send> =
        Box::new(move || i32::from(!sys::wait_for_parent(r.as_fd(), parent.as_fd())));
    let (pid, _pidfd) = sys::clone_vm(
        libc::CLONE_NEWUSER | libc::CLONE_FILES,
        &mut stack,
        &mut *hold,
    )
    .map_err(|e| Error::Sys {
        call: "clone(CLONE_VM|CLONE_FILES|CLONE_NEWUSER)".into(),
        err: e,
    })?;
    let result = (|| {
        let map = format!("0 {base} {RANGE}\n");
        for f in ["uid_map", "gid_map"] {
            let p = format!("/proc/{pid}/{f}");
            std::fs::write(&p, &map).map_err(|e| Error::Sys {
                call: format!("write({p}, {map:?})"),
                err: e,
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
    super::later::reap(pid, Box::new((stack, hold)));
    result
}
