//! Running instances: the kernel is the database.
//!
//! An instance runs when its cgroup holds processes; its init is the one
//! whose PID inside its namespace is 1. Nothing about a running container
//! is stored in a file that could go stale.

pub mod linux;
pub use linux::dbus;
pub mod native;
pub mod ondemand;
pub mod status;
pub mod systemd;

use std::time::Duration;

use serde::Serialize;

use crate::store::{Backend, Instance, Store};
use crate::{Error, Result};

pub use status::{Status, UnitStatus};

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
    /// The version of its template it runs.
    pub template_version: u32,
    /// A newer version of its template exists (`nifty update` moves it).
    pub behind: bool,
    /// CPU used over a short window, in percent of one CPU (running only).
    pub cpu_percent: Option<f64>,
    /// Bytes its own files take (its upper layer), where nifty accounts them.
    pub disk_bytes: Option<u64>,
    /// Its limits.
    pub limits: crate::limits::Limits,
    /// Where an on-demand instance is in its cycle (filled in by
    /// [`Runtime::measure`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<ondemand::OnDemandInfo>,
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
            uptime_secs: pid.and_then(linux::proc::uptime),
            memory_bytes,
            template: inst.template.clone(),
            template_version: inst.template_version,
            behind: false,
            cpu_percent: None,
            disk_bytes: None,
            limits: inst.limits.clone(),
            on_demand: None,
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

