//! `nifty doctor`: can this host run a fleet of N containers? Each check
//! reads the kernel's real value, compares it with what N containers need,
//! and says how to fix it; `--fix` applies the sysctls it can (and turns
//! on `favordynmods` where a start joins v1 cgroups).

use std::path::Path;

use serde::Serialize;

use crate::runtime::linux::cgroup::Hierarchy;
use crate::store::Store;

/// Processes of one idle container: init, syslogd, Dropbear, plus room
/// for a login (dropbear child, shell) in a good share of them.
pub const PROCS_PER_CONTAINER: u64 = 5;
/// Host memory one idle container costs (measured by bench/fleet: about
/// 0.5-1 MiB of kernel and private memory; the binaries are shared).
pub const MEMORY_PER_CONTAINER: u64 = 1 << 20;
/// Disk one instance costs (measured: 40 KiB, rounded up).
pub const DISK_PER_INSTANCE: u64 = 64 << 10;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    /// What the host has.
    pub value: String,
    /// What N containers need.
    pub need: String,
    /// How to fix it (empty when fine).
    pub fix: String,
    /// What `--fix` changes for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
}

/// A change `--fix` makes to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A sysctl, set to a value.
    Sysctl { key: String, value: String },
    /// The cgroup v2 mount, reconfigured with `favordynmods` (until the
    /// next boot).
    FavorDynmods,
}

fn sysctl(key: &str) -> Option<String> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn num(key: &str) -> Option<u64> {
    sysctl(key)?.split(' ').next()?.parse().ok()
}

/// A check of a numeric sysctl that must be at least `need`.
fn at_least(check: &str, key: &str, need: u64, set_to: u64, why: &str) -> Finding {
    let have = num(key);
    let ok = have.is_some_and(|h| h >= need);
    Finding {
        check: check.into(),
        status: if ok { Status::Ok } else { Status::Fail },
        value: have.map_or("unknown".into(), |h| format!("{key} = {h}")),
        need: format!(">= {need} ({why})"),
        fix: if ok {
            String::new()
        } else {
            format!("sysctl -w {key}={set_to}")
        },
        change: (!ok).then(|| Change::Sysctl {
            key: key.to_string(),
            value: set_to.to_string(),
        }),
    }
}

fn info(check: &str, status: Status, value: String, need: &str, fix: &str) -> Finding {
    Finding {
        check: check.into(),
        status,
        value,
        need: need.into(),
        fix: fix.into(),
        change: None,
    }
}

/// Runs every check for a fleet of `count`.
/// What the checks are asked about: a fleet of `count` in `store`.
struct Want<'a> {
    store: &'a Store,
    count: u64,
}

