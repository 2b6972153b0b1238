//! What a start leaves to a thread of its own: the ends that would make
//! it wait for nothing it needs.
//!
//! - Closing the last fd of a detached mount tree unmounts it, and the
//!   unmount waits for an RCU grace period (`namespace_unlock`:
//!   synchronize_rcu_expedited, IPIs to every CPU). Each start closes one:
//!   its idmapped clone of the template, once overlayfs holds its own.
//! - Reaping the short-lived holder of a new user namespace waits until
//!   the scheduler has run it to its exit.
//!
//! Measured in a burst of 50 cold starts under `nifty serve` on this
//! 2-CPU machine: each blocked the start's worker once, before the
//! container's first process was made, for about as long as the rest of
//! the burst kept the CPUs busy.
//!
//! One thread, made at the first use, takes them in turn. The queue is
//! short ([`QUEUE`]): when it is full the caller does the work itself, as
//! before, so fds waiting here never crowd the caller's fd limit.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};

/// Jobs waiting at most.
const QUEUE: usize = 64;

enum Job {
    Close(OwnedFd),
    /// A child of this process that has been told to exit, and what it
    /// uses until it has (dropped once it is reaped).
    Reap(i32, Box<dyn Send>),
}

impl Job {
    fn run(self) {
        match self {
            Job::Close(fd) => drop(fd),
            Job::Reap(pid, keep) => {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ =
                        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
                }
                drop(keep);
            }
        }
    }
}

/// The thread's end of the queue; `None` if it could not be made.
fn queue() -> &'static Mutex<Option<SyncSender<Job>>> {
    static QUEUE_TX: OnceLock<Mutex<Option<SyncSender<Job>>>> = OnceLock::new();
    QUEUE_TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let made = std::thread::Builder::new()
            .name("nifty-later".into())
            .spawn(move || {
                for job in rx {
                    job.run();
                }
            });
        Mutex::new(made.ok().map(|_| tx))
    })
}

fn send(job: Job) {
    let rejected = match queue().lock() {
        Ok(tx) => match tx.as_ref() {
            Some(tx) => match tx.try_send(job) {
                Ok(()) => None,
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Some(job),
            },
            None => Some(job),
        },
        Err(_) => Some(job),
    };
    if let Some(job) = rejected {
        job.run();
    }
}

/// Closes `fd` on the thread (or here, if its queue is full).
pub fn close(fd: OwnedFd) {
    send(Job::Close(fd));
}

/// Reaps the child `pid` on the thread (or here, if its queue is full):
/// one that exits by itself soon, and that nothing else waits for; then
/// drops `keep`, what it uses until then (a `clone_vm` child's stack and
/// function).
pub fn reap(pid: i32, keep: Box<dyn Send>) {
    send(Job::Reap(pid, keep));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_fd_is_closed_soon() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        close(w);
        // The read end sees the end of the pipe once the write end is
        // closed, whichever thread closes it.
        let mut b = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut b).unwrap(), 0);
    }

    #[test]
    fn a_reaped_child_leaves_no_zombie() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Nothing else waits for it: its `Child` is gone without a wait.
        drop(child);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // `keep` is dropped once the child is reaped: the channel closes.
        reap(pid, Box::new(tx));
        let r = rx.recv_timeout(std::time::Duration::from_secs(5));
        assert!(r.is_err_and(|e| e == std::sync::mpsc::RecvTimeoutError::Disconnected));
        // Reaped: no zombie of it (its PID is gone, or another process's).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|t| t.split_whitespace().next());
        assert_ne!(state, Some("Z"), "PID {pid} is a zombie: {stat}");
    }
}
