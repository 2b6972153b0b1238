//! The disk store: where instances' own files (their overlay upper and
//! work directories) live when their disk is limited.
//!
//! Limits on a directory tree need quotas of a filesystem, and the usual
//! host root (ext4 without the `project` feature, XFS mounted without
//! `prjquota`) enforces none. nifty makes one quota-capable filesystem for
//! the whole fleet of a state root: a sparse image file (`disk.img` in the
//! state root; it takes the space its data takes), loop-mounted once on
//! `disk/`, in one of two kinds (where the state root is on an XFS that
//! enforces project quotas itself, `disk/` is a plain directory there
//! and the XFS kind below works on the host's filesystem, no image):
//!
//! - **btrfs** (the default where `mkfs.btrfs` is installed): each
//!   instance is a subvolume with a quota group limit
//!   (`BTRFS_IOC_QGROUP_LIMIT`, max referenced bytes). Metadata counts
//!   too, so millions of empty files hit the same limit; there is no
//!   separate inode limit.
//! - **XFS** (where only `mkfs.xfs` is, as on RHEL, whose kernels have no
//!   btrfs; or `NIFTY_DISK_FS=xfs`): mounted with `prjquota`, each
//!   instance a directory in a project of its own (`FS_IOC_FSSETXATTR`
//!   with PROJINHERIT) with block and inode limits (`quotactl(Q_SETQUOTA,
//!   PRJQUOTA)`); needs a kernel with `CONFIG_XFS_QUOTA`.
//!
//! Both are enforced for every writer, overlayfs copy-up included (it
//! writes with the credentials of the host root that mounted it): XFS
//! quotas and btrfs quota groups ignore CAP_SYS_RESOURCE, where ext4's
//! quotas let such a writer through. A tenant who fills its limit gets
//! EDQUOT inside; nobody else notices. The store is mounted by the first
//! command that needs it (after a reboot too) and unmounted when the last
//! instance on it is removed.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags};

use crate::store::Store;
use crate::{sys, Error, Result};

/// `BTRFS_SUPER_MAGIC`, `XFS_SUPER_MAGIC`.
const BTRFS_MAGIC: u64 = 0x9123_683e;
const XFS_MAGIC: u64 = 0x5846_5342;

/// What the disk store is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Btrfs,
    Xfs,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Btrfs => "btrfs",
            Kind::Xfs => "xfs",
        }
    }

    fn mkfs(self) -> &'static str {
        match self {
            Kind::Btrfs => "mkfs.btrfs",
            Kind::Xfs => "mkfs.xfs",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Kind::Btrfs => "btrfs-progs",
            Kind::Xfs => "xfsprogs",
        }
    }
}

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

/// The mount that holds `path`: (mount point, filesystem type, source,
/// super options), from the longest mount point that is a prefix of it.
fn mount_of(path: &Path) -> Option<(PathBuf, String, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = PathBuf::from(left.split(' ').nth(4)?);
            let mut r = right.split(' ');
            let (fstype, source, opts) = (r.next()?, r.next()?, r.next()?);
            path.starts_with(&point).then(|| {
                (
                    point,
                    fstype.to_string(),
                    source.to_string(),
                    opts.to_string(),
                )
            })
        })
        .max_by_key(|(p, ..)| p.as_os_str().len())
}

/// The host's own filesystem under the state root, when it enforces
/// project quotas (XFS mounted with `prjquota`): then the disk store is
/// a plain directory there, with no image. Its block device, if so.
/// (ext4's project quotas are not used: overlayfs copy-up writes with
/// CAP_SYS_RESOURCE, which ext4's quotas let through.)
pub fn host_quota(store: &Store) -> Option<PathBuf> {
    // Asked at every start and for every instance `list` shows: the
    // mount table is read once per state root and process.
    static SEEN: std::sync::Mutex<Vec<(PathBuf, Option<PathBuf>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, dev)) = seen.iter().find(|(r, _)| r == store.root()) {
        return dev.clone();
    }
    let dev = find_host_quota(store);
    seen.push((store.root().to_path_buf(), dev.clone()));
    dev
}

