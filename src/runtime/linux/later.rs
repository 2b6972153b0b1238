//! What a start leaves to a thread of its own: the ends that would make
//! it wait for nothing it needs.
//!
//! - Closing the last fd of a detached mount tree unmounts it, and the
//!   unmount waits for an RCU grace period (`namespace_unlock`:
//!   synchronize_rcu_expedited, IPIs to every CPU). Each start closes one:
//!   its idmapped clone of the template, once overlayfs holds its own.
//! - Reaping the short-lived holder of a new user namespace waits until
//!   the scheduler has run it to its exit.
//! - Dropping the last name of a file (a state file replaced or removed,
//!   the work directory an overlay left behind) frees its blocks, and on
//!   a filesystem mounted with `discard` (ext4, XFS) the kernel waits for
//!   the device to discard them before the call returns. An fd that still
//!   holds the file (`O_PATH`) puts that off until it is closed here; a
//!   directory tree moved aside is removed here.
//!
//! Measured in a burst of 50 cold starts under `nifty serve` on this
//! 2-CPU machine: each blocked the start's worker once, before the
//! container's first process was made, for about as long as the rest of
//! the burst kept the CPUs busy. The discards came at every start of an
//! instance that had run before (its on-demand mark replaced, its
//! overlay's old work directory removed): 50 starts at once had their
//! median banner 13 ms later than 50 first starts.
//!
//! One thread, made at the first use, takes them in turn. The queue is
//! short ([`QUEUE`]): when it is full the caller does the work itself, as
//! before, so fds waiting here never crowd the caller's fd limit.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};

/// Jobs waiting at most.
const QUEUE: usize = 64;

enum Job {
    Close(OwnedFd),
    /// A child of this process that has been told to exit, and what it
    /// uses until it has (dropped once it is reaped).
    Reap(i32, Box<dyn Send>),
    /// A directory tree moved aside, no longer used by anything.
    RemoveTree(PathBuf),
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
            Job::RemoveTree(dir) => {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("remove {}: {e}", dir.display());
                    }
                }
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

/// Removes the directory tree `dir` on the thread (or here, if its queue
/// is full): one moved aside, that nothing uses or names any more.
pub fn remove_tree(dir: PathBuf) {
    send(Job::RemoveTree(dir));
}

/// Holds the file at `path` (not following a last symlink), if there is
/// one, so that dropping its last name does not free it; give the fd to
/// [`close`] once the name is gone. `None` if there is none to hold.
pub fn hold(path: &std::path::Path) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

/// Whether `p` is gone within five seconds (for tests of what this
/// thread removes).
#[cfg(test)]
pub(crate) fn gone_soon(p: &std::path::Path) -> bool {
    (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        p.symlink_metadata().is_err()
    })
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
    fn a_held_file_outlives_its_name_until_closed() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("mark");
        std::fs::write(&f, b"state").unwrap();
        let held = hold(&f).expect("an existing file is held");
        let ino = std::fs::metadata(&f).unwrap().ino();
        std::fs::remove_file(&f).unwrap();
        // Its name is gone; the file is not freed while the fd holds it.
        let st = rustix::fs::fstat(&held).unwrap();
        assert_eq!((st.st_ino, st.st_nlink), (ino, 0));
        close(held);
        // Nothing to hold, and a symlink is held as itself.
        assert!(hold(&f).is_none());
        std::os::unix::fs::symlink("/etc/hostname", &f).unwrap();
        let link = hold(&f).unwrap();
        let st = rustix::fs::fstat(&link).unwrap();
        assert_eq!(
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            rustix::fs::FileType::Symlink
        );
    }

    #[test]
    fn a_tree_set_aside_is_removed_soon() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("aside");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/c"), b"x").unwrap();
        remove_tree(d.clone());
        assert!(gone_soon(&d), "{} is still there", d.display());
        // One that is already gone is no error.
        remove_tree(d);
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
