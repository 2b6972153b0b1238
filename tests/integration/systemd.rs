//! The systemd backend on a real systemd: each test boots one as PID 1 of
//! a container made from this machine's own root (systemd-nspawn
//! --volatile=yes), with the built nifty and the test's state root bound
//! in, and drives it with `nsenter`. The harness powers it off (and kills
//! what is left) even when a test fails.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{privileged, quota_exceeded, wait_port, Root, NIFTY};

/// A systemd booted in a container of this machine's root.
struct SystemdHost {
    /// The state root, bound at /var/lib/nifty inside (so the units are
    /// plain `nifty@N.service`).
    root: Root,
    /// /etc/systemd/system of the booted host, kept on disk so that
    /// `enable` survives its reboot.
    etc: tempfile::TempDir,
    machine: String,
    nspawn: Option<Child>,
    init: i32,
}

impl SystemdHost {
    fn boot() -> SystemdHost {
        let root = Root::new();
        root.ok(&["template", "build", "-q"]);
        // The disk store is a loop mount, which a container (this systemd
        // host is one) may not make: mounted here, it is bound in with the
        // state root, as it is on a real host after the first create.
        nifty::volume::ensure(&nifty::store::Store::new(Some(root.path().into())))
            .expect("the disk store");
        let etc = tempfile::Builder::new()
            .prefix("nifty-test-etc-")
            .tempdir()
            .unwrap();
        // Start from this machine's own unit links (getty, dbus, ...).
        let st = Command::new("cp")
            .args(["-a", "/etc/systemd/system/."])
            .arg(etc.path())
            .status()
            .unwrap();
        assert!(st.success(), "copy /etc/systemd/system");
        let mut h = SystemdHost {
            root,
            etc,
            machine: format!("nifty-sd-{}", std::process::id()),
            nspawn: None,
            init: 0,
        };
        h.start();
        h
    }