fn find_host_quota(store: &Store) -> Option<PathBuf> {
    let root = std::iter::successors(Some(store.root()), |p| p.parent()).find(|p| p.exists())?;
    let root = std::fs::canonicalize(root).ok()?;
    let (_, fstype, source, opts) = mount_of(&root)?;
    (fstype == "xfs" && opts.split(',').any(|o| o == "prjquota" || o == "pquota"))
        .then(|| PathBuf::from(source))
}

/// The kind of the mounted disk store, if it is mounted (a filesystem on
/// its own device at `disk/`), or the host's XFS with project quotas.
pub fn mounted_kind(store: &Store) -> Option<Kind> {
    if host_quota(store).is_some() {
        return dir(store).is_dir().then_some(Kind::Xfs);
    }
    let d = dir(store);
    let st = rustix::fs::stat(&d).ok()?;
    let parent = rustix::fs::stat(store.root()).ok()?;
    if st.st_dev == parent.st_dev {
        return None;
    }
    match rustix::fs::statfs(&d).ok()?.f_type as u64 {
        BTRFS_MAGIC => Some(Kind::Btrfs),
        XFS_MAGIC => Some(Kind::Xfs),
        _ => None,
    }
}

/// Is the disk store mounted?
pub fn mounted(store: &Store) -> bool {
    mounted_kind(store).is_some()
}

/// The kind of an existing image, from its superblock.
fn kind_of_image(img: &Path) -> Option<Kind> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(img).ok()?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b[..4]).ok()?;
    if &b[..4] == b"XFSB" {
        return Some(Kind::Xfs);
    }
    f.seek(std::io::SeekFrom::Start(0x10040)).ok()?;
    f.read_exact(&mut b).ok()?;
    (&b == b"_BHRfS_M").then_some(Kind::Btrfs)
}

