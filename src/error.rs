//! The library's error type: every variant names what failed (instance,
//! path, syscall) and, where there is one, what to do about it.

use std::path::PathBuf;

/// Errors of the nifty library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, range, port or other argument is malformed.
    #[error("{0}")]
    Invalid(String),

    /// A filesystem operation failed on a path.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A system call failed; `call` reads like an strace line.
    #[error("{call}: {source}")]
    Sys {
        call: String,
        #[source]
        source: std::io::Error,
    },

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

    /// A container could not be started.
    #[error("instance {name:?}: {step} failed: {source}")]
    Start {
        name: String,
        step: String,
        #[source]
        source: std::io::Error,
    },

    /// Something about the host prevents the operation.
    #[error("{0}")]
    Host(String),

    /// A file nifty wrote could not be read back.
    #[error("{path}: {why}; remove or fix the file")]
    Corrupt { path: PathBuf, why: String },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the operation and path it came from.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// Wraps a rustix errno with a strace-like description of the call.
    pub fn sys(call: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> Error {
        let call = call.into();
        move |e| Error::Sys {
            call,
            source: std::io::Error::from_raw_os_error(e.raw_os_error()),
        }
    }
}
