//! The systemd backend: the article's path, done right. Every instance is
//! `nifty@NAME.service`, one template unit whose ExecStart runs
//! systemd-nspawn on the instance's root; nifty talks to systemd over D-Bus
//! (start, stop and kill of a thousand units are a thousand queued jobs,
//! not a thousand `systemctl` processes) and reads state back from it.

mod exec;
mod jobs;
mod stop;
pub mod unit;

pub use exec::exec_nspawn;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use zbus::blocking::Connection;
use zbus::zvariant::OwnedObjectPath;

use self::unit::Names;
pub use super::dbus::booted;
use super::dbus::{self, connect, dbus_err, ManagerProxy, ServiceProxy, UnitProxy};
use super::linux::cgroup::{procs_under, Hierarchy};
use super::linux::proc::find_init;
use super::{Info, StopOptions};
use crate::store::{Backend, Instance, Store};
use crate::{Error, Result};

/// Where unit files go: the administrator's directory, so that `enable`
/// survives a reboot.
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// systemd-nspawn on the PATH (or in /usr/bin).
pub fn nspawn_path() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("systemd-nspawn"))
        .find(|p| p.is_file())
}

/// Can this host run the systemd backend? Returns systemd-nspawn's path,
/// or says what is missing and what to do.
pub fn check_host() -> Result<PathBuf> {
    if !booted() {
        let pid1 = std::fs::read_to_string("/proc/1/comm")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        return Err(Error::Host(format!(
            "the systemd backend needs systemd as PID 1, and PID 1 here is {pid1:?} \
             (/run/systemd/system is missing); use --backend native, nifty's own launcher"
        )));
    }
    nspawn_path().ok_or_else(|| {
        Error::Host(
            "systemd-nspawn is not installed: apt-get install systemd-container \
             (or use --backend native)"
                .into(),
        )
    })
}

/// The unit `nifty systemd install` writes for `nifty serve` of `store`
/// (`nifty.service`, `nifty-<hash>.service` for another root).
pub fn serve_unit(store: &Store) -> String {
    Names {
        prefix: store.cgroup_name(),
    }
    .serve_service()
}

/// The template unit of `store` for a nifty binary and systemd-nspawn at
/// the given paths, without asking systemd anything (packaging: `make
/// install`, `make deb`).
pub fn render_unit(store: &Store, nifty: &Path, nspawn: &Path) -> String {
    unit::template(&unit::TemplateSpec {
        names: &Names {
            prefix: store.cgroup_name(),
        },
        nifty,
        root: store.root(),
        nspawn,
        register: false,
    })
}

/// The systemd backend of one store.
pub struct Systemd {
    store: Store,
    names: Names,
    nspawn: PathBuf,
    /// The system bus, connected at the first call to systemd: a session's
    /// way into a running instance needs none.
    conn: std::sync::OnceLock<Connection>,
    hierarchy: Hierarchy,
    /// Subscribe() is once per connection.
    subscribed: std::sync::OnceLock<()>,
}

impl Systemd {
    /// The backend (connected to systemd at its first call); fails with
    /// what to do when the host cannot run it.
    pub fn new(store: &Store, hierarchy: Hierarchy) -> Result<Systemd> {
        let nspawn = check_host()?;
        dbus::check_system_bus()?;
        Ok(Systemd {
            store: store.clone(),
            names: Names {
                prefix: store.cgroup_name(),
            },
            nspawn,
            conn: std::sync::OnceLock::new(),
            hierarchy,
            subscribed: std::sync::OnceLock::new(),
        })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The connection to systemd, made on first use.
    fn conn(&self) -> Result<&Connection> {
        if let Some(c) = self.conn.get() {
            return Ok(c);
        }
        let c = connect()?;
        Ok(self.conn.get_or_init(|| c))
    }

    fn manager(&self) -> Result<ManagerProxy<'_>> {
        ManagerProxy::new(self.conn()?).map_err(dbus_err("org.freedesktop.systemd1.Manager"))
    }

