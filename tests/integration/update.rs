//! Privileged: `nifty update` across a running fleet (issue "Rolling
//! updates"): checked batches, logins outside the batch throughout, files
//! kept, a failed batch put back, bad input refused, a killed update
//! resumed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::{self, privileged, wait_port, Root};

/// A running fleet `1..=n` on template v1 (`up`), logins checked.
fn fleet(n: u32) -> Root {
    let root = Root::new();
    root.ok(&["template", "build", "-q"]);
    root.ok(&["up", &n.to_string(), "-q"]);
    for i in 1..=n {
        assert!(wait_port(
            root.port(&i.to_string()),
            Duration::from_secs(20)
        ));
    }
    root
}

/// Each instance's (version, state, pid) as `list --json` says.
fn versions(root: &Root) -> Vec<(String, u64, String, Option<i64>)> {
    root.list_json()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["template_version"].as_u64().unwrap(),
                i["state"].as_str().unwrap().to_string(),
                i["pid"].as_i64(),
            )
        })
        .collect()
}

/// A second version of the default template, differing from the first
/// (socat and its libraries in it).
fn build_v2(root: &Root) {
    root.ok(&["template", "build", "-q", "--with", "/usr/bin/socat"]);
}

#[test]
fn update_moves_a_running_fleet_in_healthy_batches_and_keeps_its_files() {
    if !privileged() {
        return;
    }
    let root = fleet(12);
    root.ssh("3", "echo precious > ~/kept");
    // Instance 3 changes /etc/profile, and so will version 2.
    root.ok(&[
        "exec",
        "3",
        "--",
        "sh",
        "-c",
        "echo '# mine' >> /etc/profile",
    ]);
    build_v2(&root);
    let profile = root.path().join("templates/default/v2/rootfs/etc/profile");
    let mut text = std::fs::read_to_string(&profile).unwrap();
    text.push_str("# version 2\n");
    std::fs::write(&profile, text).unwrap();
    assert!(versions(&root).iter().all(|(_, v, _, _)| *v == 1));
    assert!(root.ok(&["list"]).contains("12 behind"));
    // A prober logs in to every instance in turn while the update runs.
    let done = AtomicBool::new(false);
    let log: Mutex<Vec<(String, f64, bool)>> = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let (out, wall) = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                for i in 1..=12 {
                    let n = i.to_string();
                    let (ok, _, _) = root.ssh_as(&n, "luser", "true");
                    log.lock()
                        .unwrap()
                        .push((n, t0.elapsed().as_secs_f64(), ok));
                }
            }
        });
        let o = common::nifty()
            .arg("--root")
            .arg(root.path())
            .args(["update", "--all", "--batch", "4", "--json"])
            .output()
            .unwrap();
        let wall = t0.elapsed().as_secs_f64();
        done.store(true, Ordering::SeqCst);
        (o, wall)
    });
    let text = common::succeeded(&out, "update --all --batch 4");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let batches = report["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 3, "{text}");
    assert!(batches
        .iter()
        .all(|b| b["healthy"] == true && b["names"].as_array().unwrap().len() == 4));
    // Every instance on v2, running, its file kept.
    let after = versions(&root);
    assert!(
        after.iter().all(|(_, v, s, _)| *v == 2 && s == "running"),
        "{after:?}"
    );
    assert_eq!(root.ssh("3", "cat ~/kept"), "precious\n");
    // The conflict is reported, and the instance's copy stays; the others
    // see version 2's.
    let conflicts = report["conflicts"].as_array().unwrap();
    assert!(
        conflicts
            .iter()
            .any(|c| c["name"] == "3" && c["path"] == "/etc/profile"),
        "{text}"
    );
    assert!(conflicts
        .iter()
        .all(|c| c["name"] != "4" || c["path"] != "/etc/profile"));
    let p3 = root.ssh("3", "cat /etc/profile");
    assert!(p3.contains("# mine") && !p3.contains("# version 2"), "{p3}");
    assert!(root.ssh("4", "cat /etc/profile").contains("# version 2"));
    // A login failed only while its own batch restarted (the update's
    // clock starts a little after ours: `slack` covers the difference).
    let slack = wall - report["seconds"].as_f64().unwrap() + 0.5;
    let log = log.into_inner().unwrap();
    let window = |name: &str| {
        let b = batches
            .iter()
            .find(|b| b["names"].as_array().unwrap().iter().any(|n| n == name))
            .unwrap();
        (
            b["began_ms"].as_f64().unwrap() / 1000.0,
            b["ended_ms"].as_f64().unwrap() / 1000.0 + slack,
        )
    };
    for (name, t, ok) in &log {
        if !ok {
            let (from, to) = window(name);
            assert!(
                *t >= from && *t <= to,
                "instance {name} unreachable at {t:.2}s, outside its batch ({from:.2}..{to:.2}s)"
            );
        }
    }
    // The prober did log in while the update ran (how many times depends
    // on the machine's speed, so only that it did: an instance of a batch
    // not being restarted answered).
    assert!(
        log.iter().any(|(_, t, ok)| *ok && *t < wall),
        "no login succeeded during the update: {log:?}"
    );
}

