//! On a host whose PID 1 is systemd, the native launcher's cgroups live in
//! a subtree that systemd delegated to nifty, never beside systemd's own:
//! one transient scope per state root, `nifty.slice/<store>.scope`, made
//! with `Delegate=yes` (systemd's rule for any other manager of cgroups:
//! <https://systemd.io/CGROUP_DELEGATION>). So `systemctl status
//! nifty.scope`, `systemd-cgls` and `systemd-cgtop` show the fleet, systemd
//! sets the fleet's memory limit itself (`MemoryMax=`), and systemd never
//! moves or removes what nifty made inside.
//!
//! A scope needs a process to be made: the `nifty start` that finds no
//! active scope asks for one with its own PID, then moves itself into a
//! leaf of its own (`.nifty`: the no-internal-process rule of cgroup v2
//! wants the scope's own cgroup empty before its controllers are handed
//! down). The containers' cgroups are made beside that leaf. When the last
//! container stops and nifty is gone, the scope is empty and systemd ends
//! it and removes it, with everything under it: nothing to clean up. nifty
//! then leaves the stopped containers' groups to systemd's removal rather
//! than racing it (`Cgroup::remove`).

use std::path::Path;
use std::time::{Duration, Instant};

use zbus::zvariant::Value;

use super::dbus::{self, ManagerProxy, UnitProxy};
use crate::{Error, Result};

/// The slice that holds the fleets of every state root.
pub const SLICE: &str = "nifty.slice";
/// The leaf of the scope where the process that made it waits.
pub const LEAF: &str = ".nifty";

/// The scope unit of a store whose cgroup name is `store`.
pub fn unit(store: &str) -> String {
    format!("{store}.scope")
}

/// The store's cgroup path, relative to the cgroup v2 mount.
pub fn base(store: &str) -> String {
    format!("{SLICE}/{}", unit(store))
}

/// Makes sure the scope of store `store` is active (made with this process
/// in it if it was not), and that its controllers reach the containers'
/// cgroups. `v2` is the cgroup v2 mount; `memory_max` the fleet's limit.
pub fn ensure(v2: &Path, store: &str, root: &Path, memory_max: Option<u64>) -> Result<()> {
    let unit = unit(store);
    let conn = dbus::connect()?;
    let manager = ManagerProxy::new(&conn).map_err(dbus::dbus_err("Manager"))?;
    let begin = Instant::now();
    let end = begin + Duration::from_secs(30);
    let scope = v2.join(SLICE).join(&unit);
    loop {
        match state(&conn, &manager, &unit) {
            // Active but with no process left: its last container just
            // stopped, and systemd is about to end it and remove its tree
            // (the stopped containers' groups with it: see
            // `Cgroup::remove`). A container started in it now would be
            // left in the cgroup of an ended unit: wait for the end, and
            // make a new one. (Only so long: a systemd that does not end
            // it is used as it is.)
            Some(s)
                if s == "active"
                    && populated(&scope) == Some(false)
                    && begin.elapsed() < Duration::from_secs(5) => {}
            Some(s) if s == "active" => return Ok(()),
            // Being made by another nifty, or ending as its last container
            // went: wait for either to finish.
            Some(s) if s == "activating" || s == "deactivating" => {}
            _ => {
                let pid = std::process::id();
                let mut props: dbus::Properties<'_> = vec![
                    (
                        "Description",
                        Value::from(format!("nifty fleet of {}", root.display())),
                    ),
                    ("Slice", Value::from(SLICE)),
                    ("Delegate", Value::from(true)),
                    ("PIDs", Value::from(vec![pid])),
                    // The fleet's tasks are limited per container; systemd's
                    // default for a unit (15% of pid_max) would cap a fleet
                    // of a few thousand.
                    ("TasksMax", Value::from(u64::MAX)),
                ];
                if let Some(m) = memory_max {
                    props.push(("MemoryMax", Value::from(m)));
                }
                match manager.start_transient_unit(&unit, "fail", &props, &[]) {
                    Ok(_) => return settle(v2, &unit, end),
                    // Made by another nifty meanwhile, or still loaded
                    // while it ends: look again.
                    Err(zbus::Error::MethodError(name, _, _))
                        if name.as_str().ends_with("UnitExists") => {}
                    Err(e) => {
                        return Err(Error::Host(format!(
                            "systemd refused the scope {unit} that holds nifty's containers \
                             (StartTransientUnit: {e}); see `journalctl -u {unit}`"
                        )))
                    }
                }
            }
        }
        if Instant::now() > end {
            return Err(Error::Host(format!(
                "the scope {unit} that holds nifty's containers did not become active in 30 s; \
                 see `systemctl status {unit}`"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the cgroup `dir` or one below it holds a process (`None`: no
/// such cgroup, or it cannot be read).
pub fn populated(dir: &Path) -> Option<bool> {
    let events = super::proc::read_kernel_file(&dir.join("cgroup.events"))?;
    events
        .lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v != "0")
}

/// The unit's ActiveState, or `None` if systemd has no such unit loaded.
fn state(conn: &zbus::blocking::Connection, m: &ManagerProxy<'_>, unit: &str) -> Option<String> {
    let path = m.get_unit(unit).ok()?;
    UnitProxy::builder(conn)
        .path(path)
        .ok()?
        .build()
        .ok()?
        .active_state()
        .ok()
}

/// After systemd made the scope with this process in it: moves this
/// process to the scope's leaf and hands the controllers down.
fn settle(v2: &Path, unit: &str, end: Instant) -> Result<()> {
    let scope = v2.join(SLICE).join(unit);
    let want = format!("0::/{SLICE}/{unit}");
    while !std::fs::read_to_string("/proc/self/cgroup").is_ok_and(|s| s.lines().any(|l| l == want))
    {
        if Instant::now() > end {
            return Err(Error::Host(format!(
                "systemd made the scope {unit} but did not move nifty into it"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let leaf = scope.join(LEAF);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::Sys {
                call: format!("mkdir({})", leaf.display()),
                err: e,
            })
        }
    }
    let procs = leaf.join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(|e| Error::Sys {
        call: format!("write({}, \"0\")", procs.display()),
        err: e,
    })?;
    Ok(())
}
