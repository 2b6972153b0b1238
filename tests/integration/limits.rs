//! Privileged: fair shares and limits. A tenant who fills its disk, pins
//! the CPUs or asks for more than its share is held to it, and its
//! neighbours and the host do not notice.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use crate::common::{fleet, privileged, quota_exceeded, succeeded, wait_port, Root};

/// Runs a shell command as the container's root; (exit ok, stdout+stderr).
fn sh(root: &Root, name: &str, script: &str) -> (bool, String) {
    let o = root.run(&["exec", name, "--", "sh", "-c", script]);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `nifty list --json` of one instance.
fn info(root: &Root, name: &str) -> serde_json::Value {
    let all: serde_json::Value = serde_json::from_str(&root.ok(&["list", "--json"])).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in list"))
}

/// Bytes the disk store's image takes on the host.
fn image_blocks(root: &Root) -> u64 {
    std::fs::metadata(root.path().join("disk.img"))
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[test]
fn a_disk_limit_holds_a_tenant_and_nobody_else_notices() {
    if !privileged() {
        return;
    }
    let root = fleet(&["801", "802"], &[]);
    root.ok(&["create", "803", "--disk", "100M"]);
    root.ok(&["start", "803"]);
    assert!(wait_port(root.port("803"), Duration::from_secs(20)));

    // The tenant writes until it is refused, at about its limit.
    let (_, out) = sh(
        &root,
        "803",
        "dd if=/dev/zero of=/root/fill bs=1M count=300; echo dd=$?; sync; ls -l /root/fill",
    );
    assert!(
        !out.contains("dd=0"),
        "300M written under a 100M limit: {out}"
    );
    assert!(
        quota_exceeded(&out) || out.contains("No space left"),
        "{out}"
    );
    let size: u64 = out
        .lines()
        .find(|l| l.ends_with("/root/fill"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in {out}"));
    assert!(
        size > 90 << 20 && size <= 100 << 20,
        "stopped at {size} bytes, not at about 100 MiB"
    );
    // The login user is held by the same limit.
    let o = root.run(&[
        "exec",
        "803",
        "-u",
        "luser",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/home/luser/more bs=1M count=5",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "luser wrote past the limit");
    assert!(
        quota_exceeded(&err) || err.contains("No space left"),
        "{err}"
    );

    // A neighbour and the host still write.
    let (ok, out) = sh(
        &root,
        "801",
        "dd if=/dev/zero of=/root/n bs=1M count=150 2>&1 && sync",
    );
    assert!(ok, "the neighbour could not write: {out}");
    let host = root.path().join("host-file");
    std::fs::write(&host, vec![7u8; 10 << 20]).expect("the host writes");
    std::fs::remove_file(&host).unwrap();
    // Everyone's use shows against their limits, as of the last
    // writeback and commit (the containers' sync() is a no-op by design:
    // the host's flushes their data here; btrfs commits every 5 s).
    rustix::fs::sync();
    std::thread::sleep(Duration::from_secs(6));
    let i = info(&root, "803");
    assert_eq!(i["limits"]["disk"], 100u64 << 20);
    let used = i["disk_bytes"].as_u64().expect("disk use of 803");
    assert!(used > 90 << 20 && used <= 101 << 20, "803 uses {used}");
    let used = info(&root, "801")["disk_bytes"].as_u64().unwrap();
    assert!(used >= 150 << 20, "801 uses {used}");
    let list = root.ok(&["list"]);
    assert!(list.contains("/100.0M"), "{list}");

    // A smaller limit than what it uses is refused, and nothing changes.
    let before = std::fs::read_to_string(root.path().join("instances/803/instance.toml")).unwrap();
    let e = root.fails(&["set", "803", "--disk", "50M"]);
    assert!(e.contains("less than") && e.contains("803"), "{e}");
    assert_eq!(
        std::fs::read_to_string(root.path().join("instances/803/instance.toml")).unwrap(),
        before
    );
    // A larger one lets it write more, at once, while it runs.
    root.ok(&["set", "803", "--disk", "200M"]);
    let (ok, out) = sh(
        &root,
        "803",
        "dd if=/dev/zero of=/root/fill2 bs=1M count=50 2>&1",
    );
    assert!(ok, "{out}");

    // rm gives the space back to the host.
    root.ok(&["stop", "801"]);
    let full = image_blocks(&root);
    root.ok(&["rm", "801"]);
    let end = Instant::now() + Duration::from_secs(30);
    while image_blocks(&root) + (100 << 20) > full && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        image_blocks(&root) + (100 << 20) <= full,
        "rm of 801 freed nothing: {} of {full} bytes still taken",
        image_blocks(&root)
    );
}

/// Median seconds of `n` SSH logins to `name`.
fn login_time(root: &Root, name: &str, n: usize) -> f64 {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            root.ssh(name, "true");
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[n / 2]
}

/// CPU seconds an instance used over `d` (its `list --json` sample is
/// too short for a cap; this reads its cgroup's accounting twice).
fn cpu_share(root: &Root, name: &str, d: Duration) -> f64 {
    let usage = || -> u64 {
        let s = std::fs::read_to_string(root.cgroup_base().join(name).join("cpu.stat")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (a, t) = (usage(), Instant::now());
    std::thread::sleep(d);
    (usage() - a) as f64 / t.elapsed().as_micros() as f64
}

/// The console log is in the instance's directory of the disk store and
/// counts against its `--disk` limit: a login user's syslog flood (which
/// syslogd writes to the console log, on the host) stops at the limit and
/// fills nothing of the host's; `logs` reads it there.
#[test]
fn a_console_log_flood_stops_at_the_disk_limit() {
    if !privileged() {
        return;
    }
    let root = fleet(&["831"], &["--disk", "8M"]);
    let (ok, out, err) = root.ssh_as(
        "831",
        "luser",
        "yes 'a line of a syslog flood by the login user, 64 bytes or so' \
         | head -c 20000000 | logger; echo sent",
    );
    assert!(ok && out.contains("sent"), "{out}{err}");
    let log = root.path().join("disk/831/console.log");
    // syslogd writes behind the sender: until the size settles.
    let mut size = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if now == size && now > 0 {
            break;
        }
        size = now;
    }
    assert!(
        size > 4 << 20,
        "the flood did not reach the log ({size} bytes)"
    );
    assert!(
        size <= 8 << 20,
        "{size} bytes of console log under an 8 MiB limit"
    );
    assert!(
        !root.path().join("instances/831/console.log").exists(),
        "a console log outside the disk store"
    );
    let logs = root.ok(&["logs", "831"]);
    assert!(
        logs.contains("syslog flood by the login user"),
        "{}",
        &logs[logs.len().saturating_sub(500)..]
    );
    // The log fills the instance's limit, as its own files would...
    let (ok, out) = sh(&root, "831", "dd if=/dev/zero of=/root/room bs=1M count=2");
    assert!(!ok, "2 MiB written beside a full log: {out}");
    // ... and the next start gives it its room back: a log that cannot
    // even be renamed any more is removed, and says so.
    root.ok(&["restart", "831"]);
    assert!(wait_port(root.port("831"), Duration::from_secs(20)));
    let (ok, out) = sh(
        &root,
        "831",
        "dd if=/dev/zero of=/root/room bs=1M count=2 && echo wrote",
    );
    assert!(
        ok && out.contains("wrote"),
        "no room after a restart: {out}"
    );
    let logs = root.ok(&["logs", "831"]);
    assert!(
        logs.contains("filled the instance's disk limit: removed"),
        "{logs}"
    );
}

#[test]
fn a_cpu_hog_gets_its_share_and_a_cap_holds_it() {
    if !privileged() {
        return;
    }
    let root = fleet(&["811", "812"], &[]);
    let idle = login_time(&root, "812", 5);
    // Four busy loops, more than this machine's CPUs, in 811.
    let (ok, out) = sh(
        &root,
        "811",
        "for i in 1 2 3 4; do (while :; do :; done) </dev/null >/dev/null 2>&1 & done; echo started",
    );
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_secs(1));
    let busy = login_time(&root, "812", 5);
    assert!(
        busy <= 2.0 * idle.max(0.05),
        "a neighbour's login took {busy:.3} s under the hog, {idle:.3} s idle"
    );
    let hog = cpu_share(&root, "811", Duration::from_secs(2));
    assert!(
        hog > 0.5,
        "the hog ran at {hog:.2} CPUs: the test did not load the machine"
    );

    // A cap, set while it runs: at most about half a CPU.
    root.ok(&["set", "811", "--cpus", "0.5"]);
    let capped = cpu_share(&root, "811", Duration::from_secs(3));
    assert!(capped <= 0.6, "capped at 0.5 CPU, the hog used {capped:.2}");
    assert!(
        capped >= 0.3,
        "the hog got {capped:.2} CPU under a cap of 0.5"
    );
    let i = info(&root, "811");
    assert_eq!(i["limits"]["cpus"], 0.5);
    assert!(i["cpu_percent"].as_f64().is_some_and(|c| c <= 70.0), "{i}");
    let status = root.ok(&["status", "811"]);
    assert!(
        status.contains("cpus 0.5") && status.contains("CPU:"),
        "{status}"
    );
    // Lifted again.
    root.ok(&["set", "811", "--cpus", "max"]);
    let free = cpu_share(&root, "811", Duration::from_secs(2));
    assert!(free > 0.8, "uncapped, the hog used {free:.2}");
    // A weight changes its share against a neighbour's hog.
    root.ok(&["set", "811", "--cpu-weight", "50"]);
    let (ok, out) = sh(
        &root,
        "812",
        "for i in 1 2 3 4; do (while :; do :; done) </dev/null >/dev/null 2>&1 & done; echo started",
    );
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| cpu_share(&root, "811", Duration::from_secs(3)));
        let b = s.spawn(|| cpu_share(&root, "812", Duration::from_secs(3)));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        b > 1.5 * a,
        "weight 100 against 50: 812 got {b:.2} CPUs and 811 {a:.2}"
    );
}

#[test]
fn bad_limits_are_refused_and_change_nothing() {
    if !privileged() {
        return;
    }
    let root = fleet(&["821"], &[]);
    for (args, why) in [
        (vec!["create", "822", "--cpus", "0"], "--cpus"),
        (vec!["create", "822", "--cpus", "lots"], "--cpus"),
        (vec!["create", "822", "--disk", "10"], "give a unit"),
        (vec!["create", "822", "--disk", "10X"], "--disk"),
        (
            vec!["create", "822", "--cpu-weight", "0"],
            "from 1 to 10000",
        ),
        (
            vec!["create", "822", "--io-weight", "20000"],
            "from 1 to 10000",
        ),
        (vec!["create", "822", "--tasks", "0"], "--tasks"),
        (vec!["create", "822", "--inodes", "1000"], "--disk bounds"),
        (vec!["set", "821", "--cpus", "0"], "--cpus"),
        (vec!["set", "821", "--disk", "10"], "give a unit"),
        (vec!["set", "821"], "give a limit"),
        (vec!["set", "nosuch", "--cpus", "1"], "nosuch"),
    ] {
        let e = root.fails(&args);
        assert!(e.contains(why), "{args:?}: expected {why:?} in {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: one line: {e}");
    }
    assert!(!root.path().join("instances/822").exists());
    assert!(!root.path().join("disk/822").exists());
    let toml = std::fs::read_to_string(root.path().join("instances/821/instance.toml")).unwrap();
    assert!(!toml.contains("cpus"), "{toml}");
    // An instance without a disk limit cannot be given one later.
    root.ok(&["create", "823", "--disk", "unlimited"]);
    assert!(root.path().join("instances/823/upper").is_dir());
    let e = root.fails(&["set", "823", "--disk", "1G"]);
    assert!(
        e.contains("--disk unlimited") && e.contains("recreate"),
        "{e}"
    );
    // Limits of a stopped instance change its record, for its next start.
    root.ok(&["stop", "821"]);
    root.ok(&[
        "set",
        "821",
        "--cpus",
        "1.5",
        "--io-weight",
        "300",
        "--tasks",
        "100",
    ]);
    let t = root.instance_toml("821");
    assert_eq!(t["limits"]["cpus"].as_float(), Some(1.5));
    assert_eq!(t["limits"]["io_weight"].as_integer(), Some(300));
    assert_eq!(t["limits"]["tasks"].as_integer(), Some(100));
    root.ok(&["start", "821"]);
    assert!(wait_port(root.port("821"), Duration::from_secs(20)));
    // The new task limit is the cgroup's (v2 where it has the
    // controller, else v1's pids hierarchy).
    let pids = std::fs::read_to_string(root.cgroup_base().join("821/pids.max"))
        .or_else(|_| {
            let h = nifty::runtime::linux::cgroup::Hierarchy::detect().unwrap();
            let store = nifty::store::Store::new(Some(root.path().into()));
            std::fs::read_to_string(
                h.v1_pids
                    .as_ref()
                    .unwrap()
                    .join(h.base(&store.cgroup_name()))
                    .join("821/pids.max"),
            )
        })
        .unwrap();
    assert_eq!(pids.trim(), "100");
    succeeded(&root.run(&["stop", "821"]), "stop");
}
