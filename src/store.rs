//! On-disk layout, instance records and their creation.
//!
//! ```text
//! <root>/templates/<name>/{rootfs/,template.toml}   shared, read-only lower layers
//! <root>/instances/<name>/instance.toml             template, port, user, limits, backend
//! <root>/instances/<name>/{upper,work}/             the instance's own changes (no disk store)
//! <root>/instances/<name>/console.log               console output of its init (no disk store)
//! <root>/disk/<name>/{upper,work,console.log}        the same in the disk store (`--disk`)
//! <root>/ports/<port> -> <name>                     port claims (symlinks, O(1) and atomic)
//! <root>/keys/id_ed25519{,.pub}                     nifty's SSH client key pair
//! <run>/mnt                                          the one mount point every container
//!                                                    uses inside its own mount namespace
//! ```
//! Nothing here records whether an instance runs: the kernel does (see
//! [`crate::runtime`]).

use std::fs;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::claims::Claims;
pub use crate::disk::{write_atomic, write_file};
use crate::names::check_name;
use crate::{Error, Result};

/// Default state root.
pub const DEFAULT_ROOT: &str = "/var/lib/nifty";
/// Default runtime directory, used with the default state root.
pub const DEFAULT_RUN: &str = "/run/nifty";
/// First port of the article's scheme: instance N listens on 2200 + N.
pub const PORT_BASE: u16 = 2200;
/// Ports for non-numeric names are taken downwards from here (the article's
/// `nifty@slick` used 2100), so they never meet the numeric ones.
pub const POOL_TOP: u16 = 2199;
/// Lowest port the pool hands out.
pub const POOL_BOTTOM: u16 = 1025;

/// Which launcher runs an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// nifty's own launcher: namespaces, overlayfs and a cgroup, no helper process.
    Native,
    /// The article's path: `nifty@.service` running systemd-nspawn.
    Systemd,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Native => "native",
            Backend::Systemd => "systemd",
        })
    }
}

pub use crate::limits::Limits;

/// How an instance is confined (issue #5); each layer can be relaxed at
/// create time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    /// First host UID/GID of the instance's own range of 65536 IDs; its
    /// root is that host UID. `None`: container root is host root.
    pub uid_base: Option<u32>,
    /// Seccomp filter on.
    pub seccomp: bool,
    /// Capability bounding set reduced to what BusyBox and Dropbear need.
    pub drop_caps: bool,
}

impl Default for Security {
    /// What an instance record without a `[security]` table means.
    fn default() -> Self {
        Security {
            uid_base: None,
            seccomp: true,
            drop_caps: true,
        }
    }
}

/// An instance record's file as `stat` sees it: inode, modification time
/// (seconds, nanoseconds) and size. A save renames a new file in, so any
/// rewrite changes it.
pub type RecordStamp = (u64, i64, i64, u64);

/// `instance.toml`: everything nifty needs to boot an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub template: String,
    pub backend: Backend,
    pub port: u16,
    pub user: String,
    /// The instance's SSH host public key, OpenSSH format.
    pub host_key: String,
    /// After `rekey` while it ran: the key it still serves until its next
    /// start (trusted beside the new one until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_previous: Option<String>,
    pub created: String,
    pub limits: Limits,
    /// Host directories bound read-only into the container: `SRC:DST`.
    #[serde(default)]
    pub bind_ro: Vec<String>,
    #[serde(default)]
    pub security: Security,
    /// The version of its template it runs (1 for instances made before
    /// templates had versions).
    #[serde(default = "first_version")]
    pub template_version: u32,
    /// Its own files (upper and work directories) are in the disk store,
    /// a subvolume with its disk limit (see `volume`); else in its
    /// instance directory, unlimited.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_store: bool,
    /// Started by its first SSH connection and stopped when idle, by
    /// `nifty serve`, which holds its port (`create --on-demand`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<OnDemand>,
    /// Its network: the host's (the article's), or a namespace of its own
    /// with loopback only (on-demand instances, whose SSH port is held on
    /// the host side).
    #[serde(default, skip_serializing_if = "Network::is_host")]
    pub network: Network,
}

/// The network an instance runs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The host's network namespace, as in the article.
    #[default]
    Host,
    /// A network namespace of its own with loopback only.
    None,
}

impl Network {
    pub fn is_host(&self) -> bool {
        *self == Network::Host
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Network::Host => "host",
            Network::None => "none",
        })
    }
}

