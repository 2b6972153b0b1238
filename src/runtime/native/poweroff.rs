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
//! is left to init's own poweroff, so that they run (see
//! `linux::files::init_has_shutdown_actions`). The systemd backend's stop
//! does the same from its unit's ExecStop (`runtime::systemd::stop`).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::process::{Pid, PidfdFlags, Signal};

use crate::runtime::linux::cgroup::Cgroup;

/// Open pidfds of signalled processes the watch may keep (to be woken by
/// their exits); past it, a container is watched by reading its cgroup.
pub struct FdBudget(AtomicUsize);

impl FdBudget {
    /// What the soft RLIMIT_NOFILE leaves after `reserved` fds (one per
    /// init, and room for the rest of nifty).
    pub fn new(reserved: usize) -> FdBudget {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        FdBudget(AtomicUsize::new(limit.saturating_sub(reserved + 1024)))
    }

    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn give(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends SIGTERM to every process of `cg` (as `procs`, the caller's read
/// of it, lists them) but `init` that is not in `signalled` yet, adds them
/// there, and returns the pidfds of those it signalled, as many as `budget`
/// allows (readable once they exit). A PID read from the cgroup may be
/// reused by then: each one is opened as a pidfd first and signalled only
/// if the cgroup still lists it after, so that a signal never reaches a
/// process outside the container.
pub fn term_services(
    cg: &Cgroup,
    procs: Vec<i32>,
    init: i32,
    signalled: &mut Vec<i32>,
    budget: &FdBudget,
) -> Vec<OwnedFd> {
    let fresh: Vec<(i32, OwnedFd)> = procs
        .into_iter()
        .filter(|p| *p != init && !signalled.contains(p))
        .filter_map(|p| {
            let fd = rustix::process::pidfd_open(Pid::from_raw(p)?, PidfdFlags::empty()).ok()?;
            Some((p, fd))
        })
        .collect();
    if fresh.is_empty() {
        return Vec::new();
    }
    let still = cg.procs();
    let mut fds = Vec::new();
    for (p, fd) in fresh {
        signalled.push(p);
        if still.contains(&p)
            && rustix::process::pidfd_send_signal(&fd, Signal::Term).is_ok()
            && budget.take()
        {
            fds.push(fd);
        }
    }
    fds
}

/// A container being stopped.
pub struct Stopping {
    pub name: String,
    pub cg: Cgroup,
    /// Its init (host PID) and a pidfd for it (`None`: none could be
    /// opened; its exit is then read from the cgroup).
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
    /// When what is left gets killed.
    pub deadline: Instant,
    /// nifty powers it off (init is stopped): the PIDs sent SIGTERM so far
    /// and the pidfds kept of those. `None`: init powers off.
    pub services: Option<(Vec<i32>, Vec<OwnedFd>)>,
    /// `cgroup.kill` was written.
    pub killed: bool,
}

/// Cgroups the watch reads per round at most (every 20 ms), so that
/// watching ten thousand containers does not take the CPU they need to
/// shut down.
const SCAN_PER_ROUND: usize = 512;

/// Watches stopping containers from one epoll set until every init has
/// exited (or was given up on, 10 s past its deadline), ending each one as
/// soon as it can:
/// - nifty's poweroff: when the last process sent SIGTERM exits, the cgroup
///   is read once; if init is alone, it is killed, else the newcomers (a
///   service init respawned before its SIGSTOP landed) get SIGTERM too;
/// - init's poweroff: BusyBox init, once it has run its shutdown actions
///   and signalled everything, only sleeps before powering off, so when it
///   is alone in its cgroup (read round robin, a bounded number per round)
///   it is killed;
/// - at its deadline, what is left is killed.
///
/// Returns how many were killed at their deadline. Events, not polling:
/// a stop of ten thousand costs no more per container than a stop of ten.
/// What has no pidfd (past the open-files limit) is read from its cgroup
/// instead, round robin like the rest.
pub fn watch(stopping: &mut [Stopping], budget: &FdBudget) -> usize {
    const SERVICE: u64 = 1 << 63;
    type Slab = Vec<Option<(usize, OwnedFd)>>;
    let Ok(ep) = epoll::create(epoll::CreateFlags::CLOEXEC) else {
        tracing::warn!("epoll_create failed; killing every container now");
        for s in stopping.iter_mut() {
            let _ = s.cg.kill();
            s.killed = true;
        }
        return 0;
    };
    fn add(ep: &OwnedFd, fd: &OwnedFd, key: u64) -> bool {
        epoll::add(
            ep,
            fd,
            epoll::EventData::new_u64(key),
            epoll::EventFlags::IN,
        )
        .is_ok()
    }
    // Service pidfds live in a slab: their key is their index there.
    fn register(ep: &OwnedFd, slab: &mut Slab, owner: usize, fds: Vec<OwnedFd>) -> usize {
        let mut n = 0;
        for fd in fds {
            if add(ep, &fd, SERVICE | slab.len() as u64) {
                slab.push(Some((owner, fd)));
                n += 1;
            }
        }
        n
    }
    // Reads the cgroup of a container none of whose kept pidfds is open:
    // notes init's exit when there is no pidfd to tell it; kills the
    // container if init is alone; else signals the newcomers. Returns how
    // many pidfds it kept.
    fn settle(
        ep: &OwnedFd,
        s: &mut Stopping,
        exited: &mut bool,
        slab: &mut Slab,
        i: usize,
        budget: &FdBudget,
    ) -> usize {
        let procs = s.cg.procs();
        if s.pidfd.is_none() && !procs.contains(&s.pid) {
            *exited = true;
            return 0;
        }
        if s.killed {
            return 0;
        }
        if procs.iter().all(|p| *p == s.pid) {
            let _ = s.cg.kill();
            s.killed = true;
            return 0;
        }
        let Some((signalled, _)) = &mut s.services else {
            return 0;
        };
        let fds = term_services(&s.cg, procs, s.pid, signalled, budget);
        register(ep, slab, i, fds)
    }
    let mut slab: Slab = Vec::new();
    let mut alive = vec![0usize; stopping.len()];
    let mut exited = vec![false; stopping.len()];
    for (i, s) in stopping.iter_mut().enumerate() {
        if let Some(fd) = &s.pidfd {
            if !add(&ep, fd, i as u64) {
                s.pidfd = None;
            }
        }
        if let Some((_, fds)) = &mut s.services {
            alive[i] = register(&ep, &mut slab, i, std::mem::take(fds));
        }
    }
    let mut events = epoll::EventVec::with_capacity(1024);
    let mut timed_out = 0;
    let mut cursor = 0;
    loop {
        let now = Instant::now();
        let waiting = (0..stopping.len()).any(|i| {
            !exited[i]
                && (!stopping[i].killed || now < stopping[i].deadline + Duration::from_secs(10))
        });
        if !waiting {
            break;
        }
        let _ = epoll::wait(&ep, &mut events, 20);
        for ev in &events {
            let key = ev.data.u64();
            if key & SERVICE != 0 {
                let Some((owner, _fd)) = slab[(key & !SERVICE) as usize].take() else {
                    continue;
                };
                // Dropping the fd took it out of the epoll set.
                budget.give();
                alive[owner] -= 1;
                if alive[owner] == 0 && !stopping[owner].killed {
                    alive[owner] = settle(
                        &ep,
                        &mut stopping[owner],
                        &mut exited[owner],
                        &mut slab,
                        owner,
                        budget,
                    );
                }
            } else {
                let i = key as usize;
                exited[i] = true;
                if let Some(fd) = &stopping[i].pidfd {
                    let _ = epoll::delete(&ep, fd);
                }
            }
        }
        let now = Instant::now();
        for (i, s) in stopping.iter_mut().enumerate() {
            if !exited[i] && !s.killed && now >= s.deadline {
                tracing::debug!(instance = %s.name, "did not stop within the timeout; killing it");
                let _ = s.cg.kill();
                s.killed = true;
                timed_out += 1;
            }
        }
        // Round robin over what only a read of its cgroup can tell about.
        let scan: Vec<usize> = (0..stopping.len())
            .filter(|&i| {
                let s = &stopping[i];
                !exited[i] && (s.pidfd.is_none() || !s.killed && alive[i] == 0)
            })
            .collect();
        for k in 0..scan.len().min(SCAN_PER_ROUND) {
            let i = scan[(cursor + k) % scan.len()];
            alive[i] = settle(&ep, &mut stopping[i], &mut exited[i], &mut slab, i, budget);
        }
        cursor = (cursor + SCAN_PER_ROUND) % scan.len().max(1);
    }
    timed_out
}