/// Every check, in the order `doctor` prints them.
type Check = fn(&Want<'_>) -> Vec<Finding>;
const CHECKS: &[Check] = &[
    auditing,
    process_limits,
    open_files,
    ptys,
    namespaces,
    id_ranges,
    mount_max,
    inotify,
    keyrings,
    dumpable,
    ports,
    overlayfs,
    mount_api,
    idmapped_layers,
    overlay_fd_layers,
    cgroup_kill,
    pidfds,
    port_ownership,
    abstract_sockets,
    on_demand_ports,
    network_tables,
    on_demand_served,
    default_template,
    templates_current,
    cgroups,
    cgroup_joins,
    systemd,
    disk,
    disk_store,
    io_weights,
    memory,
];

/// Runs every check for a fleet of `count` in `store`.
pub fn check(store: &Store, count: u64) -> Vec<Finding> {
    let want = Want { store, count };
    CHECKS.iter().flat_map(|c| c(&want)).collect()
}

/// Kernel auditing (the systemd backend's 5 s waits).
fn auditing(_: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let audit_on = Path::new("/proc/self/loginuid").exists()
        && !cmdline.split_whitespace().any(|a| a == "audit=0");
    out.push(info(
        "kernel auditing",
        if audit_on { Status::Warn } else { Status::Ok },
        if audit_on { "on (no audit=0 on the kernel command line)".into() } else { "off".into() },
        "off for the systemd backend: with auditing, each systemd-nspawn start can wait 5 s (the article's warning); the native launcher is not affected",
        if audit_on { "add audit=0 to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub) and reboot" } else { "" },
    ));
    out
}

/// pid_max, threads-max, file-max for N containers.
fn process_limits(w: &Want<'_>) -> Vec<Finding> {
    let procs = w.count * PROCS_PER_CONTAINER + 4096;
    let mut out = Vec::new();
    out.push(at_least(
        "pid_max",
        "kernel.pid_max",
        procs,
        procs.max(4_194_304),
        &format!("{PROCS_PER_CONTAINER} processes per container and 4096 for the host"),
    ));
    out.push(at_least(
        "threads-max",
        "kernel.threads-max",
        procs,
        procs.max(4_194_304),
        "one thread per container process",
    ));
    out.push(at_least(
        "file-max",
        "fs.file-max",
        w.count * 16 + 65536,
        (w.count * 16 + 65536).max(2_097_152),
        "about 16 open files per container",
    ));
    out
}

/// nifty's own open-files limit (a pidfd per container process at stop).
fn open_files(w: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = nofile.maximum.unwrap_or(u64::MAX);
    let need_nofile = w.count * 3 + 1024;
    out.push(info(
        "open files of nifty (RLIMIT_NOFILE)",
        if hard >= need_nofile { Status::Ok } else { Status::Fail },
        format!("hard limit {hard}"),
        &format!(">= {need_nofile}: `stop` holds a pidfd per container process (nifty raises its own limit up to fs.nr_open when root)"),
        if hard >= need_nofile { "" } else { "raise it: `ulimit -Hn 1048576` in the shell that runs nifty, or LimitNOFILE= in its unit" },
    ));
    out
}

/// Ptys for one SSH session with a terminal per container.
fn ptys(w: &Want<'_>) -> Vec<Finding> {
    vec![at_least(
        "pty max",
        "kernel.pty.max",
        w.count + 1024,
        (w.count + 1024).max(65536),
        "one SSH session with a terminal per container",
    )]
}

/// The per-user namespace limits.
fn namespaces(w: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    for (check, key) in [
        ("user namespaces", "user.max_user_namespaces"),
        ("mount namespaces", "user.max_mnt_namespaces"),
        ("PID namespaces", "user.max_pid_namespaces"),
        ("UTS namespaces", "user.max_uts_namespaces"),
        ("IPC namespaces", "user.max_ipc_namespaces"),
    ] {
        out.push(at_least(
            check,
            key,
            w.count + 64,
            (w.count + 64).max(1_048_576),
            "one per container",
        ));
    }
    out
}

/// User-namespace ID ranges of 65536: those claimed on this host (every
/// state root) and what a fleet of `count` in this root adds.
fn id_ranges(w: &Want<'_>) -> Vec<Finding> {
    use crate::claims::uid_range::{HOST_CLAIMS, PREFERRED, SLOTS};
    let instances = w.store.instances_dir();
    let (mut claimed, mut mine) = (0u64, 0u64);
    if let Ok(dir) = std::fs::read_dir(HOST_CLAIMS) {
        for e in dir.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
            {
                claimed += 1;
                if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&instances)) {
                    mine += 1;
                }
            }
        }
    }
    let need = claimed - mine + w.count;
    let (preferred, slots) = (u64::from(PREFERRED), u64::from(SLOTS));
    let value = format!("{claimed} claimed in {HOST_CLAIMS} ({mine} by this root)");
    let finding = if need <= preferred {
        info(
            "UID ranges",
            Status::Ok,
            value,
            &format!("{need} of the {preferred} below 2^31"),
            "",
        )
    } else if need <= slots {
        info(
            "UID ranges",
            Status::Ok,
            value,
            &format!(
                "{need}: {} past 2^31 (0x80000000 up), where systemd puts nothing and some \
                 tools read IDs as signed (SECURITY.md)",
                need - preferred
            ),
            "",
        )
    } else {
        info(
            "UID ranges",
            Status::Fail,
            value,
            &format!("{need} of the {slots} a host has"),
            "fewer instances with a user namespace per host; --no-userns for the rest \
             (container root is then host root: SECURITY.md)",
        )
    };
    vec![finding]
}

/// Mounts per mount namespace.
fn mount_max(_: &Want<'_>) -> Vec<Finding> {
    vec![at_least(
        "mount-max",
        "fs.mount-max",
        256,
        100_000,
        "mounts per mount namespace: a container has its own, with about 30",
    )]
}