    /// Path of the template unit file.
    pub fn template_path(&self) -> PathBuf {
        Path::new(UNIT_DIR).join(self.names.template())
    }

    /// Directory of an instance's drop-ins.
    pub fn dropin_dir(&self, name: &str) -> PathBuf {
        Path::new(UNIT_DIR).join(format!("{}.d", self.names.unit(name)))
    }

    /// nifty's own binary, as the units name it.
    fn nifty_path(&self) -> Result<PathBuf> {
        let exe = crate::sys::exe_path()
            .map_err(|e| Error::Host(format!("cannot find nifty's own binary: {e}")))?;
        // A binary replaced while running reads as "<path> (deleted)": the
        // unit must name the path, where the new one is.
        Ok(PathBuf::from(
            exe.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        ))
    }

    /// The template unit as nifty would write it now.
    pub fn render_template(&self) -> Result<String> {
        Ok(render_unit(&self.store, &self.nifty_path()?, &self.nspawn))
    }

    /// Every unit file of this store nifty writes, by path: the template
    /// unit, the socket and session templates of on-demand instances, the
    /// idle sweep and its timer, and `nifty serve`'s service.
    fn unit_files(&self) -> Result<Vec<(PathBuf, String)>> {
        let main = self.render_template()?;
        let exe = self.nifty_path()?;
        let extra = unit::on_demand_units(&unit::TemplateSpec {
            names: &self.names,
            nifty: &exe,
            root: self.store.root(),
            nspawn: &self.nspawn,
            register: false,
        });
        Ok(std::iter::once((self.template_path(), main))
            .chain(
                extra
                    .into_iter()
                    .map(|(name, text)| (Path::new(UNIT_DIR).join(name), text)),
            )
            .collect())
    }

    /// Writes the unit files that are missing or differ; tells whether any
    /// changed (and systemd must reload).
    fn write_template(&self) -> Result<bool> {
        let mut changed = false;
        for (path, text) in self.unit_files()? {
            if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
                continue;
            }
            std::fs::create_dir_all(UNIT_DIR).map_err(Error::io("create", UNIT_DIR))?;
            write_unit_file(&path, &text)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Directory of an on-demand instance's socket drop-ins.
    pub fn socket_dropin_dir(&self, name: &str) -> PathBuf {
        Path::new(UNIT_DIR).join(format!("{}.d", self.names.socket(name)))
    }

    /// On-demand instances get their port held by systemd (`on`): a socket
    /// drop-in with the port, the socket enabled (it listens after a
    /// reboot) and started, the idle sweep's timer too. Off: the sockets
    /// are stopped and forgotten.
    pub fn hold_ports(&self, insts: &[&Instance], on: bool) -> Result<()> {
        if insts.is_empty() {
            return Ok(());
        }
        let sockets: Vec<String> = insts.iter().map(|i| self.names.socket(&i.name)).collect();
        let refs: Vec<&str> = sockets.iter().map(String::as_str).collect();
        let m = self.manager()?;
        if !on {
            for s in &sockets {
                // Not loaded or not running is fine.
                let _ = m.stop_unit(s, "replace");
            }
            let _ = m.disable_unit_files(&refs, false);
            for i in insts {
                remove_dir(&self.socket_dropin_dir(&i.name))?;
            }
            return self.reload();
        }
        let mut changed = self.write_template()?;
        for i in insts {
            let dir = self.socket_dropin_dir(&i.name);
            let path = dir.join("50-nifty.conf");
            let text = unit::socket_dropin(&i.name, i.port);
            if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
                continue;
            }
            std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
            write_unit_file(&path, &text)?;
            changed = true;
        }
        let timer = self.names.sweep_timer();
        let mut all = refs.clone();
        all.push(&timer);
        // Enabling makes links only: one reload then takes up the links
        // and the drop-ins, and none is needed when neither changed.
        let (_, links) = m
            .enable_unit_files(&all, false, true)
            .map_err(dbus_err(format!("EnableUnitFiles({})", all.join(" "))))?;
        if changed || !links.is_empty() {
            self.reload()?;
        }
        for s in all {
            m.start_unit(s, "replace")
                .map_err(dbus_err(format!("StartUnit({s})")))?;
        }
        Ok(())
    }

