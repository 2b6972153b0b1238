//! The disk store: where instances' own files (their overlay upper and
//! work directories) live when their disk is limited.
//!
//! Limits on a directory tree need quotas of a filesystem, and the usual
//! host root (ext4 without the `project` feature) has none. nifty makes
//! one quota-capable filesystem for the whole fleet of a state root: a
//! sparse image file (`disk.img` in the state root; it takes the space its
//! data takes), formatted btrfs and loop-mounted once on `disk/`. Each
//! instance is a subvolume there with a quota group limit
//! (`BTRFS_IOC_QGROUP_LIMIT`, max referenced bytes): a tenant who fills it
//! gets EDQUOT inside, nobody else notices. Metadata counts too, so
//! millions of empty files hit the same limit.
//!
//! Why btrfs: XFS project quotas and ext4 quotas need kernel options that
//! not every kernel has (this project's CI kernel has neither
//! `CONFIG_XFS_QUOTA` nor `CONFIG_QFMT_V2`), and ext4's are not enforced
//! for a writer with CAP_SYS_RESOURCE, which overlayfs copy-up is (it
//! writes with the credentials of the host root that mounted it); btrfs
//! quota groups are enforced for every writer and are on Debian, Ubuntu
//! and this CI kernel. The store is mounted by the first command that
//! needs it (after a reboot too) and unmounted when the last instance on
//! it is removed.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags};

use crate::store::Store;
use crate::{sys, Error, Result};

/// `BTRFS_SUPER_MAGIC`.
const BTRFS_MAGIC: u64 = 0x9123_683e;

/// Where the disk store is mounted.
pub fn dir(store: &Store) -> PathBuf {
    store.root().join("disk")
}

/// The image file behind it.
pub fn image(store: &Store) -> PathBuf {
    store.root().join("disk.img")
}

fn host_err(msg: String) -> Error {
    Error::Host(msg)
}

/// Is the disk store mounted (a btrfs on its own device at `disk/`)?
pub fn mounted(store: &Store) -> bool {
    let d = dir(store);
    let (Ok(st), Ok(parent)) = (rustix::fs::stat(&d), rustix::fs::stat(store.root())) else {
        return false;
    };
    st.st_dev != parent.st_dev
        && rustix::fs::statfs(&d).is_ok_and(|s| s.f_type as u64 == BTRFS_MAGIC)
}

/// The apparent size of a new image: the host filesystem's size (the
/// image is sparse: it takes what its data takes), at least 1 GiB.
fn image_size(store: &Store) -> u64 {
    rustix::fs::statvfs(store.root())
        .map(|s| s.f_blocks.saturating_mul(s.f_frsize))
        .unwrap_or(0)
        .max(1 << 30)
}

