//! Files of nifty's own state: written new (never over an existing file),
//! or replaced atomically.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::runtime::linux::later;
use crate::{Error, Result};

/// Writes a new file with a mode, failing if it exists.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(Error::io("create", path))?;
    f.write_all(data).map_err(Error::io("write", path))?;
    // The umask may have narrowed the mode.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(Error::io("chmod", path))
}

/// Replaces the file at `path` with `data` (mode `mode`) atomically: a
/// temp file of a unique name in the same directory, renamed over it. A
/// crash leaves at most a `.nifty-*` temp file beside it, which no later
/// write trips over. The file replaced is freed on a thread of its own
/// (see [`later`]): on a filesystem mounted with `discard`, freeing it
/// here would wait for the device.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".nifty-")
        .tempfile_in(dir)
        .map_err(Error::io("create a temp file in", dir))?;
    tmp.write_all(data)
        .map_err(Error::io("write", tmp.path()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(Error::io("chmod", tmp.path()))?;
    let old = later::hold(path);
    tmp.persist(path)
        .map_err(|e| Error::io("rename onto", path)(e.error))?;
    if let Some(old) = old {
        later::close(old);
    }
    Ok(())
}

/// Removes the file at `path`, if there is one; freed as by
/// [`write_atomic`].
pub fn remove_file(path: &Path) -> Result<()> {
    let old = later::hold(path);
    let r = match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
        _ => Ok(()),
    };
    if let Some(old) = old {
        later::close(old);
    }
    r
}

/// Takes an exclusive lock (flock) on the directory `dir` for as long as
/// the returned fd lives; waits for another holder.
pub fn lock_dir(dir: &Path) -> Result<std::os::fd::OwnedFd> {
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(Error::sys(format!("open({})", dir.display())))?;
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockExclusive)
        .map_err(Error::sys(format!("flock({}, LOCK_EX)", dir.display())))?;
    Ok(fd)
}

/// Takes an exclusive lock (flock) on the file `path`, created if
/// missing, for as long as the returned fd lives; waits for another holder.
pub fn lock_file(path: &Path) -> Result<std::os::fd::OwnedFd> {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .map_err(Error::sys(format!("open({})", path.display())))?;
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockExclusive)
        .map_err(Error::sys(format!("flock({}, LOCK_EX)", path.display())))?;
    Ok(fd)
}

/// A lock that names its holder: an flock on a file that holds the PID of
/// the process that took it, emptied when it is let go.
#[derive(Debug)]
pub struct PidLock(fs::File);

/// Takes the lock file `path` (created if missing) without waiting and
/// writes this process's PID in it. When another process holds it, the
/// error is `busy(pid)`, with the PID that holder wrote.
pub fn lock_with_pid(path: &Path, busy: impl FnOnce(&str) -> Error) -> Result<PidLock> {
    use std::io::{Read, Seek};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(Error::io("open", path))?;
    if let Err(e) = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let mut holder = String::new();
            let _ = Read::by_ref(&mut f).take(64).read_to_string(&mut holder);
            return Err(busy(holder.trim()));
        }
        return Err(Error::sys(format!(
            "flock({}, LOCK_EX|LOCK_NB)",
            path.display()
        ))(e));
    }
    f.set_len(0).map_err(Error::io("truncate", path))?;
    f.rewind().map_err(Error::io("seek", path))?;
    writeln!(f, "{}", std::process::id()).map_err(Error::io("write", path))?;
    Ok(PidLock(f))
}

/// Does a process hold the lock file `path` (taken by [`lock_with_pid`])?
/// Asked without taking it, and without writing anything.
pub fn is_locked(path: &Path) -> bool {
    match fs::File::open(path) {
        Ok(f) => matches!(
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared),
            Err(rustix::io::Errno::WOULDBLOCK)
        ),
        Err(_) => false,
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = self.0.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_and_survive_a_crash_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nifty@.service");
        // What a crash of the old writer left behind.
        fs::write(dir.path().join("nifty@.nifty-tmp"), "half").unwrap();
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let temps = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".nifty-"))
            .count();
        assert_eq!(temps, 0, "a temp file was left");
    }

    #[test]
    fn a_pid_lock_names_its_holder_and_is_free_again_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let busy = |pid: &str| Error::Invalid(format!("held by {pid}"));
        let first = lock_with_pid(&p, busy).unwrap();
        let e = lock_with_pid(&p, busy).unwrap_err().to_string();
        assert_eq!(e, format!("held by {}", std::process::id()));
        drop(first);
        assert_eq!(fs::read_to_string(&p).unwrap(), "");
        assert!(lock_with_pid(&p, busy).is_ok());
    }
}
