//! `nifty serve`: on-demand instances (`create --on-demand`) of the native
//! backend, the article's socket activation applied to whole containers;
//! and [`session`], what the systemd backend's socket units run per
//! connection.
//!
//! One process holds the SSH port of every on-demand instance of a state
//! root: from Linux 5.9 all of them with one pair of listening sockets, to
//! which a BPF `sk_lookup` program steers the ports
//! (`runtime::linux::steer`); before, a listening socket per port; either
//! way in one epoll set. A connection to a stopped instance starts it;
//! every connection is handed, as it was accepted, to its own `dropbear
//! -i` inside the instance, in its cgroup (the article's inetd and
//! `Accept=yes`): no byte of the session passes through nifty. Once an
//! instance is up, a Dropbear of its own takes its next connections
//! straight from the kernel (`direct`). An instance with no session and
//! no process of its users for its idle timeout is stopped; its port
//! stays held.
//!
//! Nothing of a running instance lives only in this process: a session's
//! Dropbear is adopted by the instance's init if `serve` dies, and a
//! restarted `serve` finds running instances by their cgroups, as every
//! nifty command does, and their idle time in their marks. One `serve` per
//! state root, under a lock that names its holder.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant, SystemTime};

use rustix::event::epoll;
use rustix::net::{AddressFamily, SocketAddrV4, SocketAddrV6, SocketFlags, SocketType};

mod direct;

use direct::Direct;

use crate::runtime::linux::steer::{self, Steer};
use crate::runtime::{ondemand, Runtime, SessionProc, State};
use crate::store::{Instance, RecordStamp, Store};
use crate::{Error, Result};

/// Every this many checks, the running instances are found again from the
/// kernel (one directory read: instances started by `nifty start` are
/// swept too).
const FULL_CHECK_EVERY: u32 = 12;

/// Changes of the instances directory this close in time may show the
/// same time: file systems stamp with a coarse clock (a tick, 1-10 ms;
/// whole seconds on some).
const SAME_TIME: Duration = Duration::from_secs(2);

/// Whether a change after `now` could leave a directory's time at `t`:
/// `t` is within `SAME_TIME` of `now` (either way: clocks step).
fn may_hide_a_change(t: SystemTime, now: SystemTime) -> bool {
    let apart = now.duration_since(t).unwrap_or_else(|e| e.duration());
    apart < SAME_TIME
}

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often running instances are checked for idleness and the
    /// state root for new or removed on-demand instances.
    pub check_every: Duration,
}

/// One on-demand instance being served: what of it an idle one needs
/// (its record is read when a connection comes, and kept while it runs).
struct Served {
    port: u16,
    /// Its own listening socket; `None` where its port is steered.
    listener: Option<OwnedFd>,
}

/// What an epoll key stands for.
#[derive(Debug, Clone)]
enum Key {
    /// One of the steering listeners (connections to any steered port).
    Steered(usize),
    /// An instance's own listening socket.
    Instance(String),
}

/// Everything `serve` holds.
struct Server<'a> {
    store: &'a Store,
    ep: OwnedFd,
    /// One pair of listeners for every port (BPF `sk_lookup`), or `None`:
    /// a listening socket per port.
    steer: Option<&'a Steer>,
    /// Running instances' own listeners (see `direct`).
    direct: HashMap<String, Direct>,
    served: HashMap<String, Served>,
    by_key: HashMap<u64, Key>,
    by_port: HashMap<u16, String>,
    /// Instances whose port could not be held, said once.
    refused: HashMap<String, String>,
    /// Each instance's record stamp as last read, and whether serve is to
    /// hold its port: a rescan reads only the records that changed.
    records: HashMap<String, (RecordStamp, bool)>,
    /// The on-demand instances known to run, with their records: the idle
    /// sweep reads only these; those started otherwise are found at a full
    /// check. (An idle instance's record is not kept: at 50,000 that is
    /// most of serve's memory.)
    running: HashMap<String, Instance>,
}

/// What one round of connections did on serve's thread (starts report
/// through the channel).
#[derive(Default)]
struct Counts {
    /// Instances whose start it handed to a thread.
    starting: usize,
    sessions: usize,
    /// The instances that run (those it gave sessions), as read now.
    up: Vec<Instance>,
    /// The sessions it started.
    spawned: Vec<(String, SessionProc)>,
    /// Lines for the log.
    said: Vec<String>,
}

/// Where a state root's `serve` holds its lock.
fn lock_path(store: &Store) -> std::path::PathBuf {
    store.root().join("serve.lock")
}

/// Does a `serve` run for `store` (it holds its lock)?
pub fn serving(store: &Store) -> bool {
    crate::disk::is_locked(&lock_path(store))
}