/// Mounts the disk store, making it on first use. Under a lock: parallel
/// creates make and mount it once.
pub fn ensure(store: &Store) -> Result<()> {
    if mounted(store) {
        return Ok(());
    }
    store.ensure()?;
    let _lock = crate::disk::lock_file(&store.root().join(".disk.lock"))?;
    if mounted(store) {
        return Ok(());
    }
    let (img, d) = (image(store), dir(store));
    let fresh = !img.exists();
    if fresh {
        make_image(store, &img)?;
    }
    std::fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
    let out = Command::new("mount")
        .args(["-t", "btrfs", "-o", "loop,noatime,discard,commit=5"])
        .arg(&img)
        .arg(&d)
        .output()
        .map_err(|e| host_err(format!("cannot run mount (util-linux): {e}")))?;
    if !out.status.success() {
        return Err(host_err(format!(
            "cannot mount the disk store {} on {}: {} (the kernel needs btrfs and loop devices: \
             `modprobe btrfs loop`; or create instances with --disk unlimited)",
            img.display(),
            d.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let root = open_dir(&d)?;
    if fresh || !qgroups_dir(&root).is_some_and(|p| p.is_dir()) {
        sys::btrfs_quota_enable(root.as_fd()).map_err(|e| Error::Sys {
            call: format!("BTRFS_IOC_QUOTA_CTL(enable) on {}", d.display()),
            err: e,
        })?;
    }
    Ok(())
}

/// A sparse image, formatted btrfs (btrfs-progs' mkfs.btrfs).
fn make_image(store: &Store, img: &Path) -> Result<()> {
    let tmp = img.with_extension("img.new");
    let f = std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.set_len(image_size(store))
        .map_err(Error::io("size", &tmp))?;
    drop(f);
    let out = Command::new("mkfs.btrfs")
        .args(["-q", "-f", "-L", "nifty", "-m", "single", "-d", "single"])
        .arg(&tmp)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(host_err(format!(
                "cannot run mkfs.btrfs ({e}): disk limits need it (Debian: apt-get install btrfs-progs), \
                 or create instances with --disk unlimited"
            )));
        }
    };
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(host_err(format!(
            "mkfs.btrfs {}: {}",
            tmp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, img).map_err(Error::io("rename into place", img))
}

fn open_dir(p: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Error::sys(format!("open({})", p.display())))
}

/// `/sys/fs/btrfs/<uuid>/qgroups` of the filesystem `fd` is on.
fn qgroups_dir(fd: &OwnedFd) -> Option<PathBuf> {
    let id = sys::btrfs_fsid(fd.as_fd()).ok()?;
    let h = hex::encode(id);
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    Some(Path::new("/sys/fs/btrfs").join(uuid).join("qgroups"))
}

/// The directory of an instance in the disk store.
pub fn instance_dir(store: &Store, name: &str) -> PathBuf {
    dir(store).join(name)
}

/// Makes an instance's subvolume with its limit.
pub fn create(store: &Store, name: &str, limit: Option<u64>) -> Result<PathBuf> {
    ensure(store)?;
    let d = dir(store);
    let root = open_dir(&d)?;
    sys::btrfs_subvol_create(root.as_fd(), name).map_err(|e| Error::Sys {
        call: format!(
            "instance {name:?}: BTRFS_IOC_SUBVOL_CREATE in {}",
            d.display()
        ),
        err: e,
    })?;
    let p = d.join(name);
    if let Err(e) = set_limit_at(&p, name, limit) {
        let _ = sys::btrfs_subvol_destroy(root.as_fd(), name);
        return Err(e);
    }
    Ok(p)
}

fn set_limit_at(p: &Path, name: &str, limit: Option<u64>) -> Result<()> {
    let sub = open_dir(p)?;
    sys::btrfs_qgroup_limit(sub.as_fd(), limit).map_err(|e| Error::Sys {
        call: format!(
            "instance {name:?}: BTRFS_IOC_QGROUP_LIMIT on {}",
            p.display()
        ),
        err: e,
    })
}

/// Bytes an instance's files take in the disk store, if it is there: as
/// btrfs last counted them, when their data was written back and
/// committed (within about 30 s: the kernel's dirty expiry, then the
/// store's 5 s commit interval). The limit itself holds at once.
pub fn usage(store: &Store, name: &str) -> Option<u64> {
    if !mounted(store) {
        return None;
    }
    let sub = open_dir(&instance_dir(store, name)).ok()?;
    let id = sys::btrfs_subvol_id(sub.as_fd()).ok()?;
    let q = qgroups_dir(&sub)?
        .join(format!("0_{id}"))
        .join("referenced");
    std::fs::read_to_string(q).ok()?.trim().parse().ok()
}

/// Changes an instance's limit; refused below what it uses now.
pub fn set_limit(store: &Store, name: &str, limit: Option<u64>) -> Result<()> {
    ensure(store)?;
    let p = instance_dir(store, name);
    if let Some(l) = limit {
        // Commit first, so that what it uses is counted to now.
        let sub = open_dir(&p)?;
        let _ = rustix::fs::syncfs(&sub);
        if let Some(used) = usage(store, name).filter(|u| *u > l) {
            return Err(Error::Invalid(format!(
                "instance {name:?}: --disk {} is less than the {} its files take now; \
                 free some first or give more",
                crate::limits::human(l),
                crate::limits::human(used)
            )));
        }
    }
    set_limit_at(&p, name, limit)
}

/// Removes an instance's subvolume (its files), if it has one.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    let p = instance_dir(store, name);
    if !p.exists() {
        return Ok(());
    }
    let root = open_dir(&dir(store))?;
    match sys::btrfs_subvol_destroy(root.as_fd(), name) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(Error::Sys {
            call: format!(
                "instance {name:?}: BTRFS_IOC_SNAP_DESTROY in {}",
                p.display()
            ),
            err: e,
        }),
    }
}

/// Unmounts the disk store when no instance has files on it (after `rm`);
/// the image stays for the next one. Best effort.
pub fn release_if_unused(store: &Store) {
    if !mounted(store) {
        return;
    }
    let Ok(_lock) = crate::disk::lock_file(&store.root().join(".disk.lock")) else {
        return;
    };
    let d = dir(store);
    let busy = std::fs::read_dir(&d)
        .map(|rd| {
            rd.flatten()
                .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
        })
        .unwrap_or(true);
    if !busy {
        let _ = rustix::mount::unmount(&d, rustix::mount::UnmountFlags::empty());
    }
}

/// What the disk store is, for `doctor` and messages.
pub fn describe(store: &Store) -> String {
    let img = image(store);
    let used = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .ok();
    match used {
        Some(u) => format!(
            "{} (btrfs, sparse: {} on disk), {} {}",
            img.display(),
            crate::limits::human(u),
            if mounted(store) {
                "mounted on"
            } else {
                "mounted when needed on"
            },
            dir(store).display()
        ),
        None => format!(
            "{} (made at the first create with a disk limit)",
            img.display()
        ),
    }
}
