//! How `stop` powers a native container off.
//!
//! BusyBox init's poweroff (SIGUSR2) runs the inittab's `shutdown` actions,
//! then `kill(-1, SIGTERM)`, sleeps a second, `kill(-1, SIGKILL)`, and
//! exits. From PID 1 of a PID namespace, `kill(-1)` makes the kernel walk
//! every process on the host (to find those its namespace can see) under
//! the tasklist lock: two walks per container, so stopping N containers
//! costs N² (10,000 took 52-124 s, 70% of it in those walks).
//!
//! When the container's inittab has no `shutdown` action, nifty does the
//! same sequence from the host, in the container's cgroup: it stops init
//! (SIGSTOP, so that it respawns nothing), sends SIGTERM to every other
//! process, and once they are gone (or at `--timeout`) kills what is left
//! with `cgroup.kill`. The services see what they would see from init. An
//! inittab with `shutdown` actions (or none: BusyBox's default has some)
//! is left to init's own poweroff, so that they run.

use std::io::Read;
use std::os::fd::AsFd;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::process::{Pid, PidfdFlags, Signal};

use super::cgroup::Cgroup;

/// The shutdown line of inittabs written by nifty before 0.1 stopped using
/// one: it only printed a message, so it does not need init.
const LEGACY_SHUTDOWN: &str = "/bin/echo nifty: shutting down";

/// The `shutdown` actions of an inittab (BusyBox `id:runlevels:action:process`).
pub fn shutdown_actions(inittab: &str) -> Vec<&str> {
    inittab
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.splitn(4, ':');
            let (_, _, action, process) = (f.next()?, f.next()?, f.next()?, f.next()?);
            (action.trim() == "shutdown").then_some(process.trim())
        })
        .filter(|p| *p != LEGACY_SHUTDOWN)
        .collect()
}

/// Whether the init `pid` must power off by itself: its root's
/// `/etc/inittab` has `shutdown` actions, or cannot be read as a regular
/// file (BusyBox's built-in inittab has some). Read inside the container's
/// root, never through a link out of it.
pub fn init_has_shutdown_actions(pid: i32) -> bool {
    let read = || -> Option<String> {
        let root = rustix::fs::open(
            format!("/proc/{pid}/root"),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let fd = rustix::fs::openat2(
            &root,
            "etc/inittab",
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
        )
        .ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return None;
        }
        let mut text = String::new();
        std::fs::File::from(fd)
            .take(64 << 10)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    };
    read().map_or(true, |t| !shutdown_actions(&t).is_empty())
}

/// Sends SIGTERM to every process of `cg` but `init` that is not in
/// `signalled` yet, and adds them there; returns how many were signalled.
/// A PID read from the cgroup may be reused by then: each one is opened as
/// a pidfd first and signalled only if the cgroup still lists it after, so
/// that a signal never reaches a process outside the container.
pub fn term_services(cg: &Cgroup, init: i32, signalled: &mut Vec<i32>) -> usize {
    let fresh: Vec<(i32, std::os::fd::OwnedFd)> = cg
        .procs()
        .into_iter()
        .filter(|p| *p != init && !signalled.contains(p))
        .filter_map(|p| {
            let fd = rustix::process::pidfd_open(Pid::from_raw(p)?, PidfdFlags::empty()).ok()?;
            Some((p, fd))
        })
        .collect();
    if fresh.is_empty() {
        return 0;
    }
    let still = cg.procs();
    let mut n = 0;
    for (p, fd) in fresh {
        if still.contains(&p)
            && rustix::process::pidfd_send_signal(fd.as_fd(), Signal::Term).is_ok()
        {
            n += 1;
        }
        signalled.push(p);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_shutdown_actions() {
        let t = "# comment\n::respawn:/sbin/syslogd -n\n\
                 ::shutdown:/bin/umount -a -r\n  ::shutdown: /sbin/swapoff -a\n\
                 ::ctrlaltdel:/sbin/reboot\nbroken line\n";
        assert_eq!(
            shutdown_actions(t),
            ["/bin/umount -a -r", "/sbin/swapoff -a"]
        );
        assert!(shutdown_actions("::respawn:/usr/sbin/dropbear -F\n").is_empty());
        // A process may hold colons.
        assert_eq!(
            shutdown_actions("::shutdown:/bin/sh -c 'echo a:b'\n"),
            ["/bin/sh -c 'echo a:b'"]
        );
    }

    #[test]
    fn nifty_s_old_message_line_needs_no_init() {
        let old = crate::template::inittab::render(Some(2201))
            + "::shutdown:/bin/echo nifty: shutting down\n";
        assert!(shutdown_actions(&old).is_empty());
        assert!(shutdown_actions(&crate::template::inittab::render(None)).is_empty());
    }
}
