//! User namespaces: container root is an unprivileged host UID.
//!
//! Every instance owns a distinct range of 65536 host IDs (like
//! `systemd-nspawn --private-users=pick`), so that a root escaping one
//! container owns nothing of another. Ranges are claimed at create time by
//! an atomic symlink `uids/<index> -> <name>` and released at `rm`; the
//! range is recorded in instance.toml. The shared template stays one set of
//! root-owned files: each container sees it through an idmapped mount
//! (Linux >= 5.19 for overlayfs on idmapped layers) that shows host UID 0
//! as the container's root; the instance's upper layer is owned by its
//! range on the host.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use crate::sys;
use crate::{Error, Result};

/// IDs per container.
pub const RANGE: u32 = 65536;
/// Ranges nifty hands out first: 0x70000000-0x7FFDFFFF, which systemd
/// leaves unused (docs/UIDS-GIDS.md), so `systemd-nspawn
/// --private-users=pick` (which picks in 0x00080000-0x6FFFFFFF) never
/// meets them: 4094 ranges.
pub const HIGH_FIRST: u32 = 0x7000_0000;
pub const HIGH_SLOTS: u32 = (0x7FFE_0000 - HIGH_FIRST) / RANGE;
/// Past those, nspawn's own region (shared with its pick, which checks
/// only its own lock files): ranges from here up to 0x6FFF0000.
pub const FIRST: u32 = 0x0008_0000;
pub const LOW_SLOTS: u32 = (0x6FFF_0000 - FIRST) / RANGE;
/// Number of ranges in all.
pub const SLOTS: u32 = HIGH_SLOTS + LOW_SLOTS;
/// Where ranges are claimed, for every state root of the host: two
/// roots never hand out the same range.
pub const HOST_CLAIMS: &str = "/var/lib/nifty-uids";
/// A claim whose instance does not exist (yet) is taken back only after
/// this long: a create writes its instance after claiming its range.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// First host ID of range `slot`.
pub fn base_of(slot: u32) -> u32 {
    if slot < HIGH_SLOTS {
        HIGH_FIRST + slot * RANGE
    } else {
        FIRST + (slot - HIGH_SLOTS) * RANGE
    }
}

/// The slot of a range's first host ID (one handed out by [`base_of`]).
pub fn slot_of(base: u32) -> u32 {
    if base >= HIGH_FIRST {
        (base - HIGH_FIRST) / RANGE
    } else {
        HIGH_SLOTS + (base - FIRST) / RANGE
    }
}

/// Claims a free range for the instance at `instance` (its directory,
/// absolute: the claim names it) in the host-wide `dir`; returns its first
/// host ID. A claim is a symlink `<dir>/<slot> -> <instance dir>`, made
/// atomically. `hint` (the instance number) is tried first; past a taken
/// hint, slots are tried from a random one (of the region nspawn never
/// picks, then of its region), so a second fleet numbered like the first
/// does not walk the first's claims one by one. Claims of
/// instances that are gone (their state root was deleted without `rm`)
/// are taken back, under a lock.
pub fn claim(dir: &Path, instance: &Path, hint: Option<u32>) -> Result<u32> {
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let (jump_high, jump_low) = (rand::random::<u32>(), rand::random::<u32>());
    let hinted = hint.map(|h| h % SLOTS);
    // The hint, then the region nspawn never picks, then nspawn's.
    let order = hinted
        .into_iter()
        .chain((0..HIGH_SLOTS).map(|i| (jump_high.wrapping_add(i)) % HIGH_SLOTS))
        .chain((0..LOW_SLOTS).map(|i| HIGH_SLOTS + (jump_low.wrapping_add(i)) % LOW_SLOTS));
    for slot in order {
        let link = dir.join(slot.to_string());
        match std::os::unix::fs::symlink(instance, &link) {
            Ok(()) => return Ok(base_of(slot)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if take_back(dir, &link, instance)? {
                    return Ok(base_of(slot));
                }
            }
            Err(e) => return Err(Error::io("create uid range claim", &link)(e)),
        }
    }
    Err(Error::Host(format!(
        "no free UID range left for {} (all {SLOTS} are claimed in {})",
        instance.display(),
        dir.display()
    )))
}