/// Can anything of `backend` run on this host? Not the systemd backend's
/// where systemd is not PID 1: its instances are all stopped here, and
/// `rm` removes them without asking systemd.
fn runs_here(backend: Backend) -> bool {
    match backend {
        Backend::Native => true,
        Backend::Systemd => dbus::booted(),
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

/// Called once per instance as a fleet operation finishes it (progress).
pub type Done<'a> = &'a (dyn Fn(&str) + Sync);

/// The connections waiting for an instance, by its name (`nifty serve`'s
/// cold starts): each leaves the caller's hands when taken.
pub type Take<'a> = &'a (dyn Fn(&str) -> Vec<std::os::fd::OwnedFd> + Sync);

/// One door per backend: everything a command may ask of the launcher
/// that runs an instance. Commands never ask which backend an instance
/// uses: [`Runtime`] groups instances by backend and hands each group to
/// its launcher.
pub trait Launcher: Sync {
    /// The state of these instances (all of this backend).
    fn infos(&self, insts: &[&Instance]) -> Vec<Info>;
    /// Only whether each runs, and its init's PID: what [`Launcher::infos`]
    /// says first, without its memory (for sweeps and checks that need
    /// no more).
    fn states(&self, insts: &[&Instance]) -> Vec<(State, Option<i32>)>;
    /// Starts them; `done` is called once per instance.
    fn start_many(&self, insts: &[&Instance], done: Done<'_>) -> Results;
    /// [`Launcher::start_many`] at connections (`nifty serve`): a
    /// launcher that can serve an instance's waiting connections from its
    /// start (sooner, and cheaper, than a session in it once it runs)
    /// takes them with `take`, each served as [`Runtime::session`] serves
    /// one; what it leaves stays the caller's, for after `done`.
    fn start_many_serving(&self, insts: &[&Instance], take: Take<'_>, done: Done<'_>) -> Results {
        let _ = take;
        self.start_many(insts, done)
    }
    /// Once no start of [`Launcher::start_many_serving`] waits any more
    /// (a burst of cold starts is over): what those starts held back until
    /// then runs now.
    fn starts_settled(&self) {}
    /// Stops them; a stopped one is not an error.
    fn stop_many(&self, insts: &[&Instance], opts: StopOptions, done: Done<'_>) -> Results;
    /// Where a running instance lives (for `exec` and host-side files).
    fn target(&self, inst: &Instance) -> Result<Target>;
    /// Its cgroup, as shown to the user ("-" when it has none), and the
    /// processes in it and below it.
    fn processes(&self, inst: &Instance) -> (String, Vec<i32>);
    /// The unit that runs it, if the backend has units.
    fn unit(&self, inst: &Instance) -> Option<UnitStatus>;
    /// Refuses, before anything is created, what this backend cannot
    /// take (instance names, `--bind-ro` paths).
    fn check_create(&self, names: &[String], binds: &[String]) -> Result<()>;
    /// Registers newly created instances (systemd: the unit's drop-ins;
    /// an on-demand instance's socket).
    fn register(&self, insts: &[&Instance]) -> Result<()>;
    /// Has the ports of these on-demand instances held by what starts
    /// them at a connection (`on`), or no longer: systemd's sockets. Let
    /// go (`!on`) before the records say always-on, held after they say
    /// on demand, so a failure leaves record and holder agreeing. A
    /// holder that follows the records (`nifty serve`) needs nothing
    /// here: see [`Launcher::records_saved`].
    fn hold_ports(&self, insts: &[&Instance], on: bool) -> Result<()>;
    /// After on-demand records were saved (enabled, disabled, a new idle
    /// timeout): tells a holder that follows the records to read them
    /// again (the native launcher's `nifty serve`, which rescans when the
    /// instances directory's time changes).
    fn records_saved(&self) -> Result<()> {
        Ok(())
    }
    /// Whether `nifty serve` is what holds this backend's on-demand ports
    /// (the native launcher), rather than something of the backend's own
    /// (systemd's socket units).
    fn served_by_serve(&self) -> bool;
    /// What has an on-demand instance's port held when nothing does, for
    /// messages: "run `nifty serve`", or its socket unit to start.
    fn hold_ports_hint(&self, inst: &Instance) -> String;
    /// Names of the instances that may be running (a cheap superset, for
    /// sweeps: one directory read or one call).
    fn running_names(&self) -> Vec<String>;
    /// Before `rm`: refuses while anything of the instance runs; clears
    /// what the backend keeps of a stopped one.
    fn release(&self, inst: &Instance) -> Result<()>;
    /// After `rm`: forgets removed instances (systemd: drop-ins and boot
    /// links).
    fn forget(&self, names: &[String]) -> Result<()>;
    /// How a started instance runs, for messages: "" or
    /// " as nifty@1.service".
    fn launched_as(&self, inst: &Instance) -> String;
    /// Starts the instances at boot (`on`) or no longer; returns the
    /// (kind, link, destination) of each change made.
    fn enable(&self, insts: &[&Instance], on: bool) -> Result<Vec<dbus::Change>>;
    /// Ends the containers of this backend whose instance record is gone
    /// (`stop --all`); `known` are the instances that exist.
    fn reap_orphans(&self, known: &[String]) -> Results;
    /// Makes `inst`'s limits (already changed in it, not yet saved) those
    /// its backend applies, now if it runs; returns what only its next
    /// start can apply.
    fn set_limits(&self, inst: &Instance) -> Result<Vec<&'static str>>;
    /// CPU time a running instance has used, in microseconds.
    fn cpu_usage_us(&self, inst: &Instance) -> Option<u64>;
    /// Gives a running instance the CPU share its limits say, where
    /// [`Launcher::start_many_serving`] left it a background one for the
    /// rest of its boot (a launcher that does not: nothing to do).
    fn foreground(&self, inst: &Instance) -> Result<()> {
        let _ = inst;
        Ok(())
    }
    /// Whether a running instance has the background share
    /// [`Launcher::foreground`] ends (cheap: read before taking its lock).
    fn in_background(&self, inst: &Instance) -> bool {
        let _ = inst;
        false
    }
}

/// At most this long a backend holds a cold start's first process back
/// after its logins' banners (until [`Launcher::starts_settled`]): a stream
/// of cold starts that never ends holds no init for longer, nor does a
/// `serve` that is killed.
pub const HOLD_MAX: Duration = Duration::from_secs(1);

/// How long `list` and `status` watch CPU use to say a percentage.
pub const CPU_WINDOW: Duration = Duration::from_millis(200);

/// Both launchers of one store; every fleet verb goes through here and
/// each instance goes to its own backend. The systemd one is connected
/// only when an instance needs it.
pub struct Runtime {
    native: native::Native,
    store: Store,
    /// The host's cgroup mounts, found once for both backends.
    hierarchy: linux::cgroup::Hierarchy,
    systemd: std::sync::OnceLock<crate::error::Once<systemd::Systemd>>,
}

/// Where a running container lives, for `exec`: its init (host PID) and
/// the `cgroup.procs` files a process writes to join it.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: i32,
    pub procs_files: Vec<std::path::PathBuf>,
}

/// A session's process, a child of the caller: reaped by [`try_wait`]
/// (serve) or [`wait`] (`nifty systemd session`).
///
/// [`try_wait`]: SessionProc::try_wait
/// [`wait`]: SessionProc::wait
#[derive(Debug)]
pub struct SessionProc {
    pid: i32,
}

impl SessionProc {
    pub(crate) fn new(pid: i32) -> SessionProc {
        SessionProc { pid }
    }

    pub fn id(&self) -> i32 {
        self.pid
    }

    /// How it ended, if it has (it is reaped then), as
    /// `std::process::Child::try_wait` says it.
    pub fn try_wait(&mut self) -> std::io::Result<Option<rustix::process::WaitStatus>> {
        let pid = rustix::process::Pid::from_raw(self.pid)
            .ok_or_else(|| std::io::Error::other("a session without a PID"))?;
        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG)
            .map_err(std::io::Error::from)
    }

    /// Waits for it; its exit code (128 + the signal that ended it).
    pub fn wait(&mut self) -> Result<i32> {
        let pid = rustix::process::Pid::from_raw(self.pid)
            .ok_or_else(|| Error::Host("a session without a PID".into()))?;
        loop {
            match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::sys(format!("waitpid({})", self.pid))(e)),
                Ok(Some(st)) => {
                    return Ok(st
                        .exit_status()
                        .map(|c| c as i32)
                        .or_else(|| st.terminating_signal().map(|s| 128 + s as i32))
                        .unwrap_or(1))
                }
                Ok(None) => continue,
            }
        }
    }
}