    /// Names of the instances whose units may have a container (one call).
    pub fn running_names(&self) -> Vec<String> {
        self.unit_states()
            .map(|st| {
                st.into_iter()
                    .filter(|(_, (s, _))| may_run(s))
                    .map(|(n, _)| n)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes an instance's drop-in if it is missing or differs.
    fn write_dropin(&self, inst: &Instance) -> Result<bool> {
        let dir = self.dropin_dir(&inst.name);
        let path = dir.join("50-nifty.conf");
        let text = unit::dropin(&inst.name, &inst.limits);
        if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
            return Ok(false);
        }
        std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        write_unit_file(&path, &text)?;
        Ok(true)
    }

    /// `nifty systemd install`: writes the template unit and reloads
    /// systemd if it changed. Returns whether it changed.
    pub fn install(&self) -> Result<bool> {
        let changed = self.write_template()?;
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// `nifty systemd uninstall`: removes the template unit (refused while
    /// instances of this store still use the systemd backend).
    pub fn uninstall(&self) -> Result<bool> {
        let users: Vec<String> = self
            .store
            .instance_names()?
            .into_iter()
            .filter(|n| {
                self.store
                    .instance(n)
                    .is_ok_and(|i| i.backend == Backend::Systemd)
            })
            .collect();
        if !users.is_empty() {
            return Err(Error::Invalid(format!(
                "{} instance(s) still use the systemd backend ({}); remove them first (`nifty rm -f`)",
                users.len(),
                crate::fleet::name_list(&users),
            )));
        }
        // The sweep's timer and `nifty serve`'s service, if they run or
        // are enabled, end with their files.
        let m = self.manager()?;
        let services = [self.names.sweep_timer(), self.names.serve_service()];
        for u in &services {
            let _ = m.stop_unit(u, "replace");
        }
        let refs: Vec<&str> = services.iter().map(String::as_str).collect();
        let _ = m.disable_unit_files(&refs, false);
        self.unpin_steering()?;
        let mut removed = false;
        for (path, _) in self.unit_files()? {
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &path)(e)),
            }
        }
        if removed {
            self.reload()?;
        }
        Ok(removed)
    }

    /// `systemctl daemon-reload`.
    pub fn reload(&self) -> Result<()> {
        self.manager()?
            .reload()
            .map_err(dbus_err("Reload (daemon-reload)"))
    }

    /// Prepares the unit files of new instances: the template if needed,
    /// one drop-in each; reloads systemd once if anything changed.
    pub fn prepare(&self, insts: &[&Instance]) -> Result<()> {
        for inst in insts {
            check_machine_name(&inst.name)?;
        }
        let mut changed = self.write_template()?;
        for inst in insts {
            changed |= self.write_dropin(inst)?;
        }
        if changed {
            self.reload()?;
        }
        Ok(())
    }

    /// Removes the drop-ins of removed instances (and their boot links).
    pub fn forget(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut units: Vec<String> = names.iter().map(|n| self.names.unit(n)).collect();
        let m = self.manager()?;
        for n in names {
            // An on-demand instance's socket lets go of its port.
            if self.socket_dropin_dir(n).exists() {
                let _ = m.stop_unit(&self.names.socket(n), "replace");
                units.push(self.names.socket(n));
            }
        }
        let refs: Vec<&str> = units.iter().map(String::as_str).collect();
        // Not enabled is fine: DisableUnitFiles only removes what exists.
        let _ = m.disable_unit_files(&refs, false);
        for n in names {
            remove_dir(&self.dropin_dir(n))?;
            remove_dir(&self.socket_dropin_dir(n))?;
        }
        // The last on-demand instance gone, so is the steering of their
        // logins (pinned in bpffs: see `serve::direct`). The store's
        // records are read only if there is one.
        if self.pinned_steering().is_some_and(|d| d.exists()) {
            let on_demand_left = self.store.instance_names()?.iter().any(|n| {
                self.store
                    .instance(n)
                    .is_ok_and(|i| i.backend == Backend::Systemd && i.on_demand.is_some())
            });
            if !on_demand_left {
                self.unpin_steering()?;
            }
        }
        self.reload()
    }

