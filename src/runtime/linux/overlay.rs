//! The root of a container: an overlay of the shared template (idmapped
//! into the instance's ID range) under the instance's own upper layer,
//! made as a detached mount that no host mount table shows. Both backends
//! and host-side writes to a stopped instance use it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, CWD};
use rustix::mount::OpenTreeFlags;

use crate::error::SysError;
use crate::sys;

/// Makes the root of a container as a detached mount: an overlay of the
/// template `lower` (idmapped through `userns`, if given) under `upper`,
/// with `work`.
///
/// Linux 6.13 and later take the layers as fds (`lowerdir+`, `upperdir`,
/// `workdir` with FSCONFIG_SET_FD), so no option
/// string is parsed, any path works and the idmapped lower layer can stay a
/// detached mount. Older kernels (Debian 12's 6.1, Ubuntu 22.04's 5.15,
/// RHEL 9's 5.14) take only option strings, and their overlayfs accepts a
/// layer only if it is attached in the caller's mount namespace
/// (`clone_private_mount`). For them, [`overlay_by_path`] attaches the
/// idmapped tree in a private mount namespace of the calling thread, names
/// the layers by `/proc/thread-self/fd/N` (no commas, whatever the paths),
/// and detaches the tree again once the overlay holds its own clone of it.
/// Same result, same properties: nothing appears in the host's mount table.
pub fn overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    userns: Option<BorrowedFd<'_>>,
) -> Result<OwnedFd, SysError> {
    use rustix::mount::*;
    set_aside_old_work(work);
    let tree = idmapped_tree(lower, userns)?;
    if super::features::overlay_fd_layers() == Some(false) {
        return overlay_by_path(lower, tree, upper, work);
    }
    let upper_fd = open_path_dir(upper)?;
    let work_fd = open_path_dir(work)?;
    let fs =
        fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(SysError::at("fsopen(overlay)"))?;
    let set = |k: &str, fd: &OwnedFd| {
        fsconfig_set_fd(fs.as_fd(), k, fd.as_fd())
            .map_err(SysError::at(format!("fsconfig({k}, fd)")))
    };
    match set("lowerdir+", &tree) {
        Ok(()) => super::features::set_overlay_fd_layers(true),
        // Before 6.13 overlayfs takes no layer by fd: 6.8-6.12 have
        // `lowerdir+` for paths only (EBADF), 6.5-6.7 no `lowerdir+`
        // (EINVAL), older ones only the legacy option parser (EINVAL or
        // EOPNOTSUPP). Whatever the answer, the path fallback is tried and
        // reports its own error if it fails too.
        Err(_) => {
            super::features::set_overlay_fd_layers(false);
            drop(fs);
            return overlay_by_path(lower, tree, upper, work);
        }
    }
    set("upperdir", &upper_fd)?;
    set("workdir", &work_fd)?;
    fsconfig_create(fs.as_fd()).map_err(SysError::at("fsconfig(FSCONFIG_CMD_CREATE)"))?;
    // The overlay holds a clone of its own: closing this one unmounts it,
    // which waits for an RCU grace period (see `later`).
    super::later::close(tree);
    fsmount_overlay(&fs)
}

/// Where [`set_aside_old_work`] moves a work directory, beside `work`.
const WORK_ASIDE: &str = ".nifty-work-old";

/// Moves the directory that an earlier mount of this overlay left in
/// `work` (overlayfs's own `work/work`) aside, to be removed on `later`'s
/// thread. Overlayfs would remove it itself while it mounts, and on a
/// filesystem mounted with `discard` that waits for the device to discard
/// its blocks: at every start but the first (see `later`). Nothing mounts
/// this overlay meanwhile (its instance is stopped, under its lock; a
/// mount still alive would make the new one fail, its upper directory in
/// use). One set aside by a process that ended before its thread removed
/// it (the systemd backend's, which execs systemd-nspawn) is removed
/// here first. Best effort: what cannot be moved is left for overlayfs.
fn set_aside_old_work(work: &Path) {
    let Some(aside) = work.parent().map(|d| d.join(WORK_ASIDE)) else {
        return;
    };
    if aside.symlink_metadata().is_ok() {
        let _ = std::fs::remove_dir_all(&aside);
    }
    if std::fs::rename(work.join("work"), &aside).is_ok() {
        super::later::remove_tree(aside);
    }
}

