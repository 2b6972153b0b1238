//! The few parts of systemd's D-Bus API nifty uses (org.freedesktop.systemd1),
//! shared by the systemd backend (units of instances) and the native
//! launcher (its delegated cgroup subtree on systemd hosts).

use std::path::Path;

use zbus::blocking::Connection;
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::{Error, Result};

/// Is PID 1 systemd? (`sd_booted()`: /run/systemd/system exists.)
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

pub fn dbus_err(what: impl std::fmt::Display) -> impl FnOnce(zbus::Error) -> Error {
    move |err| Error::Dbus {
        what: what.to_string(),
        err: Box::new(err),
    }
}

/// What to do when systemd cannot be reached on the system bus.
fn unreachable(e: impl std::fmt::Display) -> Error {
    Error::Host(format!(
        "cannot reach systemd on the system bus: {e}; is dbus running? \
         (apt-get install dbus)"
    ))
}

/// Connects to systemd through the system bus.
pub fn connect() -> Result<Connection> {
    zbus::blocking::connection::Builder::system()
        .and_then(|b| b.max_queued(1 << 20).build())
        .map_err(unreachable)
}

/// The system bus's socket, where a caller that connects later (on first
/// use) checks for it first: there is none where dbus is not installed
/// or not running. Its address from `DBUS_SYSTEM_BUS_ADDRESS` is taken on
/// trust (the connection says what is wrong with it).
pub fn check_system_bus() -> Result<()> {
    const SOCKET: &str = "/run/dbus/system_bus_socket";
    if std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_some() {
        return Ok(());
    }
    match std::fs::symlink_metadata(SOCKET) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => Ok(()),
        Ok(_) => Err(unreachable(format!("{SOCKET} is not a socket"))),
        Err(e) => Err(unreachable(format!("{SOCKET}: {e}"))),
    }
}

/// Properties of a transient unit, as `StartTransientUnit` takes them.
pub type Properties<'a> = Vec<(&'a str, Value<'a>)>;

/// One row of `ListUnitsByPatterns`.
pub type UnitRow = (
    String,          // name
    String,          // description
    String,          // load state
    String,          // active state
    String,          // sub state
    String,          // following
    OwnedObjectPath, // unit object
    u32,             // job id
    String,          // job type
    OwnedObjectPath, // job object
);

/// A change to unit files: (kind "symlink"/"unlink", file, destination).
pub type Change = (String, String, String);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_async = false
)]
pub trait Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<UnitRow>>;
    fn reload(&self) -> zbus::Result<()>;
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Value<'_>)],
    ) -> zbus::Result<()>;
    fn subscribe(&self) -> zbus::Result<()>;
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<Change>)>;
    fn disable_unit_files(&self, files: &[&str], runtime: bool) -> zbus::Result<Vec<Change>>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_async = false
)]
pub trait Unit {
    #[zbus(property)]
    fn unit_file_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1",
    gen_async = false
)]
pub trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn control_group(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn memory_current(&self) -> zbus::Result<u64>;
}