    /// Where the store's steering is pinned (`None`: no bpffs).
    fn pinned_steering(&self) -> Option<PathBuf> {
        crate::runtime::linux::steer::pin_dir(&self.store.cgroup_name())
    }

    /// Removes the store's pinned steering, if there is one.
    fn unpin_steering(&self) -> Result<()> {
        match self.pinned_steering() {
            Some(dir) => crate::runtime::linux::steer::unpin(&dir)
                .map_err(Error::io("remove the pinned steering", &dir)),
            None => Ok(()),
        }
    }

    /// Active state of every loaded unit of this store, by instance name.
    fn unit_states(&self) -> Result<HashMap<String, (String, OwnedObjectPath)>> {
        let rows = self
            .manager()?
            .list_units_by_patterns(&[], &[&self.names.pattern()])
            .map_err(dbus_err("ListUnitsByPatterns"))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some((self.names.instance_of(&r.0)?, (r.3, r.6))))
            .collect())
    }

    /// The object of an instance's unit (loading it if needed).
    fn unit_path(&self, inst: &Instance) -> Option<OwnedObjectPath> {
        self.manager()
            .ok()?
            .load_unit(&self.names.unit(&inst.name))
            .ok()
    }

    /// An interface (`ServiceProxy`, `UnitProxy`) of a unit object,
    /// uncached: systemd changes its properties under us.
    fn proxy<'a, P>(&'a self, path: &OwnedObjectPath) -> Option<P>
    where
        P: From<zbus::Proxy<'a>> + zbus::proxy::Defaults,
    {
        zbus::blocking::proxy::Builder::<P>::new(self.conn().ok()?)
            .path(path.clone())
            .ok()?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .ok()
    }

    /// The unit's cgroup and the container's init in it.
    fn init_of(&self, unit_path: &OwnedObjectPath) -> Option<(String, i32)> {
        let cg = self
            .proxy::<ServiceProxy>(unit_path)?
            .control_group()
            .ok()?;
        if cg.is_empty() {
            return None;
        }
        let pid = find_init(&procs_under(
            &self.hierarchy.v2.join(cg.trim_start_matches('/')),
        ))?;
        Some((cg, pid))
    }

    /// The PID (on the host) of a running instance's init: found in the
    /// cgroup where its unit runs (`SLICE/<unit>`, systemd names a
    /// unit's cgroup after it), or, if it is not there (a drop-in moved
    /// the unit elsewhere, or it is stopped), where systemd says.
    pub fn init_pid(&self, inst: &Instance) -> Option<i32> {
        let dir = self
            .hierarchy
            .v2
            .join(unit::SLICE)
            .join(self.names.unit(&inst.name));
        find_init(&procs_under(&dir))
            .or_else(|| self.init_of(&self.unit_path(inst)?).map(|(_, pid)| pid))
    }

    /// Where a running instance lives: its init and its v2 cgroup (the
    /// one init itself is in).
    pub fn target(&self, inst: &Instance) -> Result<super::Target> {
        let pid = self
            .init_pid(inst)
            .ok_or_else(|| Error::NotRunning(inst.name.clone()))?;
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(Error::io("read", format!("/proc/{pid}/cgroup")))?;
        let v2 = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| Error::NotRunning(inst.name.clone()))?;
        Ok(super::Target {
            pid,
            procs_files: vec![self
                .hierarchy
                .v2
                .join(v2.trim_start_matches('/'))
                .join("cgroup.procs")],
        })
    }

    /// The directory of a cgroup systemd names (`/machine.slice/...`).
    pub fn cgroup_dir(&self, cg: &str) -> PathBuf {
        self.hierarchy.v2.join(cg.trim_start_matches('/'))
    }

    /// The unit's cgroup path (as systemd names it), if it has one.
    pub fn cgroup_path(&self, inst: &Instance) -> Option<String> {
        self.init_of(&self.unit_path(inst)?).map(|(cg, _)| cg)
    }

    /// What systemd says about these instances (one call for the states,
    /// one more per running instance).
    pub fn infos(&self, insts: &[&Instance]) -> Vec<Info> {
        self.running(insts)
            .into_iter()
            .zip(insts)
            .map(|(running, inst)| {
                let (pid, memory) = match &running {
                    Some((path, (cg, pid))) => (Some(*pid), self.memory(path, cg)),
                    None => (None, None),
                };
                Info::new(inst, pid, memory)
            })
            .collect()
    }

    /// Whether each runs, and its init: [`Systemd::infos`] without the
    /// call per running instance for its memory.
    pub fn states(&self, insts: &[&Instance]) -> Vec<(super::State, Option<i32>)> {
        self.running(insts)
            .into_iter()
            .map(|running| match running {
                Some((_, (_, pid))) => (super::State::Running, Some(pid)),
                None => (super::State::Stopped, None),
            })
            .collect()
    }

    /// The unit, cgroup and init of each of these instances that runs.
    fn running(&self, insts: &[&Instance]) -> Vec<Option<Running>> {
        let states = self.unit_states().unwrap_or_else(|e| {
            // Say so rather than show running containers as stopped.
            tracing::warn!("{e}: systemd instances are shown as stopped");
            HashMap::new()
        });
        insts
            .iter()
            .map(|inst| {
                states
                    .get(&inst.name)
                    .filter(|(s, _)| may_run(s))
                    .and_then(|(_, p)| Some((p.clone(), self.init_of(p)?)))
            })
            .collect()
    }

    fn memory(&self, path: &OwnedObjectPath, cg: &str) -> Option<u64> {
        match self.proxy::<ServiceProxy>(path)?.memory_current() {
            Ok(m) if m != u64::MAX => Some(m),
            _ => {
                let v1 = self.hierarchy.v1_memory.as_ref()?;
                std::fs::read_to_string(
                    v1.join(cg.trim_start_matches('/'))
                        .join("memory.usage_in_bytes"),
                )
                .ok()?
                .trim()
                .parse()
                .ok()
            }
        }
    }

    /// The unit's main process (systemd-nspawn), while it runs.
    pub fn main_pid(&self, inst: &Instance) -> Option<u32> {
        self.proxy::<ServiceProxy>(&self.unit_path(inst)?)?
            .main_pid()
            .ok()
            .filter(|p| *p != 0)
    }

    /// Whether an instance starts at boot (`enabled`, `disabled`, ...).
    /// Is the instance's unit active (or on its way up or down)?
    fn unit_active(&self, inst: &Instance) -> bool {
        self.unit_path(inst)
            .and_then(|p| self.proxy::<UnitProxy>(&p))
            .and_then(|u| u.active_state().ok())
            .is_some_and(|s| may_run(&s) || s == "activating")
    }

    pub fn unit_file_state(&self, inst: &Instance) -> Option<String> {
        self.proxy::<UnitProxy>(&self.unit_path(inst)?)?
            .unit_file_state()
            .ok()
    }

    /// `nifty enable`: the instances start at boot (multi-user.target
    /// wants them).
    pub fn enable(&self, insts: &[&Instance]) -> Result<Vec<dbus::Change>> {
        self.prepare(insts)?;
        let units: Vec<String> = insts.iter().map(|i| self.names.unit(&i.name)).collect();
        let refs: Vec<&str> = units.iter().map(String::as_str).collect();
        let (_, changes) = self
            .manager()?
            .enable_unit_files(&refs, false, false)
            .map_err(dbus_err(format!("EnableUnitFiles({})", units.join(" "))))?;
        self.reload()?;
        Ok(changes)
    }

    /// `nifty disable`.
    pub fn disable(&self, insts: &[&Instance]) -> Result<Vec<dbus::Change>> {
        let units: Vec<String> = insts.iter().map(|i| self.names.unit(&i.name)).collect();
        let refs: Vec<&str> = units.iter().map(String::as_str).collect();
        let changes = self
            .manager()?
            .disable_unit_files(&refs, false)
            .map_err(dbus_err(format!("DisableUnitFiles({})", units.join(" "))))?;
        self.reload()?;
        Ok(changes)
    }
}

