//! The unit files of the systemd backend, generated here and nowhere else:
//! the template unit `nifty@.service` and each instance's drop-in with its
//! limits. Pure text; the tests below pin what systemd will read.

use std::path::Path;

/// Unit names of one store: `nifty@NAME.service` for the default root,
/// `nifty-<hash>@NAME.service` for any other (as with cgroups), so two
/// roots never share a unit.
#[derive(Debug, Clone)]
pub struct Names {
    /// `nifty` or `nifty-<hash>`.
    pub prefix: String,
}

impl Names {
    /// The template unit: `nifty@.service`.
    pub fn template(&self) -> String {
        format!("{}@.service", self.prefix)
    }

    /// The unit of one instance, its name escaped as `systemd-escape` does.
    pub fn unit(&self, instance: &str) -> String {
        format!("{}@{}.service", self.prefix, escape(instance))
    }

    /// The instance name of a unit of ours, unescaped; `None` for any
    /// other unit (or the template itself).
    pub fn instance_of(&self, unit: &str) -> Option<String> {
        let rest = unit.strip_prefix(&self.prefix)?.strip_prefix('@')?;
        let esc = rest.strip_suffix(".service")?;
        (!esc.is_empty()).then(|| unescape(esc))
    }

    /// A glob matching every instance unit of this store.
    pub fn pattern(&self) -> String {
        format!("{}@*.service", self.prefix)
    }

    /// The socket template of on-demand instances: `nifty-ssh@.socket`.
    pub fn socket_template(&self) -> String {
        format!("{}-ssh@.socket", self.prefix)
    }

    /// The socket of one on-demand instance: `nifty-ssh@NAME.socket`.
    pub fn socket(&self, instance: &str) -> String {
        format!("{}-ssh@{}.socket", self.prefix, escape(instance))
    }

    /// The service each accepted connection runs (`Accept=yes`):
    /// `nifty-ssh@.service`.
    pub fn session_template(&self) -> String {
        format!("{}-ssh@.service", self.prefix)
    }

    /// The idle sweep of on-demand instances: `nifty-idle.service`.
    pub fn sweep_service(&self) -> String {
        format!("{}-idle.service", self.prefix)
    }

    /// Its timer: `nifty-idle.timer`.
    pub fn sweep_timer(&self) -> String {
        format!("{}-idle.timer", self.prefix)
    }

    /// `nifty serve` (native on-demand instances) as a service:
    /// `nifty.service`.
    pub fn serve_service(&self) -> String {
        format!("{}.service", self.prefix)
    }
}