/// The lock of a state root's `serve`: a file that holds its PID.
fn lock(store: &Store) -> Result<crate::disk::PidLock> {
    store.ensure()?;
    let path = lock_path(store);
    // A `serve` killed during a burst of cold starts leaves copies of its
    // lock's fd in the containers' first processes it held back (see
    // `Launcher::starts_settled`), for a second at most: its PID is gone.
    let end = Instant::now() + HELD_LOCK_WAIT;
    loop {
        let mut holder = None;
        let r = crate::disk::lock_with_pid(&path, |pid| {
            holder = pid.parse::<i32>().ok();
            Error::Invalid(format!(
                "`nifty serve` already runs for {} (PID {pid}, holding {}): one serves a state \
                 root; stop that one first",
                store.root().display(),
                path.display()
            ))
        });
        let gone = holder.is_some_and(|pid| !crate::runtime::linux::proc::alive(pid));
        if r.is_ok() || !gone || Instant::now() >= end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a `serve` waits for the lock of one that is gone: twice the
/// longest hold of a first process that has a copy of it.
const HELD_LOCK_WAIT: Duration = crate::runtime::HOLD_MAX.saturating_mul(2);

/// A listening socket on every address of `port`: IPv6 with IPv4 mapped
/// where the host has IPv6, IPv4 alone where it has not.
pub fn listen(port: u16) -> std::result::Result<OwnedFd, rustix::io::Errno> {
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let fd = match rustix::net::socket_with(AddressFamily::INET6, SocketType::STREAM, flags, None) {
        Ok(fd) => {
            rustix::net::sockopt::set_ipv6_v6only(&fd, false)?;
            rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
            rustix::net::bind_v6(
                &fd,
                &SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0),
            )?;
            fd
        }
        Err(rustix::io::Errno::AFNOSUPPORT) => {
            let fd =
                rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, flags, None)?;
            rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
            rustix::net::bind_v4(
                &fd,
                &SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port),
            )?;
            fd
        }
        Err(e) => return Err(e),
    };
    rustix::net::listen(&fd, 1024)?;
    Ok(fd)
}

/// Serves the on-demand instances of `store` until killed. `say` gets one
/// line per event (started, stopped, a port that cannot be held).
pub fn run(store: &Store, opts: &Options, say: &dyn Fn(String)) -> Result<()> {
    let _lock = lock(store)?;
    // The starts of a `serve` that was killed in the middle of them.
    ondemand::publish_starting(store, &[]);
    crate::fleet::Pool::Work.prepare();
    crate::fleet::Pool::Sessions.prepare();
    let rt = Runtime::new(store)?;
    let steer = steering(say);
    let mut srv = Server::new(store, steer.as_ref())?;
    // Starts run on threads of their own while this one goes on accepting;
    // they report here, and wake the loop through `wake`.
    let (tx, rx) = std::sync::mpsc::channel::<Report>();
    let wake = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .map_err(Error::sys("eventfd"))?;
    epoll::add(
        &srv.ep,
        &wake,
        epoll::EventData::new_u64(WAKE),
        epoll::EventFlags::IN,
    )
    .map_err(Error::sys("epoll_ctl(EPOLL_CTL_ADD)"))?;
    let starting: Starting = std::sync::Mutex::new(HashMap::new());
    let queue = std::sync::Mutex::new((Vec::new(), false));
    let ctx = Ctx {
        store,
        rt: &rt,
        steer: steer.as_ref(),
        starting: &starting,
        queue: &queue,
        wake: &wake,
    };
    std::thread::scope(|scope| loop_until_error(&ctx, scope, &mut srv, opts, &tx, &rx, say))
}

/// What a start's thread reports to serve's loop.
enum Report {
    /// A session it gave a connection.
    Session(String, SessionProc),
    /// An instance it started (it runs now), as its record was read.
    Up(Box<Instance>),
    /// How the start of an instance's own listener went: why not, if it
    /// did not and its instance still runs (`None`: it was stopped
    /// meanwhile, which is no news).
    Listening(
        String,
        std::result::Result<ondemand::Listener, Option<String>>,
    ),
    /// A line for the log.
    Say(String),
}

/// Instances whose start is under way, with the connections that wait for
/// it (their start's thread hands them their sessions).
type Starting = std::sync::Mutex<HashMap<String, Vec<OwnedFd>>>;

/// What serve's loop shares with its start threads.
struct Ctx<'a> {
    store: &'a Store,
    rt: &'a Runtime,
    steer: Option<&'a Steer>,
    starting: &'a Starting,
    /// Stopped instances waiting for the start thread, and whether it runs.
    queue: &'a std::sync::Mutex<(Vec<Instance>, bool)>,
    wake: &'a OwnedFd,
}

/// How long after the last start of a burst its instances get their own
/// listeners and CPU shares.
const LISTEN_AFTER: Duration = Duration::from_millis(300);

/// How long after its start an instance gets its own listener and CPU
/// share while starts go on (a burst that does not end).
const SETTLE_WITHIN: Duration = Duration::from_secs(1);

/// How many of a running instance's processes are looked at for its own
/// listener when none is recorded (a serve was killed before it recorded
/// it); a tenant may make many.
const UNRECORDED_LOOKED_AT: usize = 64;

/// The epoll key of the wake-up eventfd (listeners' keys are fd numbers).
const WAKE: u64 = u64::MAX;