/// The systemd backend behind the runtime's door.
impl super::Launcher for Systemd {
    fn infos(&self, insts: &[&Instance]) -> Vec<Info> {
        Systemd::infos(self, insts)
    }

    fn states(&self, insts: &[&Instance]) -> Vec<(super::State, Option<i32>)> {
        Systemd::states(self, insts)
    }

    fn start_many(&self, insts: &[&Instance], done: super::Done<'_>) -> super::Results {
        Systemd::start_many(self, insts, done)
    }

    fn stop_many(
        &self,
        insts: &[&Instance],
        opts: super::StopOptions,
        done: super::Done<'_>,
    ) -> super::Results {
        Systemd::stop_many(self, insts, opts, done)
    }

    fn target(&self, inst: &Instance) -> Result<super::Target> {
        Systemd::target(self, inst)
    }

    fn processes(&self, inst: &Instance) -> (String, Vec<i32>) {
        match self.cgroup_path(inst) {
            Some(cg) => {
                let pids = procs_under(&self.cgroup_dir(&cg));
                (cg, pids)
            }
            None => ("-".into(), Vec::new()),
        }
    }

    fn unit(&self, inst: &Instance) -> Option<super::UnitStatus> {
        Some(super::UnitStatus {
            main_pid: self.main_pid(inst),
            name: self.names.unit(&inst.name),
            file: self.template_path().display().to_string(),
            enabled: self
                .unit_file_state(inst)
                .unwrap_or_else(|| "unknown".into()),
        })
    }

