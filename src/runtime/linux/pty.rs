//! A terminal of nifty's own for `nifty exec`, so that tenant code never
//! holds the administrator's.
//!
//! A command run in a container is tenant code (the container's `/bin/sh`
//! is the tenant's file). Given the caller's terminal as its stdio or its
//! controlling terminal, a child it leaves behind could read what the
//! administrator types next, or push input into the administrator's shell
//! (TIOCSTI). So, as `lxc-attach` and `docker exec -t` do: the command runs
//! in a session of its own (`setsid`: no controlling terminal from the
//! host); when the caller is on a terminal, the command gets the far end of
//! a new pseudo-terminal instead, as its controlling terminal, and nifty
//! copies bytes between the two until the command exits. Once `exec`
//! returns, what is left inside holds only that pty, which nobody reads.

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::pty::OpenptFlags;

use crate::{Error, Result};

/// Which of the caller's stdio are terminals.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ttys {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Ttys {
    pub fn of_caller() -> Ttys {
        Ttys {
            stdin: std::io::stdin().is_terminal(),
            stdout: std::io::stdout().is_terminal(),
            stderr: std::io::stderr().is_terminal(),
        }
    }

    pub fn any(self) -> bool {
        self.stdin || self.stdout || self.stderr
    }
}

/// Which of the caller's stdio a command in a container gets through a
/// pipe of nifty's rather than as it is: all but terminals (a pty, above),
/// pipes and sockets. A directory would let the command out of the
/// container (`fchdir` to it: the host's tree), and a file or a device
/// could be opened again through `/proc/self/fd` with other access (as
/// the container's root) or kept past the command.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relayed {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Relayed {
    pub fn of_caller(ttys: Ttys) -> Relayed {
        let relay = |fd: BorrowedFd<'_>, tty: bool| {
            !tty && match rustix::fs::fstat(fd) {
                Ok(st) => !matches!(
                    rustix::fs::FileType::from_raw_mode(st.st_mode),
                    rustix::fs::FileType::Fifo | rustix::fs::FileType::Socket
                ),
                // Closed: nothing to hand.
                Err(_) => false,
            }
        };
        Relayed {
            stdin: relay(std::io::stdin().as_fd(), ttys.stdin),
            stdout: relay(std::io::stdout().as_fd(), ttys.stdout),
            stderr: relay(std::io::stderr().as_fd(), ttys.stderr),
        }
    }
}

/// nifty's ends of the relay pipes: where the caller's stdin is written,
/// where the command's stdout and stderr are read.
#[derive(Debug, Default)]
pub struct Relays {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl Relays {
    pub fn any(&self) -> bool {
        self.stdin.is_some() || self.stdout.is_some() || self.stderr.is_some()
    }
}

/// A new pseudo-terminal: nifty's end and the command's end.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pty (the host's devpts, close-on-exec on both ends) with the
/// caller's window size.
pub fn open(ttys: Ttys) -> Result<Pty> {
    let err = |call: &'static str| move |e: Errno| Error::sys(call)(e);
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)
        .map_err(err("posix_openpt(/dev/ptmx)"))?;
    rustix::io::fcntl_setfd(&master, rustix::io::FdFlags::CLOEXEC)
        .map_err(err("fcntl(FD_CLOEXEC)"))?;
    rustix::pty::unlockpt(&master).map_err(err("unlockpt"))?;
    // The peer by fd (TIOCGPTPEER, Linux 4.13): no path is looked up.
    let slave = rustix::pty::ioctl_tiocgptpeer(
        &master,
        OpenptFlags::RDWR
            | OpenptFlags::NOCTTY
            | OpenptFlags::from_bits_retain(OFlags::CLOEXEC.bits()),
    )
    .map_err(err("ioctl(TIOCGPTPEER)"))?;
    let from = if ttys.stdin {
        Some(std::io::stdin().as_fd().try_clone_to_owned())
    } else if ttys.stdout {
        Some(std::io::stdout().as_fd().try_clone_to_owned())
    } else {
        None
    };
    if let Some(Ok(fd)) = from {
        if let Ok(size) = rustix::termios::tcgetwinsize(&fd) {
            let _ = rustix::termios::tcsetwinsize(&master, size);
        }
    }
    Ok(Pty { master, slave })
}

/// Puts the caller's terminal (stdin) in raw mode until dropped, so that
/// every key goes to the command's terminal, which does its own editing.
struct Raw {
    saved: Option<rustix::termios::Termios>,
}

impl Raw {
    fn new(on: bool) -> Raw {
        let stdin = std::io::stdin();
        let saved = on
            .then(|| rustix::termios::tcgetattr(stdin.as_fd()).ok())
            .flatten();
        if let Some(t) = &saved {
            let mut raw = t.clone();
            raw.make_raw();
            let _ = rustix::termios::tcsetattr(
                stdin.as_fd(),
                rustix::termios::OptionalActions::Now,
                &raw,
            );
        }
        Raw { saved }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin().as_fd(),
                rustix::termios::OptionalActions::Now,
                t,
            );
        }
    }
}

fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> std::result::Result<(), Errno> {
    while !buf.is_empty() {
        match rustix::io::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let mut p = [PollFd::new(&fd, PollFlags::OUT)];
                let _ = poll(&mut p, -1);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies the caller's keys to the pty and the pty's output to the
/// caller's terminal, and the relayed outputs to the caller's stdout and
/// stderr, until the command (`child`, a pidfd) exits; then copies what
/// output is left and returns (not what others inside write later).
pub fn proxy(pty: Option<(&OwnedFd, Ttys)>, relays: Relays, child: &OwnedFd) {
    let ttys = pty.map(|(_, t)| t).unwrap_or_default();
    let master = pty.map(|(m, _)| m);
    let _raw = Raw::new(ttys.stdin);
    // The caller's stdin into its relay, in this loop (no thread: the
    // caller has joined the container's PID namespace, where it can start
    // none): what the command has not taken yet waits in `pending`.
    let mut in_from = relays
        .stdin
        .as_ref()
        .and_then(|_| rustix::io::fcntl_dupfd_cloexec(std::io::stdin(), 3).ok());
    let mut in_to = relays.stdin;
    if let Some(to) = &in_to {
        let _ = rustix::fs::fcntl_setfl(to, OFlags::NONBLOCK);
    }
    let mut pending: Vec<u8> = Vec::new();
    let stdin = std::io::stdin();
    let caller = |stdout: bool| {
        if stdout {
            rustix::io::fcntl_dupfd_cloexec(std::io::stdout(), 3).ok()
        } else {
            rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 3).ok()
        }
    };
    // (what to read, where its bytes go): the pty's output, then the
    // relayed stdout and stderr.
    let mut outs: Vec<(BorrowedFd<'_>, Option<OwnedFd>)> = Vec::new();
    if let Some(m) = master {
        outs.push((m.as_fd(), caller(ttys.stdout)));
    }
    let relayed = [(relays.stdout, true), (relays.stderr, false)];
    let relayed: Vec<(OwnedFd, bool)> = relayed
        .into_iter()
        .filter_map(|(fd, stdout)| Some((fd?, stdout)))
        .collect();
    for (fd, stdout) in &relayed {
        outs.push((fd.as_fd(), caller(*stdout)));
    }
    let copy = |from: BorrowedFd<'_>, to: &Option<OwnedFd>, buf: &mut [u8]| -> bool {
        match rustix::io::read(from, buf) {
            // Every writing end is closed (a pty says EIO).
            Ok(0) | Err(Errno::IO) => false,
            Ok(n) => {
                if let Some(o) = to {
                    let _ = write_all(o.as_fd(), &buf[..n]);
                }
                true
            }
            Err(Errno::INTR) | Err(Errno::AGAIN) => true,
            Err(_) => false,
        }
    };
    let mut open = vec![true; outs.len()];
    let mut read_stdin = ttys.stdin && master.is_some();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let mut fds = vec![PollFd::new(child, PollFlags::IN)];
        let polled: Vec<usize> = (0..outs.len()).filter(|i| open[*i]).collect();
        for i in &polled {
            fds.push(PollFd::new(&outs[*i].0, PollFlags::IN));
        }
        if read_stdin {
            fds.push(PollFd::new(&stdin, PollFlags::IN));
        }
        let stdin_at = fds.len();
        match (&in_from, &in_to) {
            (_, Some(to)) if !pending.is_empty() => fds.push(PollFd::new(to, PollFlags::OUT)),
            (Some(from), Some(_)) => fds.push(PollFd::new(from, PollFlags::IN)),
            _ => {}
        }
        match poll(&mut fds, -1) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => break,
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if ready.len() > stdin_at && ready[stdin_at] {
            if pending.is_empty() {
                match in_from.as_ref().map(|f| rustix::io::read(f, &mut buf)) {
                    Some(Ok(n)) if n > 0 => pending.extend_from_slice(&buf[..n]),
                    Some(Err(Errno::INTR | Errno::AGAIN)) => {}
                    // The end of the caller's stdin (or one that cannot
                    // be read: a directory).
                    _ => in_from = None,
                }
            }
            if let Some(to) = &in_to {
                match rustix::io::write(to, &pending) {
                    Ok(n) => drop(pending.drain(..n)),
                    Err(Errno::INTR | Errno::AGAIN) => {}
                    // The command closed its stdin.
                    Err(_) => {
                        pending.clear();
                        in_from = None;
                    }
                }
            }
            if pending.is_empty() && in_from.is_none() {
                in_to = None;
            }
        }
        for (k, i) in polled.iter().enumerate() {
            if ready[k + 1] {
                open[*i] = copy(outs[*i].0, &outs[*i].1, &mut buf);
            }
        }
        if read_stdin && ready[stdin_at - 1] {
            if let Some(m) = master {
                match rustix::io::read(stdin.as_fd(), &mut buf) {
                    Ok(0) => read_stdin = false,
                    Ok(n) => {
                        if write_all(m.as_fd(), &buf[..n]).is_err() {
                            read_stdin = false;
                        }
                    }
                    Err(Errno::INTR) | Err(Errno::AGAIN) => {}
                    Err(_) => read_stdin = false,
                }
            }
        }
        if ready[0] {
            // The command exited: what it wrote before is buffered; copy
            // that, not what others inside write later.
            for (i, (from, to)) in outs.iter().enumerate() {
                if open[i] {
                    let _ = rustix::fs::fcntl_setfl(from, OFlags::NONBLOCK);
                    while let Ok(n) = rustix::io::read(*from, &mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Some(o) = to {
                            let _ = write_all(o.as_fd(), &buf[..n]);
                        }
                    }
                }
            }
            break;
        }
        // Every output closed, no input to copy: only the command's end
        // is left to wait for.
        if open.iter().all(|o| !o) && in_to.is_none() {
            break;
        }
    }
}
