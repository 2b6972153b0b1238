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
