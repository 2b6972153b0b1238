//! An instance's own copy of its template, shifted into its ID range, for
//! hosts whose overlayfs takes no idmapped layer: Linux before 5.19
//! (Ubuntu 22.04's 5.15, RHEL 9's 5.14, unless their vendor backported
//! it), or a template on a filesystem without idmapped mounts.
//! `features::idmapped_layers` finds out, once per process.
//!
//! There, each instance with a user namespace gets, at its first start
//! (and at the first start on a new template version), a copy of the
//! template whose every file belongs to the instance's host IDs (container
//! ID + its base), as systemd-nspawn's `--private-users-ownership=chown`
//! does. Its overlay is then made of that copy without any idmapped mount,
//! and the container sees the template's owners as the shared template
//! shows them elsewhere. File data is shared where the filesystem can
//! (a reflink: btrfs, XFS); elsewhere each copy costs the template's size
//! (11 MiB for the default one). Its upper layer, limits and security are
//! the same as with the shared template.
//!
//! The copy lives in `instances/<name>/shifted/` (mode 0700: no host user
//! reaches files owned by the instance's IDs), next to the template, so
//! that a reflink can reach it; it is made under a temporary name and
//! renamed into place, and a copy of an earlier template version is
//! removed once the new one is there. `rm` removes it with the instance.
//!
//! The template is nifty's own (built from the host's packages, or an
//! image imported by `nifty image import`), not a tenant's; it is still
//! walked without following links, and no extended attribute is copied
//! (nifty's templates carry none).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::features;
use crate::store::{Instance, Store};
use crate::{Error, Result};

/// The directory, in an instance's own, that holds its shifted copy.
pub const DIR: &str = "shifted";

/// Trees deeper than this are refused.
const MAX_DEPTH: usize = 256;

/// The lower layer of an instance's overlay.
#[derive(Debug, Clone)]
pub struct Lower {
    pub path: PathBuf,
    /// The layer is the shared template, to be idmapped through the
    /// instance's user namespace; `false`: it is used as it is (no user
    /// namespace, or a shifted copy already in the instance's range).
    pub idmap: bool,
}

/// The lower layer for a stopped instance about to be mounted (a start, or
/// a host-side write to it): the shared template, or its shifted copy,
/// made now if it is missing; `NoTemplate` if its template version is
/// gone (the one place a start checks it). Call it only while nothing of
/// the instance runs: a copy of another template version is removed.
pub fn lower(store: &Store, inst: &Instance) -> Result<Lower> {
    let template = store.instance_lower(inst);
    if !template.is_dir() {
        return Err(Error::NoTemplate(inst.template.clone()));
    }
    let Some(base) = inst.security.uid_base else {
        return Ok(Lower {
            path: template,
            idmap: false,
        });
    };
    let dir = store.instance_dir(&inst.name).join(DIR);
    if features::idmapped_layers(&template, store.root()) {
        // A copy made before (an older kernel, or the fallback forced) is
        // of no more use.
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
        return Ok(Lower {
            path: template,
            idmap: true,
        });
    }
    let name = format!("{}-v{}-{base}", inst.template, inst.template_version);
    let path = dir.join(&name);
    if !path.is_dir() {
        make(&template, &dir, &name, base).map_err(|e| {
            Error::Host(format!(
                "instance {:?}: a copy of template {:?} v{} in its ID range (this kernel's \
                 overlayfs takes no idmapped template), at {}: {e}; check the free space \
                 there, or create the instance with --no-userns (container root is then \
                 host root: see SECURITY.md)",
                inst.name,
                inst.template,
                inst.template_version,
                dir.display()
            ))
        })?;
    }
    Ok(Lower { path, idmap: false })
}