/// Results of a fleet operation, one per instance.
pub type Results = Vec<(String, Result<()>)>;

/// Runs `f`, which starts a process in a container by entering its PID
/// namespace through this thread, and gives the thread its own back, so
/// that a container it starts later is not made inside that one.
fn keeping_pidns<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let own = std::fs::File::open("/proc/thread-self/ns/pid")
        .map_err(Error::io("open", "/proc/thread-self/ns/pid"))?;
    let r = f();
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
    use std::os::fd::AsFd;
    move_into_link_name_space(own.as_fd(), Some(LinkNameSpaceType::ProcessID))
        .map_err(Error::sys("setns(/proc/thread-self/ns/pid)"))?;
    r
}

impl Runtime {
    pub fn new(store: &Store) -> Result<Runtime> {
        let hierarchy = linux::cgroup::Hierarchy::detect()?;
        Ok(Runtime {
            native: native::Native::new(store, hierarchy.clone()),
            store: store.clone(),
            hierarchy,
            systemd: std::sync::OnceLock::new(),
        })
    }

    /// The systemd backend, connected on first use (for `nifty systemd`,
    /// whose verbs are about the unit files themselves).
    pub fn systemd(&self) -> Result<&systemd::Systemd> {
        self.systemd
            .get_or_init(|| {
                systemd::Systemd::new(&self.store, self.hierarchy.clone())
                    .map_err(std::sync::Arc::new)
            })
            .as_ref()
            .map_err(|e| Error::Once(e.clone()))
    }

    /// The launcher of `backend` (the only place that tells them apart).
    pub fn launcher(&self, backend: Backend) -> Result<&dyn Launcher> {
        Ok(match backend {
            Backend::Native => &self.native,
            Backend::Systemd => self.systemd()?,
        })
    }

    /// The launcher of an instance.
    fn of(&self, inst: &Instance) -> Result<&dyn Launcher> {
        self.launcher(inst.backend)
    }

    /// `insts` grouped by backend, in a fixed order (native first).
    fn groups(insts: &[Instance]) -> Vec<(Backend, Vec<&Instance>)> {
        [Backend::Native, Backend::Systemd]
            .into_iter()
            .map(|b| {
                (
                    b,
                    insts.iter().filter(|i| i.backend == b).collect::<Vec<_>>(),
                )
            })
            .filter(|(_, g)| !g.is_empty())
            .collect()
    }