/// inotify (unused: shown for completeness).
fn inotify(_: &Want<'_>) -> Vec<Finding> {
    vec![info(
        "inotify",
        Status::Ok,
        format!(
            "fs.inotify.max_user_instances = {}, max_user_watches = {}",
            sysctl("fs.inotify.max_user_instances").unwrap_or_default(),
            sysctl("fs.inotify.max_user_watches").unwrap_or_default()
        ),
        "none: nifty, BusyBox init and Dropbear use no inotify",
        "",
    )]
}

/// Keyrings (refused by the seccomp filter).
fn keyrings(_: &Want<'_>) -> Vec<Finding> {
    vec![info(
        "keyrings",
        Status::Ok,
        format!("kernel.keys.maxkeys = {}", sysctl("kernel.keys.maxkeys").unwrap_or_default()),
        "none: each container's root is its own host UID (own key quota), and its seccomp filter refuses keyctl/add_key",
        "",
    )]
}

/// `fs.suid_dumpable`: whether the kernel leaves a process that changed
/// its IDs open to tracing by others with its IDs.
fn dumpable(_: &Want<'_>) -> Vec<Finding> {
    let have = num("fs.suid_dumpable");
    let ok = have != Some(1);
    vec![Finding {
        check: "suid-dumpable".into(),
        status: if ok { Status::Ok } else { Status::Warn },
        value: have.map_or("unknown".into(), |h| format!("fs.suid_dumpable = {h}")),
        need: "0 or 2: at 1 (\"debug\") every process that takes a container's IDs is open to the container's root (its memory, fds) until it calls prctl(PR_SET_DUMPABLE, 0); nifty's own do at once, a few system calls later".into(),
        fix: match ok {
            true => String::new(),
            false => "sysctl -w fs.suid_dumpable=0".into(),
        },
        change: (!ok).then(|| Change::Sysctl {
            key: "fs.suid_dumpable".into(),
            value: "0".into(),
        }),
    }]
}

/// Instance ports against the ephemeral range and 65535.
fn ports(w: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let port_base = w.store.port_base();
    let top_port = u64::from(port_base) + w.count;
    let range = sysctl("net.ipv4.ip_local_port_range").unwrap_or_default();
    let reserved = sysctl("net.ipv4.ip_local_reserved_ports").unwrap_or_default();
    let fleet = (u64::from(port_base) + 1, top_port.min(65535));
    // The fleet's ports the kernel may hand to outgoing connections: one
    // in use (or in TIME-WAIT) when its instance starts keeps Dropbear
    // from listening, and `create` refuses it.
    let exposed = crate::store::ephemeral_overlap(&range, fleet).map(|span| {
        let mut taken = parse_port_ranges(&reserved);
        let missing = subtract(span, &taken);
        taken.push(span);
        (missing, join_port_ranges(&merge(taken)))
    });
    let (status, fix, set) = match &exposed {
        Some((missing, merged)) if !missing.is_empty() => (
            Status::Warn,
            format!("sysctl -w net.ipv4.ip_local_reserved_ports={merged}"),
            Some(Change::Sysctl {
                key: "net.ipv4.ip_local_reserved_ports".to_string(),
                value: merged.clone(),
            }),
        ),
        _ => (Status::Ok, String::new(), None),
    };
    out.push(Finding {
        check: "local port range".into(),
        status,
        value: format!("net.ipv4.ip_local_port_range = {range}; reserved = {reserved:?}"),
        need: format!(
            "instance ports {}..{} outside the ephemeral range, or reserved (kept from \
             outgoing connections)",
            fleet.0, fleet.1
        ),
        fix,
        change: set,
    });
    if top_port > 65535 {
        out.push(info(
            "port numbers",
            Status::Fail,
            format!("{port_base} + {} = {top_port}", w.count),
            "<= 65535",
            "give ports explicitly (--port) or use fewer numeric instances per host",
        ));
    }
    out
}