#[test]
fn a_failed_batch_goes_back_and_stops_the_update() {
    if !privileged() {
        return;
    }
    let root = fleet(8);
    build_v2(&root);
    // Version 3 whose Dropbear cannot start.
    root.ok(&["template", "build", "-q"]);
    let v3 = root
        .path()
        .join("templates/default/v3/rootfs/usr/sbin/dropbear");
    std::fs::copy("/bin/false", &v3).unwrap();
    let before = versions(&root);
    let o = common::nifty()
        .arg("--root")
        .arg(root.path())
        .args(["update", "--all", "--batch", "3", "--health-timeout", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    for n in ["1", "2", "3"] {
        assert!(
            err.contains(&format!("update: {n}: v1 -> v3 failed"))
                && err.contains("back on v1 and running"),
            "{err}"
        );
    }
    let after = versions(&root);
    for ((name, v, s, pid), (_, _, _, old_pid)) in after.iter().zip(&before) {
        assert_eq!((*v, s.as_str()), (1, "running"), "{name}: {after:?}");
        if ["1", "2", "3"].contains(&name.as_str()) {
            assert_eq!(root.ssh(name, "echo back"), "back\n");
        } else {
            // Never restarted.
            assert_eq!(pid, old_pid, "{name} was restarted");
        }
    }
}

#[test]
fn update_refuses_bad_input_and_a_second_update_and_resumes_a_killed_one() {
    if !privileged() {
        return;
    }
    let root = fleet(4);
    build_v2(&root);
    let e = root.fails(&["update", "--all", "--to", "9"]);
    assert!(e.contains("has no version 9"), "{e}");
    let e = root.fails(&["update", "--all", "--batch", "0"]);
    assert!(e.contains("--batch"), "{e}");
    // Another update holds the lock.
    let lock = root.path().join("update.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    std::fs::write(&lock, "4242\n").unwrap();
    let e = root.fails(&["update", "--all"]);
    assert!(
        e.contains("an update is running already") && e.contains("4242"),
        "{e}"
    );
    drop(f);
    // An instance whose stop was interrupted (its init stopped).
    let pid = versions(&root)[0].3.unwrap() as i32;
    let init = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(init, rustix::process::Signal::Stop).unwrap();
    let e = root.fails(&["update", "--all"]);
    rustix::process::kill_process(init, rustix::process::Signal::Cont).unwrap();
    assert!(e.contains("in the middle of a stop"), "{e}");
    assert!(versions(&root).iter().all(|(_, v, _, _)| *v == 1));
    // An update killed mid-batch: v3 never gets healthy, so it waits in
    // its first batch's health check; kill -9 it there.
    root.ok(&["template", "build", "-q"]);
    let v3 = root
        .path()
        .join("templates/default/v3/rootfs/usr/sbin/dropbear");
    std::fs::copy("/bin/false", &v3).unwrap();
    let mut child = common::nifty()
        .arg("--root")
        .arg(root.path())
        .args([
            "update",
            "--all",
            "--batch",
            "2",
            "--health-timeout",
            "60",
            "-q",
        ])
        .spawn()
        .unwrap();
    let journal = root.path().join("update.journal");
    let end = Instant::now() + Duration::from_secs(30);
    while !journal.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    // Every instance on one version, in the state `list` says.
    let mid = versions(&root);
    for (name, v, s, _) in &mid {
        assert!([1, 3].contains(v), "{name}: {mid:?}");
        assert!(s == "running" || s == "stopped", "{name}: {mid:?}");
    }
    // Back to v2, a working version: the next update starts what the
    // killed one left down, and finishes the job.
    let out = root.ok(&["update", "--all", "--to", "2", "--batch", "2"]);
    assert!(out.contains("update:"), "{out}");
    let after = versions(&root);
    assert!(
        after.iter().all(|(_, v, s, _)| *v == 2 && s == "running"),
        "{after:?}"
    );
    assert!(!journal.exists());
    for i in 1..=4 {
        assert_eq!(root.ssh(&i.to_string(), "echo up"), "up\n");
    }
    // diff shows the instance's own files; prune keeps what runs.
    let diff = root.ok(&["diff", "1"]);
    assert!(diff.contains("M /etc/inittab"), "{diff}");
    let pruned = root.ok(&["template", "prune"]);
    assert!(pruned.contains("removed version(s) 1"), "{pruned}");
    assert!(root.path().join("templates/default/v2/rootfs").is_dir());
    assert!(root.path().join("templates/default/v3/rootfs").is_dir());
}
