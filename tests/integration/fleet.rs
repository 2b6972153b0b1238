//! Privileged: real containers booted by the native launcher, reached with a
//! real SSH client. Each test has its own state root and instance numbers
//! of its own (so its own ports); tests take turns (see `common::Root`).

use crate::common;

use std::process::Command;
use std::time::Duration;

use crate::common::{assert_clean, mounted_under, privileged, wait_port, Root, NIFTY};

fn range(lo: u32, hi: u32) -> Vec<String> {
    (lo..=hi).map(|n| n.to_string()).collect()
}

/// BusyBox init rewrites its argv[0] to "init" once it runs.
fn is_init(cmdline: &str) -> bool {
    cmdline.starts_with("/sbin/init\0") || cmdline.starts_with("init\0")
}

fn booted(root: &Root, names: &[String]) {
    for n in names {
        assert!(
            wait_port(root.port(n), Duration::from_secs(20)),
            "instance {n}: dropbear never listened"
        );
    }
}

/// A root with a template and the instances `lo..=hi`, created, started
/// and listening.
fn running(lo: u32, hi: u32) -> Root {
    let root = Root::new();
    root.ok(&["template", "build"]);
    let sel = format!("{lo}..{hi}");
    root.ok(&["create", &sel]);
    root.ok(&["start", &sel]);
    booted(&root, &range(lo, hi));
    root
}