    /// State of every instance, from the kernel (native) or systemd, in
    /// the order given.
    pub fn infos(&self, insts: &[Instance]) -> Vec<Info> {
        let mut by_name: std::collections::HashMap<String, Info> = Self::groups(insts)
            .into_iter()
            .flat_map(|(b, group)| match self.launcher(b) {
                Ok(l) => l.infos(&group),
                // No systemd here: none of them can be running.
                Err(_) => group.iter().map(|i| stopped(i)).collect(),
            })
            .map(|i| (i.name.clone(), i))
            .collect();
        // Each template's newest version, read once.
        let mut newest: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        insts
            .iter()
            .map(|i| {
                let mut info = by_name.remove(&i.name).unwrap_or_else(|| stopped(i));
                let n = *newest
                    .entry(i.template.as_str())
                    .or_insert_with(|| self.store.template(&i.template).map_or(0, |t| t.version));
                info.behind = n > i.template_version;
                info
            })
            .collect()
    }

    /// Whether each of `insts` runs, and its init's PID, in the order
    /// given: [`Runtime::infos`] without what a sweep or a check needs not
    /// read (memory, template versions, uptime).
    pub fn states(&self, insts: &[Instance]) -> Vec<(State, Option<i32>)> {
        let mut by_name: std::collections::HashMap<&str, (State, Option<i32>)> =
            std::collections::HashMap::new();
        for (b, group) in Self::groups(insts) {
            // No systemd here: none of them can be running.
            let states = match self.launcher(b) {
                Ok(l) => l.states(&group),
                Err(_) => vec![(State::Stopped, None); group.len()],
            };
            by_name.extend(group.iter().map(|i| i.name.as_str()).zip(states));
        }
        insts
            .iter()
            .map(|i| {
                by_name
                    .remove(i.name.as_str())
                    .unwrap_or((State::Stopped, None))
            })
            .collect()
    }

    /// Those of `insts` whose state passes `keep`, in their order.
    pub fn with_state(&self, insts: &[Instance], keep: impl Fn(State) -> bool) -> Vec<Instance> {
        self.states(insts)
            .into_iter()
            .zip(insts)
            .filter(|((state, _), _)| keep(*state))
            .map(|(_, i)| i.clone())
            .collect()
    }

    pub fn info(&self, inst: &Instance) -> Info {
        self.infos(std::slice::from_ref(inst)).remove(0)
    }

    /// PID of a running instance's init.
    pub fn init_pid(&self, inst: &Instance) -> Option<i32> {
        self.states(std::slice::from_ref(inst)).remove(0).1
    }

    /// Where a running instance lives (for `exec`).
    pub fn target(&self, inst: &Instance) -> Result<Target> {
        self.of(inst)?.target(inst)
    }

    /// Opens an instance's merged root for safe reads and writes.
    pub fn open_root(&self, inst: &Instance) -> Result<linux::files::Root> {
        linux::files::open_root(&self.store, inst, |i| self.init_pid(i))
    }

    /// Runs `cmd` in a running instance as `user` (default: root), with
    /// a pty of nifty's when on a terminal; returns its exit code.
    pub fn exec(
        &self,
        inst: &Instance,
        user: Option<&str>,
        cmd: &[String],
        env: &[(String, String)],
    ) -> Result<i32> {
        let target = self.target(inst)?;
        self.native.exec(inst, &target, user, cmd, env)
    }

    /// One SSH session in a running on-demand instance, on `conn`, a
    /// connection `nifty serve` accepted on its port: Dropbear in inetd
    /// mode inside it (either backend: it is entered as `exec` enters it).
    /// Returns the session's process, which the caller reaps.
    pub fn session(&self, inst: &Instance, conn: std::os::fd::OwnedFd) -> Result<SessionProc> {
        self.session_at(inst, &self.target(inst)?, conn)
    }

