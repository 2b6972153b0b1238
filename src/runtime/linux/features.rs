//! What the running kernel offers, for the features whose absence has a
//! fallback. Each is learnt from the kernel's own answer the first time it
//! is used (a probe, not a version number: distributions backport), and
//! kept for the life of the process.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::{Error, Result};

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

static OVERLAY_FD_LAYERS: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Does overlayfs take its layers as fds (`lowerdir+` by fd, Linux 6.13)?
/// `None` until the first overlay was made. `NIFTY_FALLBACKS=overlay`
/// makes nifty use the fallback of older kernels (to test and measure it
/// on a new one).
pub fn overlay_fd_layers() -> Option<bool> {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *FORCED.get_or_init(|| forced("overlay")) {
        return Some(false);
    }
    match OVERLAY_FD_LAYERS.load(Ordering::Relaxed) {
        YES => Some(true),
        NO => Some(false),
        _ => None,
    }
}

/// `NIFTY_FALLBACKS` (comma-separated) names the fallback `what`: nifty
/// takes the path of older kernels for it even where the kernel has the
/// newer means (`overlay`: layers by path; `bind`: cgroup bind programs
/// instead of Landlock; `into-cgroup`: sessions spawned, then moved into
/// the container's cgroups, as before Linux 5.7), so tests and benchmarks
/// reach it here.
pub fn forced(what: &str) -> bool {
    std::env::var("NIFTY_FALLBACKS").is_ok_and(|v| v.split(',').any(|f| f == what))
}

static IDMAPPED_LAYERS: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Does overlayfs take the template, idmapped into an instance's ID range,
/// as its lower layer (Linux 5.19, or a backport; and a filesystem with
/// idmapped mounts under the template: ext4 and XFS from 5.12, btrfs
/// 5.15, tmpfs 6.3)? Learnt once per process: from 5.19, by idmapping
/// `template_rootfs` (a detached mount, nothing mounted); before, by
/// making such an overlay of it over an empty upper layer in a scratch
/// directory under `scratch` (removed after), for kernels with a
/// backport. Where it does not, instances with a user namespace get their
/// own shifted copy of the template instead (`super::shift`).
/// `NIFTY_FALLBACKS=shifted` answers no.
pub fn idmapped_layers(template_rootfs: &Path, scratch: &Path) -> bool {
    if forced("shifted") {
        return false;
    }
    match IDMAPPED_LAYERS.load(Ordering::Relaxed) {
        YES => return true,
        NO => return false,
        _ => {}
    }
    let probe = || -> Option<()> {
        let ns = super::userns::create(crate::claims::uid_range::FIRST).ok()?;
        if kernel_version() >= (5, 19) {
            // Overlayfs takes any idmapped layer: what is left to learn is
            // whether the template's filesystem idmaps (no mount needed).
            let tree = rustix::mount::open_tree(
                rustix::fs::CWD,
                template_rootfs,
                rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
                    | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
            )
            .ok()?;
            return crate::sys::mount_setattr_idmap(tree.as_fd(), ns.as_fd()).ok();
        }
        // Before 5.19, unless backported: an overlay of the idmapped
        // template over an empty upper layer tells.
        let dir = tempfile::Builder::new()
            .prefix(".idmap-probe-")
            .tempdir_in(scratch)
            .ok()?;
        let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
        std::fs::create_dir(&upper).ok()?;
        std::fs::create_dir(&work).ok()?;
        super::overlay::overlay(template_rootfs, &upper, &work, Some(ns.as_fd())).ok()?;
        Some(())
    };
    let yes = probe().is_some();
    if !yes {
        tracing::debug!(
            "overlayfs takes no idmapped template here (Linux {}.{}): instances get shifted copies",
            kernel_version().0,
            kernel_version().1
        );
    }
    IDMAPPED_LAYERS.store(if yes { YES } else { NO }, Ordering::Relaxed);
    yes
}

pub(crate) fn set_overlay_fd_layers(yes: bool) {
    OVERLAY_FD_LAYERS.store(if yes { YES } else { NO }, Ordering::Relaxed);
}

/// Asks overlayfs whether it takes layers as fds, without mounting
/// anything (`None`: overlayfs did not open). For `doctor`; starts learn it
/// from their first overlay.
pub fn probe_overlay_fd_layers() -> Option<bool> {
    use rustix::mount::{fsconfig_set_fd, fsopen, FsOpenFlags};
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).ok()?;
    let dir = rustix::fs::open(
        "/",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    Some(fsconfig_set_fd(fs.as_fd(), "lowerdir+", dir.as_fd()).is_ok())
}

/// The running kernel's version as (major, minor), from uname(2).
pub fn kernel_version() -> (u32, u32) {
    parse_release(&rustix::system::uname().release().to_string_lossy())
}

/// "6.1.0-50-cloud-amd64" -> (6, 1).
pub fn parse_release(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Checks, before anything is created or started, that this kernel can
/// run an instance with or without a user namespace: overlayfs (built
/// in, or a module that loads), mount_setattr(2) and user namespaces. Each
/// missing piece is one line naming it and the kernel that has it. (An
/// idmapped template is not needed: where overlayfs takes none, an
/// instance gets a shifted copy, see `super::shift`.)
pub fn preflight(userns: bool) -> Result<()> {
    use rustix::mount::{fsopen, FsOpenFlags};
    // fsopen loads the module if it must (request_module), like mount.
    if let Err(e) = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        return Err(Error::Host(format!(
            "overlayfs is not available on this kernel (fsopen(\"overlay\"): {e}; \
             neither built in nor a module that `modprobe overlay` loads): nifty's \
             instances are overlays of the template; install the kernel's modules \
             or a kernel built with CONFIG_OVERLAY_FS"
        )));
    }
    // mount_setattr(2) (5.12) makes the read-only mounts of every
    // container: asked to change nothing on a detached clone of the root
    // mount (not its submounts), it answers ENOSYS only where it is missing.
    let probe = rustix::mount::open_tree(
        rustix::fs::CWD,
        "/",
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
            | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
    );
    if let Ok(tree) = probe {
        let nothing = rustix::mount::MountAttrFlags::empty();
        if let Err(e) = crate::sys::mount_setattr_flags(tree.as_fd(), nothing) {
            if e.raw_os_error() == Some(libc::ENOSYS) {
                let (major, minor) = kernel_version();
                return Err(Error::Host(format!(
                    "Linux {major}.{minor} has no mount_setattr(2), which nifty needs for \
                     every container's read-only mounts: use Linux 5.12 or newer"
                )));
            }
        }
    }
    if !userns {
        return Ok(());
    }
    let ns = super::userns::create(crate::claims::uid_range::FIRST).map_err(|e| {
        let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Error::Host(format!(
            "user namespaces are not available ({e}; user.max_user_namespaces = {max}): \
             each instance's root is an unprivileged host ID range; set \
             user.max_user_namespaces above 0 (sysctl), or boot a kernel with \
             CONFIG_USER_NS (every distribution kernel has it)"
        ))
    })?;
    // Where the template cannot be idmapped as an overlay layer, each
    // instance gets a shifted copy of it instead (`super::shift`).
    drop(ns);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.1.0-50-cloud-amd64"), (6, 1));
        assert_eq!(parse_release("5.14.0-427.el9.x86_64"), (5, 14));
        assert_eq!(parse_release("6.18.44-fc-v669"), (6, 18));
        assert_eq!(parse_release("garbage"), (0, 0));
    }
}