fn has_program(name: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

/// The kind a new store gets: `NIFTY_DISK_FS` if set, else btrfs where
/// its mkfs is installed, else XFS where its is.
pub fn choose() -> Result<Kind> {
    match std::env::var("NIFTY_DISK_FS").ok().as_deref() {
        Some("btrfs") => return Ok(Kind::Btrfs),
        Some("xfs") => return Ok(Kind::Xfs),
        Some(other) if !other.is_empty() => {
            return Err(Error::Invalid(format!(
                "NIFTY_DISK_FS={other:?}: the disk store is btrfs or xfs"
            )))
        }
        _ => {}
    }
    if has_program("mkfs.btrfs") {
        Ok(Kind::Btrfs)
    } else if has_program("mkfs.xfs") {
        Ok(Kind::Xfs)
    } else {
        Err(host_err(
            "disk limits need a quota-capable filesystem for the disk store: \
             apt-get install btrfs-progs (or xfsprogs), or create instances with --disk unlimited"
                .into(),
        ))
    }
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
    if host_quota(store).is_some() && !img.exists() {
        // The host's XFS enforces project quotas: no image needed.
        return std::fs::create_dir_all(&d).map_err(Error::io("create", &d));
    }
    let existing = kind_of_image(&img);
    let kind = match existing {
        Some(k) => k,
        None => choose()?,
    };
    if existing.is_none() {
        make_image(store, &img, kind)?;
    }
    std::fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
    let opts = match kind {
        // discard: freed space goes back to the host as holes in the
        // image; commit=5: within seconds of an `rm`.
        Kind::Btrfs => "loop,noatime,discard,commit=5",
        Kind::Xfs => "loop,noatime,discard,prjquota",
    };
    let out = Command::new("mount")
        .args(["-t", kind.name(), "-o", opts])
        .arg(&img)
        .arg(&d)
        .output()
        .map_err(|e| host_err(format!("cannot run mount (util-linux): {e}")))?;
    if !out.status.success() {
        return Err(host_err(format!(
            "cannot mount the disk store {} ({}) on {}: {} (the kernel needs {} and loop devices{}; \
             or create instances with --disk unlimited)",
            img.display(),
            kind.name(),
            d.display(),
            String::from_utf8_lossy(&out.stderr)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            kind.name(),
            if kind == Kind::Xfs {
                " and XFS quotas (CONFIG_XFS_QUOTA)"
            } else {
                ""
            }
        )));
    }
    if kind == Kind::Btrfs {
        let root = open_dir(&d)?;
        if existing.is_none() || !qgroups_dir(&root).is_some_and(|p| p.is_dir()) {
            sys::btrfs_quota_enable(root.as_fd()).map_err(|e| Error::Sys {
                call: format!("BTRFS_IOC_QUOTA_CTL(enable) on {}", d.display()),
                err: e,
            })?;
        }
    }
    Ok(())
}

/// A sparse image, formatted.
fn make_image(store: &Store, img: &Path, kind: Kind) -> Result<()> {
    let tmp = img.with_extension("img.new");
    let f = std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.set_len(image_size(store))
        .map_err(Error::io("size", &tmp))?;
    drop(f);
    let mut cmd = Command::new(kind.mkfs());
    match kind {
        Kind::Btrfs => cmd.args(["-q", "-f", "-L", "nifty", "-m", "single", "-d", "single"]),
        // No discard at mkfs: the file is sparse already.
        Kind::Xfs => cmd.args(["-q", "-f", "-K", "-L", "nifty"]),
    };
    let out = cmd.arg(&tmp).output();
    let fail = |msg: String| {
        let _ = std::fs::remove_file(&tmp);
        Err(host_err(msg))
    };
    match out {
        Err(e) => fail(format!(
            "cannot run {} ({e}): disk limits need it (Debian: apt-get install {}), \
             or create instances with --disk unlimited",
            kind.mkfs(),
            kind.package()
        )),
        Ok(o) if !o.status.success() => fail(format!(
            "{} {}: {}",
            kind.mkfs(),
            tmp.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => std::fs::rename(&tmp, img).map_err(Error::io("rename into place", img)),
    }
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

/// The block device the store is mounted from (for quotactl).
fn device(store: &Store) -> Result<PathBuf> {
    if let Some(dev) = host_quota(store) {
        return Ok(dev);
    }
    let d = dir(store);
    let want = d.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::io("read", "/proc/self/mountinfo"))?;
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .filter_map(|l| l.split_once(" - ").map(|(_, r)| r))
        .filter_map(|r| r.split(' ').nth(1))
        .next_back()
        .map(PathBuf::from)
        .ok_or_else(|| host_err(format!("the disk store {} is not mounted", d.display())))
}

/// The directory of an instance in the disk store.
pub fn instance_dir(store: &Store, name: &str) -> PathBuf {
    dir(store).join(name)
}

fn no_inodes(name: &str, inodes: Option<u64>) -> Result<()> {
    match inodes {
        Some(_) => Err(Error::Invalid(format!(
            "instance {name:?}: --inodes: this disk store is btrfs, whose quota groups limit bytes; \
             every file's metadata counts toward them, so --disk bounds the number of files too"
        ))),
        None => Ok(()),
    }
}

/// Makes an instance's place in the store with its limits.
pub fn create(
    store: &Store,
    name: &str,
    disk: Option<u64>,
    inodes: Option<u64>,
) -> Result<PathBuf> {
    ensure(store)?;
    let d = dir(store);
    let p = d.join(name);
    match mounted_kind(store) {
        Some(Kind::Xfs) => {
            let projid = next_project(store)?;
            std::fs::create_dir(&p).map_err(Error::io("create", &p))?;
            let made = (|| {
                let fd = open_dir(&p)?;
                sys::set_project(fd.as_fd(), projid).map_err(|e| Error::Sys {
                    call: format!(
                        "instance {name:?}: FS_IOC_FSSETXATTR(project {projid}) on {}",
                        p.display()
                    ),
                    err: e,
                })?;
                set_xfs_limit(store, name, projid, disk, inodes)
            })();
            if let Err(e) = made {
                let _ = std::fs::remove_dir(&p);
                return Err(e);
            }
        }
        _ => {
            no_inodes(name, inodes)?;
            let root = open_dir(&d)?;
            sys::btrfs_subvol_create(root.as_fd(), name).map_err(|e| Error::Sys {
                call: format!(
                    "instance {name:?}: BTRFS_IOC_SUBVOL_CREATE in {}",
                    d.display()
                ),
                err: e,
            })?;
            if let Err(e) = set_btrfs_limit(&p, name, disk) {
                let _ = sys::btrfs_subvol_destroy(root.as_fd(), name);
                return Err(e);
            }
        }
    }
    Ok(p)
}

/// The first project ID nifty takes on a host filesystem.
const HOST_PROJECT_BASE: u32 = 0x4e00_0000;

/// A project ID no instance of this store has: a counter in the store,
/// under its lock.
fn next_project(store: &Store) -> Result<u32> {
    let _lock = crate::disk::lock_file(&store.root().join(".disk.lock"))?;
    let f = dir(store).join(".next-project");
    // On the host's own XFS, far above the IDs administrators give
    // their projects (/etc/projid).
    let first = if host_quota(store).is_some() {
        HOST_PROJECT_BASE
    } else {
        1
    };
    let n: u32 = std::fs::read_to_string(&f)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(first);
    crate::disk::write_atomic(&f, format!("{}\n", n + 1).as_bytes(), 0o600)?;
    Ok(n)
}

fn set_xfs_limit(
    store: &Store,
    name: &str,
    projid: u32,
    disk: Option<u64>,
    inodes: Option<u64>,
) -> Result<()> {
    let dev = device(store)?;
    sys::set_project_quota(&dev, projid, disk, inodes).map_err(|e| Error::Sys {
        call: format!(
            "instance {name:?}: quotactl(Q_SETQUOTA, PRJQUOTA, project {projid}) on {}",
            dev.display()
        ),
        err: e,
    })
}

fn set_btrfs_limit(p: &Path, name: &str, limit: Option<u64>) -> Result<()> {
    let sub = open_dir(p)?;
    sys::btrfs_qgroup_limit(sub.as_fd(), limit).map_err(|e| Error::Sys {
        call: format!(
            "instance {name:?}: BTRFS_IOC_QGROUP_LIMIT on {}",
            p.display()
        ),
        err: e,
    })
}

fn project_of(store: &Store, name: &str) -> Option<u32> {
    let fd = open_dir(&instance_dir(store, name)).ok()?;
    sys::get_project(fd.as_fd()).ok()
}

/// Bytes an instance's files take in the disk store, if it is there. On
/// btrfs, as it last counted them: data is counted when it is written
/// back and committed (within about 30 s: the kernel's dirty expiry, then
/// the store's 5 s commit interval); XFS counts at allocation. The limit
/// itself holds at once on both.
pub fn usage(store: &Store, name: &str) -> Option<u64> {
    match mounted_kind(store)? {
        Kind::Xfs => {
            let projid = project_of(store, name)?;
            sys::project_usage(&device(store).ok()?, projid)
                .ok()
                .map(|(bytes, _)| bytes)
        }
        Kind::Btrfs => {
            let sub = open_dir(&instance_dir(store, name)).ok()?;
            let id = sys::btrfs_subvol_id(sub.as_fd()).ok()?;
            let q = qgroups_dir(&sub)?
                .join(format!("0_{id}"))
                .join("referenced");
            std::fs::read_to_string(q).ok()?.trim().parse().ok()
        }
    }
}

/// Room an instance gets for a moment to mount its root on a full disk.
const ROOM_BYTES: u64 = 1 << 20;
const ROOM_INODES: u64 = 64;

/// Is `errno` a full disk or quota (EDQUOT, ENOSPC)?
fn is_full(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EDQUOT) | Some(libc::ENOSPC))
}

/// Mounts an instance's overlay with `mount`; on a full disk of the disk
/// store (`errno` of the error says so), once more with room (see
/// [`with_room`]). Both backends mount through here.
pub fn mount_overlay<T, E>(
    store: &Store,
    inst: &crate::store::Instance,
    errno: impl Fn(&E) -> Option<i32>,
    mount: impl Fn() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    match mount() {
        Err(e) if inst.disk_store && is_full(errno(&e)) => with_room(store, inst, mount),
        r => r,
    }
}

fn with_room<T, E>(
    store: &Store,
    inst: &crate::store::Instance,
    mount: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let (disk, inodes) = (inst.limits.disk, inst.limits.inodes);
    let more = apply_limit(
        store,
        &inst.name,
        disk.map(|d| d + ROOM_BYTES),
        inodes.map(|i| i + ROOM_INODES),
    );
    if let Err(e) = &more {
        tracing::warn!(
            "instance {:?}: room to mount on a full disk: {e}",
            inst.name
        );
    }
    let r = mount();
    if more.is_ok() {
        if let Err(e) = apply_limit(store, &inst.name, disk, inodes) {
            tracing::warn!(
                "instance {:?}: its limits back after mounting: {e}",
                inst.name
            );
        }
    }
    r
}

/// Changes an instance's limits; refused below what it uses now.
pub fn set_limit(store: &Store, name: &str, disk: Option<u64>, inodes: Option<u64>) -> Result<()> {
    ensure(store)?;
    let p = instance_dir(store, name);
    if let Some(l) = disk {
        // Write back and commit first, so that what it uses is counted.
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
    apply_limit(store, name, disk, inodes)
}

/// Sets an instance's limits in the store, whatever it uses now.
fn apply_limit(store: &Store, name: &str, disk: Option<u64>, inodes: Option<u64>) -> Result<()> {
    let p = instance_dir(store, name);
    match mounted_kind(store) {
        Some(Kind::Xfs) => {
            let projid = project_of(store, name).ok_or_else(|| {
                host_err(format!("instance {name:?}: {} has no project", p.display()))
            })?;
            set_xfs_limit(store, name, projid, disk, inodes)
        }
        _ => {
            no_inodes(name, inodes)?;
            set_btrfs_limit(&p, name, disk)
        }
    }
}

/// Checks that the store takes these limits (before anything is made).
pub fn check_limits(store: &Store, inodes: Option<u64>) -> Result<()> {
    let kind = match mounted_kind(store) {
        Some(k) => k,
        None if host_quota(store).is_some() => Kind::Xfs,
        None => match kind_of_image(&image(store)) {
            Some(k) => k,
            None => choose()?,
        },
    };
    if kind == Kind::Btrfs {
        no_inodes("", inodes).map_err(|_| {
            Error::Invalid(
                "--inodes: the disk store is btrfs, whose quota groups limit bytes; every file's \
                 metadata counts toward them, so --disk bounds the number of files too"
                    .into(),
            )
        })?;
    }
    Ok(())
}

/// Removes an instance's files from the store, if it has them there.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    let p = instance_dir(store, name);
    if !p.exists() {
        return Ok(());
    }
    match mounted_kind(store) {
        Some(Kind::Xfs) => {
            let projid = project_of(store, name);
            std::fs::remove_dir_all(&p).map_err(Error::io("remove", &p))?;
            if let Some(id) = projid {
                set_xfs_limit(store, name, id, None, None)?;
            }
            Ok(())
        }
        _ => {
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
    }
}

/// Unmounts the disk store when no instance has files on it (after `rm`);
/// the image stays for the next one. Best effort.
pub fn release_if_unused(store: &Store) {
    if !mounted(store) || host_quota(store).is_some() {
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
    if let Some(dev) = host_quota(store) {
        return format!(
            "{} on the host's XFS ({}), whose project quotas it uses (no image)",
            dir(store).display(),
            dev.display()
        );
    }
    let img = image(store);
    let used = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .ok();
    let kind = kind_of_image(&img).map_or("?", Kind::name);
    match used {
        Some(u) => format!(
            "{} ({kind}, sparse: {} on disk), {} {}",
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
            "{} (made at the first create with a disk limit, {})",
            img.display(),
            choose().map_or("no mkfs for it".into(), |k| k.name().to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_known_by_their_superblock() {
        let d = tempfile::tempdir().unwrap();
        let x = d.path().join("x");
        let mut v = vec![0u8; 0x10050];
        v[..4].copy_from_slice(b"XFSB");
        std::fs::write(&x, &v).unwrap();
        assert_eq!(kind_of_image(&x), Some(Kind::Xfs));
        let mut v = vec![0u8; 0x10050];
        v[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        std::fs::write(&x, &v).unwrap();
        assert_eq!(kind_of_image(&x), Some(Kind::Btrfs));
        std::fs::write(&x, b"nothing").unwrap();
        assert_eq!(kind_of_image(&x), None);
    }
}