/// A detached clone of `lower`, idmapped through `userns` if given.
fn idmapped_tree(lower: &Path, userns: Option<BorrowedFd<'_>>) -> Result<OwnedFd, SysError> {
    let tree = rustix::mount::open_tree(
        CWD,
        lower,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(SysError::at(format!("open_tree({})", lower.display())))?;
    if let Some(ns) = userns {
        sys::mount_setattr_idmap(tree.as_fd(), ns)
            .map_err(|e| SysError::io("mount_setattr(MOUNT_ATTR_IDMAP)", &e))?;
    }
    Ok(tree)
}

fn open_path_dir(p: &Path) -> Result<OwnedFd, SysError> {
    rustix::fs::open(
        p,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(SysError::at(format!("open({})", p.display())))
}

fn fsmount_overlay(fs: &OwnedFd) -> Result<OwnedFd, SysError> {
    use rustix::mount::*;
    fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(SysError::at("fsmount(overlay)"))
}

thread_local! {
    /// Whether this thread has its private mount namespace for
    /// [`overlay_by_path`] (`None`: it is in the process's own). Made at
    /// its first use, kept until [`leave_staging`].
    static STAGING_NS: std::cell::Cell<Option<Result<(), rustix::io::Errno>>> =
        const { std::cell::Cell::new(None) };
}

/// This thread's private mount namespace for [`overlay_by_path`]: made
/// once, and an error is kept (the thread may be in a namespace of its own
/// whose propagation is not private: it mounts nothing more).
fn enter_staging() -> Result<(), rustix::io::Errno> {
    use rustix::mount::{mount_change, MountPropagationFlags};
    if let Some(r) = STAGING_NS.get() {
        return r;
    }
    let r = rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS).and_then(|()| {
        mount_change(
            c"/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
    });
    STAGING_NS.set(Some(r));
    r
}

/// Takes this thread back to the process's mount namespace if
/// [`overlay_by_path`] gave it one of its own. A thread that outlives a
/// batch of starts (a pool's, in `serve`) calls this at its end: its own
/// namespace is a copy of the host's mounts as they were when it was made,
/// and kept, it would hold every one of them that the host unmounts later
/// (a disk store's) and miss every one mounted since.
pub fn leave_staging() {
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
    if STAGING_NS.get().is_none() {
        return;
    }
    // The thread group leader's (nifty makes no staging namespace there).
    let back = rustix::fs::open(
        c"/proc/self/ns/mnt",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .and_then(|ns| move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Mount)));
    match back {
        Ok(()) => STAGING_NS.set(None),
        Err(e) => tracing::warn!(
            "setns(/proc/self/ns/mnt) back from the overlay's staging namespace: {e}; \
             this thread keeps it"
        ),
    }
}

/// The overlay for kernels before 6.13 (see [`overlay`]). The calling thread
/// gets, once, a private copy of the mount namespace (`unshare(CLONE_NEWNS)`
/// on one thread unshares only that thread's view; `MS_REC|MS_PRIVATE`, so
/// nothing it mounts propagates to the host). There the idmapped `tree` is
/// attached over the template's own directory (the only place a path names
/// it), the overlay is made from `/proc/thread-self/fd/N` names of the
/// layers as this namespace sees them, and the tree is detached again.
fn overlay_by_path(
    lower: &Path,
    tree: OwnedFd,
    upper: &Path,
    work: &Path,
) -> Result<OwnedFd, SysError> {
    use rustix::mount::*;
    enter_staging().map_err(SysError::at("unshare(CLONE_NEWNS) for the overlay"))?;
    // The layers, opened in this namespace (overlayfs checks that each
    // belongs to the caller's namespace).
    let upper_fd = open_path_dir(upper)?;
    let work_fd = open_path_dir(work)?;
    // The tree goes over the template's own directory, in this namespace
    // only, and is detached again below.
    move_mount(
        tree.as_fd(),
        c"",
        CWD,
        lower,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(SysError::at("move_mount(template, staging point)"))?;
    let result = (|| {
        let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(SysError::at("fsopen(overlay)"))?;
        let name = |fd: &OwnedFd| format!("/proc/thread-self/fd/{}", fd.as_raw_fd());
        for (k, v) in [
            ("lowerdir", name(&tree)),
            ("upperdir", name(&upper_fd)),
            ("workdir", name(&work_fd)),
        ] {
            fsconfig_set_string(fs.as_fd(), k, v.as_str())
                .map_err(SysError::at(format!("fsconfig({k}, {v})")))?;
        }
        fsconfig_create(fs.as_fd()).map_err(SysError::at("fsconfig(FSCONFIG_CMD_CREATE)"))?;
        fsmount_overlay(&fs)
    })();
    let detached = unmount(lower, UnmountFlags::DETACH);
    let root = result?;
    detached.map_err(SysError::at("umount2(template, MNT_DETACH)"))?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::super::later::gone_soon;
    use super::*;

    #[test]
    fn an_old_work_directory_is_set_aside_and_removed_off_the_caller() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        // What an earlier mount left: overlayfs's work/work, not empty.
        std::fs::create_dir_all(work.join("work/#1")).unwrap();
        std::fs::write(work.join("work/#2"), b"x").unwrap();
        set_aside_old_work(&work);
        // The work directory itself stays, emptied for overlayfs.
        assert!(work.is_dir());
        assert!(work.join("work").symlink_metadata().is_err());
        assert!(gone_soon(&tmp.path().join(WORK_ASIDE)));
    }

    #[test]
    fn one_left_aside_before_is_removed_first() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(work.join("work/#4")).unwrap();
        let aside = tmp.path().join(WORK_ASIDE);
        std::fs::create_dir_all(aside.join("work/#3")).unwrap();
        set_aside_old_work(&work);
        // The old one went at once; this one is aside, then gone.
        assert!(aside.join("work/#3").symlink_metadata().is_err());
        assert!(work.join("work").symlink_metadata().is_err());
        assert!(gone_soon(&aside));
        // Nothing to set aside: nothing happens.
        let fresh = tempfile::tempdir().unwrap();
        let w = fresh.path().join("work");
        std::fs::create_dir(&w).unwrap();
        set_aside_old_work(&w);
        assert!(w.is_dir());
        assert!(fresh.path().join(WORK_ASIDE).symlink_metadata().is_err());
    }
}