    fn check_create(&self, names: &[String], binds: &[String]) -> Result<()> {
        for n in names {
            check_machine_name(n)?;
        }
        for b in binds {
            if b.chars().any(char::is_whitespace) {
                return Err(Error::Invalid(format!(
                    "--bind-ro {b:?}: systemd-nspawn cannot take a path with spaces"
                )));
            }
        }
        Ok(())
    }

    fn register(&self, insts: &[&Instance]) -> Result<()> {
        self.prepare(insts)?;
        let on_demand: Vec<&Instance> = insts
            .iter()
            .copied()
            .filter(|i| i.on_demand.is_some())
            .collect();
        self.hold_ports(&on_demand, true)
    }

    fn hold_ports(&self, insts: &[&Instance], on: bool) -> Result<()> {
        Systemd::hold_ports(self, insts, on)
    }

    fn served_by_serve(&self) -> bool {
        // Its socket units hold the ports.
        false
    }

    fn hold_ports_hint(&self, inst: &Instance) -> String {
        format!(
            "start its socket: `systemctl start {}`",
            self.names.socket(&inst.name)
        )
    }

    fn running_names(&self) -> Vec<String> {
        Systemd::running_names(self)
    }

    fn release(&self, inst: &Instance) -> Result<()> {
        // systemd ends what runs in the unit's cgroup at stop; `rm` asked
        // the state first (a running unit is refused or stopped). An
        // on-demand instance's socket goes first, so that no connection
        // starts it again while it is removed.
        if inst.on_demand.is_some() {
            let _ = self
                .manager()?
                .stop_unit(&self.names.socket(&inst.name), "replace");
            if self.unit_active(inst) {
                return Err(Error::Running(inst.name.clone(), ""));
            }
        }
        Ok(())
    }

