//! The library's error type: every variant names what failed (instance,
//! path, syscall) and, where there is one, what to do about it.
//!
//! Each error says its cause once, in its own message (the OS error of a
//! call, the step of a start); none also hands it out as `source()`, so a
//! printed chain (`{:#}`) never repeats a cause.

use std::path::PathBuf;

/// Errors of the nifty library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, range, port or other argument is malformed.
    #[error("{0}")]
    Invalid(String),

    /// A filesystem operation failed on a path.
    #[error("{op} {path}: {err}")]
    Io {
        op: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },

    /// A system call failed; `call` reads like an strace line.
    #[error("{call}: {err}")]
    Sys { call: String, err: std::io::Error },

    /// A template does not exist.
    #[error("template {0:?} does not exist: build it with `nifty template build --name {0}`")]
    NoTemplate(String),

    /// An instance does not exist.
    #[error(
        "instance {0:?} does not exist: see `nifty list`, or create it with `nifty create {0}`"
    )]
    NoInstance(String),

    /// An instance that must not exist already does.
    #[error("instance {0:?} already exists: remove it with `nifty rm {0}` or pick another name")]
    InstanceExists(String),

    /// The operation needs a stopped instance.
    #[error("instance {0:?} is running: stop it first with `nifty stop {0}`{1}")]
    Running(String, &'static str),

    /// The operation needs a running instance.
    #[error("instance {0:?} is not running: start it with `nifty start {0}`")]
    NotRunning(String),

    /// A port cannot be used.
    #[error("port {port}: {why}")]
    Port { port: u16, why: String },

    /// A container could not be started: where, and why.
    #[error("instance {name:?}: {failure}")]
    Start { name: String, failure: StartError },

    /// systemd answered a D-Bus call with an error, or could not be asked.
    #[error("systemd over D-Bus: {what}: {err}")]
    Dbus { what: String, err: Box<zbus::Error> },

    /// A record could not be written as TOML.
    #[error("cannot write {what} as TOML: {err}")]
    Encode {
        what: &'static str,
        err: toml::ser::Error,
    },

    /// An error of a check made once per process, given again to every
    /// later caller (the first one's error, typed as it was).
    #[error(transparent)]
    Once(std::sync::Arc<Error>),

    /// Something about the host prevents the operation.
    #[error("{0}")]
    Host(String),

    /// A file nifty wrote could not be read back.
    #[error("{path}: {why}; remove or fix the file")]
    Corrupt { path: PathBuf, why: String },
}

/// A failed system call: the call as strace would show it (with its
/// arguments), and its errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: {}", std::io::Error::from_raw_os_error(.errno.raw_os_error()))]
pub struct SysError {
    pub call: String,
    pub errno: rustix::io::Errno,
}

impl SysError {
    pub fn new(call: impl Into<String>, errno: rustix::io::Errno) -> SysError {
        SysError {
            call: call.into(),
            errno,
        }
    }

    /// From an I/O error of `call` (its OS error number).
    pub fn io(call: impl Into<String>, e: &std::io::Error) -> SysError {
        SysError::new(
            call,
            rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    }

    /// For `map_err`: the errno of `call`.
    pub fn at(call: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> SysError {
        let call = call.into();
        move |errno| SysError { call, errno }
    }
}

/// The result of a check made once per process: its error is shared by
/// every caller (see [`Error::Once`]).
pub type Once<T> = std::result::Result<T, std::sync::Arc<Error>>;

/// Runs a check whose result is kept for the process (`f`), or hands out
/// the kept one.
pub fn once<T: Clone>(
    cell: &std::sync::OnceLock<Once<T>>,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    cell.get_or_init(|| f().map_err(std::sync::Arc::new))
        .clone()
        .map_err(Error::Once)
}

impl From<SysError> for Error {
    fn from(e: SysError) -> Error {
        Error::Sys {
            call: e.call,
            err: std::io::Error::from_raw_os_error(e.errno.raw_os_error()),
        }
    }
}

/// Where a container's start failed (kept typed: the step of its first
/// process is an enum, as Firecracker's jailer keeps one per step).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Preparing its plan (paths, environment) failed.
    #[error("preparing failed: {0}")]
    Prepare(std::io::Error),
    /// A system call nifty made for it before its first process ran
    /// (mounts, cgroup, bind programs).
    #[error(transparent)]
    Setup(#[from] SysError),
    /// Its first process failed at `step` (`None`: a step this nifty does
    /// not know, reported by another build).
    #[error("{} failed: {}",
        .step.map_or("an unknown step", Step::describe),
        std::io::Error::from_raw_os_error(.errno.raw_os_error()))]
    Child {
        step: Option<Step>,
        errno: rustix::io::Errno,
    },
}

