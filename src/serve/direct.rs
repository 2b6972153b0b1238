//! The warm path: a running on-demand instance's own listening Dropbear,
//! which takes its port's connections straight from the kernel.
//!
//! A connection `serve` accepts for a running instance costs a `dropbear
//! -i` exec in it (about 15 ms more than a login to an always-running
//! instance, whose Dropbear only forks). So at the first such connection,
//! `serve` also starts a Dropbear listening on the instance's port, as
//! every always-running instance has, and puts its listening sockets in
//! the steering's `direct` map (`runtime::linux::steer`): from then on
//! the kernel hands the port's connections to that Dropbear, and nothing
//! of nifty runs at a login. Only instances in the host's network
//! namespace (`--network host`) and only with steering (BPF `sk_lookup`,
//! Linux 5.9): a socket per port would hold the port itself.
//!
//! The port is never left unowned: the kernel takes a closed socket out
//! of the map, so when that Dropbear ends (its instance stopped, or a
//! tenant killed it) the port's connections come to `serve` again. Before
//! an idle stop, `serve` takes the port back first, and keeps the
//! instance up if a connection reached its Dropbear meanwhile. The
//! listener is recorded in the instance's mark (PID and start time), so
//! the idle sweep does not count it as a user's process, and a restarted
//! `serve` takes it up again (while `serve` is down, the kernel's own
//! lookup finds it: such instances stay reachable).
//!
//! The systemd backend has the same warm path, through a steering pinned
//! in bpffs ([`pinned`]): the first connection systemd's socket gives a
//! running instance (`nifty systemd session`) also starts its listener,
//! on an ephemeral loopback port since the port is the socket's, and the
//! idle sweep of systemd's timer gives the port back to the socket before
//! it stops the instance ([`Release`]).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::runtime::linux::files;
use crate::runtime::linux::proc::{self, Bound};
use crate::runtime::linux::steer::{self, Steer};
use crate::runtime::ondemand::{self, Listener};
use crate::runtime::Runtime;
use crate::store::{Backend, Instance, Network, Store};
use crate::template::inittab::LISTENER_PIDFILE;

/// How long a new listener has to listen.
const LISTEN_WITHIN: Duration = Duration::from_secs(5);

/// An instance's own listener, as `serve` knows it.
#[derive(Debug, Clone, Copy)]
pub enum Direct {
    /// Being started, on a thread of its own.
    Starting,
    /// Listening; its sockets are in the steering's map.
    Up(Listener),
    /// It did not listen: not tried again in this run of the instance.
    Failed,
}

/// Whether `inst` may have a listener of its own.
pub fn wanted(inst: &Instance, steer: Option<&Steer>) -> bool {
    steer.is_some() && inst.network == Network::Host
}

/// Where an instance's own listener binds under `steer`: on its port when
/// `serve` holds the ports (then nobody else may bind it, and while
/// `serve` is down the kernel's own lookup finds the listener); on an
/// ephemeral loopback port where systemd's socket unit holds the port
/// (a pinned steering: see [`pinned`]).
fn bound(steer: &Steer, inst: &Instance) -> Bound {
    if steer.holds_ports() {
        Bound::Port(inst.port)
    } else {
        Bound::Loopback
    }
}

/// Copies of the listening sockets `l` holds, bound as `bound` says (none
/// if it is gone, or does not listen there).
fn sockets(l: Listener, bound: Bound) -> Vec<std::os::fd::OwnedFd> {
    match proc::pidfd(l.pid) {
        // The pidfd names the process for good from here: was it still ours?
        Some(fd) if l.alive() => proc::listening_sockets(l.pid, &fd, bound),
        _ => Vec::new(),
    }
}

/// Puts the listening sockets of `l` in the steering's map, for `inst`'s
/// port; how many (none: it does not listen, or no longer).
pub fn direct(steer: &Steer, inst: &Instance, l: Listener) -> usize {
    // Our copies are closed on return: the map does not keep a socket
    // open, so it leaves the map when the Dropbear closes its own.
    let n = sockets(l, bound(steer, inst))
        .iter()
        .filter(|s| steer.direct(inst.port, s.as_fd()).is_ok())
        .count();
    // A pinned steering looks at a port once it is set (`serve` sets the
    // ports it holds itself).
    if n > 0 && !steer.holds_ports() && steer.set(inst.port, true).is_err() {
        let _ = steer.undirect(inst.port);
        return 0;
    }
    n
}