/// How an on-demand instance is run by `nifty serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnDemand {
    /// Seconds with no SSH session and no process of its users after
    /// which it is stopped (it starts again at the next connection).
    pub idle_timeout_secs: u64,
}

impl OnDemand {
    /// The default idle timeout: ten minutes.
    pub const DEFAULT_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

    /// Parses `--idle-timeout` (`90s`, `10m`, `1h 30m`, or seconds); zero
    /// is refused.
    pub fn parse_idle(s: &str) -> Result<OnDemand> {
        let t = s.trim();
        let d = match t.parse::<u64>() {
            Ok(secs) => std::time::Duration::from_secs(secs),
            Err(_) => humantime::parse_duration(t).map_err(|e| {
                Error::Invalid(format!(
                    "--idle-timeout {s:?}: {e}; give a duration such as 90s, 10m or 1h"
                ))
            })?,
        };
        if d.as_secs() == 0 {
            return Err(Error::Invalid(format!(
                "--idle-timeout {s:?}: an on-demand instance needs at least one second \
                 without sessions before it is stopped (default 10m)"
            )));
        }
        Ok(OnDemand {
            idle_timeout_secs: d.as_secs(),
        })
    }
}

fn first_version() -> u32 {
    1
}

/// `template.toml`: where a template came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub name: String,
    /// 1 for the first build of a name, one more for each build after.
    #[serde(default = "first_version")]
    pub version: u32,
    pub built: String,
    pub user: String,
    pub busybox: Source,
    pub dropbear: Source,
    #[serde(default)]
    pub extra: Vec<Source>,
    /// Shared libraries copied in, with the dynamic loader.
    #[serde(default)]
    pub libraries: Vec<String>,
    /// `copied`: zoneinfo is part of the template (see the README).
    pub zoneinfo: String,
    pub applets: usize,
    /// OpenSSH's sftp-server, for `sftp` and `scp` (none: built
    /// `--without-sftp`, or before nifty carried it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sftp_server: Option<Source>,
    /// OpenSSH's scp, for `scp -O`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scp: Option<Source>,
    /// `nifty import`: the image it came from (`path` says how it was
    /// given, `version` its reference, `sha256` its manifest's digest or
    /// the tarball's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<Source>,
}

/// One binary the template was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub path: String,
    pub version: String,
    pub sha256: String,
}

/// The state root and runtime directory of one nifty installation.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    run: PathBuf,
    /// Instance N listens on `port_base + N` (default [`PORT_BASE`]);
    /// other names take ports downwards from `port_base - 1`.
    port_base: u16,
}

impl Store {
    /// A store at `root` (default [`DEFAULT_ROOT`]). The runtime directory is
    /// [`DEFAULT_RUN`] for the default root and `<root>/run` otherwise, so
    /// that two roots never share runtime files.
    pub fn new(root: Option<PathBuf>) -> Store {
        match root {
            Some(r) if r != Path::new(DEFAULT_ROOT) => {
                let root = std::path::absolute(&r).unwrap_or(r);
                Store {
                    run: root.join("run"),
                    root,
                    port_base: PORT_BASE,
                }
            }
            _ => Store {
                root: DEFAULT_ROOT.into(),
                run: DEFAULT_RUN.into(),
                port_base: PORT_BASE,
            },
        }
    }

    /// The same store with numeric instances on `base + N` (`--port-base`).
    pub fn with_port_base(mut self, base: u16) -> Store {
        self.port_base = base;
        self
    }

    pub fn port_base(&self) -> u16 {
        self.port_base
    }