/// Escapes a string for a unit name like `systemd-escape`: `/` becomes
/// `-`; anything but ASCII letters, digits, `:`, `_` and `.` (and a
/// leading `.`) becomes `\xNN`. So `my-box` is `my\x2dbox`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => {
                out.push(b as char)
            }
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Reverses [`escape`] (`systemd-escape --unescape`).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            if let Ok(v) = u8::from_str_radix(&s[i + 2..i + 4], 16) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(if b[i] == b'-' { b'/' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Quotes one word of an `ExecStart=` line: specifiers (`%`) and variable
/// expansion (`$`) are escaped, and the word is double-quoted when it has
/// anything systemd would split or unquote.
pub fn exec_word(s: &str) -> String {
    let s = s.replace('%', "%%").replace('$', "$$");
    if s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

/// What the template unit is made of.
#[derive(Debug, Clone)]
pub struct TemplateSpec<'a> {
    pub names: &'a Names,
    /// The nifty binary that mounts each root and execs systemd-nspawn.
    pub nifty: &'a Path,
    /// The state root (`--root`).
    pub root: &'a Path,
    /// systemd-nspawn.
    pub nspawn: &'a Path,
    /// Register each container with systemd-machined (`machinectl list`).
    pub register: bool,
}

/// Seconds systemd gives a container to power off before killing it.
/// BusyBox init needs about two (TERM to all, one second, KILL, one more).
pub const STOP_TIMEOUT_SECS: u64 = 30;

/// Arguments of systemd-nspawn that are the same for every instance; nifty
/// adds the per-instance ones (user namespace range, binds) from
/// instance.toml when it execs it.
pub fn nspawn_args(spec: &TemplateSpec<'_>) -> Vec<String> {
    vec![
        "--quiet".into(),
        "--keep-unit".into(),
        format!("--register={}", if spec.register { "yes" } else { "no" }),
        "--boot".into(),
        "--machine=nifty%I".into(),
        format!(
            "--directory={}/%I/root",
            exec_word(&spec.root.join("instances").display().to_string())
        ),
        // BusyBox init powers off on SIGUSR2; nspawn's default (SIGRTMIN+4)
        // is ignored by it.
        "--kill-signal=SIGUSR2".into(),
        "--link-journal=no".into(),
        // The container's init writes to the console log itself, as a
        // native one does (the fds `nifty systemd exec` passes, no pty and
        // no /dev/console, which BusyBox init does without): nspawn copies
        // nothing, and a write the log's disk limit refuses loses a line
        // (nspawn's copy ended the container). systemd 242 and later.
        "--console=pipe".into(),
        "--resolv-conf=off".into(),
        "--timezone=off".into(),
    ]
}

/// The slice of every instance's unit (`Slice=`): its cgroup is
/// `SLICE/<unit>` in the v2 hierarchy.
pub const SLICE: &str = "machine.slice";

/// The text of the template unit `nifty@.service`.
pub fn template(spec: &TemplateSpec<'_>) -> String {
    let root = exec_word(&spec.root.display().to_string());
    let nifty = exec_word(&spec.nifty.display().to_string());
    let nspawn = exec_word(&spec.nspawn.display().to_string());
    let args = nspawn_args(spec).join(" \\\n    ");
    format!(
        "\
# {template}: one nifty container per instance (%I), booted by systemd-nspawn.
# Written by `nifty systemd install` (nifty {version}); rewritten by it, do
# not edit. Per-instance limits live in {prefix}@<instance>.service.d/.

[Unit]
Description=nifty container # %I
Documentation=man:systemd-nspawn(1)
PartOf=machines.target
Before=machines.target
After=network.target
RequiresMountsFor={root_path}

[Service]
Type=notify
# nifty mounts the instance's root (the template, idmapped to the instance's
# UID range, under its overlay upper layer) in a mount namespace of its own,
# then execs systemd-nspawn there with the instance's own arguments: the
# root is never in the host's mount table and goes away with the container.
ExecStart={nifty} --root {root} systemd exec %I -- {nspawn} \\
    {args}
# Once the container runs, its /proc/net (systemd-nspawn mounted the
# kernel's) is covered with the template's view, as a native instance's is:
# no socket of the host listed, and Dropbear's read of /proc/net/tcp at
# each login walks no table of the host's. Not a boundary; '-': a start
# does not fail for it.
ExecStartPost=-{nifty} --root {root} systemd post %I
# A stop powers the container off from the host (`nifty systemd stop`), as
# the native launcher does: init is stopped, its services get SIGTERM, and
# once they are gone a reboot(2) in its PID namespace ends the container at
# once, where BusyBox init's own poweroff sleeps two seconds. '-': if it could
# not (or the inittab has shutdown actions, which init's poweroff runs),
# the KillSignal below does it the slow way.
ExecStop=-{nifty} --root {root} systemd stop %I
# `systemctl stop` sends SIGTERM to systemd-nspawn, which passes the
# container's init its --kill-signal (SIGUSR2: BusyBox init powers off);
# whatever is left after the timeout is killed.
KillMode=mixed
KillSignal=SIGTERM
# The container's console goes to its console log, as a native one's
# (`nifty logs`; rotated at start by nifty; in the disk store, counted
# against the instance's disk limit), through the fds `nifty systemd exec`
# gives systemd-nspawn (--console=pipe): a journal stream per unit stops at
# journald's limit of 4096 streams, and its rate limit drops lines. nifty's
# own messages before that go here (its errors to the console log too).
StandardOutput=append:{console}
StandardError=inherit
SyslogIdentifier=nifty%I
TimeoutStopSec={timeout}s
# nspawn exits 133 when the container reboots: start it again.
SuccessExitStatus=133
RestartForceExitStatus=133
Delegate=yes
Slice={slice}
TasksMax=512

[Install]
WantedBy=multi-user.target
",
        template = spec.names.template(),
        version = env!("CARGO_PKG_VERSION"),
        prefix = spec.names.prefix,
        root_path = root,
        timeout = STOP_TIMEOUT_SECS,
        slice = SLICE,
        console = spec
            .root
            .join("instances/%I/console.log")
            .display()
            .to_string()
            .replace('%', "%%")
            .replace("%%I", "%I"),
    )
}

/// How often the idle sweep of on-demand instances runs under systemd.
pub const SWEEP_EVERY_SECS: u64 = 10;

/// The unit files of on-demand instances (and of `nifty serve`), by name.
pub fn on_demand_units(spec: &TemplateSpec<'_>) -> Vec<(String, String)> {
    let n = spec.names;
    let root = exec_word(&spec.root.display().to_string());
    let nifty = exec_word(&spec.nifty.display().to_string());
    let head = |unit: String, what: &str| {
        format!(
            "# {unit}: {what}\n# Written by `nifty systemd install` (nifty {}); rewritten by it, do not edit.\n",
            env!("CARGO_PKG_VERSION")
        )
    };
    let instance_unit = format!("{}@%I.service", n.prefix);
    vec![
        (
            n.socket_template(),
            format!(
                "{}\
# systemd holds the SSH port of on-demand instance %I (the article's socket
# activation); its port is in {prefix}-ssh@<instance>.socket.d/. Each
# connection runs {session} on it (Accept=yes), which starts {unit} if it
# is stopped and runs one `dropbear -i` in it on the connection.

[Unit]
Description=SSH port of on-demand nifty container %I
Documentation=man:systemd.socket(5)

[Socket]
Accept=yes
# As Dropbear's own listener: no Nagle delay at the end of each session.
NoDelay=yes
BindIPv6Only=both
Backlog=1024
MaxConnections=1024

[Install]
WantedBy=sockets.target
",
                head(n.socket_template(), "on-demand nifty instances."),
                prefix = n.prefix,
                session = n.session_template(),
                unit = instance_unit,
            ),
        ),
        (
            n.session_template(),
            format!(
                "{}\
# One SSH connection to an on-demand instance, on standard input. The
# session's Dropbear joins the container (and its cgroup); this process
# waits for it and ends with it.

[Unit]
Description=SSH session of an on-demand nifty container
CollectMode=inactive-or-failed

[Service]
ExecStart={nifty} --root {root} systemd session
StandardInput=socket
StandardOutput=journal
StandardError=journal
",
                head(
                    n.session_template(),
                    "a session of an on-demand nifty instance."
                ),
            ),
        ),
        (
            n.sweep_service(),
            format!(
                "{}\
[Unit]
Description=Stop idle on-demand nifty containers

[Service]
Type=oneshot
ExecStart={nifty} --root {root} on-demand sweep
",
                head(n.sweep_service(), "the idle sweep of on-demand instances."),
            ),
        ),
        (
            n.sweep_timer(),
            format!(
                "{}\
[Unit]
Description=Stop idle on-demand nifty containers every {every}s

[Timer]
OnActiveSec={every}s
OnUnitActiveSec={every}s
AccuracySec=1s

[Install]
WantedBy=timers.target
",
                head(n.sweep_timer(), "the idle sweep of on-demand instances."),
                every = SWEEP_EVERY_SECS,
            ),
        ),
        (
            n.serve_service(),
            format!(
                "{}\
# `nifty serve`: holds the SSH ports of the on-demand instances of the
# native launcher, starts them at a connection and stops them when idle.
# Enable it with `systemctl enable --now {service}`.

[Unit]
Description=nifty serve: on-demand nifty containers (native launcher)
After=network.target

[Service]
ExecStart={nifty} --root {root} serve
Restart=on-failure
# The containers and their sessions are not this service's: stopping or
# restarting it leaves them running (a new `serve` adopts them).
KillMode=process

[Install]
WantedBy=multi-user.target
",
                head(n.serve_service(), "nifty serve."),
                service = n.serve_service(),
            ),
        ),
    ]
}

/// The drop-in of an on-demand instance's socket: its port.
pub fn socket_dropin(instance: &str, port: u16) -> String {
    format!(
        "\
# The SSH port of on-demand nifty instance {instance}; written by nifty.
[Socket]
ListenStream={port}
"
    )
}

/// The drop-in of one instance: its limits as unit properties.
pub fn dropin(instance: &str, limits: &crate::store::Limits) -> String {
    let mut s = format!(
        "\
# Limits of nifty instance {instance} (from its instance.toml); written by nifty.
[Service]
TasksMax={tasks}
",
        tasks = limits.tasks,
    );
    if let Some(m) = limits.memory {
        s.push_str(&format!("MemoryMax={m}\n"));
    }
    // Every unit its own CPU share (the controller on), as native ones.
    s.push_str(&format!("CPUWeight={}\n", limits.cpu_weight()));
    if let Some(q) = limits.cpu_quota_us() {
        // CPUQuota= is a percentage of one CPU.
        s.push_str(&format!(
            "CPUQuota={}%\n",
            q * 100 / crate::limits::CPU_PERIOD_US
        ));
    }
    if limits.io_weight.is_some() {
        s.push_str(&format!("IOWeight={}\n", limits.io_weight()));
    }
    s
}

/// The limits of a running unit as D-Bus properties (SetUnitProperties):
/// all of them, so that a lifted one is lifted (`u64::MAX` is infinity).
pub fn live_properties(limits: &crate::store::Limits) -> Vec<(&'static str, u64)> {
    vec![
        ("TasksMax", limits.tasks),
        ("MemoryMax", limits.memory.unwrap_or(u64::MAX)),
        ("CPUWeight", limits.cpu_weight()),
        (
            "CPUQuotaPerSecUSec",
            limits
                .cpu_quota_us()
                .map_or(u64::MAX, |q| q * 1_000_000 / crate::limits::CPU_PERIOD_US),
        ),
        ("IOWeight", limits.io_weight()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_systemd_escape() {
        // Values checked against `systemd-escape` 252.
        assert_eq!(escape("1"), "1");
        assert_eq!(escape("slick"), "slick");
        assert_eq!(escape("my-box"), "my\\x2dbox");
        assert_eq!(escape("web_1"), "web_1");
        assert_eq!(escape("a b"), "a\\x20b");
        assert_eq!(escape(".hidden"), "\\x2ehidden");
        assert_eq!(escape("a/b"), "a-b");
        for s in ["1", "slick", "my-box", "web_1", "x-y-z", "a b"] {
            assert_eq!(unescape(&escape(s)), s);
        }
    }

    #[test]
    fn unit_names_round_trip() {
        let n = Names {
            prefix: "nifty".into(),
        };
        assert_eq!(n.template(), "nifty@.service");
        assert_eq!(n.unit("my-box"), "nifty@my\\x2dbox.service");
        assert_eq!(
            n.instance_of("nifty@my\\x2dbox.service").as_deref(),
            Some("my-box")
        );
        assert_eq!(n.instance_of("nifty@.service"), None);
        assert_eq!(n.instance_of("nifty-abc@1.service"), None);
        assert_eq!(n.instance_of("other@1.service"), None);
    }

    #[test]
    fn on_demand_units_socket_activate_a_session_per_connection() {
        let names = Names {
            prefix: "nifty".into(),
        };
        let units = on_demand_units(&TemplateSpec {
            names: &names,
            nifty: Path::new("/usr/local/bin/nifty"),
            root: Path::new("/var/lib/nifty"),
            nspawn: Path::new("/usr/bin/systemd-nspawn"),
            register: false,
        });
        let get = |n: &str| {
            units
                .iter()
                .find(|(name, _)| name == n)
                .unwrap_or_else(|| panic!("no {n}"))
                .1
                .clone()
        };
        let socket = get("nifty-ssh@.socket");
        assert!(socket.contains("Accept=yes") && socket.contains("WantedBy=sockets.target"));
        assert!(socket.contains("nifty@%I.service"), "{socket}");
        let session = get("nifty-ssh@.service");
        for want in [
            "ExecStart=/usr/local/bin/nifty --root /var/lib/nifty systemd session",
            "StandardInput=socket",
            "StandardOutput=journal",
        ] {
            assert!(session.contains(want), "{want}: {session}");
        }
        assert!(get("nifty-idle.service").contains("on-demand sweep"));
        assert!(get("nifty-idle.timer").contains("OnUnitActiveSec=10s"));
        let serve = get("nifty.service");
        assert!(
            serve.contains("--root /var/lib/nifty serve") && serve.contains("KillMode=process")
        );
        assert_eq!(names.socket("my-box"), "nifty-ssh@my\\x2dbox.socket");
        assert!(socket_dropin("1", 2201).contains("ListenStream=2201"));
    }

    #[test]
    fn exec_words_are_quoted() {
        assert_eq!(exec_word("/var/lib/nifty"), "/var/lib/nifty");
        assert_eq!(exec_word("/tmp/a b"), "\"/tmp/a b\"");
        assert_eq!(exec_word("/tmp/50%"), "/tmp/50%%");
        assert_eq!(exec_word("/tmp/$x"), "/tmp/$$x");
    }

    #[test]
    fn template_unit_has_what_the_article_and_issue_need() {
        let names = Names {
            prefix: "nifty".into(),
        };
        let t = template(&TemplateSpec {
            names: &names,
            nifty: Path::new("/usr/local/bin/nifty"),
            root: Path::new("/var/lib/nifty"),
            nspawn: Path::new("/usr/bin/systemd-nspawn"),
            register: false,
        });
        for want in [
            "Description=nifty container # %I",
            "ExecStart=/usr/local/bin/nifty --root /var/lib/nifty systemd exec %I -- /usr/bin/systemd-nspawn",
            "ExecStartPost=-/usr/local/bin/nifty --root /var/lib/nifty systemd post %I",
            "ExecStop=-/usr/local/bin/nifty --root /var/lib/nifty systemd stop %I",
            "--machine=nifty%I",
            "--keep-unit",
            "--boot",
            "--directory=/var/lib/nifty/instances/%I/root",
            "--kill-signal=SIGUSR2",
            "--console=pipe",
            "KillSignal=SIGTERM",
            "KillMode=mixed",
            "Type=notify",
            "Delegate=yes",
            "WantedBy=multi-user.target",
        ] {
            assert!(t.contains(want), "unit lacks {want:?}:\n{t}");
        }
        let d = dropin(
            "1",
            &crate::store::Limits {
                tasks: 64,
                memory: Some(1 << 20),
                cpus: Some(0.5),
                io_weight: Some(300),
                ..Default::default()
            },
        );
        for want in [
            "TasksMax=64",
            "MemoryMax=1048576",
            "CPUWeight=100",
            "CPUQuota=50%",
            "IOWeight=300",
        ] {
            assert!(d.contains(want), "drop-in lacks {want}:\n{d}");
        }
    }
}
