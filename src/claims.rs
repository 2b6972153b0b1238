//! Claims: a key (a port, a UID range's slot) held by one owner, as a
//! symlink `<dir>/<key> -> <owner>`. symlink(2) fails if the name exists,
//! so a claim is atomic and two claimants never hold one key, across
//! processes and state roots, with no lock on the common path; a claim
//! left by an owner that is gone is taken back under the directory's lock.
//! Ports are claimed per state root, UID ranges host-wide.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A directory of claims.
#[derive(Debug, Clone)]
pub struct Claims {
    dir: PathBuf,
}

impl Claims {
    /// The claims in `dir` (made if missing).
    pub fn new(dir: &Path) -> Result<Claims> {
        std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        Ok(Claims::at(dir))
    }

    /// The claims in `dir`, for releasing (nothing is made).
    pub fn at(dir: &Path) -> Claims {
        Claims {
            dir: dir.to_path_buf(),
        }
    }

    /// Claims `key` for `owner`. `None`: claimed; `Some(holder)`: someone
    /// (maybe `owner` itself) holds it already.
    pub fn claim(&self, key: &str, owner: &Path) -> Result<Option<PathBuf>> {
        let link = self.dir.join(key);
        match std::os::unix::fs::symlink(owner, &link) {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Some(
                std::fs::read_link(&link).unwrap_or_else(|_| PathBuf::from("?")),
            )),
            Err(e) => Err(Error::io("create claim", &link)(e)),
        }
    }

    /// Releases `key` if `owner` holds it.
    pub fn release(&self, key: &str, owner: &Path) {
        let link = self.dir.join(key);
        if std::fs::read_link(&link).is_ok_and(|p| p == owner) {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Takes `key` for `owner` if `stale(link, holder)` says its holder is
    /// gone, under the directory's lock (two takers never both win); says
    /// whether it did.
    pub fn take_back(
        &self,
        key: &str,
        owner: &Path,
        stale: impl Fn(&Path, &Path) -> bool,
    ) -> Result<bool> {
        let link = self.dir.join(key);
        let is_stale = || std::fs::read_link(&link).is_ok_and(|t| stale(&link, &t));
        if !is_stale() {
            return Ok(false);
        }
        let lock_path = self.dir.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(Error::io("open", &lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(Error::sys(format!("flock({})", lock_path.display())))?;
        if !is_stale() {
            return Ok(false);
        }
        std::fs::remove_file(&link).map_err(Error::io("remove stale claim", &link))?;
        Ok(self.claim(key, owner)?.is_none())
    }
}

/// UID ranges: one of 65536 host IDs per instance, unique on the host.
pub mod uid_range {
    use super::Claims;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use crate::{Error, Result};

    pub use super::RANGE;

    /// Where ranges are claimed from, in order (first host ID, number of
    /// ranges); a slot numbers the ranges of all regions one after another.
    ///
    /// 1. 0x70000000-0x7FFDFFFF, which systemd leaves unused
    ///    (docs/UIDS-GIDS.md), so `systemd-nspawn --private-users=pick`
    ///    (which picks in 0x00080000-0x6FFFFFFF) never meets them: 4094.
    /// 2. nspawn's own region, shared with its pick (which checks only its
    ///    own lock files), from 0x00080000 up to 0x6FFF0000: 28,663.
    /// 3. Past 2^31, up to 0xFFFEFFFF (the last range stops short of
    ///    0xFFFFFFFF, which means "no ID"): 32,767, only for fleets past
    ///    the 32,757 of the first two. The kernel and nspawn take any
    ///    32-bit ID, but systemd leaves this half unused because some
    ///    userspace reads IDs as signed: on the host, such an instance's
    ///    files show large owner numbers.
    pub const REGIONS: [(u32, u32); 3] = [
        (0x7000_0000, (0x7FFE_0000 - 0x7000_0000) / RANGE),
        (0x0008_0000, (0x6FFF_0000 - 0x0008_0000) / RANGE),
        (0x8000_0000, (0xFFFF_0000 - 0x8000_0000) / RANGE),
    ];
    /// The first host ID of the region nspawn picks in.
    pub const FIRST: u32 = REGIONS[1].0;
    /// Ranges of the first two regions, where an instance number's own
    /// slot (the hint) is: a numbered fleet stays below 2^31.
    pub const PREFERRED: u32 = REGIONS[0].1 + REGIONS[1].1;
    /// Number of ranges in all.
    pub const SLOTS: u32 = PREFERRED + REGIONS[2].1;
    /// Where ranges are claimed, for every state root of the host: two
    /// roots never hand out the same range.
    pub const HOST_CLAIMS: &str = "/var/lib/nifty-uids";
    /// A claim whose instance does not exist (yet) is taken back only after
    /// this long: a create writes its instance after claiming its range.
    const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

    /// First slot of each region.
    const fn region_starts() -> [u32; 3] {
        [0, REGIONS[0].1, REGIONS[0].1 + REGIONS[1].1]
    }

    /// First host ID of range `slot` (below [`SLOTS`]).
    pub fn base_of(slot: u32) -> u32 {
        let starts = region_starts();
        let r = (0..REGIONS.len())
            .rev()
            .find(|&r| slot >= starts[r])
            .unwrap_or(0);
        REGIONS[r].0 + (slot - starts[r]) * RANGE
    }

    /// The slot of a range's first host ID (one handed out by [`base_of`]).
    pub fn slot_of(base: u32) -> u32 {
        let starts = region_starts();
        let r = (0..REGIONS.len())
            .find(|&r| {
                let (first, n) = REGIONS[r];
                base >= first
                    && u64::from(base) < u64::from(first) + u64::from(n) * u64::from(RANGE)
            })
            .unwrap_or(1);
        starts[r] + base.saturating_sub(REGIONS[r].0) / RANGE
    }

    /// Per region, where this process's next claim past a taken hint
    /// starts: a random slot at first, then one past the last slot it
    /// claimed there (a different one for each claim made at the same
    /// time); and whether a claim found the region full. So a second state
    /// root's fleet walks past the first's claims once, not once per
    /// instance.
    static NEXT: [AtomicU64; 3] = [
        AtomicU64::new(u64::MAX),
        AtomicU64::new(u64::MAX),
        AtomicU64::new(u64::MAX),
    ];
    static FULL: [AtomicBool; 3] = [
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    ];

    fn start_in(region: usize) -> u32 {
        let n = u64::from(REGIONS[region].1);
        let fresh = u64::from(rand::random::<u32>()) % n;
        let _ =
            NEXT[region].compare_exchange(u64::MAX, fresh, Ordering::Relaxed, Ordering::Relaxed);
        (NEXT[region].fetch_add(1, Ordering::Relaxed) % n) as u32
    }

    /// Claims a free range for the instance at `instance` (its directory,
    /// absolute: the claim names it) in the host-wide `dir`; returns its first
    /// host ID. A claim is a symlink `<dir>/<slot> -> <instance dir>`, made
    /// atomically. `hint` (the instance number) is tried first; past a taken
    /// hint, slots are tried in the region nspawn never picks, then in
    /// nspawn's, then past 2^31 (see [`REGIONS`]), each from where this
    /// process's last claim there ended (a random slot at first), and a
    /// region found full is not walked again by this process. Claims of
    /// instances that are gone (their state root was deleted without `rm`)
    /// are taken back, under a lock.
    pub fn claim(dir: &Path, instance: &Path, hint: Option<u32>) -> Result<u32> {
        let claims = Claims::new(dir)?;
        let take = |slot: u32| -> Result<bool> {
            let key = slot.to_string();
            Ok(claims.claim(&key, instance)?.is_none()
                || claims.take_back(&key, instance, stale)?)
        };
        if let Some(h) = hint.map(|h| h % PREFERRED) {
            if take(h)? {
                return Ok(base_of(h));
            }
        }
        let starts = region_starts();
        for (region, &(_, n)) in REGIONS.iter().enumerate() {
            let first = starts[region];
            if FULL[region].load(Ordering::Relaxed) {
                continue;
            }
            let start = start_in(region);
            for i in 0..n {
                let off = (start + i) % n;
                if take(first + off)? {
                    NEXT[region].fetch_max(u64::from(off) + 1, Ordering::Relaxed);
                    return Ok(base_of(first + off));
                }
            }
            FULL[region].store(true, Ordering::Relaxed);
        }
        Err(Error::Host(format!(
            "no free UID range left for {} (all {SLOTS} are claimed in {})",
            instance.display(),
            dir.display()
        )))
    }

    /// Is the claim `link`, held by `target`, left by an instance that is
    /// gone?
    fn stale(link: &Path, target: &Path) -> bool {
        if target.is_dir() {
            return false;
        }
        // Its whole state root is gone, or it was never completed.
        let root_gone = target.parent().is_some_and(|p| !p.is_dir());
        let old = std::fs::symlink_metadata(link)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_AFTER));
        root_gone || old
    }

    /// Records the range of an existing instance (made before claims were
    /// host-wide) in `dir`, if no one else holds it; says whether it did or
    /// holds it already.
    pub fn adopt(dir: &Path, instance: &Path, base: u32) -> bool {
        Claims::new(dir)
            .and_then(|c| c.claim(&slot_of(base).to_string(), instance))
            .is_ok_and(|holder| holder.map_or(true, |h| h == instance))
    }

    /// Releases the range starting at `base` if the instance at `instance`
    /// holds it.
    pub fn release(dir: &Path, instance: &Path, base: u32) {
        Claims::at(dir).release(&slot_of(base).to_string(), instance);
    }
}

/// IDs per container (a user namespace's range).
pub const RANGE: u32 = 65536;

#[cfg(test)]
mod tests {
    use super::uid_range::*;
    use super::Claims;
    use std::path::Path;

    #[test]
    fn a_key_is_claimed_once_and_released_only_by_its_owner() {
        let d = tempfile::tempdir().unwrap();
        let c = Claims::new(&d.path().join("ports")).unwrap();
        assert_eq!(c.claim("2201", Path::new("1")).unwrap(), None);
        assert_eq!(c.claim("2201", Path::new("2")).unwrap(), Some("1".into()));
        c.release("2201", Path::new("2"));
        assert_eq!(c.claim("2201", Path::new("3")).unwrap(), Some("1".into()));
        c.release("2201", Path::new("1"));
        assert_eq!(c.claim("2201", Path::new("3")).unwrap(), None);
        // Only a stale holder is replaced.
        assert!(!c.take_back("2201", Path::new("4"), |_, _| false).unwrap());
        assert!(c
            .take_back("2201", Path::new("4"), |_, h| h == Path::new("3"))
            .unwrap());
        assert_eq!(c.claim("2201", Path::new("5")).unwrap(), Some("4".into()));
    }

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
        assert!(b >= REGIONS[0].0);
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
        let high = REGIONS[0].1;
        assert_eq!((high, PREFERRED, SLOTS), (4094, 32_757, 65_524));
        assert_eq!(base_of(0), 0x7000_0000);
        assert_eq!(base_of(high - 1) + RANGE, 0x7FFE_0000);
        assert_eq!(base_of(high), FIRST);
        assert_eq!(base_of(PREFERRED - 1) + RANGE, 0x6FFF_0000);
        assert_eq!(base_of(PREFERRED), 0x8000_0000);
        // The last range ends just short of 0xFFFFFFFF ("no ID").
        assert_eq!(
            u64::from(base_of(SLOTS - 1)) + u64::from(RANGE),
            0xFFFF_0000
        );
        let slots = [
            0,
            1,
            high - 1,
            high,
            high + 7,
            PREFERRED - 1,
            PREFERRED,
            PREFERRED + 3,
            SLOTS - 1,
        ];
        for slot in slots {
            assert_eq!(slot_of(base_of(slot)), slot);
        }
        // No two ranges overlap: sorted by base, each ends before the next.
        let mut bases: Vec<u64> = (0..SLOTS).map(|s| u64::from(base_of(s))).collect();
        bases.sort_unstable();
        assert!(bases.windows(2).all(|w| w[0] + u64::from(RANGE) <= w[1]));
    }
}
