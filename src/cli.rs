//! The command line: clap types only; doc comments are the --help.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clap_complete::engine::ArgValueCompleter;
use nifty::store::Backend;

use crate::complete;

/// Build, clone and run fleets of BusyBox + Dropbear system containers.
///
/// A template root with static BusyBox and Dropbear is built once; instances
/// are overlayfs clones of it, each booted with BusyBox init as PID 1 and its
/// own SSH port (2200 + N for instance N).
#[derive(Debug, Parser)]
#[command(
    name = "nifty",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// State root: templates, instances, keys.
    #[arg(long, global = true, env = "NIFTY_ROOT", value_name = "DIR", default_value = nifty::store::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Instance N listens on PORT_BASE + N; other names take ports below
    /// PORT_BASE. Read when instances are created (their port is recorded).
    #[arg(long, global = true, env = "NIFTY_PORT_BASE", value_name = "PORT", default_value_t = nifty::store::PORT_BASE, value_parser = clap::value_parser!(u16).range(1026..))]
    pub port_base: u16,
    /// Say only what failed.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Say more (-vv: debug traces).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line, parsed. The line systemd runs at every connection
    /// to an on-demand instance (`nifty --root DIR systemd session`, as
    /// nifty writes it in nifty-ssh@.service) is taken as it is, without
    /// clap: building the parser of every verb costs about 0.6 ms, a tenth
    /// of what such a login costs more than one to an always-on instance.
    /// Any other line, or that one with `NIFTY_PORT_BASE` set (which clap
    /// checks), goes to clap.
    pub fn from_args() -> Cli {
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        Cli::session_line(&args, std::env::var_os("NIFTY_PORT_BASE").is_some())
            .unwrap_or_else(Cli::parse)
    }

    fn session_line(args: &[OsString], port_base_set: bool) -> Option<Cli> {
        match args {
            [flag, root, verb, sub]
                if flag == "--root"
                    && !root.is_empty()
                    && verb == "systemd"
                    && sub == "session"
                    && !port_base_set =>
            {
                Some(Cli {
                    root: PathBuf::from(root),
                    port_base: nifty::store::PORT_BASE,
                    quiet: false,
                    verbose: 0,
                    command: Command::Systemd(SystemdCmd::Session),
                })
            }
            _ => None,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build and inspect templates (the shared root every instance boots).
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Create instances: names, ranges (1..100) or --count N.
    Create(CreateArgs),
    /// Boot instances: BusyBox init as PID 1, Dropbear on their port.
    Start(Selection),
    /// Power instances off: SIGTERM to their processes, kill what is left after --timeout.
    Stop(StopArgs),
    /// Stop, then start.
    Restart(StopArgs),
    /// Kill instances at once, without a clean shutdown.
    Kill(Selection),
    /// Remove stopped instances and their files (-f stops them first).
    Rm(RmArgs),
    /// List instances: state, PID, port, uptime, memory.
    #[command(alias = "ls")]
    List(JsonArg),
    /// Show one instance like `systemctl status`: init, processes, cgroup, port, log.
    Status(StatusArgs),
    /// Show an instance's console log.
    Logs(LogsArgs),
    /// Run a command inside a running instance.
    Exec(ExecArgs),
    /// Log in to an instance over SSH with nifty's key.
    Ssh(SshArgs),
    /// Build the default template if missing, create instances 1..N, start them.
    Up(UpArgs),
    /// Set a user's password in an instance from the host (read from stdin).
    Passwd(PasswdArgs),
    /// List, add or remove a user's SSH public keys in an instance.
    AuthorizedKeys(KeysArgs),
    /// Give instances new SSH host keys (effective at their next start).
    Rekey(Selection),
    /// Move instances to their template's newest (or a given) version: stopped ones at
    /// once, running ones restarted in batches, each checked healthy before the next.
    Update(UpdateArgs),
    /// Change the limits of instances, running or stopped: `nifty set 7 --cpus 1 --disk 2G`.
    Set(SetArgs),
    /// Show what an instance changed against its template (its upper layer).
    Diff(DiffArgs),
    /// Check the host for a fleet of N containers; --fix applies the sysctls.
    Doctor(DoctorArgs),
    /// Serve on-demand instances in the foreground: hold their SSH ports,
    /// start each at its first connection, stop it when idle.
    Serve(ServeArgs),
    /// Make instances start at their first SSH connection and stop when idle
    /// (`enable`), or run always again (`disable`); `sweep` stops idle ones now.
    #[command(subcommand, name = "on-demand")]
    OnDemand(OnDemandCmd),
    /// Install, show or remove the template unit nifty@.service.
    #[command(subcommand)]
    Systemd(SystemdCmd),
    /// Start systemd instances at boot (systemctl enable nifty@NAME).
    Enable(EnableArgs),
    /// Stop starting systemd instances at boot.
    Disable(EnableArgs),
    /// Copy files between the host and an instance, running or stopped:
    /// `nifty cp ./f 7:/home/luser/f`, `nifty cp 7:/etc/os-release .`.
    Cp(CpArgs),
    /// Print an OpenSSH client config for instances (`Host nifty-NAME`):
    /// `ssh -F <(nifty ssh-config) nifty-7`, or `Include` it from ~/.ssh/config.
    SshConfig(ClientSelection),
    /// Print an Ansible inventory of instances; with --list/--host it is a
    /// dynamic inventory script.
    Inventory(InventoryArgs),
    /// Export a template as an OCI image (--oci, --oci-archive) for Podman, Kubernetes
    /// and registries, or print manifests that run a fleet of it (--kube, --compose).
    Export(ExportArgs),
    /// Make a template (its next version) from an OCI image or a root filesystem tarball.
    Import(ImportArgs),
    /// Print a shell's completion script (bash, zsh, fish, elvish, powershell):
    /// `source <(nifty completions bash)`.
    Completions {
        /// The shell.
        #[arg(value_parser = ["bash", "zsh", "fish", "elvish", "powershell"])]
        shell: String,
    },
    /// Write a man page per verb (nifty.1, nifty-create.1, ...) into DIR.
    Manpages {
        /// Where to write them.
        #[arg(value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("format").required(true).args(["oci", "oci_archive", "kube", "compose"])))]
pub struct ExportArgs {
    /// The template.
    #[arg(value_name = "TEMPLATE", add = ArgValueCompleter::new(complete::templates))]
    pub template: String,
    /// Which of its versions [default: the newest].
    #[arg(long = "template-version", value_name = "N")]
    pub template_version: Option<u32>,
    /// Write an OCI image layout into DIR (new or empty): `skopeo copy oci:DIR ...`.
    #[arg(long, value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
    pub oci: Option<PathBuf>,
    /// Write an OCI archive (the layout as one tar file): `podman load -i FILE`.
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub oci_archive: Option<PathBuf>,
    /// Print Kubernetes manifests for a fleet of the image: Secret, headless
    /// Service, StatefulSet (or Deployment), a Service per pod for SSH.
    #[arg(long)]
    pub kube: bool,
    /// Print a Compose file (podman-compose, docker compose) for a fleet of the
    /// image on one host: service nifty-N on host port PORT_BASE + N.
    #[arg(long)]
    pub compose: bool,
    /// The image's name: in the layout or archive, and what --kube and
    /// --compose run [default: localhost/nifty-TEMPLATE:vN].
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// Containers in the fleet (--kube, --compose).
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub replicas: u32,
    /// How each pod's SSH port is reached from outside the cluster (--kube).
    #[arg(long, value_enum, default_value = "nodeport")]
    pub expose: Expose,
    /// The workload (--kube): a StatefulSet keeps names, host keys and homes
    /// across rescheduling; a Deployment (what `podman kube play` runs) keeps
    /// nothing.
    #[arg(long, value_enum, default_value = "statefulset")]
    pub workload: Workload,
    /// Public keys allowed to log in (--kube: the Secret) [default: nifty's own].
    #[arg(long = "authorized-keys", value_name = "FILE")]
    pub authorized_keys: Vec<PathBuf>,
    /// Write the manifests to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Expose {
    /// A NodePort Service per pod.
    Nodeport,
    /// A LoadBalancer Service per pod.
    Loadbalancer,
    /// Only the headless Service (reach pods inside the cluster).
    None,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Workload {
    Statefulset,
    Deployment,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["oci", "oci_archive", "rootfs"])))]
pub struct ImportArgs {
    /// The template to make (a new version if it exists).
    #[arg(value_name = "TEMPLATE")]
    pub name: String,
    /// An OCI image layout directory (`skopeo copy ... oci:DIR`).
    #[arg(long, value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
    pub oci: Option<PathBuf>,
    /// An OCI archive (`podman save --format oci-archive`, `nifty export --oci-archive`).
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub oci_archive: Option<PathBuf>,
    /// A root filesystem tarball (.tar or .tar.gz).
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub rootfs: Option<PathBuf>,
    /// Which image of the layout (its org.opencontainers.image.ref.name, or the tag).
    #[arg(long = "ref", value_name = "REF")]
    pub reference: Option<String>,
    /// The login user [default: the image's io.nifty.user label, else luser].
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a host path, or NAME:PATH in an instance (a relative
    /// PATH is in the login user's home).
    #[arg(value_name = "SRC", add = ArgValueCompleter::new(complete::copy_endpoint))]
    pub src: String,
    /// Where to: a host path, or NAME:PATH (into it if it is a directory).
    #[arg(value_name = "DEST", add = ArgValueCompleter::new(complete::copy_endpoint))]
    pub dest: String,
    /// Copy directories and their contents.
    #[arg(short, long)]
    pub recursive: bool,
    /// The container user that files copied in belong to [default: the
    /// owner of the directory they land in].
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
}

#[derive(Debug, Args)]
pub struct ClientSelection {
    /// Names, ranges (1..100) and globs ('web-*') [default: every instance].
    #[arg(value_name = "NAME|RANGE|GLOB", add = ArgValueCompleter::new(complete::instances))]
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum InventoryFormat {
    Ini,
    Yaml,
    Json,
}

#[derive(Debug, Args)]
pub struct InventoryArgs {
    #[command(flatten)]
    pub sel: ClientSelection,
    /// Output format.
    #[arg(long, value_enum, default_value = "ini")]
    pub format: InventoryFormat,
    /// Dynamic inventory: all groups and hosts as JSON (what Ansible asks a script).
    #[arg(long, conflicts_with_all = ["host", "format"])]
    pub list: bool,
    /// Dynamic inventory: one host's variables as JSON.
    #[arg(long, value_name = "HOST", conflicts_with = "format")]
    pub host: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SystemdCmd {
    /// Write /etc/systemd/system/nifty@.service (reloads systemd only if it changed).
    Install,
    /// Remove the template unit (refused while systemd instances exist).
    Uninstall,
    /// Print the template unit as `install` writes it.
    Show {
        /// Render it for a nifty installed at PATH, without asking systemd
        /// (packaging: `make install`, `make deb`).
        #[arg(long, value_name = "PATH")]
        nifty: Option<PathBuf>,
        /// systemd-nspawn's path, with --nifty.
        #[arg(
            long,
            value_name = "PATH",
            requires = "nifty",
            default_value = "/usr/bin/systemd-nspawn"
        )]
        nspawn: PathBuf,
    },
    /// The unit's ExecStart: mount an instance's root in a mount namespace
    /// of its own and exec systemd-nspawn there.
    #[command(hide = true)]
    Exec {
        /// Instance name.
        name: String,
        /// systemd-nspawn and its arguments.
        #[arg(last = true, required = true)]
        nspawn: Vec<String>,
    },
    /// What nifty-ssh@.service runs for one connection to an on-demand
    /// instance (the socket on standard input): start it, run `dropbear -i`
    /// in it on the connection.
    #[command(hide = true)]
    Session,
    /// The unit's ExecStartPost: once the container runs, cover its
    /// /proc/net with the template's view (on the host's network).
    #[command(hide = true)]
    Post {
        /// Instance name.
        name: String,
    },
    /// The unit's ExecStop: power the container off from the host, as the
    /// native launcher does, without BusyBox init's two seconds of sleep.
    #[command(hide = true)]
    Stop {
        /// Instance name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OnDemandCmd {
    /// Make stopped instances on demand: `nifty on-demand enable 1..100 --idle-timeout 30m`.
    Enable {
        #[command(flatten)]
        sel: Selection,
        /// How long one with no SSH session and no process of its users stays
        /// up (90s, 10m, 1h) [default: 10m].
        #[arg(long, value_name = "DURATION")]
        idle_timeout: Option<String>,
    },
    /// Make stopped on-demand instances run always again (their own Dropbear
    /// listens when they run): `nifty on-demand disable 7`.
    Disable {
        #[command(flatten)]
        sel: Selection,
    },
    /// Stop the on-demand instances idle for their timeout now (`nifty serve`
    /// and the systemd timer nifty-idle.timer do this on their own).
    Sweep,
}

#[derive(Debug, Args)]
pub struct EnableArgs {
    #[command(flatten)]
    pub sel: Selection,
    /// Also start (enable) or stop (disable) them now.
    #[arg(long)]
    pub now: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Size of the fleet to check for.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Apply the sysctls that fix what failed.
    #[arg(long)]
    pub fix: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// Instance name.
    #[arg(add = ArgValueCompleter::new(complete::instances))]
    pub name: String,
    /// User of the container.
    pub user: String,
    /// Stdin holds a crypt(3) hash ($6$...), not a password.
    #[arg(long)]
    pub hash: bool,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Instance name.
    #[arg(add = ArgValueCompleter::new(complete::instances))]
    pub name: String,
    /// User of the container.
    pub user: String,
    /// Add a public key (the key text, or a file holding keys).
    #[arg(long, value_name = "KEY|FILE")]
    pub add: Vec<String>,
    /// Remove keys: by key text, file, or comment.
    #[arg(long, value_name = "KEY|FILE|COMMENT")]
    pub remove: Vec<String>,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Build (or atomically rebuild) a template from the host's BusyBox and Dropbear.
    Build(BuildArgs),
    /// List templates.
    List(JsonArg),
    /// Show a template's versions with their sources, versions and digests.
    Show {
        /// Template name.
        #[arg(add = ArgValueCompleter::new(complete::templates))]
        name: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Remove the versions of a template that no instance runs (never the newest).
    Prune {
        /// Template name.
        #[arg(default_value = "default", add = ArgValueCompleter::new(complete::templates))]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub sel: Selection,
    /// The template version to move to (default: the newest).
    #[arg(long, value_name = "VERSION")]
    pub to: Option<u32>,
    /// Running instances restarted at once: a number, or a share of them (10%).
    #[arg(long, default_value = "10%", value_name = "N|P%")]
    pub batch: String,
    /// At most this many instances down at once (caps --batch).
    #[arg(long, value_name = "N")]
    pub max_unavailable: Option<usize>,
    /// Seconds a restarted instance has to answer an SSH login with its own host key.
    #[arg(long, default_value_t = 30, value_name = "S")]
    pub health_timeout: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Instance name.
    #[arg(add = ArgValueCompleter::new(complete::instances))]
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Template name.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// BusyBox binary (Debian: busybox-static; a musl one:
    /// scripts/build-static-busybox DIR).
    #[arg(
        long,
        env = "NIFTY_BUSYBOX",
        default_value = "/bin/busybox",
        value_name = "PATH"
    )]
    pub busybox: PathBuf,
    /// Dropbear server; dropbearkey and dbclient are taken from beside it
    /// (a static one: scripts/build-static-dropbear DIR).
    #[arg(
        long,
        env = "NIFTY_DROPBEAR",
        default_value = "/usr/sbin/dropbear",
        value_name = "PATH"
    )]
    pub dropbear: PathBuf,
    /// Extra host binaries to include, with their shared libraries.
    #[arg(long = "with", value_name = "PATH")]
    pub with: Vec<PathBuf>,
    /// The login user.
    #[arg(long, default_value = "luser")]
    pub user: String,
    /// More public keys allowed to log in as the user (nifty's own is always there).
    #[arg(long = "authorized-keys", value_name = "FILE")]
    pub authorized_keys: Vec<PathBuf>,
    /// Read a password for the user from stdin (stored as a SHA-512 crypt hash).
    #[arg(long)]
    pub password_stdin: bool,
    /// Zoneinfo directory to copy in [default: /usr/share/zoneinfo if it
    /// exists; without it (no tzdata on the host) the containers keep UTC].
    #[arg(long, value_name = "DIR")]
    pub zoneinfo: Option<PathBuf>,
    /// OpenSSH's sftp-server, for `sftp` and `scp` (Debian: openssh-sftp-server).
    #[arg(long, default_value = nifty::template::SFTP_SERVER, value_name = "PATH")]
    pub sftp_server: PathBuf,
    /// OpenSSH's scp, for `scp -O` (Debian: openssh-client).
    #[arg(long, default_value = "/usr/bin/scp", value_name = "PATH")]
    pub scp: PathBuf,
    /// Leave sftp-server and scp out: no file transfer over SSH.
    #[arg(long, conflicts_with_all = ["sftp_server", "scp"])]
    pub without_sftp: bool,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Names (1, slick) and ranges (1..1000).
    #[arg(value_name = "NAME|RANGE", required_unless_present = "count")]
    pub names: Vec<String>,
    /// Create N instances with the lowest free numbers.
    #[arg(long, value_name = "N", conflicts_with = "names")]
    pub count: Option<usize>,
    /// Template to clone.
    #[arg(long, default_value = "default", add = ArgValueCompleter::new(complete::templates))]
    pub template: String,
    /// SSH port (one instance only; default PORT_BASE + N, or a free one below PORT_BASE).
    #[arg(long)]
    pub port: Option<u16>,
    /// Launcher [default: systemd where PID 1 is systemd and systemd-nspawn
    /// is installed, native elsewhere].
    #[arg(long, value_enum, env = "NIFTY_BACKEND")]
    pub backend: Option<Backend>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Bind a host directory read-only: SRC or SRC:DST.
    #[arg(long = "bind-ro", value_name = "SRC[:DST]")]
    pub bind_ro: Vec<String>,
    /// Let container root be host root (no user namespace). Unsafe.
    #[arg(long)]
    pub no_userns: bool,
    /// No seccomp filter. Unsafe.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Keep every capability in the bounding set. Unsafe.
    #[arg(long)]
    pub keep_caps: bool,
    /// Start at the first SSH connection and stop when idle: the port is held
    /// on the host (`nifty serve` for the native backend, a socket unit
    /// nifty-ssh@NAME.socket for systemd) and each connection gets its own
    /// `dropbear -i` inside.
    #[arg(long)]
    pub on_demand: bool,
    /// How long an on-demand instance with no SSH session and no process
    /// of its users stays up (90s, 10m, 1h) [default: 10m].
    #[arg(long, value_name = "DURATION", requires = "on_demand")]
    pub idle_timeout: Option<String>,
    /// The instance's network: `host` (the article's: it shares the host's)
    /// or `none` (a namespace of its own, loopback only; with --on-demand,
    /// whose SSH port is held on the host) [default: host].
    #[arg(long, value_name = "NETWORK", value_parser = parse_network)]
    pub network: Option<nifty::store::Network>,
}

fn parse_network(s: &str) -> Result<nifty::store::Network, String> {
    match s {
        "host" => Ok(nifty::store::Network::Host),
        "none" => Ok(nifty::store::Network::None),
        _ => Err(format!(
            "{s:?}: use host (the host's network) or none (loopback only)"
        )),
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// How often idle on-demand instances are looked for, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5, hide = true)]
    pub check_every: u64,
}

/// Fair shares and limits: for `create` (defaults for what is not given)
/// and `set` (what is not given stays).
#[derive(Debug, Args, Default)]
pub struct LimitArgs {
    /// Maximum number of tasks [create's default: 512].
    #[arg(long, value_name = "N")]
    pub tasks: Option<String>,
    /// A memory limit of the instance's own (bytes, or with K, M, G), or
    /// `shared`. Without it, instances share their fleet's memory cgroup,
    /// limited to 90% of the host's memory as a whole (a memory cgroup per
    /// container costs kernel memory that grows with the fleet).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU fair share, 1..10000 [default: 100, as every instance]: under
    /// contention an instance gets CPU in proportion to its weight.
    #[arg(long, value_name = "N")]
    pub cpu_weight: Option<String>,
    /// A hard CPU cap in CPUs (0.5: half of one CPU), or `max`.
    #[arg(long, value_name = "X")]
    pub cpus: Option<String>,
    /// I/O fair share, 1..10000 [default: 100] (effective with the BFQ
    /// scheduler or io.cost; `nifty doctor` says which the host has).
    #[arg(long, value_name = "N")]
    pub io_weight: Option<String>,
    /// Disk for the instance's own files (with a unit: 500M, 2G), or
    /// `unlimited` [create's default: 1G].
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,
    /// Files the instance's own layer may hold, or `unlimited` [default].
    #[arg(long, value_name = "N")]
    pub inodes: Option<String>,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub sel: Selection,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct Selection {
    /// Names, ranges (1..100) and globs ('web-*').
    #[arg(value_name = "NAME|RANGE|GLOB", add = ArgValueCompleter::new(complete::instances))]
    pub names: Vec<String>,
    /// Every instance.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub sel: Selection,
    /// Seconds to wait for a clean poweroff before killing what is left.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Signal for init (BusyBox init: USR2 powers off, TERM reboots). For USR2, the
    /// default, nifty does the poweroff itself when the instance's inittab has no
    /// `shutdown` action: init stopped, SIGTERM to the rest, then SIGKILL.
    #[arg(long, default_value = "USR2")]
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub sel: Selection,
    /// Stop running instances first.
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Instance name.
    #[arg(add = ArgValueCompleter::new(complete::instances))]
    pub name: String,
    /// Log lines to show.
    #[arg(short = 'n', long, default_value_t = 10)]
    pub lines: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Instance name.
    #[arg(add = ArgValueCompleter::new(complete::instances))]
    pub name: String,
    /// Keep printing new lines.
    #[arg(short, long)]
    pub follow: bool,
    /// Show only the last N lines.
    #[arg(short = 'n', long)]
    pub lines: Option<usize>,
    /// Print the container's bytes as they are, control characters
    /// included (by default they are escaped on a terminal).
    #[arg(long)]
    pub raw: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Instance name.
    #[arg(add = ArgValueCompleter::new(complete::instances))]
    pub name: String,
    /// Run as this user of the container (default: its root).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Extra environment: KEY=VALUE.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// Instance name.
    #[arg(add = ArgValueCompleter::new(complete::instances))]
    pub name: String,
    /// Command to run instead of a login shell.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of instances: 1..N.
    pub count: u64,
    /// Template to clone (built from the host's binaries if missing and "default").
    #[arg(long, default_value = "default")]
    pub template: String,
    /// Launcher of the instances it creates [default: as `create`'s].
    #[arg(long, value_enum, env = "NIFTY_BACKEND")]
    pub backend: Option<Backend>,
    /// Limits of the instances it creates, as `create`'s.
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_session_line_is_what_clap_makes_of_it() {
        let args = ["--root", "/var/lib/nifty", "systemd", "session"];
        let fast = Cli::session_line(&line(&args), false).expect("the session line");
        let clap = Cli::try_parse_from(std::iter::once("nifty").chain(args)).unwrap();
        assert_eq!(fast.root, clap.root);
        assert_eq!((fast.quiet, fast.verbose), (clap.quiet, clap.verbose));
        assert!(matches!(
            clap.command,
            Command::Systemd(SystemdCmd::Session)
        ));
        assert!(matches!(
            fast.command,
            Command::Systemd(SystemdCmd::Session)
        ));
        assert_eq!(fast.port_base, nifty::store::PORT_BASE);
    }

    #[test]
    fn any_other_line_goes_to_clap() {
        for args in [
            &["--root", "/r", "systemd", "session", "extra"][..],
            &["--root=/r", "systemd", "session"],
            &["--root", "", "systemd", "session"],
            &["--root", "/r", "systemd", "post"],
            &["-q", "/r", "systemd", "session"],
            &["systemd", "session"],
        ] {
            assert!(Cli::session_line(&line(args), false).is_none(), "{args:?}");
        }
        let args = line(&["--root", "/r", "systemd", "session"]);
        assert!(
            Cli::session_line(&args, true).is_none(),
            "NIFTY_PORT_BASE is clap's to check"
        );
    }
}