/// serve's loop: checks, accepts, and reports of the start threads.
fn loop_until_error<'scope, 'env>(
    ctx: &'env Ctx<'env>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    srv: &mut Server<'_>,
    opts: &Options,
    tx: &std::sync::mpsc::Sender<Report>,
    rx: &std::sync::mpsc::Receiver<Report>,
    say: &dyn Fn(String),
) -> Result<()> {
    let (store, rt) = (ctx.store, ctx.rt);
    // Sessions started here and not yet reaped.
    let mut sessions: Vec<(String, SessionProc)> = Vec::new();
    // Instances started here that have neither a listener of their own
    // nor their own CPU share yet, with when each came up (oldest first:
    // the last is the last start).
    let mut unheard: Vec<(String, Instant)> = Vec::new();
    let mut seen_dir: Option<SystemTime> = None;
    // Whether the records were last all read while the directory's time
    // was within `SAME_TIME` of then.
    let mut racy_scan = false;
    let mut checks: u32 = 0;
    let mut next_check = Instant::now();
    let mut events = epoll::EventVec::with_capacity(1024);
    loop {
        if Instant::now() >= next_check {
            let first = checks == 0;
            let full = checks % FULL_CHECK_EVERY == 0;
            checks = checks.wrapping_add(1);
            // A create, rm or `on-demand enable|disable` changes the
            // instances directory's time.
            let dir = std::fs::metadata(store.instances_dir())
                .and_then(|m| m.modified())
                .ok();
            // A change made in the same tick of the file system's clock
            // as the one a rescan saw leaves the time as it was: the
            // records are read once more after a rescan made while the
            // time was that recent (as git does with its index).
            if dir != seen_dir || std::mem::take(&mut racy_scan) {
                seen_dir = dir;
                let now = SystemTime::now();
                srv.rescan(rt, true, say)?;
                racy_scan = dir.is_some_and(|t| may_hide_a_change(t, now));
            } else if !srv.refused.is_empty() {
                srv.rescan(rt, false, say)?;
            }
            let insts: Vec<Instance> = if full {
                rt.running_on_demand()
                    .into_iter()
                    .filter(|i| srv.served.contains_key(&i.name))
                    .collect()
            } else {
                srv.running.values().cloned().collect()
            };
            let direct = &srv.direct;
            let listener = |i: &Instance| match direct.get(&i.name) {
                Some(Direct::Up(l)) => Some(*l),
                _ => None,
            };
            let release = direct::Release {
                steer: srv.steer,
                listener: &listener,
            };
            // Those a serve killed meanwhile left booting in the
            // background get their own CPU share back.
            if first && !insts.is_empty() {
                foreground(ctx, scope, insts.clone(), tx);
            }
            let swept = rt.sweep(store, &insts, &release);
            for (name, r) in &swept.stopped {
                match r {
                    Ok(()) => say(format!("instance {name}: idle, stopped")),
                    Err(e) => say(format!("instance {name}: idle, stop failed: {e}")),
                }
            }
            let mut by_name: HashMap<String, Instance> =
                insts.into_iter().map(|i| (i.name.clone(), i)).collect();
            srv.running = swept
                .running
                .into_iter()
                .filter_map(|n| by_name.remove(&n).map(|i| (n, i)))
                .collect();
            // What listened in instances that run no more is gone with
            // them (a full check knows every running one).
            for (name, r) in &swept.stopped {
                if r.is_ok() {
                    srv.direct.remove(name);
                }
            }
            if full {
                srv.direct
                    .retain(|n, d| srv.running.contains_key(n) || matches!(d, Direct::Starting));
            }
            next_check = Instant::now() + opts.check_every;
        }
        sessions.retain_mut(|(name, c)| match c.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                // A Dropbear that died of a signal did not end its session
                // itself: worth a line (the client saw a reset).
                if let Some(sig) = status.terminating_signal() {
                    say(format!(
                        "instance {name}: session (dropbear -i, PID {}) killed by signal {sig}",
                        c.id()
                    ));
                }
                tracing::debug!(instance = %name, pid = c.id(), ?status, "session ended");
                false
            }
            Err(_) => false,
        });
        // (The start thread wakes the loop when it is done.)
        let mut wake_at = next_check;
        if let (Some((_, oldest)), Some((_, last_up))) = (unheard.first(), unheard.last()) {
            wake_at = wake_at.min(*oldest + SETTLE_WITHIN);
            if !guard(ctx.queue).1 {
                wake_at = wake_at.min(*last_up + LISTEN_AFTER);
            }
        }
        // (At most a second.)
        let wait = wake_at.saturating_duration_since(Instant::now());
        let wait_ms = crate::sys::poll_timeout_ms(wait.min(Duration::from_secs(1)));
        match epoll::wait(&srv.ep, &mut events, wait_ms) {
            Ok(()) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::sys("epoll_wait")(e)),
        }
        // What the start threads did meanwhile.
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(ctx.wake, &mut buf);
        for r in rx.try_iter() {
            match r {
                Report::Session(name, child) => sessions.push((name, child)),
                Report::Up(inst) => {
                    // A fresh run: nothing of a listener of the last one.
                    // (Its start's batch may have ended long after it was
                    // up, if another start of the batch waited: a listener
                    // started meanwhile, live or starting, is this run's.)
                    let this_run = match srv.direct.get(&inst.name) {
                        Some(Direct::Up(l)) => l.alive(),
                        Some(Direct::Starting) => true,
                        Some(Direct::Failed) | None => false,
                    };
                    if !this_run {
                        srv.direct.remove(&inst.name);
                    }
                    unheard.push((inst.name.clone(), Instant::now()));
                    srv.running.insert(inst.name.clone(), *inst);
                }
                // (Unless its instance stopped meanwhile.)
                Report::Listening(name, r) if srv.direct.contains_key(&name) => {
                    let d = match r {
                        Ok(l) => {
                            // Not a process of its users (and a restarted
                            // serve takes it up again).
                            let mut mark = ondemand::read_mark(store, &name);
                            mark.listener = Some(l);
                            ondemand::write_mark(store, &name, &mark);
                            Direct::Up(l)
                        }
                        Err(e) => {
                            if let Some(e) = e {
                                say(format!("instance {name}: {e}"));
                            }
                            // (Nor one that ended before, on record.)
                            ondemand::update_mark(store, &name, |m| m.listener = None);
                            Direct::Failed
                        }
                    };
                    srv.direct.insert(name, d);
                }
                Report::Listening(..) => {}
                Report::Say(line) => say(line),
            }
        }
        // Instances started at a connection get their own listeners and
        // CPU shares once no start has been under way for a while (each
        // listener is a start's worth of CPU, which the sessions of a burst
        // need first), or a while after their start if starts go on.
        let quiet = unheard
            .last()
            .is_some_and(|(_, last_up)| last_up.elapsed() >= LISTEN_AFTER)
            && !guard(ctx.queue).1;
        let due = match quiet {
            true => unheard.len(),
            false => unheard.partition_point(|(_, up)| up.elapsed() >= SETTLE_WITHIN),
        };
        if due > 0 {
            let due: Vec<Instance> = unheard
                .drain(..due)
                .filter_map(|(name, _)| srv.running.get(&name).cloned())
                .collect();
            for inst in &due {
                listen_in(ctx, scope, &mut srv.direct, inst, tx);
            }
            foreground(ctx, scope, due, tx);
        }
        // Every connection waiting on every ready socket, then the stopped
        // ones among their instances started at once, then the sessions.
        let mut conns: Vec<(String, OwnedFd)> = Vec::new();
        for ev in &events {
            if let Some(key) = srv.by_key.get(&ev.data.u64()).cloned() {
                srv.accept_all(&key, &mut conns);
            }
        }
        if conns.is_empty() {
            continue;
        }
        let counts = serve_connections(ctx, scope, &srv.served, &mut srv.direct, conns, tx);
        srv.running
            .extend(counts.up.into_iter().map(|i| (i.name.clone(), i)));
        sessions.extend(counts.spawned);
        for line in counts.said {
            say(line);
        }
        tracing::debug!(
            starting = counts.starting,
            sessions = counts.sessions,
            "connections served"
        );
    }
}