/// Starts a listener in `inst` and directs its port to it (on a thread of
/// its own: a Dropbear takes some milliseconds to listen). The Dropbear
/// goes to the background: the process that listens is the container's
/// init's child, not serve's (a child of serve would stay a zombie in the
/// instance's cgroup when it stops, until serve reaped it, and the stop
/// would wait for it). The caller records it in the instance's mark
/// (serve's loop writes the marks): until then the idle sweep counts it
/// as a process of the users, which keeps the instance up.
///
/// Which process listens is what the Dropbear says in its pidfile
/// ([`LISTENER_PIDFILE`], written in the background once it listens),
/// asked of the kernel: the process of the instance's cgroup that is that
/// PID in its PID namespace, started since, holding listening sockets
/// where it should. Not the first process found listening: Dropbear
/// listens before it goes to the background, and musl's daemon(3) forks
/// twice, so for a moment a process on its way out holds the sockets too.
pub fn start(rt: &Runtime, steer: &Steer, inst: &Instance) -> Result<Listener, String> {
    let bound = bound(steer, inst);
    let failed = |why: String| {
        format!(
            "its own listening Dropbear {why}; its logins go through serve (see `nifty logs {}`)",
            inst.name
        )
    };
    let since = proc::now_ticks();
    let code = rt
        .listener(inst, bound)
        .and_then(|mut child| child.wait())
        .map_err(|e| e.to_string())?;
    if code != 0 {
        return Err(failed(format!("exited with {code}")));
    }
    let init = rt
        .init_pid(inst)
        .ok_or_else(|| failed("has no running instance to listen in".into()))?;
    let root = files::Root::of_running(&inst.name, init, inst.security.uid_base.unwrap_or(0))
        .map_err(|e| failed(e.to_string()))?;
    // Dropbear listens on every address family the host has, as the
    // steering's own listeners do (on a pinned steering: both loopback
    // addresses): until the named one listens on them all, or on as many
    // twice in a row.
    let want = if steer.holds_ports() {
        steer.listeners.len()
    } else {
        2
    };
    let end = Instant::now() + LISTEN_WITHIN;
    let mut seen: Option<(Listener, usize)> = None;
    loop {
        let found = named(rt, inst, &root, init, since)
            .map_err(failed)?
            .map(|l| (l, sockets(l, bound).len()))
            .filter(|(_, n)| *n > 0);
        let settled = match (found, seen) {
            (Some((_, n)), _) if n >= want => true,
            (Some(now), Some(before)) => now == before,
            _ => false,
        };
        seen = found;
        if settled || Instant::now() >= end {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    match seen {
        Some((l, _)) if direct(steer, inst, l) > 0 => Ok(l),
        _ => Err(failed(format!(
            "did not listen ({bound:?}) within {LISTEN_WITHIN:?}, or did not say so in {LISTENER_PIDFILE}"
        ))),
    }
}

/// The listener that a Dropbear started at `since` or later names in its
/// pidfile, if it has written it yet: the tenant's file (read as every
/// file of a container is: no link followed, a regular file of bounded
/// size), so only the process the kernel knows by that PID in the
/// container's namespace, among the instance's, started since, counts.
fn named(
    rt: &Runtime,
    inst: &Instance,
    root: &files::Root,
    init: i32,
    since: u64,
) -> Result<Option<Listener>, String> {
    let Some(text) = root.read(LISTENER_PIDFILE).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    // (Being written: asked again.)
    let Some(pid) = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return Ok(None);
    };
    Ok(proc::host_pid(&rt.processes(inst), init, pid)
        .and_then(Listener::of)
        .filter(|l| l.started >= since))
}

/// The pinned steering of `store`'s on-demand ports on a systemd host
/// (see `Steer::pinned`): opened, or made at its first use (`make`) under
/// a lock in the store, as sessions run at once. `None` where there is no
/// bpffs at /sys/fs/bpf or the kernel has no `sk_lookup` (Linux 5.9):
/// every login then gets a session of its own, as the article's
/// `Accept=yes` does.
pub fn pinned(store: &Store, make: bool) -> Option<Steer> {
    let dir = steer::pin_dir(&store.cgroup_name())?;
    if let Ok(steer) = Steer::open_pinned(&dir) {
        return Some(steer);
    }
    if !make {
        return None;
    }
    let _lock = crate::disk::lock_file(&store.root().join("steer.lock")).ok()?;
    Steer::pinned(&dir)
        .map_err(|e| tracing::info!("no steering pinned in {}: {e}", dir.display()))
        .ok()
}

/// After systemd's socket gave a running instance's connection to a
/// session (`nifty systemd session`): the instance gets a listener of its
/// own, whose sockets the pinned steering hands its next connections, so
/// that they skip systemd's unit per connection; or its listener, alive
/// but not in the steering's map (made again since), is put back. One
/// session at a time per instance (a lock); the others go on at once.
pub fn ensure_pinned(store: &Store, rt: &Runtime, inst: &Instance) {
    if inst.backend != Backend::Systemd || inst.network != Network::Host {
        return;
    }
    let lock = store.instance_dir(&inst.name).join("listener.lock");
    let Ok(fd) = rustix::fs::open(
        &lock,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    ) else {
        return;
    };
    if rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return;
    }
    let Some(steer) = pinned(store, true) else {
        return;
    };
    let own = ondemand::read_mark(store, &inst.name)
        .listener
        .filter(|l| l.alive() && rt.processes(inst).contains(&l.pid));
    if let Some(l) = own {
        direct(&steer, inst, l);
        return;
    }
    match start(rt, &steer, inst) {
        Ok(l) => ondemand::update_mark(store, &inst.name, |m| m.listener = Some(l)),
        Err(e) => tracing::warn!("instance {:?}: {e}", inst.name),
    }
}