/// Is the claim `link` left by an instance that is gone? Then replaces it
/// with one for `instance`, under the directory's lock (two takers never
/// both win), and says so.
fn take_back(dir: &Path, link: &Path, instance: &Path) -> Result<bool> {
    let stale = |link: &Path| -> bool {
        let Ok(target) = std::fs::read_link(link) else {
            return false;
        };
        if target.is_dir() {
            return false;
        }
        // Its whole state root is gone, or it was never completed.
        let root_gone = target.parent().is_some_and(|p| !p.is_dir());
        let old = std::fs::symlink_metadata(link)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_AFTER));
        root_gone || old
    };
    if !stale(link) {
        return Ok(false);
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(Error::io("open", dir.join(".lock")))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(Error::sys(
        format!("flock({})", dir.join(".lock").display()),
    ))?;
    if !stale(link) {
        return Ok(false);
    }
    std::fs::remove_file(link).map_err(Error::io("remove stale claim", link))?;
    match std::os::unix::fs::symlink(instance, link) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io("create uid range claim", link)(e)),
    }
}

/// Records the range of an existing instance (made before claims were
/// host-wide) in `dir`, if no one else holds it; says whether it did or
/// holds it already.
pub fn adopt(dir: &Path, instance: &Path, base: u32) -> bool {
    let _ = std::fs::create_dir_all(dir);
    let link = dir.join(slot_of(base).to_string());
    match std::os::unix::fs::symlink(instance, &link) {
        Ok(()) => true,
        Err(_) => std::fs::read_link(&link).is_ok_and(|t| t == instance),
    }
}

/// Releases the range starting at `base` if the instance at `instance`
/// holds it.
pub fn release(dir: &Path, instance: &Path, base: u32) {
    let link = dir.join(slot_of(base).to_string());
    if std::fs::read_link(&link).is_ok_and(|p| p == instance) {
        let _ = std::fs::remove_file(link);
    }
}

/// Makes a user namespace mapping container IDs 0..65535 to host IDs
/// `base..base+65535` and returns an fd for it. A short-lived child holds
/// the namespace while its maps are written; the fd keeps it alive.
pub fn create(base: u32) -> Result<OwnedFd> {
    let (r, w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(Error::sys("pipe2()"))?;
    let parent = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(Error::sys("pidfd_open(self)"))?;
    // The holder shares nifty's memory (no fork of a big, threaded
    // process): it only waits until the maps are written.
    let mut stack = vec![0u8; 16 << 10];
    let mut hold = || i32::from(!sys::wait_for_parent(r.as_fd(), parent.as_fd()));
    let (pid, _pidfd) =
        sys::clone_vm(libc::CLONE_NEWUSER, &mut stack, &mut hold).map_err(|e| Error::Sys {
            call: "clone(CLONE_VM|CLONE_NEWUSER)".into(),
            source: e,
        })?;
    let result = (|| {
        let map = format!("0 {base} {RANGE}\n");
        for f in ["uid_map", "gid_map"] {
            let p = format!("/proc/{pid}/{f}");
            std::fs::write(&p, &map).map_err(|e| Error::Sys {
                call: format!("write({p}, {map:?})"),
                source: e,
            })?;
        }
        let p = format!("/proc/{pid}/ns/user");
        rustix::fs::open(
            &p,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(Error::sys(format!("open({p})")))
    })();
    let _ = rustix::io::write(&w, b"x");
    drop(w);
    let _ = rustix::process::waitpid(
        rustix::process::Pid::from_raw(pid),
        rustix::process::WaitOptions::empty(),
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_distinct_and_released() {
        let d = tempfile::tempdir().unwrap();
        let inst = |n: &str| d.path().join("root/instances").join(n);
        std::fs::create_dir_all(inst("1")).unwrap();
        let a = claim(d.path(), &inst("1"), Some(1)).unwrap();
        assert_eq!(a, base_of(1));
        // Slot taken: another range, never the same, in the region nspawn
        // never picks.
        let b = claim(d.path(), &inst("x"), Some(1)).unwrap();
        assert_ne!(b, a);
        assert!(b >= HIGH_FIRST);
        release(d.path(), &inst("1"), a);
        assert_eq!(claim(d.path(), &inst("z"), Some(1)).unwrap(), a);
        // Releasing with the wrong owner does nothing.
        release(d.path(), &inst("nope"), b);
        assert!(d
            .path()
            .join(slot_of(b).to_string())
            .symlink_metadata()
            .is_ok());
    }

    #[test]
    fn slots_and_bases_round_trip_and_never_overlap() {
        assert_eq!(base_of(0), 0x7000_0000);
        assert_eq!(base_of(HIGH_SLOTS - 1) + RANGE, 0x7FFE_0000);
        assert_eq!(base_of(HIGH_SLOTS), FIRST);
        assert!(base_of(SLOTS - 1) + RANGE <= 0x6FFF_0000);
        for slot in [0, 1, HIGH_SLOTS - 1, HIGH_SLOTS, HIGH_SLOTS + 7, SLOTS - 1] {
            assert_eq!(slot_of(base_of(slot)), slot);
        }
    }
}
