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

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::net::{AddressFamily, SocketAddrV4, SocketAddrV6, SocketFlags, SocketType};

use crate::runtime::{Runtime, State, StopOptions};
use crate::store::{Instance, Store};
use crate::{Error, Result};

/// Processes of an idle instance: its init and syslogd.
const IDLE_PROCESSES: usize = 2;

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often instances are checked for idleness and the state root
    /// for new or removed on-demand instances.
    pub check_every: Duration,
}

/// One on-demand instance being served.
struct Served {
    inst: Instance,
    listener: OwnedFd,
    /// Since when it has had no session and no process of its users.
    idle_since: Option<Instant>,
}

/// What one pass of the loop did, for the log.
#[derive(Debug, Default)]
struct Counts {
    started: usize,
    sessions: usize,
}

/// The lock of a state root's `serve`: a file that holds its PID.
fn lock(store: &Store) -> Result<std::fs::File> {
    let path = store.root().join("serve.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io("open", &path))?;
    if let Err(e) = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(Error::Invalid(format!(
                "`nifty serve` already runs for {} (PID {}, holding {}): one serves a state \
                 root; stop that one first",
                store.root().display(),
                holder.trim(),
                path.display()
            )));
        }
        return Err(Error::sys(format!(
            "flock({}, LOCK_EX|LOCK_NB)",
            path.display()
        ))(e));
    }
    f.set_len(0).map_err(Error::io("truncate", &path))?;
    f.rewind().map_err(Error::io("seek", &path))?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(Error::io("write", &path))?;
    Ok(f)
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
    let rt = Runtime::new(store)?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(Error::sys("epoll_create1"))?;
    let mut served: HashMap<String, Served> = HashMap::new();
    // Listener (its epoll key) to instance.
    let mut by_key: HashMap<u64, String> = HashMap::new();
    // Sessions started here and not yet reaped.
    let mut sessions: Vec<std::process::Child> = Vec::new();
    // Instances whose port could not be held, said once.
    let mut refused: HashMap<String, String> = HashMap::new();
    let mut next_check = Instant::now();
    let mut events = epoll::EventVec::with_capacity(1024);
    loop {
        if Instant::now() >= next_check {
            rescan(store, &ep, &mut served, &mut by_key, &mut refused, say)?;
            let n = stop_idle(&rt, &mut served, say);
            if n > 0 {
                tracing::debug!(stopped = n, "idle instances stopped");
            }
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
        tracing::debug!(?counts, "connections served");
    }
}

/// The epoll key of a listener: its fd number.
fn key(fd: &OwnedFd) -> u64 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd() as u64
}

/// Takes up new on-demand instances (their ports held from now on) and
/// lets go of removed ones.
fn rescan(
    store: &Store,
    ep: &OwnedFd,
    served: &mut HashMap<String, Served>,
    by_key: &mut HashMap<u64, String>,
    refused: &mut HashMap<String, String>,
    say: &dyn Fn(String),
) -> Result<()> {
    let names: std::collections::HashSet<String> = store.instance_names()?.into_iter().collect();
    served.retain(|name, s| {
        let keep = names.contains(name);
        if !keep {
            let _ = epoll::delete(ep, &s.listener);
            by_key.remove(&key(&s.listener));
        }
        keep
    });
    for name in names {
        if served.contains_key(&name) {
            continue;
        }
        let Ok(inst) = store.instance(&name) else {
            continue;
        };
        if inst.on_demand.is_none() {
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
                served.insert(
                    name,
                    Served {
                        inst,
                        listener,
                        idle_since: None,
                    },
                );
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
    let stopped: Vec<Instance> = rt
        .infos(&insts)
        .into_iter()
        .zip(&insts)
        .filter(|(info, _)| info.state == State::Stopped)
        .map(|(_, i)| i.clone())
        .collect();
    let mut failed: HashMap<String, String> = HashMap::new();
    if !stopped.is_empty() {
        for (name, r) in rt.start_many(&stopped, &|_| {}) {
            match r {
                Ok(()) => counts.started += 1,
                Err(e) => {
                    say(format!("instance {name}: start on connection failed: {e}"));
                    failed.insert(name, e.to_string());
                }
            }
        }
    }
    for (name, conn) in conns {
        if failed.contains_key(&name) {
            continue; // dropped: closed
        }
        let Some(s) = served.get_mut(&name) else {
            continue;
        };
        s.idle_since = None;
        match rt.session(&s.inst, conn) {
            Ok(child) => {
                counts.sessions += 1;
                sessions.push(child);
            }
            Err(e) => say(format!("instance {name}: session: {e}")),
        }
    }
    counts
}

/// Stops the running instances that have been idle for their timeout.
/// Returns how many it stopped.
fn stop_idle(rt: &Runtime, served: &mut HashMap<String, Served>, say: &dyn Fn(String)) -> usize {
    let now = Instant::now();
    let insts: Vec<Instance> = served.values().map(|s| s.inst.clone()).collect();
    let infos = rt.infos(&insts);
    let mut due = Vec::new();
    for (inst, info) in insts.iter().zip(&infos) {
        let Some(s) = served.get_mut(&inst.name) else {
            continue;
        };
        if info.state != State::Running {
            s.idle_since = None;
            continue;
        }
        let busy = rt.processes(inst).len() > IDLE_PROCESSES;
        if busy {
            s.idle_since = None;
            continue;
        }
        let since = *s.idle_since.get_or_insert(now);
        let timeout = Duration::from_secs(inst.on_demand.map_or(u64::MAX, |o| o.idle_timeout_secs));
        if now.duration_since(since) >= timeout {
            due.push(inst.clone());
        }
    }
    if due.is_empty() {
        return 0;
    }
    let mut n = 0;
    for (name, r) in rt.stop_many(&due, StopOptions::default(), &|_| {}) {
        match r {
            Ok(()) => {
                n += 1;
                say(format!("instance {name}: idle, stopped"));
                if let Some(s) = served.get_mut(&name) {
                    s.idle_since = None;
                }
            }
            Err(e) => say(format!("instance {name}: idle, stop failed: {e}")),
        }
    }
    n
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
