//! `nifty serve`: on-demand instances (`create --on-demand`), the
//! article's socket activation applied to whole containers.
//!
//! One process holds the SSH port of every on-demand instance of a state
//! root, each a listening socket in one epoll set. A connection to a
//! stopped instance starts it; every connection is handed, as it was
//! accepted, to its own `dropbear -i` inside the instance (the article's
//! inetd and `Accept=yes`): no byte of the session passes through nifty,
//! and nothing inside listens, so the port is never free for a tenant to
//! take while `serve` runs. An instance with no session and no process of
//! its users for its idle timeout is stopped; its port stays held.
//!
//! Nothing of a running instance lives only in this process: a session's
//! Dropbear is adopted by the instance's init if `serve` dies, and a
//! restarted `serve` finds running instances by their cgroups, as every
//! nifty command does. One `serve` per state root, under a lock that
//! names its holder.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::net::{AddressFamily, SocketAddrV4, SocketAddrV6, SocketFlags, SocketType};

use crate::runtime::{ondemand, Runtime, State};
use crate::store::{Instance, Store};
use crate::{Error, Result};

/// Every this many checks, the state of every served instance is read
/// again (instances started by `nifty start` are swept too) and the state
/// root rescanned even if its instances directory did not change.
const FULL_CHECK_EVERY: u32 = 12;

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often running instances are checked for idleness and the
    /// state root for new or removed on-demand instances.
    pub check_every: Duration,
}

/// One on-demand instance being served.
struct Served {
    inst: Instance,
    listener: OwnedFd,
}

/// What one round of connections did.
#[derive(Debug, Default)]
struct Counts {
    started: usize,
    sessions: usize,
    /// The instances that run now.
    up: Vec<String>,
}

/// The lock of a state root's `serve`: a file that holds its PID.
fn lock(store: &Store) -> Result<crate::disk::PidLock> {
    store.ensure()?;
    let path = store.root().join("serve.lock");
    crate::disk::lock_with_pid(&path, |pid| {
        Error::Invalid(format!(
            "`nifty serve` already runs for {} (PID {pid}, holding {}): one serves a state \
             root; stop that one first",
            store.root().display(),
            path.display()
        ))
    })
}

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
    raise_nofile();
    let rt = Runtime::new(store)?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(Error::sys("epoll_create1"))?;
    let mut served: HashMap<String, Served> = HashMap::new();
    // Listener (its epoll key) to instance.
    let mut by_key: HashMap<u64, String> = HashMap::new();
    // Sessions started here and not yet reaped.
    let mut sessions: Vec<std::process::Child> = Vec::new();
    // Instances whose port could not be held, said once.
    let mut refused: HashMap<String, String> = HashMap::new();
    // The on-demand instances known to run: the idle sweep reads only
    // these, and every instance's state only at a full check.
    let mut running: HashSet<String> = HashSet::new();
    let mut seen_dir: Option<std::time::SystemTime> = None;
    let mut checks: u32 = 0;
    let mut next_check = Instant::now();
    let mut events = epoll::EventVec::with_capacity(1024);
    loop {
        if Instant::now() >= next_check {
            let full = checks % FULL_CHECK_EVERY == 0;
            checks = checks.wrapping_add(1);
            // A create, rm or `on-demand enable|disable` changes the
            // instances directory's time.
            let dir = std::fs::metadata(store.instances_dir())
                .and_then(|m| m.modified())
                .ok();
            if full || dir != seen_dir {
                seen_dir = dir;
                rescan(
                    store,
                    &ep,
                    &mut served,
                    &mut by_key,
                    &mut refused,
                    true,
                    say,
                )?;
            } else if !refused.is_empty() {
                rescan(
                    store,
                    &ep,
                    &mut served,
                    &mut by_key,
                    &mut refused,
                    false,
                    say,
                )?;
            }
            let insts: Vec<Instance> = if full {
                let all: Vec<Instance> = served.values().map(|s| s.inst.clone()).collect();
                rt.with_state(&all, |s| s == State::Running)
            } else {
                running
                    .iter()
                    .filter_map(|n| served.get(n).map(|s| s.inst.clone()))
                    .collect()
            };
            let swept = rt.sweep(store, &insts);
            for (name, r) in &swept.stopped {
                match r {
                    Ok(()) => say(format!("instance {name}: idle, stopped")),
                    Err(e) => say(format!("instance {name}: idle, stop failed: {e}")),
                }
            }
            running = swept.running.into_iter().collect();
            next_check = Instant::now() + opts.check_every;
        }
        sessions.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        let wait = next_check.saturating_duration_since(Instant::now());
        match epoll::wait(&ep, &mut events, wait.as_millis().min(1000) as i32) {
            Ok(()) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::sys("epoll_wait")(e)),
        }
        // Every connection waiting on every ready port, then the stopped
        // ones among their instances started at once, then the sessions.
        let mut conns: Vec<(String, OwnedFd)> = Vec::new();
        for ev in &events {
            let Some(name) = by_key.get(&ev.data.u64()).cloned() else {
                continue;
            };
            let s = &served[&name];
            loop {
                match rustix::net::accept_with(&s.listener, SocketFlags::CLOEXEC) {
                    Ok(c) => conns.push((name.clone(), c)),
                    Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                    Err(e) => {
                        tracing::warn!("instance {name:?}: accept on port {}: {e}", s.inst.port);
                        break;
                    }
                }
            }
        }
        if conns.is_empty() {
            continue;
        }
        let counts = serve_connections(store, &rt, &mut served, conns, &mut sessions, say);
        running.extend(counts.up);
        tracing::debug!(
            started = counts.started,
            sessions = counts.sessions,
            "connections served"
        );
    }
}

