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
/// caller's terminal until the command (`child`, a pidfd) exits; then
/// copies what output is left and returns.
pub fn proxy(master: &OwnedFd, child: &OwnedFd, ttys: Ttys) {
    let _raw = Raw::new(ttys.stdin);
    let stdin = std::io::stdin();
    let out = if ttys.stdout {
        rustix::io::fcntl_dupfd_cloexec(std::io::stdout(), 3).ok()
    } else {
        rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 3).ok()
    };
    let mut read_stdin = ttys.stdin;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let mut fds = vec![
            PollFd::new(master, PollFlags::IN),
            PollFd::new(child, PollFlags::IN),
        ];
        if read_stdin {
            fds.push(PollFd::new(&stdin, PollFlags::IN));
        }
        match poll(&mut fds, -1) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => break,
        }
        let (m, c) = (fds[0].revents(), fds[1].revents());
        let s = fds
            .get(2)
            .map(PollFd::revents)
            .unwrap_or(PollFlags::empty());
        if !m.is_empty() {
            match rustix::io::read(master, &mut buf) {
                Ok(0) | Err(Errno::IO) => break, // every end of the pty is closed
                Ok(n) => {
                    if let Some(o) = &out {
                        let _ = write_all(o.as_fd(), &buf[..n]);
                    }
                }
                Err(Errno::INTR) | Err(Errno::AGAIN) => {}
                Err(_) => break,
            }
        }
        if !s.is_empty() {
            match rustix::io::read(stdin.as_fd(), &mut buf) {
                Ok(0) => read_stdin = false,
                Ok(n) => {
                    if write_all(master.as_fd(), &buf[..n]).is_err() {
                        read_stdin = false;
                    }
                }
                Err(Errno::INTR) | Err(Errno::AGAIN) => {}
                Err(_) => read_stdin = false,
            }
        }
        if !c.is_empty() {
            // The command exited: what it wrote before is in the pty's
            // buffer; copy that, not what others inside write later.
            let _ = rustix::fs::fcntl_setfl(master, OFlags::NONBLOCK);
            while let Ok(n) = rustix::io::read(master, &mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(o) = &out {
                    let _ = write_all(o.as_fd(), &buf[..n]);
                }
            }
            break;
        }
    }
}
