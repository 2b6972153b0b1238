//! `nifty systemd stop NAME`, nifty@.service's ExecStop: the unit's stop
//! without BusyBox init's poweroff, which sleeps two seconds and syncs the
//! host's filesystems twice.
//!
//! It powers the container off as the native launcher does (see
//! `runtime::native::poweroff`): init is stopped (SIGSTOP: it respawns
//! nothing), every other process of its PID namespace gets SIGTERM, and
//! once they are gone (or after the grace time) a child of this process
//! made in that namespace calls reboot(2), and the kernel ends the
//! namespace (`sys::power_off_pid_ns`, Linux 3.4). nspawn sees its init end
//! as from a poweroff (SIGINT: "shut down"), exits 0, and the unit stops
//! clean. Whatever goes wrong leaves init running again and the stop to
//! systemd's KillSignal (SIGUSR2 to init: its own poweroff).

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_send_signal, Signal};

use super::Systemd;
use crate::runtime::linux::{cgroup, files, proc};
use crate::store::Instance;
use crate::{Error, Result};

/// How long the kernel may take to end the namespace once asked.
const REBOOT_WAIT: Duration = Duration::from_secs(5);

impl Systemd {
    /// Powers a running instance off from the host, as the module says.
    /// Returns whether it did. `false`, with init running again, leaves the
    /// stop to systemd's KillSignal: when it is not running, when its
    /// inittab has `shutdown` actions (init's poweroff runs them), or when
    /// it did not go down.
    pub fn power_off_inside(&self, inst: &Instance, grace: Duration) -> Result<bool> {
        let target = match self.target(inst) {
            Ok(t) => t,
            Err(Error::NotRunning(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let init = target.pid;
        if files::init_has_shutdown_actions(&inst.name, init) {
            return Ok(false);
        }
        let Some(init_fd) = proc::pidfd(init) else {
            return Ok(false);
        };
        let Some(own) = proc::pid_ns(init) else {
            return Ok(false);
        };
        let Some(dir) = target.procs_files.first().and_then(|f| f.parent()) else {
            return Ok(false);
        };
        // The container's processes but init: in its cgroup (and those
        // below) and its PID namespace, which nspawn, in the unit's
        // cgroup too, and this process are not. Each is opened as a pidfd
        // first and kept only if the process opened is in that namespace,
        // so that a reused PID never gets a signal.
        let services = || -> Vec<(i32, OwnedFd)> {
            cgroup::procs_under(dir)
                .into_iter()
                .filter(|p| *p != init)
                .filter_map(|p| proc::pidfd(p).map(|fd| (p, fd)))
                .filter(|(p, _)| proc::pid_ns(*p).as_ref() == Some(&own))
                .collect()
        };
        let resume = || {
            let _ = pidfd_send_signal(&init_fd, Signal::Cont);
            Ok(false)
        };
        if pidfd_send_signal(&init_fd, Signal::Stop).is_err() {
            return Ok(false);
        }
        files::console_note(&self.store, inst, files::POWERING_OFF);
        let deadline = Instant::now() + grace;
        // Each gets SIGTERM once (newcomers too), as from init.
        let mut signalled = HashSet::new();
        loop {
            let left = services();
            if left.is_empty() {
                break;
            }
            for (pid, fd) in &left {
                if signalled.insert(*pid) {
                    let _ = pidfd_send_signal(fd, Signal::Term);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Until one of them exits (or a tenth of a second: a newcomer).
            let mut fds: Vec<_> = left
                .iter()
                .map(|(_, fd)| PollFd::new(fd, PollFlags::IN))
                .collect();
            let wait = (deadline - now).min(Duration::from_millis(100));
            let _ = poll(&mut fds, crate::sys::poll_timeout_ms(wait));
        }
        // Its PID namespace, while the pidfd says that init is still the
        // process at its PID.
        let pidns = rustix::fs::open(
            format!("/proc/{init}/ns/pid").as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        );
        let pidns = match pidns {
            Ok(ns) if proc::exits_within(&init_fd, Duration::ZERO) == Some(false) => ns,
            _ => return resume(),
        };
        if let Err(e) = crate::sys::power_off_pid_ns(pidns.as_fd()) {
            tracing::warn!(
                "instance {:?}: reboot(2) in its PID namespace: {e}",
                inst.name
            );
            return resume();
        }
        if proc::exits_within(&init_fd, REBOOT_WAIT) != Some(true) {
            return resume();
        }
        Ok(true)
    }
}