    fn forget(&self, names: &[String]) -> Result<()> {
        Systemd::forget(self, names)
    }

    fn launched_as(&self, inst: &Instance) -> String {
        format!(" as {}", self.names.unit(&inst.name))
    }

    fn enable(&self, insts: &[&Instance], on: bool) -> Result<Vec<dbus::Change>> {
        if on {
            Systemd::enable(self, insts)
        } else {
            self.disable(insts)
        }
    }

    fn set_limits(&self, inst: &Instance) -> Result<Vec<&'static str>> {
        // The drop-in keeps them; a running unit gets them at once.
        if self.write_dropin(inst)? {
            self.reload()?;
        }
        let unit = self.names.unit(&inst.name);
        if self.unit_active(inst) {
            let props = unit::live_properties(&inst.limits);
            let props: Vec<(&str, zbus::zvariant::Value<'_>)> = props
                .iter()
                .map(|(k, v)| (*k, zbus::zvariant::Value::from(*v)))
                .collect();
            self.manager()?
                .set_unit_properties(&unit, true, &props)
                .map_err(dbus_err(format!("SetUnitProperties({unit})")))?;
        }
        Ok(Vec::new())
    }

    fn cpu_usage_us(&self, inst: &Instance) -> Option<u64> {
        super::linux::cgroup::cpu_usage_usec(&self.cgroup_dir(&self.cgroup_path(inst)?))
    }

    fn reap_orphans(&self, _: &[String]) -> super::Results {
        // A unit outlives no instance: `rm` stops it first.
        Vec::new()
    }
}

/// Where systemd is not PID 1 (a state root moved to such a host, say),
/// nothing of an instance of this backend runs, and `forget` cannot ask
/// systemd: the instances' drop-ins and boot links are removed as the
/// files they are.
pub fn forget_offline(store: &Store, names: &[String]) -> Result<()> {
    let n = Names {
        prefix: store.cgroup_name(),
    };
    for name in names {
        for (unit, wants) in [
            (n.unit(name), "multi-user.target.wants"),
            (n.socket(name), "sockets.target.wants"),
        ] {
            remove_dir(&Path::new(UNIT_DIR).join(format!("{unit}.d")))?;
            let link = Path::new(UNIT_DIR).join(wants).join(&unit);
            if link.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
                std::fs::remove_file(&link).map_err(Error::io("remove", &link))?;
            }
        }
    }
    Ok(())
}

/// Removes a drop-in directory; a missing one is fine.
fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", dir)(e)),
        _ => Ok(()),
    }
}

fn write_unit_file(path: &Path, text: &str) -> Result<()> {
    crate::store::write_atomic(path, text.as_bytes(), 0o644)
}

/// Does a unit in this ActiveState have a container to look for? Active,
/// reloading or on its way down (its init may still run: `list` shows it
/// running until it is gone); not while activating (nspawn has not made
/// the container yet), inactive or failed.
/// A running instance's unit, and its cgroup and init (`init_of`).
type Running = (OwnedObjectPath, (String, i32));

fn may_run(active_state: &str) -> bool {
    matches!(active_state, "active" | "reloading" | "deactivating")
}

/// The machine name `nifty<name>` must be a valid hostname: systemd
/// refuses `_` there.
pub fn check_machine_name(name: &str) -> Result<()> {
    if name.contains('_') {
        return Err(Error::Invalid(format!(
            "invalid instance name {name:?} for the systemd backend: its machine name \
             nifty{name} must be a hostname (letters, digits and '-'); try {:?}",
            name.replace('_', "-")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::may_run;

    #[test]
    fn unit_states_map_to_a_container_to_look_for() {
        for s in ["active", "reloading", "deactivating"] {
            assert!(may_run(s), "{s}");
        }
        for s in [
            "inactive",
            "failed",
            "activating",
            "maintenance",
            "refreshing",
            "",
        ] {
            assert!(!may_run(s), "{s}");
        }
    }
}