/// The steps of the child, for error reports (one variant per step, like
/// Firecracker's jailer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    JoinCgroup = 1,
    Setsid,
    EnterEmptyRoot,
    AttachRoot,
    ChdirRoot,
    MountProc,
    MountDev,
    CreateDevice,
    BindDevice,
    MountDevpts,
    DevSymlink,
    MaskProc,
    MountSys,
    BindRo,
    Chroot,
    JoinUserns,
    SetIds,
    UnshareUtsIpc,
    Hostname,
    DropCaps,
    Stdio,
    CloseFds,
    Landlock,
    Seccomp,
    ExecInit,
    Loopback,
    ProcNet,
}

impl Step {
    pub const ALL: [Step; 27] = [
        Step::JoinCgroup,
        Step::Setsid,
        Step::EnterEmptyRoot,
        Step::AttachRoot,
        Step::ChdirRoot,
        Step::MountProc,
        Step::MountDev,
        Step::CreateDevice,
        Step::BindDevice,
        Step::MountDevpts,
        Step::DevSymlink,
        Step::MaskProc,
        Step::MountSys,
        Step::BindRo,
        Step::Chroot,
        Step::JoinUserns,
        Step::SetIds,
        Step::UnshareUtsIpc,
        Step::Hostname,
        Step::DropCaps,
        Step::Stdio,
        Step::CloseFds,
        Step::Landlock,
        Step::Seccomp,
        Step::ExecInit,
        Step::Loopback,
        Step::ProcNet,
    ];

    pub fn from_u8(b: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u8 == b)
    }

    /// What the step does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Step::JoinCgroup => "joining the container's cgroups",
            Step::Setsid => "setsid()",
            Step::EnterEmptyRoot => "setns(nifty's empty mount namespace) and unshare(CLONE_NEWNS)",
            Step::AttachRoot => "move_mount(overlay root, /)",
            Step::ChdirRoot => "fchdir(new root)",
            Step::MountProc => "mount(proc)",
            Step::MountDev => "mount(tmpfs, /dev)",
            Step::CreateDevice => "creating a /dev entry",
            Step::BindDevice => "move_mount of a host device node",
            Step::MountDevpts => "mount(devpts, /dev/pts, newinstance)",
            Step::DevSymlink => "symlink in /dev",
            Step::MaskProc => "masking /proc paths",
            Step::MountSys => "mount(sysfs, /sys, MS_RDONLY)",
            Step::BindRo => "move_mount of a read-only bind",
            Step::Chroot => "chroot(new root)",
            Step::JoinUserns => "setns(user namespace)",
            Step::SetIds => "setgroups/setresgid/setresuid(0) in the user namespace, not dumpable",
            Step::UnshareUtsIpc => "unshare(CLONE_NEWUTS|CLONE_NEWIPC)",
            Step::Hostname => "sethostname()",
            Step::DropCaps => "dropping capabilities (PR_CAPBSET_DROP)",
            Step::Stdio => "redirecting stdio to the console log",
            Step::CloseFds => "close_range(3.., CLOEXEC)",
            Step::Landlock => "landlock_restrict_self (its own port, abstract sockets)",
            Step::Seccomp => "installing the seccomp filter",
            Step::ExecInit => "execve(/sbin/init)",
            Step::Loopback => "bringing up lo in its own network namespace (SIOCSIFFLAGS)",
            Step::ProcNet => {
                "open_tree and move_mount of the /proc/net link onto /proc/net (Linux 5.2)"
            }
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the operation and path it came from.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |err| Error::Io { op, path, err }
    }

    /// Wraps a rustix errno with a strace-like description of the call.
    pub fn sys(call: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> Error {
        let call = call.into();
        move |e| Error::Sys {
            call,
            err: std::io::Error::from_raw_os_error(e.raw_os_error()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_start_failure_keeps_its_step_typed_and_says_its_cause_once() {
        let e = Error::Start {
            name: "7".into(),
            failure: StartError::Child {
                step: Some(Step::MountProc),
                errno: rustix::io::Errno::PERM,
            },
        };
        assert!(matches!(
            &e,
            Error::Start {
                failure: StartError::Child {
                    step: Some(Step::MountProc),
                    ..
                },
                ..
            }
        ));
        let text = e.to_string();
        assert_eq!(
            text,
            format!(
                "instance \"7\": mount(proc) failed: {}",
                std::io::Error::from_raw_os_error(libc::EPERM)
            )
        );
        assert!(e.source().is_none());
        // Through anyhow, as the binary prints it: the cause appears once.
        let printed = format!("{:#}", anyhow::Error::from(e).context("start"));
        assert_eq!(printed.matches("mount(proc)").count(), 1, "{printed}");
        assert_eq!(
            printed.matches("Operation not permitted").count(),
            1,
            "{printed}"
        );
    }

    #[test]
    fn system_call_errors_say_call_and_errno_once() {
        let e = Error::from(SysError::new("fsopen(overlay)", rustix::io::Errno::NODEV));
        let printed = format!("{:#}", anyhow::Error::from(e));
        assert!(printed.starts_with("fsopen(overlay): "), "{printed}");
        assert_eq!(printed.matches("No such device").count(), 1, "{printed}");
        let io = Error::io("open", "/x")(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            format!("{:#}", anyhow::Error::from(io))
                .matches("No such file")
                .count(),
            1
        );
    }
}
