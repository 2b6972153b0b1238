//! Running instances: the kernel is the database.
//!
//! An instance runs when its cgroup holds processes; its init is the one
//! whose PID inside its namespace is 1. Nothing about a running container
//! is stored in a file that could go stale.

pub mod native;

use std::time::Duration;

use serde::Serialize;

use crate::store::{Backend, Instance, Store};
use crate::{Error, Result};

/// What the kernel says about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Stopped,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Stopped => "stopped",
        })
    }
}

/// One line of `nifty list`.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub name: String,
    pub state: State,
    pub backend: Backend,
    pub pid: Option<i32>,
    pub port: u16,
    pub uptime_secs: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub template: String,
}

/// How to stop.
#[derive(Debug, Clone, Copy)]
pub struct StopOptions {
    /// Signal for init: SIGUSR2 (BusyBox init powers off).
    pub signal: rustix::process::Signal,
    /// How long to wait before killing what is left.
    pub timeout: Duration,
    /// Skip the signal and the wait: kill at once.
    pub kill: bool,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            signal: rustix::process::Signal::Usr2,
            timeout: Duration::from_secs(10),
            kill: false,
        }
    }
}

/// Parses a signal name (`USR2`, `SIGTERM`, `15`).
pub fn parse_signal(s: &str) -> Result<rustix::process::Signal> {
    use rustix::process::Signal;
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    let sig = match name {
        "USR2" | "12" => Signal::Usr2,
        "USR1" | "10" => Signal::Usr1,
        "TERM" | "15" => Signal::Term,
        "INT" | "2" => Signal::Int,
        "HUP" | "1" => Signal::Hup,
        "QUIT" | "3" => Signal::Quit,
        "KILL" | "9" => Signal::Kill,
        "PWR" | "30" => Signal::Power,
        _ => {
            return Err(Error::Invalid(format!(
                "unknown signal {s:?}: use USR2 (BusyBox init: poweroff), TERM (reboot), INT, HUP, QUIT, KILL"
            )))
        }
    };
    Ok(sig)
}

/// Fails unless the instance's backend is built.
pub fn check_backend(inst: &Instance) -> Result<()> {
    match inst.backend {
        Backend::Native => Ok(()),
        Backend::Systemd => Err(Error::Host(format!(
            "instance {:?}: the systemd backend is not built yet; recreate it with --backend native",
            inst.name
        ))),
    }
}

/// The backend used when `create` is not told: systemd where PID 1 is
/// systemd (and the backend exists), native elsewhere.
pub fn default_backend() -> Backend {
    Backend::Native
}

/// Convenience: the state of one instance.
pub fn state(store: &Store, inst: &Instance) -> Result<State> {
    Ok(native::Native::new(store)?.info(inst).state)
}
