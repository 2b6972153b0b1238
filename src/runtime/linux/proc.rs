//! What the kernel says of a container's processes, read so that nothing
//! the tenant controls is trusted: its init, its uptime, whether a process
//! lives; and the lock that serializes work on one instance.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, Signal};

use crate::{Error, Result};

/// Takes an exclusive lock on the instance directory for the duration of a
/// start (released by the kernel if nifty dies).
pub fn lock(dir: &Path) -> Result<OwnedFd> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => {
            Error::NoInstance(dir.file_name().unwrap_or_default().to_string_lossy().into())
        }
        e => Error::sys(format!("open({})", dir.display()))(e),
    })?;
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockExclusive)
        .map_err(Error::sys(format!("flock({}, LOCK_EX)", dir.display())))?;
    Ok(fd)
}

/// Reads a file the kernel makes as it is read (under /proc, or a cgroup's
/// `cgroup.procs`): one open, one read for most (4 KiB), no `stat` (their
/// size says nothing), where `fs::read_to_string` makes a dozen calls. Per
/// process and instance at every sweep and `list`. At most `MAX` bytes.
pub fn read_kernel_file(path: &Path) -> Option<String> {
    const MAX: usize = 4 << 20;
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len >= MAX {
                break;
            }
            buf.resize(len * 2, 0);
        }
        match rustix::io::read(&fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

/// The container's init among its cgroup's processes: the one that is PID 1
/// in its own namespace and has exec'd (a first process still setting up,
/// or left behind by a nifty killed mid-start, does not count).
pub fn find_init(procs: &[i32]) -> Option<i32> {
    find_init_state(procs).map(|(pid, _)| pid)
}

/// [`find_init`], and whether that init is stopped (state T: SIGSTOP).
pub fn find_init_state(procs: &[i32]) -> Option<(i32, bool)> {
    find_init_held(procs).map(|i| (i.pid, i.stopped))
}

/// A container's init, as [`find_init_held`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    pub pid: i32,
    /// Stopped (state T: SIGSTOP).
    pub stopped: bool,
    /// Its first process, held before it execs init (see
    /// `native::spawn::spawn`): set up as init will be, with the logins of
    /// its start; stopping it is ending it (nothing of the container's own
    /// has run but those logins).
    pub held: bool,
}

/// [`find_init`], stopped or not, held or not.
///
/// Only what the tenant cannot forge counts: membership of the cgroup
/// (`procs`, read by the caller), the kernel's `NSpid` (PID 1 of its own
/// namespace), and whether it has exec'd: until then the container's first
/// process still runs nifty's own executable, which no process inside can
/// ever exec (the host binary is not reachable from a container). Names
/// (comm, argv) are the tenant's to change and are not read, but for such
/// a first process of nifty's own, whose name only nifty sets (it is not
/// dumpable: nothing in the container may write its /proc/PID/comm), and
/// which counts as the init once it is held.
pub fn find_init_held(procs: &[i32]) -> Option<Init> {
    let own = nifty_exe();
    procs.iter().find_map(|&pid| {
        let s = read_kernel_file(Path::new(&format!("/proc/{pid}/status")))?;
        let stopped = pid_one(&s)?;
        let exe = rustix::fs::stat(format!("/proc/{pid}/exe").as_str())
            .ok()
            .map(|st| (st.st_dev, st.st_ino));
        let held = exe.is_some() && exe == own;
        if held && status_field(&s, "Name:").map(str::as_bytes) != Some(HELD.to_bytes()) {
            return None; // not exec'd yet: still starting
        }
        Some(Init { pid, stopped, held })
    })
}

/// The name (comm) of a container's first process once it is held (see
/// `native::spawn::spawn`): set up as its init will be, its logins served,
/// init not yet exec'd. Such a process counts as the container's init.
pub const HELD: &std::ffi::CStr = c"nifty:held";

