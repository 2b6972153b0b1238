//! Running instances: the kernel is the database.
//!
//! An instance runs when its cgroup holds processes; its init is the one
//! whose PID inside its namespace is 1. Nothing about a running container
//! is stored in a file that could go stale.

pub mod dbus;
pub mod native;
pub mod systemd;

use std::time::Duration;

use serde::Serialize;

use crate::store::{Backend, Instance, Store};
use crate::{Error, Result};

/// What the kernel says about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    /// Init is stopped (SIGSTOP from the host): a `nifty stop` that was
    /// interrupted (another `nifty stop` finishes it), or an administrator.
    Stopping,
    Stopped,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Stopping => "stopping",
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

impl Info {
    /// What `list` shows of an instance whose init is `pid` (None: stopped).
    pub fn new(inst: &Instance, pid: Option<i32>, memory_bytes: Option<u64>) -> Info {
        Info {
            name: inst.name.clone(),
            state: if pid.is_some() {
                State::Running
            } else {
                State::Stopped
            },
            backend: inst.backend,
            pid,
            port: inst.port,
            uptime_secs: pid.and_then(native::uptime),
            memory_bytes,
            template: inst.template.clone(),
        }
    }
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

/// Fails unless the instance runs under the native launcher.
pub fn check_backend(inst: &Instance) -> Result<()> {
    match inst.backend {
        Backend::Native => Ok(()),
        Backend::Systemd => Err(Error::Invalid(format!(
            "instance {:?} runs under systemd (nifty@.service), not the native launcher",
            inst.name
        ))),
    }
}

/// The backend used when `create` is not told: systemd where PID 1 is
/// systemd and systemd-nspawn is installed, native elsewhere.
pub fn default_backend() -> Backend {
    if systemd::check_host().is_ok() {
        Backend::Systemd
    } else {
        Backend::Native
    }
}

/// Both launchers of one store; every fleet verb goes through here and
/// each instance goes to its own backend. The systemd one is connected
/// only when an instance needs it.
pub struct Runtime {
    pub native: native::Native,
    store: Store,
    systemd: std::sync::OnceLock<std::result::Result<systemd::Systemd, String>>,
}

/// Where a running container lives, for `exec`: its init (host PID) and
/// the `cgroup.procs` files a process writes to join it.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: i32,
    pub procs_files: Vec<std::path::PathBuf>,
}

/// Results of a fleet operation, one per instance.
pub type Results = Vec<(String, Result<()>)>;

impl Runtime {
    pub fn new(store: &Store) -> Result<Runtime> {
        Ok(Runtime {
            native: native::Native::new(store)?,
            store: store.clone(),
            systemd: std::sync::OnceLock::new(),
        })
    }

    /// The systemd backend, connected on first use.
    pub fn systemd(&self) -> Result<&systemd::Systemd> {
        self.systemd
            .get_or_init(|| systemd::Systemd::new(&self.store).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Host(e.clone()))
    }

    /// State of every instance, from the kernel (native) or systemd.
    pub fn infos(&self, insts: &[Instance]) -> Vec<Info> {
        let sd: Vec<&Instance> = insts
            .iter()
            .filter(|i| i.backend == Backend::Systemd)
            .collect();
        use rayon::prelude::*;
        let mut sd_infos = match (sd.is_empty(), self.systemd()) {
            (true, _) => Vec::new(),
            (false, Ok(s)) => s.infos(&sd),
            (false, Err(_)) => sd.iter().map(|i| stopped(i)).collect(),
        }
        .into_iter();
        // Native state is read from /proc and cgroupfs: in parallel.
        let native: Vec<Option<Info>> = insts
            .par_iter()
            .map(|i| (i.backend == Backend::Native).then(|| self.native.info(i)))
            .collect();
        native
            .into_iter()
            .zip(insts)
            .map(|(n, i)| n.unwrap_or_else(|| sd_infos.next().unwrap_or_else(|| stopped(i))))
            .collect()
    }

    pub fn info(&self, inst: &Instance) -> Info {
        self.infos(std::slice::from_ref(inst)).remove(0)
    }

    /// PID of a running instance's init.
    pub fn init_pid(&self, inst: &Instance) -> Option<i32> {
        match inst.backend {
            Backend::Native => self.native.info(inst).pid,
            Backend::Systemd => self.systemd().ok()?.init_pid(inst),
        }
    }

    /// Where a running instance lives (for `exec`).
    pub fn target(&self, inst: &Instance) -> Result<Target> {
        match inst.backend {
            Backend::Native => self.native.target(inst),
            Backend::Systemd => self.systemd()?.target(inst),
        }
    }

    /// Opens an instance's merged root for safe reads and writes.
    pub fn open_root(&self, inst: &Instance) -> Result<native::files::Root> {
        self.native.open_root(inst, |i| self.init_pid(i))
    }

    /// Starts instances, native ones in parallel on the worker pool,
    /// systemd ones as queued jobs.
    pub fn start_many(&self, insts: &[Instance], done: &(dyn Fn(&str) + Sync)) -> Results {
        use rayon::prelude::*;
        let (sd, nat): (Vec<&Instance>, Vec<&Instance>) =
            insts.iter().partition(|i| i.backend == Backend::Systemd);
        let work = || {
            nat.par_iter()
                .map(|i| {
                    let r = self.native.start(i).map(|_| ());
                    done(&i.name);
                    (i.name.clone(), r)
                })
                .collect::<Results>()
        };
        let mut out = match crate::fleet::pool(nat.len()) {
            Ok(p) => p.install(work),
            Err(_) => work(),
        };
        if !sd.is_empty() {
            out.extend(match self.systemd() {
                Ok(s) => s.start_many(&sd, done),
                Err(e) => fail(&sd, &e),
            });
        }
        out
    }

    /// Stops instances of both backends at once.
    pub fn stop_many(
        &self,
        insts: &[Instance],
        opts: StopOptions,
        done: &(dyn Fn(&str) + Sync),
    ) -> Results {
        let (sd, nat): (Vec<Instance>, Vec<Instance>) = insts
            .iter()
            .cloned()
            .partition(|i| i.backend == Backend::Systemd);
        let sd: Vec<&Instance> = sd.iter().collect();
        std::thread::scope(|s| {
            let h = (!sd.is_empty()).then(|| {
                s.spawn(|| match self.systemd() {
                    Ok(sys) => sys.stop_many(&sd, opts, done),
                    // No systemd here: none of them can be running.
                    Err(_) => sd
                        .iter()
                        .map(|i| {
                            done(&i.name);
                            (i.name.clone(), Ok(()))
                        })
                        .collect(),
                })
            });
            let mut out = self.native.stop_many(&nat, opts, done);
            if let Some(h) = h {
                out.extend(h.join().unwrap_or_default());
            }
            out
        })
    }
}

fn stopped(inst: &Instance) -> Info {
    Info::new(inst, None, None)
}

pub(crate) fn fail(insts: &[&Instance], e: &Error) -> Results {
    insts
        .iter()
        .map(|i| {
            (
                i.name.clone(),
                Err(Error::Host(format!("instance {:?}: {e}", i.name))),
            )
        })
        .collect()
}

/// Convenience: the state of one instance.
pub fn state(store: &Store, inst: &Instance) -> Result<State> {
    Ok(Runtime::new(store)?.info(inst).state)
}