    /// [`Runtime::session`] in the running instance at `target`, which the
    /// caller found.
    pub fn session_at(
        &self,
        inst: &Instance,
        target: &Target,
        conn: std::os::fd::OwnedFd,
    ) -> Result<SessionProc> {
        let log = linux::files::append_console_log(&self.store.console_log(inst))?;
        keeping_pidns(|| self.native.session(inst, target, conn, log))
    }

    /// A listening Dropbear in a running on-demand instance, bound as
    /// `bound` says (either backend: entered as `exec` enters it). Returns the process
    /// started, which goes to the background and exits: the caller waits
    /// for it.
    pub fn listener(&self, inst: &Instance, bound: linux::proc::Bound) -> Result<SessionProc> {
        let target = self.target(inst)?;
        let log = linux::files::append_console_log(&self.store.console_log(inst))?;
        keeping_pidns(|| self.native.listener(inst, &target, log, bound))
    }

    /// Covers a running instance's /proc/net with the template's view where
    /// it should show it and does not (either backend; in effect a systemd
    /// one, whose /proc systemd-nspawn mounts: `nifty systemd post`, the
    /// unit's ExecStartPost). Whether it did.
    pub fn cover_proc_net(&self, inst: &Instance) -> Result<bool> {
        let target = self.target(inst)?;
        self.native.cover_proc_net(inst, &target)
    }

    /// `nifty on-demand enable|disable`: makes a stopped instance on
    /// demand (`Some`: its Dropbear leaves its inittab and its backend
    /// holds its port) or no longer. A new idle timeout alone is only
    /// recorded. Returns whether anything changed.
    pub fn set_on_demand(
        &self,
        inst: &Instance,
        on_demand: Option<crate::store::OnDemand>,
    ) -> Result<bool> {
        let current = self.store.instance(&inst.name)?;
        if current.on_demand == on_demand {
            return Ok(false);
        }
        if on_demand.is_none() && current.network == crate::store::Network::None {
            return Err(Error::Invalid(format!(
                "instance {:?} has a network of its own (--network none): only its on-demand \
                 sessions, handed in from the host, reach it; it stays on demand",
                inst.name
            )));
        }
        if current.on_demand.is_some() == on_demand.is_some() {
            let _lock = linux::proc::lock(&self.store.instance_dir(&inst.name))?;
            let mut next = self.store.instance(&inst.name)?;
            next.on_demand = on_demand;
            self.store.save_instance(&next)?;
            // What holds its port takes up the new timeout.
            let launcher = self.of(&next)?;
            launcher.hold_ports(&[&next], true)?;
            launcher.records_saved()?;
            return Ok(true);
        }
        // Its root, opened for writing, holds the instance's lock while it
        // is stopped: it cannot be started meanwhile.
        let root = self.open_root(&current)?;
        let mut next = self.store.instance(&inst.name)?;
        if self.info(&next).state != State::Stopped {
            return Err(Error::Invalid(format!(
                "instance {:?} is running: stop it first (`nifty stop {}`); {} takes effect \
                 when it is stopped, as its inittab {} its own Dropbear",
                inst.name,
                inst.name,
                if on_demand.is_some() {
                    "on demand"
                } else {
                    "always-on"
                },
                if on_demand.is_some() {
                    "loses"
                } else {
                    "gets back"
                },
            )));
        }
        let tab = match on_demand {
            Some(_) => crate::template::inittab::render_on_demand(),
            None => crate::template::inittab::render(Some(next.port)),
        };
        root.write("/etc/inittab", tab.as_bytes(), 0, 0, 0o644)?;
        let launcher = self.of(&next)?;
        if on_demand.is_none() {
            launcher.hold_ports(&[&next], false)?;
        }
        next.on_demand = on_demand;
        self.store.save_instance(&next)?;
        if on_demand.is_some() {
            launcher.hold_ports(&[&next], true)?;
        } else {
            ondemand::write_mark(&self.store, &next.name, &Default::default());
        }
        launcher.records_saved()?;
        Ok(true)
    }

    /// What has `inst`'s port held when nothing does (see
    /// `Launcher::hold_ports_hint`).
    pub fn hold_ports_hint(&self, inst: &Instance) -> String {
        match self.of(inst) {
            Ok(l) => l.hold_ports_hint(inst),
            Err(e) => e.to_string(),
        }
    }