    /// The ports non-numeric names take, from the top down: below the
    /// numeric ones, as many as the default pool has (1025-2199).
    pub fn pool(&self) -> (u16, u16) {
        let top = self.port_base.saturating_sub(1).max(POOL_BOTTOM);
        let bottom = top.saturating_sub(POOL_TOP - POOL_BOTTOM).max(POOL_BOTTOM);
        (bottom, top)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `--root` option that names this store in a command line shown
    /// to the user: "" for the default root, else " --root DIR".
    pub fn root_flag(&self) -> String {
        if self.root == Path::new(DEFAULT_ROOT) {
            String::new()
        } else {
            format!(" --root {}", self.root.display())
        }
    }
    pub fn run_dir(&self) -> &Path {
        &self.run
    }
    pub fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }
    pub fn template_dir(&self, name: &str) -> PathBuf {
        self.templates_dir().join(name)
    }
    /// Where version `v` of template `name` lives: `templates/<name>/v<v>`
    /// (its `rootfs` and its `template.toml`), or, for a template built
    /// before versions and never rebuilt, `templates/<name>` itself.
    pub fn template_version_dir(&self, name: &str, v: u32) -> PathBuf {
        let dir = self.template_dir(name);
        let versioned = dir.join(format!("v{v}"));
        if v == 1 && !versioned.exists() && dir.join("rootfs").is_dir() {
            dir
        } else {
            versioned
        }
    }
    /// The root of template `name`'s newest version.
    pub fn template_rootfs(&self, name: &str) -> PathBuf {
        let v = self.template(name).map_or(1, |t| t.version);
        self.template_rootfs_at(name, v)
    }
    /// The root of version `v` of template `name`.
    pub fn template_rootfs_at(&self, name: &str, v: u32) -> PathBuf {
        self.template_version_dir(name, v).join("rootfs")
    }
    /// The template root an instance runs on (its own version).
    pub fn instance_lower(&self, inst: &Instance) -> PathBuf {
        self.template_rootfs_at(&inst.template, inst.template_version)
    }
    pub fn instances_dir(&self) -> PathBuf {
        self.root.join("instances")
    }
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.instances_dir().join(name)
    }
    /// An instance's console log: beside its layers in the disk store
    /// where it has one, so that it counts against the instance's `--disk`
    /// quota: what a container writes to its console or its syslog cannot
    /// fill the host's disk (a full quota loses lines; the next start
    /// removes a log that filled it). Both backends: init writes to it
    /// itself (systemd-nspawn with `--console=pipe`).
    pub fn console_log(&self, inst: &Instance) -> PathBuf {
        if inst.disk_store {
            crate::volume::instance_dir(self, &inst.name).join("console.log")
        } else {
            self.console_log_in_instance_dir(&inst.name)
        }
    }

    /// The console log's place in the instance directory: the log of an
    /// instance without a disk store; for one with, a log from before logs
    /// counted against `--disk` (shown by `logs` until its next start),
    /// and what the systemd unit writes before systemd-nspawn runs.
    pub fn console_log_in_instance_dir(&self, name: &str) -> PathBuf {
        self.instance_dir(name).join("console.log")
    }
    pub fn ports_dir(&self) -> PathBuf {
        self.root.join("ports")
    }
    /// Claims of user-namespace ID ranges, host-wide (every state root):
    /// `<slot> -> <instance dir>`.
    pub fn uids_dir(&self) -> PathBuf {
        PathBuf::from(crate::claims::uid_range::HOST_CLAIMS)
    }

    /// Once per state root made by an older nifty (its claims were in
    /// `<root>/uids/`): records its instances' ranges host-wide, and warns
    /// of any another root holds already.
    pub(crate) fn adopt_legacy_ranges(&self) {
        let legacy = self.root.join("uids");
        if !legacy.is_dir() {
            return;
        }
        for name in self.instance_names().unwrap_or_default() {
            let Ok(inst) = self.instance(&name) else {
                continue;
            };
            if let Some(base) = inst.security.uid_base {
                let dir = self.instance_dir(&name);
                if !crate::claims::uid_range::adopt(&self.uids_dir(), &dir, base) {
                    tracing::warn!(
                        instance = %name,
                        "its UID range {base} is claimed by another instance of this host; \
                         recreate one of them"
                    );
                }
            }
        }
        let _ = fs::remove_dir_all(&legacy);
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }
    /// The host keys of all instances, for OpenSSH clients (`nifty ssh-config`).
    pub fn known_hosts(&self) -> PathBuf {
        self.root.join("known_hosts")
    }

    /// An OpenSSH client config of all instances (`Host nifty-NAME`).
    pub fn ssh_config(&self) -> PathBuf {
        self.root.join("ssh_config")
    }

    pub fn client_key(&self) -> PathBuf {
        self.keys_dir().join("id_ed25519")
    }
    /// Where nifty's empty root (an empty read-only tmpfs that containers'
    /// mount namespaces are copied from) is mounted, in its own namespace:
    /// the host never sees it.
    pub fn mount_point(&self) -> PathBuf {
        self.run.join("mnt")
    }

    /// The cgroup directory name of this store: `nifty` for the default
    /// root, `nifty-<hash of root>` otherwise, so that test roots running in
    /// parallel never meet.
    pub fn cgroup_name(&self) -> String {
        if self.root == Path::new(DEFAULT_ROOT) {
            "nifty".into()
        } else {
            let h = Sha256::digest(self.root.as_os_str().as_encoded_bytes());
            format!("nifty-{}", &hex::encode(h)[..12])
        }
    }

    /// Creates the directory skeleton; fails with a clear message when the
    /// root cannot be written.
    pub fn ensure(&self) -> Result<()> {
        for d in [
            self.root.clone(),
            self.templates_dir(),
            self.instances_dir(),
            self.ports_dir(),
            self.run.clone(),
            self.mount_point(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&d)
                .map_err(|e| {
                    Error::Host(format!(
                        "cannot create state directory {}: {e}; pick a writable --root (or NIFTY_ROOT)",
                        d.display()
                    ))
                })?;
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.keys_dir())
            .map_err(Error::io("create", self.keys_dir()))?;
        spread_subdirs(&self.instances_dir());
        Ok(())
    }

    /// Reads a template's record.
    pub fn template(&self, name: &str) -> Result<TemplateMeta> {
        check_name("template", name)?;
        read_toml(&self.template_dir(name).join("template.toml"), || {
            Error::NoTemplate(name.to_string())
        })
    }

    /// Every version of template `name` that is still on disk, oldest
    /// first (the newest is [`Store::template`]).
    pub fn template_versions(&self, name: &str) -> Result<Vec<TemplateMeta>> {
        let newest = self.template(name)?;
        let mut out = Vec::new();
        for v in 1..newest.version {
            let dir = self.template_version_dir(name, v);
            if dir.join("rootfs").is_dir() {
                let meta = read_toml(&dir.join("template.toml"), || {
                    Error::NoTemplate(format!("{name} v{v}"))
                })
                .unwrap_or_else(|_| TemplateMeta {
                    version: v,
                    ..newest.clone()
                });
                out.push(TemplateMeta { version: v, ..meta });
            }
        }
        out.push(newest);
        Ok(out)
    }

    /// All templates, sorted by name.
    pub fn templates(&self) -> Result<Vec<TemplateMeta>> {
        let mut out = Vec::new();
        for name in list_dir(&self.templates_dir())? {
            out.push(self.template(&name)?);
        }
        Ok(out)
    }

    /// Reads an instance's record.
    pub fn instance(&self, name: &str) -> Result<Instance> {
        check_name("instance", name)?;
        read_toml(&self.instance_dir(name).join("instance.toml"), || {
            Error::NoInstance(name.to_string())
        })
    }

    /// What changes whenever an instance's record is rewritten; `None`
    /// when it has none.
    pub fn instance_stamp(&self, name: &str) -> Option<RecordStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(self.instance_dir(name).join("instance.toml")).ok()?;
        Some((m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
    }

    /// Names of all instances, numbers first in numeric order, then the
    /// others alphabetically.
    pub fn instance_names(&self) -> Result<Vec<String>> {
        let mut names = list_dir(&self.instances_dir())?;
        sort_names(&mut names);
        Ok(names)
    }

    /// Rewrites an instance's record (atomically: temp file + rename).
    pub fn save_instance(&self, inst: &Instance) -> Result<()> {
        let text = toml::to_string(inst).map_err(|err| Error::Encode {
            what: "an instance record",
            err,
        })?;
        write_atomic(
            &self.instance_dir(&inst.name).join("instance.toml"),
            text.as_bytes(),
            0o644,
        )
    }

    /// An instance's overlay upper and work directories; mounts the disk
    /// store if they are on it.
    pub fn instance_layers(&self, inst: &Instance) -> Result<(PathBuf, PathBuf)> {
        let d = if inst.disk_store {
            crate::volume::ensure(self)?;
            crate::volume::instance_dir(self, &inst.name)
        } else {
            self.instance_dir(&inst.name)
        };
        Ok((d.join("upper"), d.join("work")))
    }

    /// Removes a stopped instance's files and releases its port.
    pub fn remove_instance(&self, inst: &Instance) -> Result<()> {
        if inst.disk_store {
            crate::volume::ensure(self)?;
            crate::volume::remove(self, &inst.name)?;
        }
        let dir = self.instance_dir(&inst.name);
        // Move it out of the way first so a half-removed instance is never
        // seen under its name.
        let trash = self
            .instances_dir()
            .join(format!(".rm-{}-{}", inst.name, std::process::id()));
        fs::rename(&dir, &trash).map_err(Error::io("rename", &dir))?;
        self.release_port(inst.port, &inst.name);
        if let Some(b) = inst.security.uid_base {
            crate::claims::uid_range::release(&self.uids_dir(), &self.instance_dir(&inst.name), b);
        }
        fs::remove_dir_all(&trash).map_err(Error::io("remove", &trash))
    }

    /// Claims a port for `name`: the requested one, `2200 + N` for numeric
    /// names, or the next free one of the pool. A claim is a symlink
    /// `ports/<port> -> <name>`, so two instances can never hold one port;
    /// a port already bound on the host is refused now, not at boot.
    pub(crate) fn claim_port(&self, name: &str, requested: Option<u16>) -> Result<u16> {
        let (bottom, top) = self.pool();
        let fixed = match requested {
            Some(p) => Some(p),
            None => match name.parse::<u32>() {
                Ok(n) if !name.starts_with('0') || name == "0" => {
                    let p = u32::from(self.port_base) + n;
                    if p > 65535 {
                        return Err(Error::Invalid(format!(
                            "instance {name:?}: port {} + {n} is above 65535; give --port or a smaller number",
                            self.port_base
                        )));
                    }
                    Some(p as u16)
                }
                _ => None,
            },
        };
        if let Some(port) = fixed {
            if port == 0 {
                return Err(Error::Port {
                    port,
                    why: "0 is not a usable port; pick 1-65535".into(),
                });
            }
            self.try_claim(port, name)?;
            return Ok(port);
        }
        for port in (bottom..=top).rev() {
            match self.try_claim(port, name) {
                Ok(()) => return Ok(port),
                Err(Error::Port { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Host(format!(
            "instance {name:?}: no free port left in {bottom}-{top}; give --port"
        )))
    }

    /// The instance a port is assigned to, from its claim (nifty's own
    /// directory).
    pub fn port_owner(&self, port: u16) -> Option<String> {
        let owner = std::fs::read_link(self.ports_dir().join(port.to_string())).ok()?;
        Some(owner.to_str()?.to_string())
    }

    fn try_claim(&self, port: u16, name: &str) -> Result<()> {
        let claims = Claims::at(&self.ports_dir());
        let key = port.to_string();
        if let Some(owner) = claims.claim(&key, Path::new(name))? {
            return Err(Error::Port {
                port,
                why: format!(
                    "already assigned to instance {:?}",
                    owner.display().to_string()
                ),
            });
        }
        if let Err(why) = host_port_free(port) {
            claims.release(&key, Path::new(name));
            return Err(Error::Port { port, why });
        }
        Ok(())
    }

    pub(crate) fn release_port(&self, port: u16, name: &str) {
        Claims::at(&self.ports_dir()).release(&port.to_string(), Path::new(name));
    }
}

/// Is a TCP port free on the host, for IPv4 and IPv6 wildcard listeners
/// (Dropbear listens on both)?
fn host_port_free(port: u16) -> std::result::Result<(), String> {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
    let in_use = |e: std::io::Error| {
        format!(
            "in use on the host ({e}); pick another with --port{}",
            ephemeral_hint(port)
        )
    };
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(in_use)?;
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(in_use(e)),
        _ => Ok(()),
    }
}

/// If `port` is one the kernel may give an outgoing connection (inside
/// net.ipv4.ip_local_port_range), says how to keep it for instances.
fn ephemeral_hint(port: u16) -> &'static str {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let port = u64::from(port);
    if ephemeral_overlap(&range, (port, port)).is_some() {
        "; it lies in the range the kernel gives outgoing connections \
         (net.ipv4.ip_local_port_range): `nifty doctor --count N --fix` reserves \
         the fleet's ports"
    } else {
        ""
    }
}

/// The part of `ports` (inclusive) inside the ephemeral range `range`
/// ("LOW HIGH", as net.ipv4.ip_local_port_range reads; the kernel's
/// default 32768-60999 when unreadable).
pub fn ephemeral_overlap(range: &str, ports: (u64, u64)) -> Option<(u64, u64)> {
    let mut it = range.split_whitespace().map(|s| s.parse::<u64>().ok());
    let low = it.next().flatten().unwrap_or(32768);
    let high = it.next().flatten().unwrap_or(60999);
    let span = (ports.0.max(low), ports.1.min(high));
    (span.0 <= span.1).then_some(span)
}

/// The lowest port an unprivileged process may bind on the host
/// (net.ipv4.ip_unprivileged_port_start, 1024 by default).
pub fn unprivileged_port_start() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Splits a `SRC:DST` bind specification, both absolute paths.
pub fn parse_bind(spec: &str) -> Result<(PathBuf, PathBuf)> {
    let (src, dst) = spec.split_once(':').unwrap_or((spec, spec));
    let (src, dst) = (PathBuf::from(src), PathBuf::from(dst));
    if !src.is_absolute() || !dst.is_absolute() || dst.components().any(|c| c.as_os_str() == "..") {
        return Err(Error::Invalid(format!(
            "invalid bind {spec:?}: use SRC[:DST] with absolute paths and no '..'"
        )));
    }
    if !src.is_dir() {
        return Err(Error::Invalid(format!(
            "invalid bind {spec:?}: {} is not a directory on the host",
            src.display()
        )));
    }
    Ok((src, dst))
}

/// Sorts names: numbers first in numeric order, then the rest.
pub fn sort_names(names: &mut [String]) {
    names.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then(a.cmp(b)),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => a.cmp(b),
    });
}