/// One connection systemd accepted on an on-demand instance's socket
/// (`nifty-ssh@.service`, `Accept=yes`): the instance is the one whose
/// port the connection came in on; it is started if it is stopped, and
/// the connection is handed to a `dropbear -i` in it, as `serve` does.
/// Returns when the session ends, with its exit code.
pub fn session(store: &Store, conn: OwnedFd) -> Result<i32> {
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
    let rt = Runtime::new(store)?;
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
    let mut mark = ondemand::read_mark(store, &inst.name);
    if mark.idle_since.take().is_some() {
        ondemand::write_mark(store, &inst.name, &mark);
    }
    // A start by another session may still be on its way up.
    let end = Instant::now() + Duration::from_secs(30);
    while rt.target(&inst).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = rt.session(&inst, conn)?;
    let st = child
        .wait()
        .map_err(Error::io("wait for the session of", &inst.name))?;
    Ok(st.code().unwrap_or(1))
}

/// One listening socket per on-demand instance: the soft limit of open
/// files goes up to the hard one (as systemd's services get), so that
/// tens of thousands can be held; `rescan` names a port it cannot hold.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: l.maximum,
                maximum: l.maximum,
            },
        );
    }
}

/// The epoll key of a listener: its fd number.
fn key(fd: &OwnedFd) -> u64 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd() as u64
}

