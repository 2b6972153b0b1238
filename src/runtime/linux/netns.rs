//! A TCP table of its own for each network namespace nifty makes
//! (`--network none`), Linux 6.1.
//!
//! By default every network namespace shares the kernel's one table of
//! TCP connections (the "ehash", sized by RAM: 262,144 buckets on a 24 GiB
//! host), and `/proc/net/tcp` in any namespace walks all of it, empty
//! buckets too, to find that namespace's few sockets: about 1.7 ms a walk
//! here, and Dropbear reads `/proc/net/tcp` for entropy at each start
//! (two walks), so every login to a `--network none` instance paid some
//! 3 ms for it. Since Linux 6.1 a namespace can get a table of its own,
//! sized by `net.ipv4.tcp_child_ehash_entries` of the namespace of the
//! task that creates it. nifty does not change that sysctl on the host (it
//! would change every namespace made there, Docker's too): the thread that
//! makes a container's namespace steps into a namespace of nifty's own for
//! the `clone` (the nursery, made once per process, whose sysctl is set),
//! and steps back. Before 6.1 (the sysctl does not exist) or with
//! `NIFTY_FALLBACKS=netns-ehash`, namespaces are made from the host's and
//! share its table, as before.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType, UnshareFlags};

/// Buckets of a container network's own TCP table: 8 KiB, room for
/// thousands of the tenant's own loopback connections.
pub const OWN_TABLE: u32 = 1024;

/// The sysctl, per namespace, that sizes the tables of the namespaces made
/// from it.
const CHILD_EHASH: &str = "/proc/sys/net/ipv4/tcp_child_ehash_entries";

/// A network namespace of nifty's own from which container namespaces are
/// made, each with a TCP table of its own. Lives with the process (its fd).
#[derive(Debug)]
pub struct Nursery(OwnedFd);

/// The process's nursery, made at its first use; `None` before Linux 6.1,
/// where nothing could make one, or with `NIFTY_FALLBACKS=netns-ehash`.
pub fn nursery() -> Option<&'static Nursery> {
    static NURSERY: OnceLock<Option<Nursery>> = OnceLock::new();
    NURSERY
        .get_or_init(|| {
            if super::features::forced("netns-ehash") {
                return None;
            }
            Nursery::new()
                .inspect_err(|e| {
                    tracing::debug!("no network namespace nursery ({e}): the host's TCP table")
                })
                .ok()
        })
        .as_ref()
}

impl Nursery {
    /// Makes the namespace on a thread of its own (a thread's namespace is
    /// its own; the process's other threads stay where they are), sets its
    /// sysctl there (`/proc/sys/net` is the writing thread's namespace's),
    /// and keeps a handle on it.
    fn new() -> std::io::Result<Nursery> {
        let made = std::thread::Builder::new()
            .name("nifty:netns".into())
            .spawn(|| -> std::io::Result<OwnedFd> {
                rustix::thread::unshare(UnshareFlags::NEWNET)?;
                std::fs::write(CHILD_EHASH, OWN_TABLE.to_string())?;
                let ns = rustix::fs::open(
                    "/proc/thread-self/ns/net",
                    OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                Ok(ns)
            })?
            .join()
            .map_err(|_| std::io::Error::other("the thread making it panicked"))??;
        Ok(Nursery(made))
    }

    /// Runs `make` (a `clone` or `unshare` with `CLONE_NEWNET`) with the
    /// calling thread in the nursery, and takes the thread back to its own
    /// namespace. Only the namespace's birth happens there: `make` must
    /// not open sockets for the caller.
    pub fn within<T>(&self, make: impl FnOnce() -> T) -> std::io::Result<T> {
        let home = rustix::fs::open(
            "/proc/thread-self/ns/net",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        move_into_link_name_space(self.0.as_fd(), Some(LinkNameSpaceType::Network))?;
        let made = make();
        // Going back cannot fail for a root that just came from there; if
        // it did, this thread's next sockets would be in the nursery.
        move_into_link_name_space(home.as_fd(), Some(LinkNameSpaceType::Network))
            .expect("setns back to the thread's own network namespace");
        Ok(made)
    }
}
