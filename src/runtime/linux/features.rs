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
/// run an instance of `template` (its rootfs) with or without a user
/// namespace: overlayfs (built in, or a module that loads), user
/// namespaces, and an idmapped mount of the template's filesystem. Each
/// missing piece is one line naming it and the kernel that has it.
pub fn preflight(template_rootfs: &Path, userns: bool) -> Result<()> {
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
    if !userns {
        return Ok(());
    }
    let (major, minor) = kernel_version();
    if (major, minor) < (5, 19) {
        return Err(Error::Host(format!(
            "Linux {major}.{minor} cannot use an idmapped template as an overlay layer \
             (overlayfs takes idmapped layers from Linux 5.19), so each instance cannot \
             have its own ID range over the shared template: use a newer kernel \
             (Ubuntu 22.04: its HWE kernel), or create with --no-userns (container root \
             is then host root: see SECURITY.md)"
        )));
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
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        template_rootfs,
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
            | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| Error::Sys {
        call: format!(
            "open_tree({}) (the new mount API, Linux 5.2)",
            template_rootfs.display()
        ),
        err: std::io::Error::from_raw_os_error(e.raw_os_error()),
    })?;
    crate::sys::mount_setattr_idmap(tree.as_fd(), ns.as_fd()).map_err(|e| {
        let fs = rustix::fs::statfs(template_rootfs)
            .map(|s| format!("{:#x}", s.f_type))
            .unwrap_or_default();
        Error::Host(format!(
            "the template {} cannot be shown through an idmapped mount on Linux {}.{} \
             (mount_setattr(MOUNT_ATTR_IDMAP): {e}; filesystem magic {fs}): idmapped \
             mounts need Linux 5.12 on ext4, xfs and btrfs (5.15), 6.3 on tmpfs, and \
             overlayfs takes them as layers from 5.19; move the state root (--root) to \
             such a filesystem, use a newer kernel, or create with --no-userns (container \
             root is then host root: see SECURITY.md)",
            template_rootfs.display(),
            kernel_version().0,
            kernel_version().1
        ))
    })
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