/// The holder's part in the idle sweep (`serve`'s, or the systemd
/// timer's with a pinned steering): before an instance with a listener is
/// stopped, its port's connections come to the holder again, and one
/// that reached the listener meanwhile keeps the instance up.
pub struct Release<'a> {
    pub steer: Option<&'a Steer>,
    /// An instance's own listener, as the holder knows it (asked only of
    /// the instances due to stop).
    pub listener: &'a dyn Fn(&Instance) -> Option<Listener>,
}

impl Release<'_> {
    fn listener(&self, inst: &Instance) -> Option<Listener> {
        (self.listener)(inst).filter(Listener::alive)
    }

    /// Whether a connection waits in a listening socket of `l`.
    fn queued(steer: &Steer, inst: &Instance, l: Listener) -> bool {
        sockets(l, bound(steer, inst)).iter().any(|s| {
            let mut fds = [rustix::event::PollFd::new(s, rustix::event::PollFlags::IN)];
            rustix::event::poll(&mut fds, 0).unwrap_or(0) > 0
        })
    }
}

impl ondemand::Release for Release<'_> {
    fn release(&self, due: Vec<Instance>) -> Vec<Instance> {
        let Some(steer) = self.steer else {
            return due;
        };
        let with: Vec<&Instance> = due.iter().filter(|i| self.listener(i).is_some()).collect();
        if with.is_empty() {
            return due;
        }
        for inst in &with {
            let _ = steer.undirect(inst.port);
        }
        // A connection the kernel gave a listener just before is in its
        // queue or being accepted (then the sweep sees its session).
        std::thread::sleep(Duration::from_millis(10));
        due.into_iter()
            .filter(|inst| match self.listener(inst) {
                Some(l) if Self::queued(steer, inst, l) => {
                    self.restore(inst);
                    false
                }
                _ => true,
            })
            .collect()
    }

    fn restore(&self, inst: &Instance) {
        if let (Some(steer), Some(l)) = (self.steer, self.listener(inst)) {
            direct(steer, inst, l);
        }
    }
}