#[test]
fn fleet_of_twenty() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "101..120"]);
    let names = range(101, 120);
    // Each instance has its own identity.
    let keys: Vec<String> = names
        .iter()
        .map(|n| root.instance_toml(n)["host_key"].as_str().unwrap().into())
        .collect();
    let unique: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), 20, "host keys are shared");
    assert_eq!(root.port("101"), common::TEST_PORT_BASE + 101);
    root.ok(&["start", "101..120"]);
    booted(&root, &names);

    for n in ["101", "110", "120"] {
        let out = root.ssh(
            n,
            "sh --help 2>&1 | head -1; cat /proc/1/cmdline; echo; hostname; ps -o pid,comm",
        );
        let mut lines = out.lines();
        assert!(lines.next().unwrap().starts_with("BusyBox v"), "{out}");
        assert_eq!(
            lines.next().unwrap().trim_end_matches('\0'),
            "init",
            "{out}"
        );
        assert_eq!(lines.next().unwrap(), format!("nifty{n}"));
        // Only its own processes: a handful, with small PIDs, init first.
        let pids: Vec<u32> = lines
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(pids[0], 1, "{out}");
        assert!(
            pids.len() < 10 && pids.iter().all(|p| *p < 100),
            "foreign processes visible: {out}"
        );
    }
    // The served host keys are the recorded ones and differ (StrictHostKeyChecking
    // in ssh() already refused a mismatch); root cannot log in over the network.
    let (ok, _, err) = root.ssh_as("105", "root", "id");
    assert!(!ok, "root logged in over SSH: {err}");

    let list = root.ok(&["list", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(v.len(), 20);
    assert!(v
        .iter()
        .all(|i| i["state"] == "running" && i["pid"].as_i64().unwrap() > 1));
    let status = root.ok(&["status", "107"]);
    assert!(
        status.contains("Init PID")
            && status.contains("(listening)")
            && status.contains("dropbear"),
        "{status}"
    );
    assert!(status.contains("syslogd"), "{status}");

    let pids: Vec<i32> = names.iter().flat_map(|n| root.procs(n)).collect();
    assert!(pids.len() >= 60, "init, syslogd, dropbear each: {pids:?}");
    root.ok(&["stop", "101..120"]);
    assert_clean(&root, &pids);
    assert!(root.ok(&["list"]).contains("0 running"));

    // Start again works; rm removes the instance's files.
    root.ok(&["start", "101..103"]);
    booted(&root, &range(101, 103));
    root.ssh("102", "true");
    let e = root.fails(&["rm", "101"]);
    assert!(e.contains("is running"), "{e}");
    root.ok(&["rm", "-f", "101..103"]);
    for n in ["101", "102", "103"] {
        assert!(!root.path().join("instances").join(n).exists());
    }
    root.ok(&["rm", "104..120"]);
    assert_clean(&root, &pids);
    assert_eq!(
        std::fs::read_dir(root.path().join("ports"))
            .unwrap()
            .count(),
        0,
        "port claims left"
    );
}

#[test]
fn files_are_private_and_persistent() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "201", "202"]);
    root.ok(&["start", "201", "202"]);
    booted(&root, &range(201, 202));
    root.ssh("201", "echo only-here > /home/luser/note");
    root.ok(&[
        "exec",
        "201",
        "--",
        "sh",
        "-c",
        "echo root-was-here > /etc/motd",
    ]);
    let (ok, _, _) = root.ssh_as("202", "luser", "test -e /home/luser/note");
    assert!(!ok, "file leaked into another container");
    root.ok(&["restart", "201"]);
    booted(&root, &range(201, 201));
    assert_eq!(
        root.ssh("201", "cat /home/luser/note /etc/motd"),
        "only-here\nroot-was-here\n"
    );
    assert!(
        !root.rootfs().join("home/luser/note").exists(),
        "template changed"
    );
    assert!(!root.rootfs().join("etc/motd").exists(), "template changed");
    // exec: as the container's root or its user, exit codes pass through.
    assert_eq!(root.ok(&["exec", "202", "--", "id", "-u"]), "0\n");
    assert_eq!(
        root.ok(&["exec", "202", "--user", "luser", "--", "id", "-un"]),
        "luser\n"
    );
    let o = root.run(&["exec", "202", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    // Logs show the boot.
    let logs = root.ok(&["logs", "201"]);
    assert!(logs.contains("starting instance 201"), "{logs}");
    // Bad input changes nothing.
    assert!(root.fails(&["start", "201"]).contains("is running"));
    assert!(root
        .fails(&["create", "203", "--port", &root.port("201").to_string()])
        .contains("already assigned"));
    root.ok(&["stop", "--all"]);
    assert!(root
        .fails(&["exec", "201", "--", "true"])
        .contains("not running"));
    assert_clean(&root, &[]);
}

#[test]
fn port_in_use_is_refused_at_create() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    let l = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let e = root.fails(&["create", "slick", "--port", &port]);
    assert!(e.contains("in use on the host"), "{e}");
    assert!(!root.path().join("instances/slick").exists());
    // A free port given explicitly is taken.
    let free = common::TEST_PORT_BASE - 50;
    root.ok(&["create", "slick", "--port", &free.to_string()]);
    assert_eq!(root.port("slick"), free);
    // Non-numeric names get a port of the pool below the numeric ones.
    root.ok(&["create", "slack"]);
    assert!(root.port("slack") < common::TEST_PORT_BASE);
}