/// "1,3-5,8" (net.ipv4.ip_local_reserved_ports) as inclusive ranges.
fn parse_port_ranges(list: &str) -> Vec<(u64, u64)> {
    list.split(',')
        .filter_map(|r| {
            let r = r.trim();
            match r.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => r.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

/// Sorted, with overlapping and adjacent ranges joined.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The parts of `span` no range of `taken` covers.
fn subtract(span: (u64, u64), taken: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut left = vec![span];
    for &(a, b) in taken {
        left = left
            .into_iter()
            .flat_map(|(x, y)| {
                let mut parts = Vec::new();
                if b < x || a > y {
                    parts.push((x, y));
                } else {
                    if a > x {
                        parts.push((x, a - 1));
                    }
                    if b < y {
                        parts.push((b + 1, y));
                    }
                }
                parts
            })
            .collect();
    }
    left
}

fn join_port_ranges(ranges: &[(u64, u64)]) -> String {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// overlayfs: loaded, built in, or a module that loads.
fn overlayfs(_: &Want<'_>) -> Vec<Finding> {
    let (release, _) = kernel();
    let mut out = Vec::new();
    let (st, value) = overlay_status(&release);
    out.push(info(
        "overlayfs",
        st,
        value,
        "instances are overlays of the template",
        if st == Status::Ok {
            ""
        } else {
            "install the kernel's modules (modprobe overlay must work)"
        },
    ));
    out
}

/// The new mount API and idmapped mounts (5.12).
fn mount_api(_: &Want<'_>) -> Vec<Finding> {
    let (release, at_least) = kernel();
    vec![info(
        "new mount API",
        if at_least((5, 12)) {
            Status::Ok
        } else {
            Status::Fail
        },
        format!("Linux {release}"),
        ">= 5.12: fsopen/fsmount/open_tree/move_mount (5.2), mount_setattr and idmapped mounts (5.12)",
        if at_least((5, 12)) {
            ""
        } else {
            "a newer kernel (Debian 12's 6.1, Ubuntu 22.04's 5.15, RHEL 9's 5.14 have it)"
        },
    )]
}

/// Idmapped overlay lower layers (5.19), tried on the default template
/// when there is one, or the fallback: shifted copies.
fn idmapped_layers(w: &Want<'_>) -> Vec<Finding> {
    use crate::runtime::linux::features;
    let (release, at_least) = kernel();
    let template = w.store.template_rootfs("default");
    let forced = features::forced("shifted");
    let idmap = if forced {
        false
    } else if template.is_dir() && w.store.root().is_dir() {
        features::idmapped_layers(&template, w.store.root())
    } else {
        at_least((5, 19))
    };
    vec![info(
        "idmapped overlay layers",
        if idmap { Status::Ok } else { Status::Warn },
        if idmap {
            format!("Linux {release}: every instance's ID range over the one shared template")
        } else {
            format!(
                "Linux {release}{}: each instance with a user namespace gets its own copy of the \
                 template in its ID range at its first start (reflinked where the filesystem \
                 can; else the template's size per instance)",
                if forced {
                    " (forced by NIFTY_FALLBACKS=shifted)"
                } else {
                    ""
                }
            )
        },
        ">= 5.19 (or a backport), and a filesystem with idmapped mounts under the template",
        if idmap {
            ""
        } else {
            "a newer kernel (Ubuntu 22.04: its HWE kernel) shares one template between all instances"
        },
    )]
}

/// Overlay layers by fd (6.13), or the fallback.
fn overlay_fd_layers(_: &Want<'_>) -> Vec<Finding> {
    use crate::runtime::linux::features;
    let mut out = Vec::new();
    let by_fd = features::probe_overlay_fd_layers();
    out.push(info(
        "overlay layers by fd",
        Status::Ok,
        match by_fd {
            Some(true) => "yes (lowerdir+ by fd, Linux 6.13+)".to_string(),
            Some(false) => "no (before Linux 6.13); fallback: the idmapped template is attached in a private mount namespace of nifty's and named by path, then detached (same isolation; see the README for its cost)".to_string(),
            None => "unknown (overlayfs did not open)".to_string(),
        },
        "fast path >= 6.13",
        "",
    ));
    out
}

/// cgroup.kill (5.14), or the fallback.
fn cgroup_kill(_: &Want<'_>) -> Vec<Finding> {
    let (_, at_least) = kernel();
    let mut out = Vec::new();
    let kill = at_least((5, 14));
    out.push(info(
        "cgroup.kill",
        Status::Ok,
        if kill {
            "yes (Linux 5.14+)".to_string()
        } else {
            "no; fallback: SIGKILL to each process of the cgroup".to_string()
        },
        "fast path >= 5.14",
        "",
    ));
    out
}

/// pidfds (5.3).
fn pidfds(_: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let pidfd = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .is_ok();
    out.push(info(
        "pidfds",
        if pidfd { Status::Ok } else { Status::Fail },
        if pidfd {
            "pidfd_open works".to_string()
        } else {
            "pidfd_open fails".to_string()
        },
        ">= 5.3: stop and start follow containers by pidfd, never by a reusable PID",
        if pidfd { "" } else { "a newer kernel" },
    ));
    out
}

/// Each container owns its port: Landlock (6.7) or the cgroup bind programs.
fn port_ownership(_: &Want<'_>) -> Vec<Finding> {
    let net = crate::runtime::linux::confine::NetConfinement::of_kernel();
    let mut out = Vec::new();
    {
        use crate::runtime::linux::confine::PortOwnership;
        let (status, what, fix) = match net.ports {
            PortOwnership::Landlock => (
                Status::Ok,
                "Landlock: a container binds only its own TCP port".to_string(),
                "",
            ),
            PortOwnership::CgroupBpf => (
                Status::Ok,
                format!(
                    "cgroup bind programs ({}): a container binds only its own TCP port",
                    if crate::sys::landlock_abi() >= 4 {
                        "forced by NIFTY_FALLBACKS=bind".to_string()
                    } else {
                        format!(
                            "fallback: Landlock ABI {} has no network rules",
                            crate::sys::landlock_abi()
                        )
                    }
                ),
                "",
            ),
            PortOwnership::None => (
                Status::Warn,
                "not defended: no Landlock network rules (6.7) and no cgroup BPF (CONFIG_CGROUP_BPF); a container can bind any free port, a stopped neighbour's SSH port among them".to_string(),
                "a kernel with CONFIG_CGROUP_BPF, or 6.7+",
            ),
        };
        out.push(info(
            "port ownership",
            status,
            what,
            ">= 6.7 (Landlock ABI 4); fallback >= 4.17 (cgroup BPF_CGROUP_INET4/6_BIND)",
            fix,
        ));
    }
    out
}

/// Abstract unix sockets out of reach (Landlock scoping, 6.12).
fn abstract_sockets(_: &Want<'_>) -> Vec<Finding> {
    let net = crate::runtime::linux::confine::NetConfinement::of_kernel();
    vec![info(
        "abstract unix sockets",
        if net.abstract_unix {
            Status::Ok
        } else {
            Status::Warn
        },
        if net.abstract_unix {
            "Landlock: out of reach of containers".to_string()
        } else {
            "not defended: containers reach the host's abstract unix sockets (Landlock scoping: 6.12)".to_string()
        },
        ">= 6.12 (Landlock ABI 6)",
        if net.abstract_unix {
            ""
        } else {
            "a newer kernel; meanwhile let no host service trust an abstract socket"
        },
    )]
}

/// How `nifty serve` would hold on-demand ports: one socket for all
/// (BPF sk_lookup, 5.9), or one each. Tried as serve does it.
fn on_demand_ports(_: &Want<'_>) -> Vec<Finding> {
    let value = if crate::runtime::linux::features::forced("steer") {
        "a listening socket per port, about 2.3 KiB each (forced by NIFTY_FALLBACKS=steer)"
            .to_string()
    } else {
        match crate::runtime::linux::steer::Steer::new() {
            Ok(_) => "one socket pair for every port (BPF sk_lookup)".to_string(),
            Err(e) => format!(
                "fallback: a listening socket per port, about 2.3 KiB each (BPF sk_lookup: {e})"
            ),
        }
    };
    vec![info(
        "on-demand ports",
        Status::Ok,
        value,
        ">= 5.9 (BPF sk_lookup); fallback: any",
        "",
    )]
}

/// Whether a `--network none` instance's namespace gets a TCP table of its
/// own (Linux 6.1): made as a start makes it.
fn network_tables(_: &Want<'_>) -> Vec<Finding> {
    use crate::runtime::linux::{features, netns};
    let shared = "the host's TCP table, which /proc/net/tcp in such an instance walks whole \
                  (Dropbear reads it at each start: some 3 ms on a host with a large table)";
    let (status, value) = if features::forced("netns-ehash") {
        (
            Status::Ok,
            format!("{shared} (forced by NIFTY_FALLBACKS=netns-ehash)"),
        )
    } else if netns::nursery().is_some() {
        (
            Status::Ok,
            format!(
                "each --network none instance's network has a table of its own ({} buckets)",
                netns::OWN_TABLE
            ),
        )
    } else {
        (Status::Ok, format!("fallback: {shared}"))
    };
    vec![info(
        "netns TCP tables",
        status,
        value,
        ">= 6.1 (net.ipv4.tcp_child_ehash_entries); fallback: any",
        "",
    )]
}

/// This root's on-demand instances of the native launcher are reachable
/// only while a `nifty serve` holds their ports: none is said when there
/// are none.
fn on_demand_served(w: &Want<'_>) -> Vec<Finding> {
    let Ok(rt) = crate::runtime::Runtime::new(w.store) else {
        return Vec::new();
    };
    let names = w.store.instance_names().unwrap_or_default();
    let waiting = names
        .iter()
        .filter_map(|n| w.store.instance(n).ok())
        .filter(|i| rt.served_by_serve(i))
        .count();
    if waiting == 0 {
        return Vec::new();
    }
    let serving = crate::serve::serving(w.store);
    let root = w.store.root().display();
    vec![info(
        "on-demand serve",
        if serving { Status::Ok } else { Status::Warn },
        format!(
            "{waiting} native on-demand instance(s); `nifty serve` {} for {root}",
            if serving { "runs" } else { "does not run" }
        ),
        "a running `nifty serve`, which holds their ports",
        if serving {
            ""
        } else {
            "run `nifty serve` for this root, or enable the service `nifty systemd install` writes for it"
        },
    )]
}

/// The default template tried as `start` would.
fn default_template(w: &Want<'_>) -> Vec<Finding> {
    use crate::runtime::linux::features;
    let mut out = Vec::new();
    let template = w.store.template_rootfs("default");
    if template.is_dir() {
        let r = features::preflight(true);
        out.push(info(
            "default template",
            if r.is_ok() { Status::Ok } else { Status::Fail },
            match &r {
                Ok(()) => "overlayfs, mount_setattr and user namespaces work".to_string(),
                Err(e) => e.to_string(),
            },
            "what `start` needs, tried on the template",
            "",
        ));
    }
    out
}

/// The cgroup hierarchy, and where native containers go.
fn cgroups(w: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    match Hierarchy::detect() {
        Ok(h) => out.push(info(
            "cgroups",
            Status::Ok,
            format!(
                "{}; native containers in {}",
                if h.v2_controllers {
                    format!("pure cgroup v2 at {}", h.v2.display())
                } else {
                    format!(
                        "hybrid: v2 at {} for membership, v1 pids/memory for limits",
                        h.v2.display()
                    )
                },
                if h.systemd {
                    format!(
                        "/{} (a scope systemd delegated)",
                        h.base(&w.store.cgroup_name())
                    )
                } else {
                    format!(
                        "/{} (no systemd to delegate)",
                        h.base(&w.store.cgroup_name())
                    )
                }
            ),
            "a cgroup v2 hierarchy",
            "",
        )),
        Err(e) => out.push(info(
            "cgroups",
            Status::Fail,
            e.to_string(),
            "a cgroup v2 hierarchy",
            "mount -t cgroup2 none /sys/fs/cgroup/unified",
        )),
    }
    out
}

/// Whether a start waits for an RCU grace period to join its v1 cgroups
/// (a hybrid host without `favordynmods`): 10-20 ms of a single cold start
/// here, during which every other start's cgroup work waits too.
fn cgroup_joins(_: &Want<'_>) -> Vec<Finding> {
    let Ok(h) = Hierarchy::detect() else {
        return Vec::new(); // said by the cgroups check
    };
    let (_, at_least) = kernel();
    let need = "no wait for an RCU grace period at each start";
    let (status, value, fix, change) = if !h.joins_v1() {
        (
            Status::Ok,
            "none: a container is cloned into its cgroup (CLONE_INTO_CGROUP)".to_string(),
            String::new(),
            None,
        )
    } else if h.favordynmods {
        (
            Status::Ok,
            "each start joins the v1 groups; favordynmods is on, so a join does not wait for an RCU grace period".into(),
            String::new(),
            None,
        )
    } else if at_least((6, 0)) {
        (
            Status::Warn,
            "each start joins the v1 groups, and each join waits for an RCU grace period (favordynmods is off)".into(),
            format!(
                "nifty doctor --fix (mount -o remount,favordynmods {}: until the next boot; \
                 the kernel command line cgroup_favordynmods=true, Linux 6.7, makes it last), \
                 or boot with pure cgroup v2 (systemd.unified_cgroup_hierarchy=1)",
                h.v2.display()
            ),
            Some(Change::FavorDynmods),
        )
    } else {
        (
            Status::Warn,
            "each start joins the v1 groups, and each join waits for an RCU grace period (no favordynmods before Linux 6.0)".into(),
            "boot with pure cgroup v2 (systemd.unified_cgroup_hierarchy=1), or Linux 6.0 or later and favordynmods".into(),
            None,
        )
    };
    vec![Finding {
        check: "cgroup joins".into(),
        status,
        value,
        need: need.into(),
        fix,
        change,
    }]
}

/// systemd as PID 1 and systemd-nspawn (the systemd backend).
fn systemd(_: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let pid1 = std::fs::read_to_string("/proc/1/comm")
        .unwrap_or_default()
        .trim()
        .to_string();
    let nspawn = ["/usr/bin/systemd-nspawn", "/bin/systemd-nspawn"]
        .iter()
        .any(|p| Path::new(p).exists());
    out.push(info(
        "systemd",
        if pid1 == "systemd" && nspawn {
            Status::Ok
        } else {
            Status::Warn
        },
        format!(
            "PID 1 is {pid1:?}; systemd-nspawn {}",
            if nspawn { "installed" } else { "missing" }
        ),
        "only for the systemd backend (the native launcher needs neither)",
        if nspawn {
            ""
        } else {
            "apt-get install systemd-container"
        },
    ));
    out
}

/// Disk for N instances.
fn disk(w: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let root = w.store.root();
    let probe = std::iter::successors(Some(root), |p| p.parent())
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if let Ok(st) = rustix::fs::statvfs(probe) {
        let free = st.f_bavail * st.f_frsize;
        let need = w.count * DISK_PER_INSTANCE + (64 << 20);
        out.push(info(
            "disk",
            if free >= need {
                Status::Ok
            } else {
                Status::Fail
            },
            format!("{} MiB free at {}", free >> 20, probe.display()),
            &format!(">= {} MiB: 64 KiB per instance and a template", need >> 20),
            if free >= need {
                ""
            } else {
                "free space or move the state root (--root)"
            },
        ));
    }
    out
}

/// The disk store (instances' own files under their disk limits): where
/// it is, and whether this host can make it.
fn disk_store(w: &Want<'_>) -> Vec<Finding> {
    let loop_dev = Path::new("/dev/loop-control").exists();
    let kind = crate::volume::choose();
    let ok = crate::volume::mounted(w.store) || (loop_dev && kind.is_ok());
    vec![info(
        "disk limits",
        if ok { Status::Ok } else { Status::Warn },
        if ok {
            crate::volume::describe(w.store)
        } else {
            format!(
                "cannot make the disk store: {}",
                [
                    kind.as_ref().err().map(|e| e.to_string()),
                    (!loop_dev).then(|| "no /dev/loop-control".to_string()),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ")
            )
        },
        "a quota-capable disk store (btrfs, or XFS with project quotas) on a loop device: each instance's own files are limited (--disk, default 1G)",
        if ok { "" } else { "apt-get install btrfs-progs; modprobe btrfs loop (or create instances with --disk unlimited)" },
    )]
}

/// What the I/O weights (`--io-weight`) act on here: the scheduler of the
/// disk under the state root.
fn io_weights(w: &Want<'_>) -> Vec<Finding> {
    let dev = std::iter::successors(Some(w.store.root()), |p| p.parent())
        .find_map(|p| rustix::fs::stat(p).ok())
        .map(|st| (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)));
    let sched = dev.and_then(|(ma, mi)| {
        let sys = format!("/sys/dev/block/{ma}:{mi}");
        // A partition's queue is its disk's.
        ["queue/scheduler", "../queue/scheduler"]
            .iter()
            .find_map(|q| std::fs::read_to_string(format!("{sys}/{q}")).ok())
    });
    let active = sched.as_deref().and_then(|s| {
        s.split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
    });
    let (status, value) = match active.as_deref() {
        Some("bfq") => (Status::Ok, "BFQ schedules the state root's disk: --io-weight is honoured".to_string()),
        Some(s) => (
            Status::Warn,
            format!("the state root's disk is scheduled by {s}: --io-weight has no effect there unless io.cost is set up for it (BFQ honours weights)"),
        ),
        None => (Status::Warn, "no I/O scheduler found for the state root's disk (a virtual or overlay filesystem): --io-weight may have no effect".into()),
    };
    vec![info(
        "I/O weights",
        status,
        value,
        "BFQ (or io.cost) on the disk that holds the instances' files",
        if status == Status::Ok {
            ""
        } else {
            "echo bfq > /sys/block/<disk>/queue/scheduler (modprobe bfq)"
        },
    )]
}

/// Memory for N idle containers.
fn memory(w: &Want<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb << 10);
    let need = w.count * MEMORY_PER_CONTAINER;
    out.push(info(
        "memory",
        if avail >= need {
            Status::Ok
        } else {
            Status::Fail
        },
        format!("{} MiB available", avail >> 20),
        &format!(">= {} MiB: about 1 MiB per idle container", need >> 20),
        if avail >= need {
            ""
        } else {
            "run fewer containers or add memory"
        },
    ));
    out
}

/// Templates built from a BusyBox or Dropbear that the host has since
/// upgraded (a security fix waiting to reach the fleet).
fn templates_current(w: &Want<'_>) -> Vec<Finding> {
    w.store
        .templates()
        .unwrap_or_default()
        .iter()
        .filter_map(|t| {
            let stale = crate::template::stale_sources(t);
            (!stale.is_empty()).then(|| {
                info(
                    &format!("template {}", t.name),
                    Status::Warn,
                    format!(
                        "v{} was built from an older {} than the host's",
                        t.version,
                        stale.join(" and ")
                    ),
                    "templates built from the host's current busybox-static and dropbear-bin",
                    &format!("nifty template build --name {}; nifty update --all", t.name),
                )
            })
        })
        .collect()
}

/// The running kernel's release, and a test of its version against
/// (major, minor).
fn kernel() -> (String, impl Fn((u32, u32)) -> bool) {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let v = crate::runtime::linux::features::parse_release(&release);
    (release, move |want: (u32, u32)| v >= want)
}

/// Is overlayfs loaded, built in, or a module that loads on first use?
fn overlay_status(release: &str) -> (Status, String) {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if fs.lines().any(|l| l.ends_with("\toverlay")) {
        return (Status::Ok, "available".into());
    }
    let modules = Path::new("/lib/modules").join(release);
    let listed = |file: &str| {
        std::fs::read_to_string(modules.join(file)).is_ok_and(|t| {
            t.lines()
                .any(|l| l.contains("/overlay.ko") || l.contains("/overlayfs.ko"))
        })
    };
    if listed("modules.builtin") || listed("modules.dep") {
        (
            Status::Ok,
            "a module, loaded by the kernel on first use".into(),
        )
    } else {
        (
            Status::Fail,
            format!(
                "not in /proc/filesystems, and no module in {}",
                modules.display()
            ),
        )
    }
}

/// Makes the changes of the findings that have one; returns each, with
/// whether it was made.
pub fn fix(findings: &[Finding]) -> Vec<(Change, Result<(), String>)> {
    findings
        .iter()
        .filter_map(|f| f.change.clone())
        .map(|c| {
            let r = match &c {
                Change::Sysctl { key, value } => {
                    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                    std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))
                }
                Change::FavorDynmods => Hierarchy::detect()
                    .and_then(|h| h.set_favordynmods(true))
                    .map_err(|e| e.to_string()),
            };
            (c, r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_merged_not_replaced() {
        let fleet = (30001, 40000);
        let span = crate::store::ephemeral_overlap("32768 60999", fleet).unwrap();
        assert_eq!(span, (32768, 40000));
        assert_eq!(
            crate::store::ephemeral_overlap("32768 60999", (2201, 3200)),
            None
        );
        assert_eq!(
            crate::store::ephemeral_overlap("40000 50000", (2201, 39999)),
            None
        );
        // A user's own reservations stay; the fleet's part is added.
        let mut taken = parse_port_ranges("8080,35000-36000,39999-45000");
        assert_eq!(subtract(span, &taken), vec![(32768, 34999), (36001, 39998)]);
        taken.push(span);
        assert_eq!(join_port_ranges(&merge(taken)), "8080,32768-45000");
        assert!(subtract(span, &parse_port_ranges("1-65535")).is_empty());
        assert_eq!(parse_port_ranges(""), vec![]);
    }

    #[test]
    fn findings_name_real_values() {
        let store = Store::new(Some(std::env::temp_dir().join("nifty-doctor-unit")));
        let f = check(&store, 10);
        let pid = f.iter().find(|f| f.check == "pid_max").unwrap();
        let real = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap();
        assert!(pid.value.contains(real.trim()), "{pid:?}");
        assert_eq!(pid.status, Status::Ok, "10 containers fit any pid_max");
        let huge = check(&store, 100_000_000);
        assert!(huge
            .iter()
            .any(|f| f.status == Status::Fail && f.change.is_some()));
    }
}