/// Waits, up to `within`, until `pid` no longer runs nifty's executable:
/// true once it has exec'd (or is gone). A CLONE_VFORK parent is woken in
/// the middle of its child's execve, before the kernel gives the child its
/// new memory (`exec_mmap`: the vfork wake-up comes first), so for a while
/// after the parent returns, /proc shows the child still running nifty,
/// and [`find_init`] would not count it as the container's init yet.
pub fn wait_exec(pid: i32, within: std::time::Duration) -> bool {
    let own = nifty_exe();
    let path = format!("/proc/{pid}/exe");
    let end = std::time::Instant::now() + within;
    for round in 0u32.. {
        let exe = rustix::fs::stat(path.as_str())
            .ok()
            .map(|st| (st.st_dev, st.st_ino));
        if exe.is_none() || exe != own {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        // Usually a few microseconds: yield first, then sleep.
        if round < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    false
}

/// From a process's /proc status text: is it PID 1 of its own PID
/// namespace (the last `NSpid` column)? Then whether it is stopped
/// (state T).
fn pid_one(status: &str) -> Option<bool> {
    if status_field(status, "NSpid:").and_then(|l| l.split_whitespace().last()) != Some("1") {
        return None;
    }
    Some(status_field(status, "State:").is_some_and(|st| st.starts_with('T')))
}

/// A field of a /proc status text, trimmed.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// (device, inode) of the running nifty's executable.
fn nifty_exe() -> Option<(u64, u64)> {
    static EXE: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *EXE.get_or_init(|| {
        rustix::fs::stat("/proc/self/exe")
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    })
}

/// When a process started, in clock ticks since boot (/proc/PID/stat's
/// `starttime`): with its PID, names one process for good (a PID is
/// reused, never with the same start). None for one that has ended (a
/// zombie too).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = read_kernel_file(Path::new(&format!("/proc/{pid}/stat")))?;
    // The name in parentheses is the process's to choose: after its last ')'.
    let mut after = stat[stat.rfind(')')? + 2..].split(' ');
    if matches!(after.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    after.nth(18)?.parse().ok()
}

/// Seconds since a process started. Its start is in clock ticks since
/// boot, and so is the boot-time clock (what /proc/uptime shows; no file
/// to read per process).
pub fn uptime(pid: i32) -> Option<u64> {
    let start = start_ticks(pid)?;
    let up = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let hz = rustix::param::clock_ticks_per_second();
    Some((up.tv_sec as u64).saturating_sub(start / hz))
}

/// Where a listening socket is bound, for [`listening_sockets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// On this port, any address.
    Port(u16),
    /// On a loopback address (127.0.0.1 or ::1), any port.
    Loopback,
}

impl Bound {
    fn matches(self, addr: &rustix::net::SocketAddrAny) -> bool {
        use rustix::net::SocketAddrAny::{V4, V6};
        match (self, addr) {
            (Bound::Port(p), V4(a)) => a.port() == p,
            (Bound::Port(p), V6(a)) => a.port() == p,
            (Bound::Loopback, V4(a)) => a.ip().is_loopback(),
            (Bound::Loopback, V6(a)) => a.ip().is_loopback(),
            _ => false,
        }
    }
}

/// The listening TCP sockets of process `pid` (through `pidfd`) bound as
/// `bound` says, in nifty's own network namespace: copies of its fds
/// (pidfd_getfd, Linux 5.6). The process may be a tenant's: each fd is
/// checked for what the kernel says it is (a TCP socket, listening, bound
/// there, made in this network namespace), not for what the process says;
/// at most `MAX_FDS` of its fds are looked at.
pub fn listening_sockets(pid: i32, pidfd: &OwnedFd, bound: Bound) -> Vec<OwnedFd> {
    const MAX_FDS: usize = 64;
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let own_netns = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        None,
    )
    .ok()
    .and_then(|s| netns_of(s.as_fd()));
    let mut out = Vec::new();
    for entry in dir.flatten().take(MAX_FDS) {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Only sockets are worth a copy (a link's text, not followed).
        if !fs::read_link(entry.path())
            .is_ok_and(|l| l.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
        {
            continue;
        }
        let Ok(sock) =
            rustix::process::pidfd_getfd(pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        let listening_tcp = rustix::net::sockopt::get_socket_acceptconn(&sock).unwrap_or(false)
            && rustix::net::sockopt::get_socket_type(&sock).ok()
                == Some(rustix::net::SocketType::STREAM)
            && rustix::net::sockopt::get_socket_protocol(&sock)
                .ok()
                .flatten()
                == Some(rustix::net::ipproto::TCP);
        let on_port = rustix::net::getsockname(&sock).is_ok_and(|a| bound.matches(&a));
        let here = netns_of(sock.as_fd());
        if listening_tcp && on_port && here.is_some() && here == own_netns {
            out.push(sock);
        }
    }
    out
}

/// Which network namespace a socket was made in: its cookie
/// (SO_NETNS_COOKIE, Linux 5.14, no capability needed), else the
/// namespace's inode (SIOCGSKNS, which needs CAP_NET_ADMIN).
#[derive(Debug, PartialEq, Eq)]
enum Netns {
    Cookie(u64),
    Inode(u64, u64),
}

fn netns_of(sock: std::os::fd::BorrowedFd<'_>) -> Option<Netns> {
    if let Ok(cookie) = crate::sys::socket_netns_cookie(sock) {
        return Some(Netns::Cookie(cookie));
    }
    let ns = crate::sys::socket_netns(sock).ok()?;
    let st = rustix::fs::fstat(&ns).ok()?;
    Some(Netns::Inode(st.st_dev, st.st_ino))
}

/// The PID namespace of a process (its `ns/pid` link's text, which names
/// the namespace), to tell a container's processes from others in the
/// same cgroup.
pub fn pid_ns(pid: i32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// A pidfd of `pid` (pidfd_open, Linux 5.3), if it runs: it names that
/// process for good, whatever becomes of its PID.
pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
}

/// Whether the process of `pidfd` exits within `within` (a pidfd is
/// readable once its process has exited): `None` when poll(2) cannot tell.
pub fn exits_within(pidfd: &OwnedFd, within: std::time::Duration) -> Option<bool> {
    use rustix::event::{poll, PollFd, PollFlags};
    let end = std::time::Instant::now() + within;
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        let wait = end.saturating_duration_since(std::time::Instant::now());
        match poll(&mut fds, crate::sys::poll_timeout_ms(wait)) {
            Ok(n) => return Some(n != 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
    }
}

/// The kernel's `NSpid` of a process: its PID in each PID namespace it is
/// in, the outermost (the reader's) first.
fn ns_pids(pid: i32) -> Option<Vec<i32>> {
    let s = read_kernel_file(Path::new(&format!("/proc/{pid}/status")))?;
    let line = s.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// The host PID of the process that a container, whose init is `init`,
/// calls `ns_pid`: among `procs` (its cgroup's, read by the caller), the
/// one that is `ns_pid` in init's own namespace (not in one nested below
/// it). A PID the tenant wrote (a pidfile) is only a question: the answer
/// is the kernel's.
pub fn host_pid(procs: &[i32], init: i32, ns_pid: i32) -> Option<i32> {
    let depth = ns_pids(init)?.len();
    procs
        .iter()
        .copied()
        .find(|&p| ns_pids(p).is_some_and(|ids| ids.len() == depth && ids.last() == Some(&ns_pid)))
}

/// The boot-time clock in the ticks of [`start_ticks`]: a process started
/// from now on has a start no earlier.
pub fn now_ticks() -> u64 {
    let up = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let hz = rustix::param::clock_ticks_per_second();
    up.tv_sec as u64 * hz + up.tv_nsec as u64 * hz / 1_000_000_000
}

/// Does the process exist (signal 0)?
pub fn alive(pid: i32) -> bool {
    Pid::from_raw(pid).is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Sends a signal to a process.
pub fn signal(pid: i32, sig: Signal) -> Result<()> {
    let p = Pid::from_raw(pid).ok_or_else(|| Error::Invalid(format!("bad pid {pid}")))?;
    rustix::process::kill_process(p, sig).map_err(Error::sys(format!("kill({pid}, {sig:?})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_in_a_namespace_is_answered_by_the_kernel() {
        let me = std::process::id() as i32;
        let mine = *ns_pids(me).unwrap().last().unwrap();
        assert_eq!(host_pid(&[me], me, mine), Some(me));
        assert_eq!(host_pid(&[me], me, mine + 1), None, "not among procs");
        // A process started from now on starts no earlier than now.
        let since = now_ticks();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let started = start_ticks(child.id() as i32);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(started.unwrap() >= since, "{started:?} < {since}");
        // And a pidfd says when its process has exited.
        let fd = pidfd(me).unwrap();
        assert_eq!(exits_within(&fd, std::time::Duration::ZERO), Some(false));
    }

    #[test]
    fn wait_exec_tells_a_process_that_has_exec_d_from_one_that_has_not() {
        // This test's own process runs the executable that nifty_exe()
        // names: it never "execs", and the wait gives up.
        let me = std::process::id() as i32;
        assert!(!wait_exec(me, std::time::Duration::from_millis(5)));
        // A child that has exec'd something else (std returns from spawn
        // once it has), then one that is gone.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(wait_exec(pid, std::time::Duration::ZERO));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(wait_exec(pid, std::time::Duration::ZERO));
    }

    #[test]
    fn start_ticks_name_a_live_process_and_not_a_zombie() {
        let me = std::process::id() as i32;
        assert!(start_ticks(me).is_some());
        assert_eq!(start_ticks(me), start_ticks(me));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited, not reaped yet: a zombie.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
            && std::time::Instant::now() < end
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(start_ticks(pid), None);
        child.wait().unwrap();
        assert_eq!(start_ticks(pid), None);
    }

    #[test]
    fn listening_sockets_are_the_kernel_s_listening_tcp_ones_on_the_port() {
        // This process holds: a listener on `port`, a connection to it
        // (TCP, on the same port at one end), and a UDP socket.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _a = l.accept().unwrap();
        let _u = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
        let me = std::process::id() as i32;
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(me).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        // By inode: the other tests of this process run at once, and one
        // may listen on the same port number (on another address).
        let ino = |fd: std::os::fd::BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
        let found: Vec<u64> = listening_sockets(me, &pidfd, Bound::Port(port))
            .iter()
            .map(|s| ino(s.as_fd()))
            .collect();
        assert!(found.contains(&ino(l.as_fd())), "the listener");
        for (what, fd) in [
            ("the connection", _c.as_fd()),
            ("the accepted one", _a.0.as_fd()),
            ("the UDP socket", _u.as_fd()),
        ] {
            assert!(!found.contains(&ino(fd)), "{what} is no listener");
        }
        assert!(
            !listening_sockets(me, &pidfd, Bound::Port(port.wrapping_add(1)))
                .iter()
                .any(|s| ino(s.as_fd()) == ino(l.as_fd()))
        );
        // Any port on loopback: the listener; one on every address is not.
        let everywhere = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let on_loopback: Vec<u64> = listening_sockets(me, &pidfd, Bound::Loopback)
            .iter()
            .map(|s| ino(s.as_fd()))
            .collect();
        assert!(on_loopback.contains(&ino(l.as_fd())), "the listener");
        assert!(!on_loopback.contains(&ino(everywhere.as_fd())));
    }

    #[test]
    fn a_bound_is_a_port_anywhere_or_any_port_on_loopback() {
        use rustix::net::{SocketAddrAny, SocketAddrV4, SocketAddrV6};
        use std::net::{Ipv4Addr, Ipv6Addr};
        let v4 = |ip: Ipv4Addr, port| SocketAddrAny::V4(SocketAddrV4::new(ip, port));
        let v6 = |ip: Ipv6Addr, port| SocketAddrAny::V6(SocketAddrV6::new(ip, port, 0, 0));
        assert!(Bound::Port(2201).matches(&v4(Ipv4Addr::UNSPECIFIED, 2201)));
        assert!(Bound::Port(2201).matches(&v6(Ipv6Addr::UNSPECIFIED, 2201)));
        assert!(!Bound::Port(2201).matches(&v4(Ipv4Addr::LOCALHOST, 2202)));
        assert!(Bound::Loopback.matches(&v4(Ipv4Addr::LOCALHOST, 40123)));
        assert!(Bound::Loopback.matches(&v6(Ipv6Addr::LOCALHOST, 40123)));
        assert!(!Bound::Loopback.matches(&v4(Ipv4Addr::UNSPECIFIED, 40123)));
        assert!(!Bound::Loopback.matches(&v6(Ipv6Addr::UNSPECIFIED, 40123)));
    }

    /// /proc status texts as the kernel writes them (the fields read).
    fn status(name: &str, state: &str, nspid: &str) -> String {
        format!("Name:\t{name}\nUmask:\t0022\nState:\t{state}\nTgid:\t4242\nNSpid:\t{nspid}\n")
    }

    #[test]
    fn init_is_pid_one_of_its_namespace_whatever_its_name() {
        // The container's init, running, seen from the host.
        assert_eq!(
            pid_one(&status("init", "S (sleeping)", "4242\t1")),
            Some(false)
        );
        // Renamed by the tenant: still init (names are never read).
        assert_eq!(
            pid_one(&status("sshd", "S (sleeping)", "4242\t1")),
            Some(false)
        );
        // Stopped by an interrupted `nifty stop`.
        assert_eq!(
            pid_one(&status("init", "T (stopped)", "4242\t1")),
            Some(true)
        );
        // Another process of the container, or one named like init.
        assert_eq!(pid_one(&status("init", "S (sleeping)", "4243\t7")), None);
        // A host process (one PID namespace): PID 1 is the host's init,
        // never in a container's cgroup; anything else is not init.
        assert_eq!(pid_one(&status("init", "S (sleeping)", "4242")), None);
        assert_eq!(pid_one("Name:\tx\n"), None);
    }
}