#[test]
fn killing_nifty_mid_start_leaves_nothing_invisible() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "301..320"]);
    for delay_ms in [2u64, 8, 15] {
        let mut child = common::nifty()
            .arg("--root")
            .arg(root.path())
            .args(["start", "301..320"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL, at whatever point it was
        let _ = child.wait();
        // A container whose first process was already running when nifty
        // died finishes booting on its own (it needs nifty no more): give it
        // the few milliseconds that takes, then compare list and kernel.
        std::thread::sleep(Duration::from_millis(300));
        // `list` tells the truth: every running instance has a live init in
        // its cgroup, every stopped one an empty cgroup.
        let v = root.list_json();
        for i in &v {
            let name = i["name"].as_str().unwrap();
            let procs = root.procs(name);
            if i["state"] == "running" {
                let pid = i["pid"].as_i64().unwrap() as i32;
                assert!(procs.contains(&pid), "{name}: {pid} not in {procs:?}");
                let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
                assert!(is_init(&cmd), "{name}: {cmd:?}");
            } else {
                for p in procs {
                    let cmd =
                        std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    assert!(!is_init(&cmd), "{name}: stopped, but init {p} runs");
                }
            }
        }
        let pids: Vec<i32> = range(301, 320).iter().flat_map(|n| root.procs(n)).collect();
        root.ok(&["stop", "--all"]);
        assert_clean(&root, &pids);
    }
    // And a full start after all that works.
    root.ok(&["start", "301..320"]);
    booted(&root, &range(301, 320));
    root.ssh("315", "true");
    // A stop killed midway leaves nothing nifty cannot see or finish.
    let pids: Vec<i32> = range(301, 320).iter().flat_map(|n| root.procs(n)).collect();
    let mut child = common::nifty()
        .arg("--root")
        .arg(root.path())
        .args(["stop", "--all"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let _ = child.kill();
    let _ = child.wait();
    root.ok(&["kill", "--all"]);
    assert_clean(&root, &pids);
}

#[test]
fn up_twice_leaves_five_running() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    let out = root.ok(&["up", "5"]);
    assert!(out.contains("nifty ssh 1"), "{out}");
    root.ok(&["up", "5"]);
    let v = root.list_json();
    assert_eq!(v.len(), 5);
    assert!(v.iter().all(|i| i["state"] == "running"), "{v:?}");
    booted(&root, &range(1, 5));
    // `nifty ssh` itself logs in, trusting only the instance's own host key.
    let o = common::nifty()
        .arg("--root")
        .arg(root.path())
        .args(["ssh", "3", "--", "echo", "hello from", "$(hostname)"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello from nifty3\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pids: Vec<i32> = range(1, 5).iter().flat_map(|n| root.procs(n)).collect();
    root.ok(&["stop", "--all"]);
    // A stopped instance: `nifty ssh` says so and how to start it.
    let e = root.fails(&["ssh", "3", "--", "true"]);
    assert!(e.contains("is not running") && e.contains("start"), "{e}");
    assert_clean(&root, &pids);
}

#[test]
fn password_login_with_sha512_crypt() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    let mut child = common::nifty()
        .arg("--root")
        .arg(root.path())
        .args(["template", "build", "--password-stdin", "--user", "alice"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret pass\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let shadow = std::fs::read_to_string(root.rootfs().join("etc/shadow")).unwrap();
    assert!(
        shadow.lines().any(|l| l.starts_with("alice:$6$")),
        "{shadow}"
    );
    root.ok(&["create", "401"]);
    root.ok(&["start", "401"]);
    booted(&root, &range(401, 401));
    let login = |pw: &str| {
        Command::new("sshpass")
            .args([
                "-p",
                pw,
                "ssh",
                "-p",
                &root.port("401").to_string(),
                "-l",
                "alice",
            ])
            .args([
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "LogLevel=ERROR", "localhost", "id -un"])
            .output()
            .expect("sshpass is installed by scripts/install-deps")
    };
    let good = login("s3cret pass");
    assert_eq!(
        String::from_utf8_lossy(&good.stdout),
        "alice\n",
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(!login("wrong").status.success());
    let pids = root.procs("401");
    root.ok(&["stop", "401"]);
    assert_clean(&root, &pids);
}

/// Memory: an instance with `--memory` has a memory cgroup of its own with
/// that limit; one without is charged to its store's shared memory cgroup,
/// which is limited as a whole (a hybrid host; on a pure v2 host every
/// container has its own, unlimited unless told).
#[test]
fn memory_cgroup_own_only_when_limited() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build", "-q"]);
    root.ok(&["create", "601"]);
    root.ok(&["create", "602", "--memory", "48M"]);
    root.ok(&["start", "601", "602"]);
    let pids = [root.procs("601"), root.procs("602")].concat();
    let h = nifty::runtime::linux::cgroup::Hierarchy::detect().unwrap();
    let base = h.base(&nifty::store::Store::new(Some(root.path().into())).cgroup_name());
    let memcg_of = |name: &str| {
        let pid = root.procs(name)[0];
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        cg.lines()
            .find(|l| l.split(':').nth(1) == Some("memory"))
            .map(|l| l.rsplit(':').next().unwrap().to_string())
    };
    let total: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1024;
    match &h.v1_memory {
        Some(mem) => {
            assert_eq!(
                memcg_of("601").as_deref(),
                Some(format!("/{base}").as_str())
            );
            assert_eq!(
                memcg_of("602").as_deref(),
                Some(format!("/{base}/602").as_str())
            );
            assert!(!mem.join(&base).join("601").exists());
            let read = |p: std::path::PathBuf| -> u64 {
                std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
            };
            assert_eq!(
                read(mem.join(&base).join("602/memory.limit_in_bytes")),
                48 << 20
            );
            let fleet = read(mem.join(&base).join("memory.limit_in_bytes"));
            assert!(
                fleet <= total / 100 * 90 && fleet > total / 2,
                "fleet limit {fleet}"
            );
        }
        None => {
            let max = |n: &str| {
                std::fs::read_to_string(root.cgroup_base().join(n).join("memory.max")).unwrap()
            };
            assert_eq!(max("601").trim(), "max");
            assert_eq!(max("602").trim(), (48u64 << 20).to_string());
            // The fleet as a whole: limited by nifty, or by systemd in the
            // scope it delegated (MemoryMax=).
            let fleet: u64 = std::fs::read_to_string(root.cgroup_base().join("memory.max"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(
                fleet <= total / 100 * 90 && fleet > total / 2,
                "fleet limit {fleet}"
            );
        }
    }
    // Both boot and answer; `list` shows a memory figure for both.
    booted(&root, &["601".into(), "602".into()]);
    assert_eq!(root.ssh("601", "echo ok"), "ok\n");
    let list: serde_json::Value = serde_json::from_str(&root.ok(&["list", "--json"])).unwrap();
    for i in list.as_array().unwrap() {
        assert!(i["memory_bytes"].as_u64().unwrap_or(0) > 0, "{i}");
    }
    root.ok(&["stop", "601", "602"]);
    assert_clean(&root, &pids);
    if let Some(mem) = &h.v1_memory {
        assert!(
            !mem.join(&base).exists(),
            "the shared memory cgroup is left"
        );
    }
}

#[test]
fn stop_powers_off_from_the_host_unless_the_inittab_has_shutdown_actions() {
    if !privileged() {
        return;
    }
    let root = running(611, 612);
    // 612's inittab gains a shutdown action (BusyBox init re-reads it on
    // SIGHUP): its poweroff is left to init, so that the action runs.
    root.ok(&common::add_shutdown_action("612"));
    let reloaded = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        root.ok(&["logs", "612"]).contains("reloading /etc/inittab")
    });
    assert!(reloaded, "init did not re-read its inittab");
    let pids: Vec<i32> = ["611", "612"].iter().flat_map(|n| root.procs(n)).collect();
    root.ok(&["stop", "611", "612"]);
    assert_clean(&root, &pids);

    // 611: nifty stopped init and sent SIGTERM; the services exited on it
    // (Dropbear and syslogd say so), init's own poweroff never ran.
    let log = root.ok(&["logs", "611"]);
    assert!(log.contains("nifty: powering off"), "{log}");
    assert!(log.contains("syslogd exiting"), "{log}");
    assert!(log.contains("Terminated by signal"), "{log}");
    assert!(!log.contains("The system is going down"), "{log}");
    // 612: init ran its shutdown action, then its poweroff.
    let log = root.ok(&["logs", "612"]);
    assert!(log.contains("custom shutdown ran"), "{log}");
    assert!(log.contains("The system is going down"), "{log}");
    assert!(!log.contains("nifty: powering off"), "{log}");
    // Both boot again.
    root.ok(&["start", "611", "612"]);
    booted(&root, &range(611, 612));
    root.ok(&["rm", "-f", "611", "612"]);
}

#[test]
fn stop_works_past_the_open_files_limit() {
    if !privileged() {
        return;
    }
    let root = running(621, 625);
    let names = range(621, 625);
    let pids: Vec<i32> = names.iter().flat_map(|n| root.procs(n)).collect();
    // Without CAP_SYS_RESOURCE nifty cannot lift a hard limit of 512 open
    // files: too few to keep a pidfd per process besides its reserve, so
    // every container is watched by reading its cgroup instead.
    let o = Command::new("setpriv")
        .args(["--bounding-set=-sys_resource", "--", "sh", "-c"])
        .arg(r#"ulimit -n 512 && exec "$0" --root "$1" stop 621..625"#)
        .arg(NIFTY)
        .arg(root.path())
        .env_remove("NIFTY_ROOT")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "stop failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_clean(&root, &pids);
    for n in &names {
        let log = root.ok(&["logs", n]);
        assert!(
            log.contains("nifty: powering off") && log.contains("syslogd exiting"),
            "{n}: {log}"
        );
    }
    root.ok(&["rm", "621..625"]);
}

#[test]
fn an_interrupted_stop_shows_and_is_finished_by_stop() {
    if !privileged() {
        return;
    }
    let root = running(631, 631);
    let v = root.list_json();
    let pid = v[0]["pid"].as_i64().unwrap() as i32;
    let pids = root.procs("631");
    // What a `nifty stop` killed after its first step leaves: init stopped.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::Stop,
    )
    .unwrap();
    let stopping = (0..100).any(|_| {
        let v = root.list_json();
        v[0]["state"] == "stopping" || {
            std::thread::sleep(Duration::from_millis(20));
            false
        }
    });
    assert!(stopping, "list never showed it stopping");
    assert!(root.ok(&["list"]).contains("1 stopping"));
    let e = root.fails(&["start", "631"]);
    assert!(e.contains("its init is stopped"), "{e}");
    let e = root.fails(&["rm", "631"]);
    assert!(e.contains("stop it first"), "{e}");
    root.ok(&["stop", "631"]);
    assert_clean(&root, &pids);
    root.ok(&["rm", "631"]);
}

/// The overlay of kernels before 6.13 (layers named by path in a private
/// mount namespace of nifty's), forced on this kernel: the containers boot
/// and answer, each still sees the template through its own ID range, the
/// template stays read-only to them, and the host's mount table never
/// shows their roots.
#[test]
fn the_overlay_fallback_of_older_kernels_boots_and_leaves_nothing() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build", "-q"]);
    root.ok(&["create", "641..642"]);
    root.forced("overlay", &["start", "641..642"]);
    booted(&root, &range(641, 642));
    let pids = [root.procs("641"), root.procs("642")].concat();
    // Its root is the overlay, its layers named only by fd number.
    let mounts = root.ssh("641", "cat /proc/self/mountinfo");
    let top = mounts.lines().find(|l| l.contains(" / / ")).unwrap_or("");
    assert!(
        top.contains("overlay") && top.contains("lowerdir=/proc/thread-self/fd/"),
        "{mounts}"
    );
    assert!(
        !mounts.contains(&root.path().display().to_string()),
        "{mounts}"
    );
    // Container root is its own range, and cannot write the template.
    let uid_map = std::fs::read_to_string(format!("/proc/{}/uid_map", pids[0])).unwrap();
    assert!(
        !uid_map.split_whitespace().nth(1).is_some_and(|h| h == "0"),
        "{uid_map}"
    );
    let out = common::succeeded(
        &root.run(&[
            "exec",
            "641",
            "--",
            "sh",
            "-c",
            "echo x > /bin/planted; ls -ln /bin/busybox",
        ]),
        "exec",
    );
    assert!(out.contains(" 0 "), "template files show as root's: {out}");
    assert!(!root.rootfs().join("bin/planted").exists());
    assert!(mounted_under(root.path()).is_empty());
    root.ok(&["stop", "641..642"]);
    assert_clean(&root, &pids);
}