    /// Boots (again) with the same state.
    fn start(&mut self) {
        let log = std::fs::File::create(self.root.path().join("systemd-host.log")).unwrap();
        // Options must come before -b: what follows goes to systemd.
        let child = Command::new("systemd-nspawn")
            .args(["--register=no", "--keep-unit", "--volatile=yes", "-D", "/"])
            .arg(format!("--machine={}", self.machine))
            .arg(format!(
                "--bind={}:/var/lib/nifty",
                self.root.path().display()
            ))
            .arg(format!(
                "--bind={}:/etc/systemd/system",
                self.etc.path().display()
            ))
            .arg(format!("--bind-ro={NIFTY}"))
            // What a systemd host's services may call, and nspawn's
            // filter refuses: bpf and pidfd_getfd (the steering of logins
            // to running on-demand instances).
            .arg("--system-call-filter=bpf pidfd_getfd")
            .args(["-b", "systemd.firstboot=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run systemd-nspawn (Debian package systemd-container)");
        let pid = child.id() as i32;
        self.nspawn = Some(child);
        // Its PID 1 is the child of systemd-nspawn named systemd.
        let end = Instant::now() + Duration::from_secs(30);
        self.init = loop {
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(k) = kids
                .split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok())
                .find(|k| {
                    std::fs::read_to_string(format!("/proc/{k}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                })
            {
                break k;
            }
            assert!(
                Instant::now() < end,
                "the systemd host did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // Wait until boot is done (degraded is fine: some host units fail
        // in a container).
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let o = self.sh(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if s == "running" || s == "degraded" {
                break;
            }
            assert!(
                Instant::now() < end,
                "systemd host state {s:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The bpffs a systemd host has at /sys/fs/bpf (systemd mounts it;
        // in a container it does not): a bpffs of its own, gone with it.
        common::succeeded(
            &self.sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]),
            "mount bpffs at /sys/fs/bpf in the systemd host",
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("systemd-host.log")).unwrap_or_default()
    }

    /// Runs a command inside the booted host.
    fn sh(&self, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a"])
            .args(cmd)
            .output()
            .expect("run nsenter")
    }

    fn stdout(&self, cmd: &[&str]) -> String {
        String::from_utf8_lossy(&self.sh(cmd).stdout).into_owned()
    }

    /// Runs nifty inside (its default root: /var/lib/nifty); asserts success.
    fn nifty(&self, args: &[&str]) -> String {
        let base = format!("NIFTY_PORT_BASE={}", common::TEST_PORT_BASE);
        let mut cmd = vec!["env", base.as_str(), NIFTY];
        cmd.extend_from_slice(args);
        common::succeeded(&self.sh(&cmd), &format!("nifty {args:?} inside systemd"))
    }

    fn is_active(&self, unit: &str) -> String {
        self.stdout(&["systemctl", "is-active", unit])
            .trim()
            .to_string()
    }

    /// Waits for the nspawn of the host to exit (after poweroff/reboot).
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let Some(child) = self.nspawn.as_mut() else {
            return true;
        };
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if child.try_wait().ok().flatten().is_some() {
                self.nspawn = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// `systemctl reboot`, then a fresh boot with the same state.
    fn reboot(&mut self) {
        let _ = self.sh(&["systemctl", "reboot"]);
        assert!(
            self.wait_exit(Duration::from_secs(60)),
            "the systemd host did not go down: {}",
            self.log()
        );
        self.start();
    }

    /// Processes of this machine whose root is inside our state root or
    /// whose cgroup is one of nifty's units: what a stop must not leave.
    fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ours = |p: &Path| p.starts_with(self.root.path().join("instances"));
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let root: PathBuf = std::fs::read_link(format!("/proc/{pid}/root")).unwrap_or_default();
            if cg.contains("/nifty@") || ours(&root) {
                out.push(format!("pid {pid}: {}", cg.lines().next().unwrap_or("")));
            }
        }
        // A steering pinned in the host's bpffs (the warm path of on-demand
        // instances) goes with the last of them.
        let pins = self.stdout(&["sh", "-c", "ls -A /sys/fs/bpf/nifty 2>/dev/null"]);
        out.extend(
            pins.lines()
                .map(|p| format!("pinned: /sys/fs/bpf/nifty/{p}")),
        );
        out
    }
}

impl Drop for SystemdHost {
    fn drop(&mut self) {
        if self.nspawn.is_none() {
            return;
        }
        // Kill the containers at once, then power the host off cleanly.
        let _ = self.sh(&[NIFTY, "kill", "--all", "-q"]);
        let pid = self.nspawn.as_ref().map(|c| c.id() as i32).unwrap_or(0);
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::Term,
        );
        if !self.wait_exit(Duration::from_secs(30)) {
            // Killing its PID 1 ends the whole PID namespace.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(self.init).unwrap(),
                rustix::process::Signal::Kill,
            );
            if let Some(mut c) = self.nspawn.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.machine));
    }
}

/// `name`'s /proc/net, as its login user sees it, is the template's view
/// (systemd-nspawn mounted the kernel's; the unit's ExecStartPost, or the
/// first session or exec, covers it): no socket of the host is listed.
fn assert_proc_net_view(root: &Root, name: &str) {
    let listed = root.ssh(
        name,
        "readlink /proc/net; cat /proc/net/tcp /proc/net/tcp6 | wc -l",
    );
    let (link, lines) = listed.split_once('\n').unwrap();
    assert_eq!(link, "/usr/lib/nifty/net", "{name}: {listed}");
    assert!(
        lines.trim().parse::<u32>().unwrap() <= 2,
        "{name}: {listed}"
    );
}

fn privileged_systemd() -> bool {
    if !privileged() {
        return false;
    }
    assert!(
        Path::new("/usr/bin/systemd-nspawn").exists() && Path::new("/lib/systemd/systemd").exists(),
        "the systemd tests need systemd and systemd-container (scripts/install-deps)"
    );
    true
}

/// The article's path end to end: ten clones under nifty@.service, a real
/// SSH login, `systemctl status`, a clean stop on the unit's signal,
/// `nifty@slick` and an escaped name, and `enable` across a reboot.
#[test]
fn article_fleet_under_systemd() {
    if !privileged_systemd() {
        return;
    }
    let mut host = SystemdHost::boot();
    let root = &host.root;
    host.nifty(&["create", "1..10", "--backend", "systemd"]);
    let unit = std::fs::read_to_string(host.etc.path().join("nifty@.service")).unwrap();
    assert!(unit.contains("Description=nifty container # %I"), "{unit}");
    assert!(unit.contains("--kill-signal=SIGUSR2"), "{unit}");
    // The state root as the test host sees it.
    assert!(
        unit.contains("StandardOutput=append:/var/lib/nifty/instances/%I/console.log"),
        "{unit}"
    );
    assert!(
        host.etc
            .path()
            .join("nifty@3.service.d/50-nifty.conf")
            .exists(),
        "no drop-in with the limits"
    );
    host.nifty(&["start", "1..10"]);
    for n in 1..=10 {
        assert_eq!(host.is_active(&format!("nifty@{n}")), "active", "nifty@{n}");
    }
    for n in ["3", "10"] {
        assert!(
            wait_port(root.port(n), Duration::from_secs(20)),
            "dropbear of {n} does not listen"
        );
    }
    let help = root.ssh("3", "sh --help 2>&1");
    assert!(help.contains("BusyBox"), "sh --help over ssh: {help}");
    assert_eq!(root.ssh("10", "hostname").trim(), "nifty10");
    // The unit's ExecStartPost covered /proc/net with the template's view:
    // the test host's own sockets are not listed.
    assert_proc_net_view(root, "10");

    let status = host.stdout(&["systemctl", "status", "--no-pager", "--lines=0", "nifty@3"]);
    for want in [
        "nifty container # 3",
        "init",
        "/sbin/syslogd",
        "dropbear",
        &format!("-p {}", root.port("3")),
    ] {
        assert!(
            status.contains(want),
            "systemctl status lacks {want:?}:\n{status}"
        );
    }
    let ours = host.nifty(&["status", "3"]);
    assert!(
        ours.contains("nifty@3.service") && ours.contains("dropbear"),
        "{ours}"
    );
    let list = host.nifty(&["list"]);
    assert!(list.contains("10 instance(s), 10 running"), "{list}");
    // Limits go to the unit: its drop-in keeps them, a running unit gets
    // them at once; the disk limit holds inside.
    host.nifty(&[
        "set",
        "3",
        "--cpus",
        "0.5",
        "--io-weight",
        "200",
        "--disk",
        "100M",
    ]);
    let dropin =
        std::fs::read_to_string(host.etc.path().join("nifty@3.service.d/50-nifty.conf")).unwrap();
    for want in ["CPUWeight=100", "CPUQuota=50%", "IOWeight=200"] {
        assert!(dropin.contains(want), "drop-in lacks {want}:\n{dropin}");
    }
    let show = host.stdout(&[
        "systemctl",
        "show",
        "-p",
        "CPUQuotaPerSecUSec",
        "-p",
        "IOWeight",
        "nifty@3",
    ]);
    assert!(
        show.contains("CPUQuotaPerSecUSec=500ms") && show.contains("IOWeight=200"),
        "{show}"
    );
    let (ok, _, err) = root.ssh_as("3", "luser", "dd if=/dev/zero of=big bs=1M count=200");
    assert!(!ok && quota_exceeded(&err), "200M under 100M: {err}");
    // The console log is in the disk store too, counted against the limit
    // (nspawn passes init the log's fds: --console=pipe), and a full limit
    // did not end the container: it answered the login above.
    root.ssh("3", "rm big");
    let log = std::fs::read_to_string(root.path().join("disk/3/console.log")).unwrap();
    assert!(log.contains("nifty: starting instance 3"), "{log}");
    // restart goes through systemd too: a new init, reachable again.
    let before = host.stdout(&["systemctl", "show", "--property=MainPID", "nifty@10"]);
    host.nifty(&["restart", "10"]);
    let after = host.stdout(&["systemctl", "show", "--property=MainPID", "nifty@10"]);
    assert_ne!(before, after, "nifty@10 was not restarted");
    assert!(wait_port(root.port("10"), Duration::from_secs(20)));
    assert_eq!(root.ssh("10", "hostname").trim(), "nifty10");
    // nifty finds a container in its unit's cgroup, in the unit file's
    // slice, without asking systemd; one a drop-in moved to another slice
    // is found where systemd says it is.
    let moved = host.etc.path().join("nifty@9.service.d/90-slice.conf");
    std::fs::write(&moved, "[Service]\nSlice=nifty-moved.slice\n").unwrap();
    host.sh(&["systemctl", "daemon-reload"]);
    host.nifty(&["restart", "9"]);
    let cg = host.stdout(&["systemctl", "show", "--property=ControlGroup", "nifty@9"]);
    assert!(cg.contains("/nifty-moved.slice/"), "{cg}");
    assert_eq!(host.nifty(&["exec", "9", "--", "hostname"]), "nifty9\n");
    assert_eq!(host.nifty(&["exec", "3", "--", "hostname"]), "nifty3\n");

    // A rolling update through systemd: version 2 of the template, 1..4
    // restarted two at a time, each checked (an SSH login with its own
    // host key) before the next; the rest stay on version 1.
    root.ssh("2", "echo precious > ~/kept");
    root.ok(&["template", "build", "-q", "--with", "/usr/bin/socat"]);
    let out = host.nifty(&["update", "1..4", "--batch", "2"]);
    assert!(out.contains("4 moved (4 restarted in 2 batch(es)"), "{out}");
    let list: serde_json::Value = serde_json::from_str(&host.nifty(&["list", "--json"])).unwrap();
    for i in list.as_array().unwrap() {
        let n: u32 = i["name"].as_str().unwrap().parse().unwrap();
        let want = if n <= 4 { 2 } else { 1 };
        assert_eq!(i["template_version"], want, "{i}");
        assert_eq!(i["state"], "running", "{i}");
    }
    assert_eq!(host.is_active("nifty@1"), "active");
    assert_eq!(root.ssh("2", "cat ~/kept"), "precious\n");
    // A version whose Dropbear cannot start: the batch goes back to the
    // version it had, running, and the update says so (exit 1).
    root.ok(&["template", "build", "-q"]);
    let v3_dropbear = root
        .path()
        .join("templates/default/v3/rootfs/usr/sbin/dropbear");
    let good = std::fs::read(&v3_dropbear).unwrap();
    std::fs::copy("/bin/false", &v3_dropbear).unwrap();
    let base = format!("NIFTY_PORT_BASE={}", common::TEST_PORT_BASE);
    let o = host.sh(&[
        "env",
        &base,
        NIFTY,
        "update",
        "5..6",
        "--batch",
        "2",
        "--health-timeout",
        "5",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("5: v1 -> v3 failed") && err.contains("back on v1 and running"),
        "{err}"
    );
    assert_eq!(host.is_active("nifty@5"), "active");
    assert!(wait_port(root.port("5"), Duration::from_secs(20)));
    assert_eq!(root.ssh("5", "echo back"), "back\n");
    // Mended: new instances below are made on version 3.
    // (Its own Dropbear back, the host's or a static one: NIFTY_DROPBEAR.)
    std::fs::write(&v3_dropbear, good).unwrap();

    // 10's inittab gains a shutdown action (BusyBox init re-reads it on
    // SIGHUP): its poweroff is left to init, so that the action runs.
    host.nifty(&common::add_shutdown_action("10"));
    let reloaded = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        host.nifty(&["logs", "10"])
            .contains("reloading /etc/inittab")
    });
    assert!(reloaded, "init did not re-read its inittab");
    // Stop: every unit ends on nifty's power off (the unit's ExecStop:
    // init stopped, SIGTERM to the services, then reboot(2) in its PID
    // namespace), not on the unit's timeout (which would log "timed out"
    // and kill), and its result is a success: nspawn saw a poweroff.
    host.nifty(&["stop", "1..10"]);
    for n in 1..=10 {
        let u = format!("nifty@{n}");
        assert_eq!(host.is_active(&u), "inactive", "{u}");
        let r = host.stdout(&["systemctl", "show", "--property=Result", &u]);
        assert_eq!(r.trim(), "Result=success", "{u}");
    }
    let journal = host.stdout(&["journalctl", "--no-pager", "--unit=nifty@*"]);
    assert!(
        !journal.contains("timed out") && !journal.contains("Killing process"),
        "a container was killed on the stop timeout:\n{journal}"
    );
    // The console goes to the instance's console log, as a native one's
    // (no journal stream per unit: journald takes at most 4096).
    // What its last run wrote (the log keeps the runs before).
    let last_run = |n: &str| {
        let log = host.nifty(&["logs", n]);
        assert!(log.contains("nifty: starting instance"), "{n}: {log}");
        log.rsplit("nifty: starting instance")
            .next()
            .unwrap()
            .to_string()
    };
    // 1: the services exited on SIGTERM (syslogd and Dropbear say so);
    // init's own poweroff, which sleeps two seconds, never ran.
    let log = last_run("1");
    assert!(log.contains("nifty: powering off"), "{log}");
    assert!(log.contains("syslogd exiting"), "{log}");
    assert!(log.contains("Terminated by signal"), "{log}");
    assert!(!log.contains("The system is going down"), "{log}");
    // 10: init ran its shutdown action, then its poweroff.
    let log = last_run("10");
    assert!(log.contains("custom shutdown ran"), "{log}");
    assert!(log.contains("The system is going down"), "{log}");
    assert!(!log.contains("nifty: powering off"), "{log}");
    assert!(
        !journal.contains("syslogd exiting"),
        "the console went to the journal:\n{journal}"
    );
    let active = host.stdout(&[
        "systemctl",
        "list-units",
        "--no-legend",
        "--state=active",
        "nifty@*",
    ]);
    assert_eq!(active.trim(), "", "units left active");
    let mounts = host.stdout(&["cat", "/proc/self/mountinfo"]);
    assert!(!mounts.contains("/var/lib/nifty/instances"), "{mounts}");
    assert!(common::mounted_under(&root.path().join("instances")).is_empty());
    assert_eq!(host.leftovers(), Vec::<String>::new());

    // A name, and a name systemd escapes; systemd is the default backend
    // where PID 1 is systemd.
    host.nifty(&["create", "slick", "my-box"]);
    assert_eq!(
        root.instance_toml("slick")["backend"].as_str(),
        Some("systemd")
    );
    host.nifty(&["start", "slick", "my-box"]);
    assert_eq!(host.is_active("nifty@slick"), "active");
    assert_eq!(host.is_active("nifty@my\\x2dbox.service"), "active");
    for n in ["slick", "my-box"] {
        assert!(
            wait_port(root.port(n), Duration::from_secs(20)),
            "{n} does not listen: {}\n{}",
            host.stdout(&[NIFTY, "status", n]),
            host.stdout(&["journalctl", "-n", "40", "--no-pager"])
        );
        assert_eq!(root.ssh(n, "hostname").trim(), format!("nifty{n}"));
    }
    host.nifty(&["rm", "-f", "slick", "my-box"]);
    assert!(!host.etc.path().join("nifty@slick.service.d").exists());
    assert!(!host.etc.path().join("nifty@my\\x2dbox.service.d").exists());

    // enable: instance 2 comes up by itself after a reboot, 1 does not.
    host.nifty(&["enable", "2"]);
    assert_eq!(
        host.stdout(&["systemctl", "is-enabled", "nifty@2"]).trim(),
        "enabled"
    );
    host.reboot();
    let end = Instant::now() + Duration::from_secs(30);
    while host.is_active("nifty@2") != "active" && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(host.is_active("nifty@2"), "active", "{}", host.log());
    assert_eq!(host.is_active("nifty@1"), "inactive");
    assert!(wait_port(host.root.port("2"), Duration::from_secs(20)));
    assert_eq!(host.root.ssh("2", "hostname").trim(), "nifty2");
    host.nifty(&["disable", "2"]);
    assert_eq!(
        host.stdout(&["systemctl", "is-enabled", "nifty@2"]).trim(),
        "disabled"
    );
    // Where overlayfs takes no idmapped template (Linux before 5.19), the
    // unit's root is the instance's own shifted copy of the template
    // (forced for the units through the manager's environment).
    host.sh(&["systemctl", "set-environment", "NIFTY_FALLBACKS=shifted"]);
    host.nifty(&["create", "shifted1", "--backend", "systemd"]);
    host.nifty(&["start", "shifted1"]);
    host.sh(&["systemctl", "unset-environment", "NIFTY_FALLBACKS"]);
    let root = &host.root;
    assert!(wait_port(root.port("shifted1"), Duration::from_secs(20)));
    assert_eq!(
        root.ssh("shifted1", "id -u; stat -c '%u:%g' /etc/shadow ~"),
        "1000\n0:0\n1000:1000\n"
    );
    let record = root.instance_toml("shifted1");
    let base = record["security"]["uid_base"].as_integer().unwrap() as u32;
    let version = record["template_version"].as_integer().unwrap();
    let copy = root.path().join(format!(
        "instances/shifted1/shifted/default-v{version}-{base}"
    ));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(copy.join("etc/shadow")).unwrap().uid(),
        base
    );
    host.nifty(&["rm", "-f", "--all"]);
    host.nifty(&["systemd", "uninstall"]);
    assert!(!host.etc.path().join("nifty@.service").exists());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

/// On a host whose PID 1 is not systemd (this CI machine), asking for the
/// systemd backend is refused with what to do, and nothing is created.
#[test]
fn systemd_backend_refused_without_systemd() {
    if !privileged() {
        return;
    }
    if Path::new("/run/systemd/system").exists() {
        eprintln!("SKIP: this host runs systemd");
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build", "-q"]);
    let e = root.fails(&["create", "1", "--backend", "systemd"]);
    assert!(e.contains("PID 1") && e.contains("--backend native"), "{e}");
    assert!(root.ok(&["list"]).contains("0 instance(s)"));
    assert!(!root
        .path()
        .join(format!("ports/{}", common::TEST_PORT_BASE + 1))
        .exists());
    // Native instances have no boot-time start.
    root.ok(&["create", "1"]);
    let e = root.fails(&["enable", "1"]);
    assert!(e.contains("native launcher"), "{e}");
    // A systemd instance seen from a host without systemd (a state root
    // moved here, say): it cannot run, so it is stopped; starting it says
    // why.
    let record = root.path().join("instances/1/instance.toml");
    let text = std::fs::read_to_string(&record).unwrap();
    std::fs::write(
        &record,
        text.replace("backend = \"native\"", "backend = \"systemd\""),
    )
    .unwrap();
    assert!(root.ok(&["list"]).contains("stopped systemd"));
    root.ok(&["stop", "1"]);
    root.ok(&["kill", "--all"]);
    let e = root.fails(&["start", "1"]);
    assert!(e.contains("PID 1"), "{e}");
    // Nothing of it can run here: rm removes it without systemd, and lets
    // go of its ID range, port and drop-ins.
    assert_eq!(root.uid_claims().len(), 1);
    root.ok(&["rm", "-f", "1"]);
    assert!(root.ok(&["list"]).contains("0 instance(s)"));
    assert!(root.uid_claims().is_empty(), "{:?}", root.uid_claims());
    assert!(!root
        .path()
        .join(format!("ports/{}", common::TEST_PORT_BASE + 1))
        .exists());
}

/// On-demand instances on the systemd backend: the article's socket
/// activation. Each instance's port is a socket unit of systemd's
/// (`nifty-ssh@NAME.socket`, `Accept=yes`); a connection starts
/// `nifty@NAME.service` and gets its own `dropbear -i` inside; the idle
/// sweep's timer stops idle ones; `rm` lets go of the port.
#[test]
fn on_demand_instances_under_systemd_socket_activation() {
    if !privileged_systemd() {
        return;
    }
    let host = SystemdHost::boot();
    let root = &host.root;
    host.nifty(&[
        "create",
        "1..200",
        "--backend",
        "systemd",
        "--on-demand",
        "--idle-timeout",
        "4s",
        "-q",
    ]);
    let socket = std::fs::read_to_string(host.etc.path().join("nifty-ssh@.socket")).unwrap();
    assert!(socket.contains("Accept=yes"), "{socket}");
    let dropin =
        std::fs::read_to_string(host.etc.path().join("nifty-ssh@7.socket.d/50-nifty.conf"))
            .unwrap();
    assert!(
        dropin.contains(&format!("ListenStream={}", root.port("7"))),
        "{dropin}"
    );
    assert_eq!(
        host.is_active("nifty-ssh@7.socket"),
        "active",
        "{}",
        host.log()
    );
    assert_eq!(host.is_active("nifty-idle.timer"), "active");
    let running = || -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&host.nifty(&["list", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == "running")
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        running().is_empty(),
        "on-demand instances start only when asked"
    );
    let v: serde_json::Value = serde_json::from_str(&host.nifty(&["list", "--json"])).unwrap();
    assert_eq!(v[6]["on_demand"]["phase"], "idle", "{}", v[6]);

    // 20 logins at once, each to a stopped instance.
    let twenty: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    let outs: Vec<(String, bool, String, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = twenty
            .iter()
            .map(|n| {
                s.spawn(move || {
                    let (ok, out, err) = root.ssh_as(n, "luser", "cat /proc/1/comm; id -un");
                    (n.clone(), ok, out, err)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, ok, out, err) in outs {
        assert!(ok, "login to {n}: {err}\n{}", host.log());
        assert_eq!(out, "init\nluser\n", "{n}");
    }
    let mut up = running();
    up.sort_by_key(|n| n.parse::<u32>().unwrap_or(0));
    assert_eq!(up, twenty, "exactly the 20 logged in to run");
    assert_eq!(host.is_active("nifty@3.service"), "active");
    // The first login of each came through systemd's socket: a session,
    // a `dropbear -i`. That session also started the instance's own
    // Dropbear, listening on loopback, and put its sockets in the pinned
    // steering: the next logins go straight to it, and systemd's socket
    // accepts none of them.
    let mark = root.path().join("instances/3/on-demand.json");
    let end = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&mark).is_ok_and(|m| m.contains("listener"))
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let accepted = || -> u64 {
        let out = host.stdout(&["systemctl", "show", "-P", "NAccepted", "nifty-ssh@3.socket"]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("NAccepted: {out:?}"))
    };
    let before = accepted();
    let out = root.ssh("3", "tr '\\0' ' ' < /proc/$PPID/cmdline");
    assert!(
        out.starts_with("/usr/sbin/dropbear ") && out.contains("-p 127.0.0.1:0"),
        "a login to a running instance is its own listener's: {out}\n{}",
        host.stdout(&["journalctl", "-u", "nifty-ssh@*", "-n", "20", "--no-pager"])
    );
    assert_eq!(
        accepted(),
        before,
        "systemd's socket took a login of a running instance"
    );
    // Its /proc/net is the view too (200 socket units listen): the
    // `dropbear -i` of each login walks no table of the host's.
    assert_proc_net_view(root, "3");

    // The timer's sweep stops them once idle for 4 s (it runs every 10 s).
    let end = Instant::now() + Duration::from_secs(60);
    while !running().is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        running().is_empty(),
        "idle instances still run: {:?}\n{}",
        running(),
        host.stdout(&[
            "journalctl",
            "-u",
            "nifty-idle.service",
            "-n",
            "30",
            "--no-pager"
        ])
    );
    assert_eq!(host.is_active("nifty@3.service"), "inactive");
    // `nifty serve` (the native launcher's, as its unit) leaves the ports
    // of systemd-backend instances to their sockets.
    common::succeeded(
        &host.sh(&["systemctl", "start", "nifty.service"]),
        "systemctl start nifty.service",
    );
    std::thread::sleep(Duration::from_secs(1));
    // Still on demand: the next login starts it again.
    assert_eq!(root.ssh("3", "cat /proc/1/comm"), "init\n");
    let said = host.stdout(&["journalctl", "-u", "nifty.service", "--no-pager"]);
    assert!(said.contains("serving the on-demand instances"), "{said}");
    assert!(
        !said.contains("cannot hold"),
        "serve took a socket unit's port:\n{said}"
    );
    let v: serde_json::Value = serde_json::from_str(&host.nifty(&["list", "--json"])).unwrap();
    assert_eq!(v[6]["on_demand"]["phase"], "idle", "{}", v[6]);
    common::succeeded(
        &host.sh(&["systemctl", "stop", "nifty.service"]),
        "systemctl stop nifty.service",
    );

    // rm lets go of the ports.
    let port7 = root.port("7");
    host.nifty(&["rm", "-f", "--all", "-q"]);
    assert!(!host.etc.path().join("nifty-ssh@7.socket.d").exists());
    assert_ne!(host.is_active("nifty-ssh@7.socket"), "active");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port7)).is_err(),
        "port of a removed instance still held"
    );
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
