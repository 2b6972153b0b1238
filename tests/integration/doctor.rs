//! Privileged: `nifty doctor` reports the limits this machine really has.

use crate::common::{privileged, Root};

fn sysctl(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn doctor_reports_real_limits_for_ten_thousand() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    let o = root.run(&["doctor", "--count", "10000", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let get = |name: &str| {
        v.iter()
            .find(|f| f["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check"))
    };
    let pid_max: u64 = sysctl("kernel.pid_max").parse().unwrap();
    let f = get("pid_max");
    assert_eq!(f["value"], format!("kernel.pid_max = {pid_max}"));
    // 10,000 containers need about 54,000 PIDs.
    assert_eq!(
        f["status"],
        if pid_max >= 54_096 { "ok" } else { "fail" },
        "{f}"
    );
    let pty: u64 = sysctl("kernel.pty.max").parse().unwrap();
    assert_eq!(
        get("pty max")["status"],
        if pty >= 11_024 { "ok" } else { "fail" }
    );
    assert!(get("user namespaces")["value"]
        .as_str()
        .unwrap()
        .ends_with(&sysctl("user.max_user_namespaces")));
    assert!(get("local port range")["value"].as_str().unwrap().contains(
        &sysctl("net.ipv4.ip_local_port_range")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    ));
    // UID ranges: the claims this host holds (other tests' roots too, so
    // their number moves), none by this root; 10,000 more fit.
    let f = get("UID ranges");
    let value = f["value"].as_str().unwrap();
    let (n, rest) = value.split_once(' ').unwrap();
    assert!(n.parse::<u32>().is_ok(), "{f}");
    assert_eq!(rest, "claimed in /var/lib/nifty-uids (0 by this root)");
    assert_eq!(f["status"], "ok", "{f}");
    let big = root.run(&["doctor", "--count", "70000", "--json"]);
    let v2: Vec<serde_json::Value> = serde_json::from_slice(&big.stdout).unwrap();
    let f = v2.iter().find(|f| f["check"] == "UID ranges").unwrap();
    assert_eq!(f["status"], "fail", "{f}");
    assert!(f["fix"].as_str().unwrap().contains("--no-userns"), "{f}");
    let cg = get("cgroups")["value"].as_str().unwrap().to_string();
    let hybrid = std::path::Path::new("/sys/fs/cgroup/unified").exists();
    assert_eq!(cg.starts_with("hybrid"), hybrid, "{cg}");
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap();
    assert!(get("systemd")["value"]
        .as_str()
        .unwrap()
        .contains(pid1.trim()));
    // A TCP table of its own for --network none instances where the kernel
    // has the sysctl that makes one (6.1).
    let tables = get("netns TCP tables")["value"]
        .as_str()
        .unwrap()
        .to_string();
    let own = std::path::Path::new("/proc/sys/net/ipv4/tcp_child_ehash_entries").exists();
    assert_eq!(
        tables.contains("of its own (1024 buckets)"),
        own,
        "{tables}"
    );
    // The exit code says whether everything passed.
    let failed = v.iter().any(|f| f["status"] == "fail");
    assert_eq!(o.status.success(), !failed);
}

/// The cgroup v2 mount's line in /proc/self/mountinfo, from its mount
/// options on (its IDs left out).
fn v2_mount() -> String {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .map(|l| l.split(' ').skip(4).collect::<Vec<_>>().join(" "))
        .expect("a cgroup2 mount")
}

/// `doctor --fix` turns on `favordynmods` by reconfiguring the cgroup v2
/// mount, which sets exactly the flags it is given: the others must be
/// given again. Given as they are (`favordynmods` too, if it is on: once
/// on, Linux 6.18 cannot turn it off), the mount reads the same after,
/// its mount flags (`nosuid`, ...) and superblock flags (`nsdelegate`,
/// `memory_recursiveprot` on a systemd host) alike. And the doctor's row
/// says what the mount says.
#[test]
fn the_cgroup_mount_keeps_its_flags_through_a_reconfiguration() {
    if !privileged() {
        return;
    }
    let h = nifty::runtime::linux::cgroup::Hierarchy::detect().unwrap();
    let before = v2_mount();
    let on = h.v2_flags.iter().any(|f| f == "favordynmods");
    h.set_favordynmods(on).unwrap();
    assert_eq!(v2_mount(), before);

    let root = Root::new();
    let o = root.run(&["doctor", "--json"]);
    let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let row = v.iter().find(|f| f["check"] == "cgroup joins").unwrap();
    let value = row["value"].as_str().unwrap();
    if !h.joins_v1() {
        assert!(value.contains("CLONE_INTO_CGROUP"), "{row}");
        assert_eq!(row["status"], "ok", "{row}");
    } else if h.favordynmods {
        assert!(value.contains("favordynmods is on"), "{row}");
        assert_eq!(row["status"], "ok", "{row}");
    } else {
        assert_eq!(row["status"], "warn", "{row}");
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        // favordynmods came with Linux 6.0.
        if nifty::runtime::linux::features::parse_release(&release) >= (6, 0) {
            assert!(row["fix"].as_str().unwrap().contains("--fix"), "{row}");
            assert_eq!(row["change"], "favor_dynmods", "{row}");
        } else {
            assert!(row.get("change").is_none(), "{row}");
        }
    }
}