    /// Whether a connection to `inst`'s SSH port is answered now: it runs,
    /// or it is on demand and something holds its port to start it. For
    /// `nifty ssh`, which says why not instead of the client's
    /// "Connection refused".
    pub fn reachable(&self, inst: &Instance) -> Result<()> {
        let mut infos = vec![self.info(inst)];
        if inst.on_demand.is_none() {
            return match infos[0].state {
                State::Stopped => Err(Error::NotRunning(inst.name.clone())),
                _ => Ok(()),
            };
        }
        ondemand::describe(&self.store, std::slice::from_ref(inst), &mut infos);
        match infos[0].on_demand.as_ref().map(|o| o.phase) {
            Some(ondemand::Phase::Unserved) => Err(Error::Invalid(format!(
                "instance {:?} is on demand and nothing holds its port {}, so nothing \
                 starts it at a connection: {} (or start it: `nifty{} start {}`)",
                inst.name,
                inst.port,
                self.hold_ports_hint(inst),
                self.store.root_flag(),
                inst.name
            ))),
            _ => Ok(()),
        }
    }

    /// Whether `nifty serve` holds this on-demand instance's port and
    /// starts it (not its backend's own sockets); `serve` takes only these.
    pub fn served_by_serve(&self, inst: &Instance) -> bool {
        inst.on_demand.is_some() && self.of(inst).is_ok_and(|l| l.served_by_serve())
    }