/// Accepts what waits on `fd` (nonblocking), into `out` as (key, conn).
fn accept_from(fd: &OwnedFd, mut out: impl FnMut(OwnedFd)) {
    loop {
        match rustix::net::accept_with(fd, SocketFlags::CLOEXEC) {
            Ok(c) => {
                // As Dropbear's own listener does: `dropbear -i` leaves
                // its socket as it gets it, and with Nagle's algorithm the
                // last packets of a session wait for a delayed ACK (about
                // 40 ms at every logout).
                let _ = rustix::net::sockopt::set_tcp_nodelay(&c, true);
                out(c)
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
            Err(e) => {
                tracing::warn!("accept: {e}");
                break;
            }
        }
    }
}

/// One pair of listening sockets for every port (BPF `sk_lookup`), or
/// `None` (said why): a listening socket per port.
fn steering(say: &dyn Fn(String)) -> Option<Steer> {
    if crate::runtime::linux::features::forced("steer") {
        say("a listening socket per port (NIFTY_FALLBACKS=steer)".into());
        return None;
    }
    match Steer::new() {
        Ok(s) => Some(s),
        Err(e) => {
            say(format!(
                "a listening socket per port: BPF sk_lookup (Linux 5.9) is not available here \
                 ({e})"
            ));
            None
        }
    }
}

impl<'a> Server<'a> {
    fn new(store: &'a Store, steer: Option<&'a Steer>) -> Result<Server<'a>> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(Error::sys("epoll_create1"))?;
        let mut by_key = HashMap::new();
        if let Some(st) = steer {
            for (i, l) in st.listeners.iter().enumerate() {
                epoll::add(
                    &ep,
                    l,
                    epoll::EventData::new_u64(key(l)),
                    epoll::EventFlags::IN,
                )
                .map_err(Error::sys("epoll_ctl(EPOLL_CTL_ADD)"))?;
                by_key.insert(key(l), Key::Steered(i));
            }
        }
        Ok(Server {
            store,
            ep,
            steer,
            direct: HashMap::new(),
            running: HashMap::new(),
            served: HashMap::new(),
            by_key,
            by_port: HashMap::new(),
            refused: HashMap::new(),
            records: HashMap::new(),
        })
    }

    /// Accepts every connection waiting behind `key`, with the instance
    /// each is for (a steered one by the port it came in on).
    fn accept_all(&self, key: &Key, conns: &mut Vec<(String, OwnedFd)>) {
        match key {
            Key::Instance(name) => {
                if let Some(l) = self.served.get(name).and_then(|s| s.listener.as_ref()) {
                    accept_from(l, |c| conns.push((name.clone(), c)));
                }
            }
            Key::Steered(i) => {
                let Some(l) = self.steer.and_then(|s| s.listeners.get(*i)) else {
                    return;
                };
                accept_from(l, |c| {
                    match steer::local_port(&c)
                        .ok()
                        .and_then(|p| self.by_port.get(&p))
                    {
                        Some(name) => conns.push((name.clone(), c)),
                        // A port let go of since: the connection ends.
                        None => drop(c),
                    }
                });
            }
        }
    }

    /// Takes up new on-demand instances (their ports held from now on) and
    /// lets go of removed ones and of those no longer on demand. With
    /// `full` false, only retries the ports that could not be held.
    fn rescan(&mut self, rt: &Runtime, full: bool, say: &dyn Fn(String)) -> Result<()> {
        let names: Vec<String> = if full {
            self.store.instance_names()?
        } else {
            self.refused.keys().cloned().collect()
        };
        // The records serve holds the ports of, by name; those read now
        // (new or changed since the last rescan) among them in `fresh`.
        let mut wanted: HashSet<String> = HashSet::new();
        let mut fresh: HashMap<String, Instance> = HashMap::new();
        let mut records = HashMap::new();
        for name in names {
            let Some(stamp) = self.store.instance_stamp(&name) else {
                continue;
            };
            let held = match self.records.remove(&name) {
                Some((seen, held)) if seen == stamp => held,
                // Not those whose backend holds their ports itself.
                _ => match self.read(rt, &name) {
                    Some(i) => {
                        fresh.insert(name.clone(), i);
                        true
                    }
                    None => false,
                },
            };
            if held {
                wanted.insert(name.clone());
            }
            records.insert(name, (stamp, held));
        }
        if full {
            // Those gone since are dropped with what is left.
            self.records = records;
        } else {
            self.records.extend(records);
        }
        // Thousands of records read at once (the first rescan of a large
        // state root) leave the heap holding what they took.
        let trim = fresh.len() >= 1000;
        let before = self.by_port.len();
        let mut changed = false;
        if full {
            self.refused.retain(|n, _| wanted.contains(n));
            let gone: Vec<String> = self
                .served
                .iter()
                // Gone, no longer on demand, or moved to another port.
                .filter(|(name, s)| {
                    !wanted.contains(*name) || fresh.get(*name).is_some_and(|i| i.port != s.port)
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in gone {
                changed = true;
                if let Some(s) = self.served.remove(&name) {
                    self.let_go(&name, &s);
                }
            }
        }
        // Ports something else listens on are not taken (steering would
        // take their connections): read once.
        let mut new: Vec<String> = Vec::new();
        for n in wanted {
            if !self.served.contains_key(&n) {
                new.push(n);
            } else if let (Some(i), Some(r)) = (fresh.remove(&n), self.running.get_mut(&n)) {
                // Running: its record as it is now (an idle timeout set
                // meanwhile, say).
                *r = i;
            }
        }
        let listening = if self.steer.is_some() && !new.is_empty() {
            crate::runtime::status::sockets().listening
        } else {
            HashSet::new()
        };
        for name in new {
            // (One refused before is read again.)
            let Some(inst) = fresh.remove(&name).or_else(|| self.read(rt, &name)) else {
                continue;
            };
            match self.hold(rt, &inst, &listening) {
                Ok(listener) => {
                    changed = true;
                    if self.refused.remove(&name).is_some() {
                        say(format!("instance {name}: port {} held now", inst.port));
                    }
                    self.by_port.insert(inst.port, name.clone());
                    self.served.insert(
                        name,
                        Served {
                            port: inst.port,
                            listener,
                        },
                    );
                }
                Err(e) => {
                    let why = format!(
                        "instance {name}: cannot hold its port {}: {e} (something else listens \
                         there: `ss -ltnp 'sport = :{}'`); it is not served until that ends",
                        inst.port, inst.port
                    );
                    if self.refused.insert(name, why.clone()).is_none() {
                        say(why);
                    }
                }
            }
        }
        if changed {
            self.publish();
            if self.by_port.len() != before {
                say(format!(
                    "holding the ports of {} on-demand instance(s){}",
                    self.by_port.len(),
                    if self.steer.is_some() {
                        " (one socket, BPF sk_lookup)"
                    } else {
                        ""
                    }
                ));
            }
        }
        drop(fresh);
        if trim {
            crate::sys::trim_heap();
        }
        Ok(())
    }

    /// An instance's record, if serve is to hold its port (on demand, of
    /// the native backend).
    fn read(&self, rt: &Runtime, name: &str) -> Option<Instance> {
        self.store
            .instance(name)
            .ok()
            .filter(|i| rt.served_by_serve(i))
    }

    /// Holds an instance's port: steered, or a listening socket of its own
    /// (returned, in the epoll set). A port that something listens on is
    /// not taken, unless that is the instance's own listener (started by a
    /// `serve` before this one, recorded or not): it is taken up again.
    fn hold(
        &mut self,
        rt: &Runtime,
        inst: &Instance,
        listening: &HashSet<u16>,
    ) -> std::result::Result<Option<OwnedFd>, rustix::io::Errno> {
        if let Some(st) = self.steer {
            let errno = |e: std::io::Error| {
                rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
            };
            if listening.contains(&inst.port) {
                let mut mark = ondemand::read_mark(self.store, &inst.name);
                let procs = rt.processes(inst);
                let recorded = mark
                    .listener
                    .filter(|l| procs.contains(&l.pid) && l.alive());
                // Else one that a serve killed before it recorded it had
                // started: the process of the instance that holds
                // listening sockets on its port (checked as the kernel
                // sees them: see `direct::direct`).
                let candidates: Vec<ondemand::Listener> = match recorded {
                    Some(l) => vec![l],
                    None => procs
                        .iter()
                        .take(UNRECORDED_LOOKED_AT)
                        .filter_map(|&pid| ondemand::Listener::of(pid))
                        .collect(),
                };
                if candidates.is_empty() {
                    return Err(rustix::io::Errno::ADDRINUSE);
                }
                st.set(inst.port, true).map_err(errno)?;
                let Some(l) = candidates
                    .into_iter()
                    .find(|&l| direct::direct(st, inst, l) > 0)
                else {
                    let _ = st.set(inst.port, false);
                    return Err(rustix::io::Errno::ADDRINUSE);
                };
                if recorded.is_none() {
                    // Not a process of its users.
                    mark.listener = Some(l);
                    ondemand::write_mark(self.store, &inst.name, &mark);
                }
                self.direct.insert(inst.name.clone(), Direct::Up(l));
                return Ok(None);
            }
            st.set(inst.port, true).map_err(errno)?;
            return Ok(None);
        }
        let listener = listen(inst.port)?;
        epoll::add(
            &self.ep,
            &listener,
            epoll::EventData::new_u64(key(&listener)),
            epoll::EventFlags::IN,
        )?;
        self.by_key
            .insert(key(&listener), Key::Instance(inst.name.clone()));
        Ok(Some(listener))
    }

    /// Lets go of a served instance's port.
    fn let_go(&mut self, name: &str, s: &Served) {
        match &s.listener {
            Some(l) => {
                let _ = epoll::delete(&self.ep, l);
                self.by_key.remove(&key(l));
            }
            None => {
                if let Some(st) = self.steer {
                    let _ = st.undirect(s.port);
                    let _ = st.set(s.port, false);
                }
            }
        }
        self.direct.remove(name);
        self.running.remove(name);
        self.by_port.remove(&s.port);
    }

    /// Writes the ports held now, for `list` (`serve.ports`).
    fn publish(&self) {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.sort_unstable();
        let text: String = ports.iter().map(|p| format!("{p}\n")).collect();
        if let Err(e) = crate::disk::write_atomic(
            &ondemand::served_ports_path(self.store),
            text.as_bytes(),
            0o644,
        ) {
            tracing::warn!("{e}");
        }
    }
}

/// One connection systemd accepted on an on-demand instance's socket
/// (`nifty-ssh@.service`, `Accept=yes`): the instance is the one whose
/// port the connection came in on; it is started if it is stopped, and
/// the connection is handed to a `dropbear -i` in it, as `serve` does.
/// Returns when the session ends, with its exit code. A login to a
/// running instance asks systemd nothing (see `Systemd::init_pid`).
pub fn session(store: &Store, rt: &Runtime, conn: OwnedFd) -> Result<i32> {
    let local = rustix::net::getsockname(&conn).map_err(Error::sys("getsockname(stdin)"))?;
    let port = match local {
        rustix::net::SocketAddrAny::V4(a) => a.port(),
        rustix::net::SocketAddrAny::V6(a) => a.port(),
        _ => {
            return Err(Error::Invalid(
                "standard input is not a TCP connection: `nifty systemd session` is run by \
                 an on-demand instance's socket unit (nifty-ssh@.socket)"
                    .into(),
            ))
        }
    };
    let inst = store
        .port_owner(port)
        .and_then(|n| store.instance(&n).ok())
        .filter(|i| i.port == port && i.on_demand.is_some())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "port {port} is not the port of an on-demand instance of {}: stop its socket \
                 (`systemctl stop` the nifty-ssh@ socket of port {port})",
                store.root().display()
            ))
        })?;
    // Where it runs, found once: at once when it is up (the warm path);
    // else after its start, by this session or by another's.
    let mut cold = false;
    let target = match rt.target(&inst) {
        Ok(t) => t,
        Err(_) => {
            cold = true;
            let stopped = rt.with_state(std::slice::from_ref(&inst), |s| s == State::Stopped);
            if !stopped.is_empty() {
                ondemand::mark_starting(store, &stopped, true);
                let r = rt.start_many(&stopped, &|_| {});
                ondemand::mark_starting(store, &stopped, false);
                for (_, r) in r {
                    match r {
                        // Another connection's session started it meanwhile.
                        Ok(()) | Err(Error::Running(..)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            // A start by another session may still be on its way up.
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                match rt.target(&inst) {
                    Ok(t) => break t,
                    Err(e) if Instant::now() >= end => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    };
    ondemand::end_idle(store, &inst.name);
    let mut child = rt.session_at(&inst, &target, conn)?;
    // The next logins go straight to a Dropbear of its own. After a cold
    // start it waits, as `serve`'s listeners wait for the end of a burst:
    // started at once, the listeners of a burst's instances would take
    // CPU from the burst's sessions. (The unit ends once both are done.)
    if !cold {
        direct::ensure_pinned(store, rt, &inst);
        return child.wait();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(LISTEN_AFTER);
            direct::ensure_pinned(store, rt, &inst);
        });
        child.wait()
    })
}

/// The idle sweep of the on-demand instances no `serve` holds (systemd's
/// timer runs it: `nifty on-demand sweep`). Before it stops a systemd
/// instance whose own listener takes its logins (through the pinned
/// steering), the port's connections go back to systemd's socket.
pub fn sweep_unserved(store: &Store, rt: &Runtime, insts: &[Instance]) -> ondemand::Swept {
    let steer = direct::pinned(store, false);
    let listener = |i: &Instance| {
        (i.backend == crate::store::Backend::Systemd)
            .then(|| ondemand::read_mark(store, &i.name).listener)
            .flatten()
    };
    let release = direct::Release {
        steer: steer.as_ref(),
        listener: &listener,
    };
    rt.sweep(store, insts, &release)
}

/// A mutex's guard, also after a panic of another holder.
fn guard<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The epoll key of a listener: its fd number.
fn key(fd: &OwnedFd) -> u64 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd() as u64
}

/// Gives each connection its session: at once for a running instance; for
/// a stopped one, when its start (on a thread of its own, all of this
/// round's stopped ones at once) has it up, or at once if a start is
/// already under way. A connection whose instance does not start is
/// closed (the client sees the connection end).
fn serve_connections<'scope, 'env>(
    ctx: &'env Ctx<'env>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    served: &HashMap<String, Served>,
    directs: &mut HashMap<String, Direct>,
    conns: Vec<(String, OwnedFd)>,
    tx: &std::sync::mpsc::Sender<Report>,
) -> Counts {
    let (store, rt) = (ctx.store, ctx.rt);
    let mut counts = Counts::default();
    // Those whose start is under way take their connections now.
    let conns: Vec<(String, OwnedFd)> = {
        let mut starting = guard(ctx.starting);
        conns
            .into_iter()
            .filter_map(|(name, conn)| match starting.get_mut(&name) {
                Some(waiting) => {
                    waiting.push(conn);
                    None
                }
                None => Some((name, conn)),
            })
            .collect()
    };
    let mut wanted: Vec<String> = conns.iter().map(|(n, _)| n.clone()).collect();
    wanted.sort();
    wanted.dedup();
    // The records as they are now (`set` may have changed one); a
    // connection for one that is gone meanwhile ends.
    let insts: Vec<Instance> = wanted
        .iter()
        .filter(|n| served.contains_key(*n))
        .filter_map(|n| store.instance(n).ok())
        .collect();
    let by_name: HashMap<&str, &Instance> = insts.iter().map(|i| (i.name.as_str(), i)).collect();
    let stopped = rt.with_state(&insts, |s| s == State::Stopped);
    let cold: HashSet<&str> = stopped.iter().map(|i| i.name.as_str()).collect();
    let mut waiting: HashMap<String, Vec<OwnedFd>> = HashMap::new();
    let mut warm: Vec<(String, Instance, OwnedFd)> = Vec::new();
    for (name, conn) in conns {
        let Some(inst) = by_name.get(name.as_str()) else {
            continue;
        };
        if cold.contains(name.as_str()) {
            waiting.entry(name).or_default().push(conn);
            continue;
        }
        ondemand::end_idle(store, &name);
        warm.push((name, (*inst).clone(), conn));
    }
    counts.up = insts
        .iter()
        .filter(|i| !cold.contains(i.name.as_str()))
        .cloned()
        .collect();
    // A running instance whose logins come through serve (it has none,
    // or its own ended) gets a listener from which the kernel hands it the
    // next ones.
    for (_, inst, _) in &warm {
        listen_in(ctx, scope, directs, inst, tx);
    }
    // Sessions of running instances: several at once on a pool (each
    // spawn waits for its child's exec, which may wait on a cgroup
    // migration), one on this thread.
    let spawn = |(name, inst, conn): (String, Instance, OwnedFd)| {
        let r = rt.session(&inst, conn);
        (name, r)
    };
    let spawned: Vec<(String, Result<SessionProc>)> = match warm.len() {
        0 | 1 => warm.into_iter().map(spawn).collect(),
        _ => crate::fleet::par_map(crate::fleet::Pool::Sessions, warm, spawn),
    };
    for (name, r) in spawned {
        match r {
            Ok(child) => {
                counts.sessions += 1;
                counts.spawned.push((name, child));
            }
            Err(e) => counts.said.push(format!("instance {name}: session: {e}")),
        }
    }
    if stopped.is_empty() {
        return counts;
    }
    // Connections that come for them until each is up join `starting`.
    // One thread starts them, batch after batch (two at once would only
    // share the CPUs).
    counts.starting = stopped.len();
    guard(ctx.starting).extend(waiting);
    let idle = {
        let mut q = guard(ctx.queue);
        q.0.extend(stopped);
        !std::mem::replace(&mut q.1, true)
    };
    if idle {
        let tx = tx.clone();
        scope.spawn(move || starter(ctx, &tx));
    }
    counts
}

/// Starts a listener of its own in a running instance, on a thread, unless
/// it has one, or one is starting, or it cannot (see `direct`).
fn listen_in<'scope, 'env>(
    ctx: &'env Ctx<'env>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    directs: &mut HashMap<String, Direct>,
    inst: &Instance,
    tx: &std::sync::mpsc::Sender<Report>,
) {
    let Some(steer) = ctx.steer.filter(|_| direct::wanted(inst, ctx.steer)) else {
        return;
    };
    let needed = match directs.get(&inst.name) {
        None => true,
        Some(Direct::Up(l)) => !l.alive(),
        Some(Direct::Starting | Direct::Failed) => false,
    };
    if !needed {
        return;
    }
    directs.insert(inst.name.clone(), Direct::Starting);
    let (tx, inst) = (tx.clone(), inst.clone());
    scope.spawn(move || {
        let name = inst.name.clone();
        let r = direct::start(ctx.rt, steer, &inst)
            .map_err(|e| ctx.rt.init_pid(&inst).is_some().then_some(e));
        report(ctx, &tx, Report::Listening(name, r));
    });
}

/// Gives instances started at connections their own CPU share (see
/// `Runtime::foreground`), on a thread: each instance's lock may be held by
/// a command that changes it.
fn foreground<'scope, 'env>(
    ctx: &'env Ctx<'env>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    insts: Vec<Instance>,
    tx: &std::sync::mpsc::Sender<Report>,
) {
    let tx = tx.clone();
    scope.spawn(move || {
        for inst in insts {
            match ctx.rt.foreground(&inst) {
                // (Removed meanwhile.)
                Ok(()) | Err(Error::NoInstance(_)) => {}
                Err(e) => report(
                    ctx,
                    &tx,
                    Report::Say(format!("instance {}: its own CPU share: {e}", inst.name)),
                ),
            }
        }
    });
}

/// Sends a thread's report to serve's loop, and wakes it.
fn report(ctx: &Ctx<'_>, tx: &std::sync::mpsc::Sender<Report>, r: Report) {
    let _ = tx.send(r);
    let _ = rustix::io::write(ctx.wake, &1u64.to_ne_bytes());
}

/// Starts the queued instances, batch after batch, until none is left;
/// each instance's waiting connections get their sessions as soon as it
/// is up.
fn starter(ctx: &Ctx<'_>, tx: &std::sync::mpsc::Sender<Report>) {
    let (store, rt) = (ctx.store, ctx.rt);
    let report = |r: Report| report(ctx, tx, r);
    loop {
        let batch = {
            let mut q = guard(ctx.queue);
            if q.0.is_empty() {
                q.1 = false;
                drop(q);
                // The loop waits for this to start listeners.
                let _ = rustix::io::write(ctx.wake, &1u64.to_ne_bytes());
                // The burst is over: the inits its starts held back run
                // (a next burst has a starter of its own meanwhile).
                rt.starts_settled();
                return;
            }
            std::mem::take(&mut q.0)
        };
        let by_name: HashMap<&str, &Instance> =
            batch.iter().map(|i| (i.name.as_str(), i)).collect();
        // `list` shows them starting meanwhile (one file for the batch).
        let names: Vec<&str> = batch.iter().map(|i| i.name.as_str()).collect();
        ondemand::publish_starting(store, &names);
        let failed_sessions = std::sync::Mutex::new(Vec::new());
        // The connections waiting when a start is ready to serve them go
        // with it: the container's first process hands each to its own
        // Dropbear before it execs init (which runs before init and its
        // services, and enters nothing from outside).
        let take = |name: &str| {
            guard(ctx.starting)
                .get_mut(name)
                .map(std::mem::take)
                .unwrap_or_default()
        };
        // Those that came after get their sessions as soon as it is up (on
        // the worker that started it); one that did not start ends its
        // connections. (`done` comes once per instance, whatever its start
        // did: none is left in `starting`.)
        let results = rt.start_many_serving(&batch, &take, &|name| {
            let conns = guard(ctx.starting).remove(name).unwrap_or_default();
            let Some(inst) = by_name.get(name) else {
                return;
            };
            for conn in conns {
                match rt.session(inst, conn) {
                    Ok(child) => report(Report::Session(name.to_string(), child)),
                    Err(e) => guard(&failed_sessions).push((name.to_string(), e)),
                }
            }
        });
        ondemand::publish_starting(store, &[]);
        ondemand::mark_starting(store, &batch, false);
        let mut failed: HashSet<String> = HashSet::new();
        for (name, r) in results {
            match r {
                Ok(()) => {
                    if let Some(inst) = by_name.get(name.as_str()) {
                        report(Report::Up(Box::new((*inst).clone())));
                    }
                }
                Err(e) => {
                    report(Report::Say(format!(
                        "instance {name}: start on connection failed: {e}"
                    )));
                    failed.insert(name);
                }
            }
        }
        // A session of an instance that did not start says nothing more.
        for (name, e) in failed_sessions.into_inner().unwrap_or_default() {
            if !failed.contains(&name) {
                report(Report::Say(format!("instance {name}: session: {e}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_in_the_same_tick_as_a_rescan_is_seen_by_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let time = || std::fs::metadata(dir).unwrap().modified().unwrap();
        let mut missed = 0;
        for i in 0..200 {
            // A rescan at `now` saw `seen`; a change follows at once.
            let seen = time();
            let now = SystemTime::now();
            std::fs::create_dir(dir.join(i.to_string())).unwrap();
            if time() == seen {
                // The clock's tick hid it: the rule reads the records again.
                missed += 1;
                assert!(may_hide_a_change(seen, now));
            }
        }
        eprintln!("changes that kept the directory's time: {missed} of 200");
        let now = SystemTime::now();
        assert!(!may_hide_a_change(now - Duration::from_secs(60), now));
        assert!(may_hide_a_change(now - Duration::from_millis(5), now));
        // A clock stepped back: a time just ahead is as recent.
        assert!(may_hide_a_change(now + Duration::from_millis(5), now));
        assert!(!may_hide_a_change(now + Duration::from_secs(60), now));
    }

    #[test]
    fn a_port_is_held_once_and_reported_in_use() {
        // A port the kernel picks, then held again: the second is refused.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let held = listen(port).unwrap();
        assert_eq!(listen(port).unwrap_err(), rustix::io::Errno::ADDRINUSE);
        // A client connects to it and is accepted on the held socket.
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(rustix::net::accept_with(&held, SocketFlags::CLOEXEC).is_ok());
    }

    #[test]
    fn a_second_serve_names_the_first() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(Some(d.path().to_path_buf()));
        let first = lock(&store).unwrap();
        let e = lock(&store).unwrap_err().to_string();
        assert!(e.contains("already runs"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        assert!(serving(&store));
        drop(first);
        assert!(!serving(&store));
        assert!(lock(&store).is_ok());
    }
}