/// Takes up new on-demand instances (their ports held from now on) and
/// lets go of removed ones and of those no longer on demand. With `full`
/// false, only retries the ports that could not be held.
fn rescan(
    store: &Store,
    ep: &OwnedFd,
    served: &mut HashMap<String, Served>,
    by_key: &mut HashMap<u64, String>,
    refused: &mut HashMap<String, String>,
    full: bool,
    say: &dyn Fn(String),
) -> Result<()> {
    let names: Vec<String> = if full {
        store.instance_names()?
    } else {
        refused.keys().cloned().collect()
    };
    let mut wanted: HashMap<String, Instance> = HashMap::new();
    for name in &names {
        if let Ok(inst) = store.instance(name) {
            if inst.on_demand.is_some() {
                wanted.insert(name.clone(), inst);
            }
        }
    }
    if full {
        refused.retain(|n, _| wanted.contains_key(n));
        served.retain(|name, s| {
            // Gone, no longer on demand, or moved to another port.
            let keep = wanted.get(name).is_some_and(|i| i.port == s.inst.port);
            if !keep {
                let _ = epoll::delete(ep, &s.listener);
                by_key.remove(&key(&s.listener));
            }
            keep
        });
    }
    for (name, inst) in wanted {
        if let Some(s) = served.get_mut(&name) {
            s.inst = inst;
            continue;
        }
        match listen(inst.port) {
            Ok(listener) => {
                epoll::add(
                    ep,
                    &listener,
                    epoll::EventData::new_u64(key(&listener)),
                    epoll::EventFlags::IN,
                )
                .map_err(Error::sys("epoll_ctl(EPOLL_CTL_ADD)"))?;
                by_key.insert(key(&listener), name.clone());
                if refused.remove(&name).is_some() {
                    say(format!("instance {name}: port {} held now", inst.port));
                }
                served.insert(name, Served { inst, listener });
            }
            Err(e) => {
                let why = format!(
                    "instance {name}: cannot hold its port {}: {e} (something else listens \
                     there: `ss -ltnp 'sport = :{}'`); it is not served until that ends",
                    inst.port, inst.port
                );
                if refused.insert(name, why.clone()).is_none() {
                    say(why);
                }
            }
        }
    }
    Ok(())
}

/// Starts what is stopped among the connections' instances (all at once),
/// then gives each connection its session. A connection whose instance
/// does not start is closed (the client sees the connection end).
fn serve_connections(
    store: &Store,
    rt: &Runtime,
    served: &mut HashMap<String, Served>,
    conns: Vec<(String, OwnedFd)>,
    sessions: &mut Vec<std::process::Child>,
    say: &dyn Fn(String),
) -> Counts {
    let mut counts = Counts::default();
    let mut wanted: Vec<String> = conns.iter().map(|(n, _)| n.clone()).collect();
    wanted.sort();
    wanted.dedup();
    // The records as they are now (`set` may have changed one).
    for n in &wanted {
        if let (Ok(fresh), Some(s)) = (store.instance(n), served.get_mut(n)) {
            s.inst = fresh;
        }
    }
    let insts: Vec<Instance> = wanted
        .iter()
        .filter_map(|n| served.get(n).map(|s| s.inst.clone()))
        .collect();
    let stopped = rt.with_state(&insts, |s| s == State::Stopped);
    let mut failed: HashMap<String, String> = HashMap::new();
    if !stopped.is_empty() {
        // `list` shows them starting meanwhile.
        ondemand::mark_starting(store, &stopped, true);
        for (name, r) in rt.start_many(&stopped, &|_| {}) {
            match r {
                Ok(()) => counts.started += 1,
                Err(e) => {
                    say(format!("instance {name}: start on connection failed: {e}"));
                    failed.insert(name, e.to_string());
                }
            }
        }
        ondemand::mark_starting(store, &stopped, false);
    }
    for (name, conn) in conns {
        if failed.contains_key(&name) {
            continue; // dropped: closed
        }
        let Some(s) = served.get(&name) else {
            continue;
        };
        // A login ends an idle time (the session's processes would, at
        // the next sweep, unless it has ended by then).
        let mut mark = ondemand::read_mark(store, &name);
        if mark.idle_since.take().is_some() {
            ondemand::write_mark(store, &name, &mark);
        }
        match rt.session(&s.inst, conn) {
            Ok(child) => {
                counts.sessions += 1;
                sessions.push(child);
            }
            Err(e) => say(format!("instance {name}: session: {e}")),
        }
    }
    counts.up = wanted
        .into_iter()
        .filter(|n| !failed.contains_key(n))
        .collect();
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

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
        drop(first);
        assert!(lock(&store).is_ok());
    }
}