/// Entries of a directory that are not hidden work files, sorted.
fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(Error::io("read directory", dir))?;
        if let Some(n) = e.file_name().to_str() {
            if !n.starts_with('.') {
                out.push(n.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Marks a directory as the top of a hierarchy for ext4's Orlov allocator
/// (`chattr +T`), so that its subdirectories, the instances, are spread
/// over the block groups. Every start makes and deletes a few inodes in the
/// instance's overlay work directory (overlayfs's mount-time checks), and
/// ext4 without a journal skips inodes deleted in the last 30 s one by one
/// when it allocates: with all instances in one group, each start would
/// scan past every other start's deletions (quadratic in the fleet; a
/// fifth of the CPU of starting 1000). Best effort: other filesystems do
/// not need it.
fn spread_subdirs(dir: &Path) {
    use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};
    let Ok(fd) = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return;
    };
    if let Ok(flags) = ioctl_getflags(&fd) {
        if !flags.contains(IFlags::TOPDIR) {
            let _ = ioctl_setflags(&fd, flags | IFlags::TOPDIR);
        }
    }
}

/// Reads a TOML record; `missing` makes the error for a file that is not there.
fn read_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    missing: impl FnOnce() -> Error,
) -> Result<T> {
    match fs::read_to_string(path) {
        Ok(s) => toml::from_str(&s).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            why: e.message().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing()),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

/// The current time, RFC 3339, seconds precision.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_numbers_first() {
        let mut v: Vec<String> = ["10", "slick", "2", "1", "a"].map(String::from).to_vec();
        sort_names(&mut v);
        assert_eq!(v, ["1", "2", "10", "a", "slick"]);
    }

    #[test]
    fn cgroup_names_differ_per_root() {
        assert_eq!(Store::new(None).cgroup_name(), "nifty");
        let a = Store::new(Some("/tmp/a".into())).cgroup_name();
        let b = Store::new(Some("/tmp/b".into())).cgroup_name();
        assert_ne!(a, b);
        assert!(a.starts_with("nifty-"));
        assert_eq!(
            Store::new(Some("/tmp/a".into())).run_dir(),
            Path::new("/tmp/a/run")
        );
    }

    #[test]
    fn binds() {
        assert!(parse_bind("relative:/x").is_err());
        assert!(parse_bind("/usr/share:/a/../b").is_err());
        assert!(parse_bind("/nonexistent-dir-xyz").is_err());
        let (s, d) = parse_bind("/usr/share:/opt/share").unwrap();
        assert_eq!(
            (s.as_path(), d.as_path()),
            (Path::new("/usr/share"), Path::new("/opt/share"))
        );
    }

    /// A port base of this test's own whose two pool ports below it are
    /// free on the host now, below the ephemeral range: the default pool
    /// (2199 down) may be a user's fleet or another program's.
    fn free_port_base() -> u16 {
        (20_000..32_000)
            .rev()
            .step_by(7)
            .find(|&b: &u16| host_port_free(b - 1).is_ok() && host_port_free(b - 2).is_ok())
            .expect("two free ports below 32000")
    }

    #[test]
    fn ports_are_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let base = free_port_base();
        let store = Store::new(Some(dir.path().into())).with_port_base(base);
        store.ensure().unwrap();
        assert_eq!(
            store.pool(),
            (base - 1 - (POOL_TOP - POOL_BOTTOM), base - 1)
        );
        let p = store.claim_port("slick", None).unwrap();
        assert_eq!(p, base - 1, "the pool is taken from the top down");
        let q = store.claim_port("other", None).unwrap();
        assert_eq!(q, base - 2);
        let e = store.claim_port("x", Some(p)).unwrap_err().to_string();
        assert!(e.contains("already assigned to instance \"slick\""), "{e}");
        store.release_port(p, "slick");
        assert_eq!(store.claim_port("x", Some(p)).unwrap(), p);
    }
}