    /// The on-demand instances that may be running, of every backend
    /// reachable here (for the idle sweep: no record of a stopped instance
    /// is read).
    pub fn running_on_demand(&self) -> Vec<Instance> {
        let mut names = self.native.running_names();
        if let Ok(sd) = self.systemd() {
            names.extend(Launcher::running_names(sd));
        }
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|n| self.store.instance(&n).ok())
            .filter(|i| i.on_demand.is_some())
            .collect()
    }

    /// The processes of an instance's container (none when it is stopped).
    pub fn processes(&self, inst: &Instance) -> Vec<i32> {
        self.of(inst)
            .map(|l| l.processes(inst).1)
            .unwrap_or_default()
    }

    /// Everything `status` shows of an instance; its log's last `lines`.
    pub fn status(&self, inst: &Instance, lines: usize) -> Result<Status> {
        let mut info = [self.info(inst)];
        self.measure(std::slice::from_ref(inst), &mut info);
        let [info] = info;
        let l = self.of(inst)?;
        let (cgroup, pids) = l.processes(inst);
        Ok(Status {
            listening: info.state == State::Running && status::listening(inst.port),
            cgroup,
            log: status::tail(&self.console_log(inst), lines),
            unit: l.unit(inst),
            processes: status::processes(pids),
            info,
        })
    }

    /// Where an instance's console output goes, on either backend (the
    /// systemd unit sends it there too: a journal stream per unit would
    /// stop at journald's 4096 streams).
    /// For reading: the disk store is mounted first if it is not yet
    /// (after a reboot); a log from before logs counted against `--disk`
    /// is shown until the instance's next start writes the new one.
    pub fn console_log(&self, inst: &Instance) -> std::path::PathBuf {
        if inst.disk_store {
            if let Err(e) = crate::volume::ensure(&self.store) {
                tracing::warn!("{e}");
            }
        }
        let path = self.store.console_log(inst);
        let before = self.store.console_log_in_instance_dir(&inst.name);
        if !path.exists() && before.exists() {
            return before;
        }
        path
    }

    /// Checks, before anything is created or started, that this kernel can
    /// run instances with or without a user namespace (both backends
    /// mount the same overlay).
    pub fn preflight(&self, userns: bool) -> Result<()> {
        linux::features::preflight(userns)
    }

    /// Refuses, before anything is created, names or binds `backend`
    /// cannot take.
    pub fn check_create(&self, backend: Backend, names: &[String], binds: &[String]) -> Result<()> {
        self.launcher(backend)?.check_create(names, binds)
    }

    /// Registers newly created instances with their backends.
    pub fn register(&self, insts: &[Instance]) -> Result<()> {
        for (b, group) in Self::groups(insts) {
            self.launcher(b)?.register(&group)?;
        }
        Ok(())
    }

    /// Before `rm`: refuses while anything of the instance runs.
    pub fn release(&self, inst: &Instance) -> Result<()> {
        if !runs_here(inst.backend) {
            return Ok(());
        }
        self.of(inst)?.release(inst)
    }

    /// After `rm` (or a create undone): the backends forget `insts`.
    pub fn forget(&self, insts: &[Instance]) -> Result<()> {
        for (b, group) in Self::groups(insts) {
            let names: Vec<String> = group.iter().map(|i| i.name.clone()).collect();
            if runs_here(b) {
                self.launcher(b)?.forget(&names)?;
            } else {
                systemd::forget_offline(&self.store, &names)?;
            }
        }
        Ok(())
    }

    /// How a started instance runs, for messages.
    pub fn launched_as(&self, inst: &Instance) -> String {
        self.of(inst)
            .map(|l| l.launched_as(inst))
            .unwrap_or_default()
    }

    /// Boot-time start on or off for `insts`.
    pub fn enable(&self, insts: &[Instance], on: bool) -> Result<Vec<dbus::Change>> {
        let mut out = Vec::new();
        for (b, group) in Self::groups(insts) {
            out.extend(self.launcher(b)?.enable(&group, on)?);
        }
        Ok(out)
    }

    /// Ends containers whose instance record is gone, of every backend
    /// reachable here; `known` are the instances that exist.
    pub fn reap_orphans(&self, known: &[String]) -> Results {
        let mut out = self.native.reap_orphans(known);
        if let Some(Ok(sd)) = self.systemd.get() {
            out.extend(sd.reap_orphans(known));
        }
        out
    }

    /// Fills in what instances use now: their disk, the state of the
    /// on-demand ones, and CPU over [`CPU_WINDOW`] for the running ones
    /// (one window for all of them).
    pub fn measure(&self, insts: &[Instance], infos: &mut [Info]) {
        ondemand::describe(&self.store, insts, infos);
        let sample = |infos: &[Info]| -> Vec<Option<u64>> {
            insts
                .iter()
                .zip(infos)
                .map(|(i, info)| {
                    (info.state == State::Running)
                        .then(|| self.of(i).ok()?.cpu_usage_us(i))
                        .flatten()
                })
                .collect()
        };
        for (i, info) in insts.iter().zip(infos.iter_mut()) {
            if i.disk_store {
                info.disk_bytes = crate::volume::usage(&self.store, &i.name);
            }
        }
        let before = sample(infos);
        if before.iter().all(Option::is_none) {
            return;
        }
        let t0 = std::time::Instant::now();
        std::thread::sleep(CPU_WINDOW);
        let after = sample(infos);
        let window = t0.elapsed().as_micros().max(1) as f64;
        for ((info, b), a) in infos.iter_mut().zip(before).zip(after) {
            if let (Some(b), Some(a)) = (b, a) {
                info.cpu_percent = Some(a.saturating_sub(b) as f64 * 100.0 / window);
            }
        }
    }

    /// Ends the background boot of an instance `start_many_serving`
    /// started (see [`Launcher::foreground`]), with its limits as they are
    /// now (a `nifty set` meanwhile is not undone). Nothing for one not in
    /// the background (a restarted `serve` asks of every running one).
    pub fn foreground(&self, inst: &Instance) -> Result<()> {
        if !self.of(inst)?.in_background(inst) {
            return Ok(());
        }
        let _lock = linux::proc::lock(&self.store.instance_dir(&inst.name))?;
        let now = self.store.instance(&inst.name)?;
        self.of(&now)?.foreground(&now)
    }

    /// `nifty set`: new limits for an instance, running or stopped,
    /// applied by its backend (at once where it runs), then recorded.
    /// Returns what takes effect only at its next start.
    pub fn set_limits(
        &self,
        inst: &Instance,
        limits: &crate::limits::Limits,
    ) -> Result<Vec<&'static str>> {
        let _lock = linux::proc::lock(&self.store.instance_dir(&inst.name))?;
        let mut next = self.store.instance(&inst.name)?;
        if limits.disk != next.limits.disk || limits.inodes != next.limits.inodes {
            if !next.disk_store {
                return Err(Error::Invalid(format!(
                    "instance {:?} was created with --disk unlimited: its files are not in the \
                     disk store, so its disk and inodes cannot be limited; recreate it with --disk",
                    inst.name
                )));
            }
            crate::volume::set_limit(&self.store, &next.name, limits.disk, limits.inodes)?;
        }
        next.limits = limits.clone();
        let later = self.of(&next)?.set_limits(&next)?;
        self.store.save_instance(&next)?;
        Ok(later)
    }

    /// Starts instances: each backend's group at once (native ones in
    /// parallel on the worker pool, systemd ones as queued jobs).
    pub fn start_many(&self, insts: &[Instance], done: Done<'_>) -> Results {
        self.start_all(insts, None, done)
    }

    /// [`Runtime::start_many`] at connections: `take` gives each
    /// instance's waiting connections to a start that serves them (see
    /// [`Launcher::start_many_serving`]); `done` serves what is left.
    pub fn start_many_serving(
        &self,
        insts: &[Instance],
        take: Take<'_>,
        done: Done<'_>,
    ) -> Results {
        self.start_all(insts, Some(take), done)
    }

    /// See [`Launcher::starts_settled`]: for `nifty serve`, once its queue
    /// of starts is empty (of the launchers in use only).
    pub fn starts_settled(&self) {
        self.native.starts_settled();
        if let Some(Ok(s)) = self.systemd.get() {
            s.starts_settled();
        }
    }

    fn start_all(&self, insts: &[Instance], take: Option<Take<'_>>, done: Done<'_>) -> Results {
        let mut out = Results::new();
        for (b, group) in Self::groups(insts) {
            out.extend(match (self.launcher(b), take) {
                (Ok(l), Some(take)) => l.start_many_serving(&group, take, done),
                (Ok(l), None) => l.start_many(&group, done),
                (Err(e), _) => fail(&group, &e),
            });
        }
        self.retire_previous_keys(insts, &out);
        in_order(insts, out)
    }

    /// An instance rekeyed while it ran serves its new key once started:
    /// its previous key is no longer trusted (dropped from the record and
    /// from the fleet's known_hosts).
    fn retire_previous_keys(&self, insts: &[Instance], out: &Results) {
        let started = |name: &str| out.iter().any(|(n, r)| n == name && r.is_ok());
        let mut changed = false;
        for i in insts.iter().filter(|i| i.host_key_previous.is_some()) {
            if !started(&i.name) {
                continue;
            }
            let _lock = linux::proc::lock(&self.store.instance_dir(&i.name));
            if let Ok(mut rec) = self.store.instance(&i.name) {
                rec.host_key_previous = None;
                changed |= self.store.save_instance(&rec).is_ok();
            }
        }
        if changed {
            if let Err(e) = crate::sshconfig::refresh_known_hosts(&self.store) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Stops instances of every backend at once (one thread per backend).
    pub fn stop_many(&self, insts: &[Instance], opts: StopOptions, done: Done<'_>) -> Results {
        let groups = Self::groups(insts);
        std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .iter()
                .map(|(b, group)| {
                    s.spawn(move || match self.launcher(*b) {
                        Ok(l) => l.stop_many(group, opts, done),
                        // A backend that is not here runs nothing.
                        Err(_) => group
                            .iter()
                            .map(|i| {
                                done(&i.name);
                                (i.name.clone(), Ok(()))
                            })
                            .collect(),
                    })
                })
                .collect();
            let out = handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect();
            in_order(insts, out)
        })
    }
}

/// `results` in the order of `insts`: backends answer by group and in the
/// order their jobs end, and callers pair results with what they asked.
fn in_order(insts: &[Instance], mut results: Results) -> Results {
    let rank: std::collections::HashMap<&str, usize> = insts
        .iter()
        .enumerate()
        .map(|(i, inst)| (inst.name.as_str(), i))
        .collect();
    results.sort_by_key(|(name, _)| rank.get(name.as_str()).copied().unwrap_or(usize::MAX));
    results
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