/// Makes `dir/name` as a shifted copy of `template` (under a temporary
/// name, renamed into place), then removes the other entries of `dir`:
/// copies of other versions, and temporary ones of processes that are
/// gone.
fn make(template: &Path, dir: &Path, name: &str, base: u32) -> std::io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let tmp = dir.join(format!(".tmp-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let t0 = std::time::Instant::now();
    let made = copy_shifted(template, &tmp, base).and_then(|n| {
        fs::rename(&tmp, dir.join(name))?;
        Ok(n)
    });
    let n = match made {
        Ok(n) => n,
        // Another process made it first: use that one.
        Err(_) if dir.join(name).is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            0
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    tracing::debug!(
        "shifted copy of {} ({n} entries) in {:?}",
        template.display(),
        t0.elapsed()
    );
    for e in fs::read_dir(dir)?.flatten() {
        let other = e.file_name();
        let other = other.to_string_lossy();
        let stale = match other.strip_prefix(".tmp-") {
            Some(rest) => rest
                .split('-')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|pid| !super::proc::alive(pid)),
            None => other != name,
        };
        if stale {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// A container ID's host ID: `base` + the ID, or + 65534 (nobody) for an
/// ID past the range, which an idmapped mount would show as nobody too.
pub fn shift(id: u32, base: u32) -> u32 {
    const NOBODY: u32 = 65534;
    base + if id < crate::claims::RANGE {
        id
    } else {
        NOBODY
    }
}

/// Copies the tree `src` to `dst` (which must not exist), every entry
/// owned by its IDs shifted by `base`, with its mode (setuid and setgid
/// bits too, set after the owner) and times; hard links stay hard links.
/// Returns how many entries it made.
pub fn copy_shifted(src: &Path, dst: &Path, base: u32) -> std::io::Result<u64> {
    let mut links = HashMap::new();
    let mut n = 0;
    copy_entry(src, dst, base, &mut links, 0, &mut n)?;
    Ok(n)
}

fn copy_entry(
    src: &Path,
    dst: &Path,
    base: u32,
    links: &mut HashMap<(u64, u64), PathBuf>,
    depth: usize,
    n: &mut u64,
) -> std::io::Result<()> {
    let md = fs::symlink_metadata(src)?;
    let ft = md.file_type();
    *n += 1;
    if ft.is_dir() {
        if depth >= MAX_DEPTH {
            return Err(std::io::Error::other(format!(
                "{}: deeper than {MAX_DEPTH} directories",
                src.display()
            )));
        }
        fs::create_dir(dst)?;
        for e in fs::read_dir(src)? {
            let e = e?;
            copy_entry(
                &e.path(),
                &dst.join(e.file_name()),
                base,
                links,
                depth + 1,
                n,
            )?;
        }
    } else if ft.is_file() {
        if md.nlink() > 1 {
            if let Some(first) = links.get(&(md.dev(), md.ino())) {
                return fs::hard_link(first, dst);
            }
            links.insert((md.dev(), md.ino()), dst.to_path_buf());
        }
        let from = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(src)?;
        let mut to = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dst)?;
        // A reflink where the filesystem has them, else a copy
        // (copy_file_range, which shares extents where it can).
        if rustix::fs::ioctl_ficlone(&to, &from).is_err() {
            std::io::copy(&mut &from, &mut to)?;
        }
        // Owner, then mode (chown(2) clears setuid and setgid), then times,
        // on the open file.
        std::os::unix::fs::fchown(
            &to,
            Some(shift(md.uid(), base)),
            Some(shift(md.gid(), base)),
        )?;
        to.set_permissions(fs::Permissions::from_mode(md.mode() & 0o7777))?;
        rustix::fs::futimens(&to, &times(&md))?;
        return Ok(());
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else {
        // FIFOs, sockets and device nodes, made again as they are (the
        // overlay is mounted nodev: a device node opens nothing).
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dst,
            rustix::fs::FileType::from_raw_mode(md.mode()),
            rustix::fs::Mode::from_raw_mode(md.mode() & 0o7777),
            md.rdev(),
        )?;
    }
    std::os::unix::fs::lchown(
        dst,
        Some(shift(md.uid(), base)),
        Some(shift(md.gid(), base)),
    )?;
    if !ft.is_symlink() {
        // After the owner: chown(2) clears setuid and setgid.
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    }
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dst,
        &times(&md),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// The access and modification times of `md`.
fn times(md: &fs::Metadata) -> rustix::fs::Timestamps {
    let ts = |s: i64, ns: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns as _,
    };
    rustix::fs::Timestamps {
        last_access: ts(md.atime(), md.atime_nsec()),
        last_modification: ts(md.mtime(), md.mtime_nsec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_shift_into_the_range_and_past_it_to_nobody() {
        assert_eq!(shift(0, 0x7000_0000), 0x7000_0000);
        assert_eq!(shift(1000, 0x7000_0000), 0x7000_03e8);
        assert_eq!(shift(65535, 0x7000_0000), 0x7000_ffff);
        assert_eq!(shift(65536, 0x7000_0000), 0x7000_fffe);
        assert_eq!(shift(u32::MAX, 0x7000_0000), 0x7000_fffe);
    }
}
