//! On-demand instances (`create --on-demand`, `nifty serve`): started by
//! their first SSH connection, stopped when idle, adopted by a restarted
//! `serve`. Real containers, a real OpenSSH client.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// `nifty serve` for a root, killed (by its PID) when dropped.
struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(root: &Root) -> Serve {
        Serve::start_with(root, &[])
    }

    /// `serve` with extra environment (`NIFTY_FALLBACKS=steer`).
    fn start_with(root: &Root, env: &[(&str, &str)]) -> Serve {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = root.path().join(format!("serve-{n}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = nifty()
            .arg("--root")
            .arg(root.path())
            .args(["serve", "--check-every", "1"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("run nifty serve");
        Serve { child, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Names of the running instances of `root`, with their init PIDs.
fn running(root: &Root) -> Vec<(String, i64)> {
    root.list_json()
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["pid"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The on-demand state `list --json` shows of each instance.
fn phases(root: &Root) -> std::collections::HashMap<String, serde_json::Value> {
    root.list_json()
        .into_iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["on_demand"].clone(),
            )
        })
        .collect()
}

/// Does `serve` hold `name`'s port (as `list` sees it: idle, or running)?
fn served(root: &Root, name: &str) -> bool {
    matches!(
        phases(root)[name]["phase"].as_str(),
        Some("idle") | Some("running")
    )
}

/// The ports `serve` says it holds.
fn held_ports(root: &Root) -> Vec<u16> {
    std::fs::read_to_string(root.path().join("serve.ports"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// Seconds a client of [`logins`] waits for its banner. Only a bound on a
/// hang: here a burst's banners come in milliseconds, but in the Debian 12
/// VM stage (qemu without KVM, 2 vCPUs, two tests at once) one of twenty
/// cold starts at once took more than 10 s.
const COLD_LOGIN_WITHIN: u64 = 60;

/// Logins to `names` at once: (name, ok, stdout, stderr); a failed one's
/// stderr ends with how long its client ran and the slowest of the others,
/// so a timeout says whether the whole burst was slow or one login hung.
fn logins(root: &Root, names: &[String], cmd: &str) -> Vec<(String, bool, String, String)> {
    let all: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = names
            .iter()
            .map(|n| {
                s.spawn(move || {
                    let t = Instant::now();
                    let (ok, out, err) = root.ssh_within(n, "luser", cmd, COLD_LOGIN_WITHIN);
                    (n.clone(), ok, out, err, t.elapsed())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let slowest_ok = all
        .iter()
        .filter(|l| l.1)
        .map(|l| l.4)
        .max()
        .unwrap_or_default();
    all.into_iter()
        .map(|(n, ok, out, mut err, took)| {
            if !ok {
                err.push_str(&format!(
                    "(this login's client ran {took:.1?}; the slowest successful one of {} at once {slowest_ok:.1?})",
                    names.len()
                ));
            }
            (n, ok, out, err)
        })
        .collect()
}

/// Is something listening on `port`? Read from /proc, without
/// connecting (a connection would start an on-demand instance).
fn listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && format!("{} ", cols[1]).ends_with(&hex) && cols[3] == "0A"
            })
        })
    })
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

#[test]
fn on_demand_instances_start_at_a_login_stop_when_idle_and_survive_serve() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    // Bad input changes nothing.
    let e = root.fails(&["create", "1", "--on-demand", "--idle-timeout", "0"]);
    assert!(e.contains("idle-timeout"), "{e}");
    assert!(!root.path().join("instances/1").exists());
    let e = root.fails(&["create", "1", "--idle-timeout", "5s"]);
    assert!(e.contains("--on-demand"), "{e}");
    assert!(!root.path().join("instances/1").exists());

    root.ok(&[
        "create",
        "1..200",
        "--on-demand",
        "--idle-timeout",
        "1m",
        "-q",
    ]);
    assert!(
        running(&root).is_empty(),
        "on-demand instances start only when asked"
    );
    let tab = std::fs::read_to_string(root.upper("7").join("etc/inittab")).unwrap();
    assert!(
        !tab.lines()
            .any(|l| !l.starts_with('#') && l.contains("dropbear")),
        "no Dropbear of its own: {tab}"
    );

    // Nothing holds their ports yet: `list` says so.
    let p = phases(&root);
    assert_eq!(p["7"]["phase"], "unserved", "{:?}", p["7"]);
    assert_eq!(p["7"]["idle_timeout_secs"], 60);
    // `nifty ssh` says what to run instead of ssh's "Connection refused".
    let e = root.fails(&["ssh", "7", "--", "true"]);
    assert!(
        e.contains("nothing holds its port") && e.contains("serve`"),
        "{e}"
    );

    let mut serve = Serve::start(&root);
    assert!(
        wait_until(Duration::from_secs(20), || served(&root, "200")),
        "serve holds no port: {}",
        serve.log()
    );
    // One socket for all 200 ports on this kernel (5.9+): none listens on
    // an instance's port.
    assert!(
        serve
            .log()
            .contains("holding the ports of 200 on-demand instance(s) (one socket, BPF sk_lookup)"),
        "{}",
        serve.log()
    );
    assert!(!listening(root.port("200")));
    assert_eq!(held_ports(&root).len(), 200);
    // A second serve of the same root says who serves it, and changes nothing.
    let e = root.fails(&["serve"]);
    assert!(
        e.contains("already runs") && e.contains(&serve.child.id().to_string()),
        "{e}"
    );

    // 20 logins at once, each to a stopped instance: all answered by the
    // instance's own Dropbear (its own host key, StrictHostKeyChecking).
    let twenty: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    // The session's Dropbear is an inetd one, started for this connection.
    let parent = "tr '\\0' ' ' < /proc/$PPID/cmdline";
    let cmd = format!("{PID1_COMM}; id -un; {parent}");
    for (n, ok, out, err) in logins(&root, &twenty, &cmd) {
        assert!(ok, "login to {n}: {err}\nserve: {}", serve.log());
        assert!(
            out.starts_with("init\nluser\n/usr/sbin/dropbear -i "),
            "{n}: {out}"
        );
    }
    let up = running(&root);
    let names: Vec<&str> = up.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names.len(),
        20,
        "exactly the 20 logged in to run: {names:?}"
    );
    // Once up, each got a listening Dropbear of its own: the kernel hands
    // it the next logins (serve is not in the way) once serve has put it
    // in the steering's map, and then recorded it in the instance's mark.
    let port3 = root.port("3");
    let mark3 = root.path().join("instances/3/on-demand.json");
    assert!(
        wait_until(Duration::from_secs(10), || listening(port3)
            && std::fs::read_to_string(&mark3)
                .is_ok_and(|m| m.contains("listener"))),
        "3 has no listener of its own: {}",
        serve.log()
    );
    let out = root.ssh("3", parent);
    assert!(
        out.starts_with(&format!(
            "/usr/sbin/dropbear -w -r /etc/dropbear/dropbear_ed25519_host_key \
             -P /var/run/nifty-listener.pid -p {port3}"
        )),
        "{out}"
    );
    // Its root kills it: the port's logins come through serve again at
    // once (never refused), and the next warm one starts another.
    let listener = root.ssh("3", "cut -d' ' -f4 /proc/$PPID/stat");
    root.ok(&["exec", "3", "--", "kill", "-9", listener.trim()]);
    assert!(wait_until(Duration::from_secs(10), || !listening(port3)));
    let out = root.ssh("3", parent);
    assert!(out.starts_with("/usr/sbin/dropbear -i "), "{out}");
    assert!(
        wait_until(Duration::from_secs(10), || listening(port3)),
        "no new listener in 3: {}",
        serve.log()
    );
    // `list` shows who runs, who waits, and a session while it lasts.
    std::thread::scope(|s| {
        // (Long enough for two `list`s on a slow machine: in a VM without
        // KVM, a 4 s session had ended before the second one.)
        let h = s.spawn(|| root.ssh("4", "sleep 15; echo done"));
        assert!(
            wait_until(Duration::from_secs(10), || phases(&root)["4"]["sessions"]
                == 1),
            "{:?}",
            phases(&root)["4"]
        );
        let p = phases(&root);
        assert_eq!(p["4"]["phase"], "running");
        assert_eq!(p["150"]["phase"], "idle", "{:?}", p["150"]);
        assert_eq!(p["150"]["sessions"], 0);
        let text = root.ok(&["list"]);
        let row = text.lines().find(|l| l.starts_with("4 ")).unwrap();
        assert!(row.ends_with("running, 1 session"), "{row}");
        assert_eq!(h.join().unwrap(), "done\n");
    });

    // kill -9 of serve: the instances keep running; a new serve adopts
    // them (same inits) and logs in again at once.
    let before = running(&root);
    let pid = serve.child.id();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::Kill,
    )
    .unwrap();
    let _ = serve.child.wait();
    assert_eq!(running(&root), before, "killing serve stopped nothing");
    // With serve gone, an instance with a listener of its own is still
    // reachable (the kernel's own lookup finds it).
    assert_eq!(root.ssh("3", "echo here"), "here\n");
    serve = Serve::start(&root);
    assert!(wait_until(Duration::from_secs(20), || served(&root, "200")));
    // ... and the new serve takes its port up again, listener and all.
    assert!(
        served(&root, "3"),
        "{:?}\n{}",
        phases(&root)["3"],
        serve.log()
    );
    assert!(!serve.log().contains("cannot hold"), "{}", serve.log());
    let ten: Vec<String> = (1..=10).map(|n| n.to_string()).collect();
    for (n, ok, _, err) in logins(&root, &ten, "true") {
        assert!(
            ok,
            "login to {n} after serve's restart: {err}\n{}",
            serve.log()
        );
    }
    let after = running(&root);
    for (n, pid) in before.iter().filter(|(n, _)| ten.contains(n)) {
        assert!(
            after.contains(&(n.clone(), *pid)),
            "{n} (init {pid}) was adopted, not restarted: {after:?}"
        );
    }

    // A shorter idle timeout, set while they run (serve takes it up).
    root.ok(&["on-demand", "enable", "1..200", "--idle-timeout", "3s"]);
    assert_eq!(phases(&root)["7"]["idle_timeout_secs"], 3);
    // Idle: no session, no process of its users: all stopped after 3 s.
    assert!(
        wait_until(Duration::from_secs(40), || running(&root).is_empty()),
        "idle instances still run: {:?}\n{}",
        running(&root),
        serve.log()
    );
    assert!(serve.log().contains("idle, stopped"), "{}", serve.log());
    assert_eq!(phases(&root)["4"]["phase"], "idle");
    assert!(!listening(port3), "3's listener went with it");
    // And the next login starts one again.
    assert_eq!(root.ssh("5", PID1_COMM), "init\n");
    serve.kill();
    root.ok(&["stop", "--all", "-q"]);
    assert_clean(&root, &[]);
}

/// A session `serve` starts, cold (a `dropbear -i`) or through the
/// instance's own listener, lives in the instance's cgroup, whether born
/// there (clone3 with CLONE_INTO_CGROUP, Linux 5.7) or moved there (the
/// fallback before, forced here).
#[test]
fn sessions_live_in_their_instance_s_cgroup_on_both_paths() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "1", "--on-demand", "-q"]);
    let port = root.port("1");
    let parent = "tr '\\0' ' ' < /proc/$PPID/cmdline";
    // A session's `sleep`, found from the host in the instance's cgroup;
    // and the parent of the session's Dropbear, as the instance sees it.
    let sleeps_inside = |root: &Root| {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                root.ssh(
                    "1",
                    "sed -n 's/^PPid:[[:space:]]*//p' /proc/$PPID/status; sleep 2; echo slept",
                )
            });
            let found = wait_until(Duration::from_secs(10), || {
                root.procs("1").iter().any(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
                })
            });
            let out = h.join().unwrap();
            let (ppid, slept) = out.split_once('\n').expect("two lines");
            assert_eq!(slept, "slept\n");
            (found, ppid.to_string())
        })
    };
    for env in [&[][..], &[("NIFTY_FALLBACKS", "into-cgroup")][..]] {
        let serve = Serve::start_with(&root, env);
        assert!(
            wait_until(Duration::from_secs(20), || served(&root, "1")),
            "{}",
            serve.log()
        );
        // Cold: a `dropbear -i` that the container's first process started
        // before it exec'd init (init is its parent).
        let (inside, ppid) = sleeps_inside(&root);
        assert!(inside, "{env:?}: cold session outside");
        assert_eq!(
            ppid, "1",
            "{env:?}: the cold session's Dropbear was not init's child"
        );
        // Its Dropbear logged "Child connection from" before syslogd ran:
        // the console log says where the login came from.
        // (The client may reach `localhost` over IPv6.)
        let logs = root.ok(&["logs", "1"]);
        let line = "nifty: instance 1 starts for an SSH connection from ";
        assert!(
            [format!("{line}127.0.0.1:"), format!("{line}[::1]:")]
                .iter()
                .any(|l| logs.contains(l.as_str())),
            "{env:?}: {logs}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || listening(port)),
            "{env:?}: no listener: {}",
            serve.log()
        );
        // Warm: once the kernel hands the port's logins to its listener.
        assert!(
            wait_until(Duration::from_secs(10), || !root
                .ssh("1", parent)
                .contains(" -i ")),
            "{env:?}: logins still come through serve: {}",
            serve.log()
        );
        assert!(sleeps_inside(&root).0, "{env:?}: warm session outside");
        drop(serve);
        root.ok(&["stop", "1", "-q"]);
    }
}

/// Before Linux 6.13 each start thread makes its overlay in a mount
/// namespace of its own (played here with `NIFTY_FALLBACKS=overlay`):
/// `serve`'s threads live on, and none may keep a copy of the host's mounts
/// after its batch.
#[test]
fn serve_s_start_threads_leave_the_overlay_s_namespace_after_a_batch() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "1..3", "--on-demand", "-q"]);
    let serve = Serve::start_with(&root, &[("NIFTY_FALLBACKS", "overlay")]);
    assert!(
        wait_until(Duration::from_secs(20), || ["1", "2", "3"]
            .iter()
            .all(|n| served(&root, n))),
        "{}",
        serve.log()
    );
    let pid = serve.child.id();
    let namespaces = || -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            // (A thread that ended while they are listed is left out:
            // its files are gone.)
            .filter_map(|t| {
                let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
                let ns = std::fs::read_link(t.path().join("ns/mnt")).ok()?;
                Some((comm.trim().to_string(), ns.display().to_string()))
            })
            .collect()
    };
    let own = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let own = own.display().to_string();
    // Two batches: the second one's threads make their namespace again.
    for round in 0..2 {
        std::thread::scope(|s| {
            for n in ["1", "2", "3"] {
                let root = &root;
                s.spawn(move || assert_eq!(root.ssh(n, "echo in"), "in\n"));
            }
        });
        let mut away = namespaces();
        away.retain(|(_, ns)| *ns != own);
        assert!(
            away.is_empty(),
            "round {round}: serve's threads still in another mount namespace: {away:?}\n{}",
            serve.log()
        );
        assert!(namespaces()
            .iter()
            .any(|(c, _)| c.starts_with("nifty-work")));
        root.ok(&["stop", "1..3", "-q"]);
    }
}

/// A cold start boots the rest of its instance (init, its services) with
/// the least CPU share once its logins have their banners, and `serve`
/// gives it its own share (here `--cpu-weight 300`) once the burst is
/// over; a restarted `serve` gives it back to those a killed one left so.
#[test]
fn a_cold_start_boots_in_the_background_until_its_burst_ends() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "1", "--on-demand", "--cpu-weight", "300", "-q"]);
    let mut serve = Serve::start(&root);
    assert!(
        wait_until(Duration::from_secs(20), || served(&root, "1")),
        "{}",
        serve.log()
    );
    let file = root.cpu_share_file("1").expect("a cpu controller");
    // Its own share: weight 300, or v1 shares 300 * 1024 / 100.
    let own = match file.file_name().and_then(|n| n.to_str()) {
        Some("cpu.weight") => 300,
        _ => 3072,
    };
    let share = || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    // Every value it takes from the login on (2 ms apart), until it is
    // back at its own.
    let seen = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let mut seen: Vec<u64> = Vec::new();
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                if let Some(v) = share() {
                    if seen.last() != Some(&v) {
                        seen.push(v);
                    }
                    // (Its cgroup is made with the default share, then
                    // its own, before the start.)
                    if v == own && seen.iter().any(|&v| v <= 2) {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        // What serve writes in the state root meanwhile (see below).
        use rustix::fs::inotify;
        let ino = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .expect("inotify_init1");
        inotify::add_watch(
            &ino,
            root.path(),
            inotify::WatchFlags::MOVED_TO | inotify::WatchFlags::DELETE,
        )
        .expect("inotify_add_watch");
        assert_eq!(root.ssh("1", "echo in"), "in\n", "{}", serve.log());
        let starting = root.path().join("serve.starting");
        assert!(wait_until(Duration::from_secs(10), || !starting.exists()));
        let mut events = Vec::new();
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let mut reader = inotify::Reader::new(&ino, &mut buf);
        while let Ok(e) = reader.next() {
            let name = e.file_name().map(|n| n.to_string_lossy().into_owned());
            events.push((name.unwrap_or_default(), e.events()));
        }
        // `list` learns of a batch's starts from one file, written before
        // them and removed after (no mark per instance in the burst).
        let at = |what: inotify::ReadFlags| {
            events
                .iter()
                .position(|(n, e)| n == "serve.starting" && e.contains(what))
        };
        assert!(
            matches!((at(inotify::ReadFlags::MOVED_TO), at(inotify::ReadFlags::DELETE)), (Some(a), Some(b)) if a < b),
            "serve.starting was not written then removed: {events:?}"
        );
        watch.join().unwrap()
    });
    assert!(
        seen.iter().any(|&v| v <= 2) && seen.last() == Some(&own),
        "{} went through {seen:?}, not the least share then {own}: {}",
        file.display(),
        serve.log()
    );
    // A serve killed before the burst ended left it in the background
    // (played by writing the least share), and killed before it recorded
    // the instance's own listener, left that unrecorded (played by taking
    // it out of the mark): the next one takes the listener up again and
    // gives the instance its own share.
    let mark = root.path().join("instances/1/on-demand.json");
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&mark).is_ok_and(|m| m.contains("listener"))
        }),
        "no listener recorded: {}",
        serve.log()
    );
    serve.kill();
    std::fs::write(&file, if own == 300 { "1" } else { "2" }).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mark).unwrap()).unwrap();
    let listener = m.as_object_mut().unwrap().remove("listener").unwrap();
    std::fs::write(&mark, m.to_string()).unwrap();
    let serve = Serve::start(&root);
    assert!(
        wait_until(Duration::from_secs(20), || share() == Some(own)),
        "{} stays at {:?}: {}",
        file.display(),
        share(),
        serve.log()
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mark).unwrap()).unwrap();
    assert_eq!(m["listener"], listener, "{}", serve.log());
    assert!(!serve.log().contains("cannot hold"), "{}", serve.log());
    assert_eq!(root.ssh("1", "echo in"), "in\n", "{}", serve.log());
    drop(serve);
    root.ok(&["stop", "1", "-q"]);
    assert_clean(&root, &[]);
}

#[test]
fn serve_says_which_port_it_cannot_hold_and_serves_the_rest() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "1", "2", "--on-demand", "-q"]);
    // Someone else holds 2's port first. (This serve has a listening
    // socket per port, the fallback of kernels before 5.9.)
    let squatter = std::net::TcpListener::bind(("0.0.0.0", root.port("2"))).unwrap();
    let serve = Serve::start_with(&root, &[("NIFTY_FALLBACKS", "steer")]);
    let one = root.port("1");
    assert!(
        wait_until(Duration::from_secs(20), || listening(one)),
        "{}",
        serve.log()
    );
    assert!(
        serve.log().contains("a listening socket per port"),
        "{}",
        serve.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || serve
            .log()
            .contains(&format!("cannot hold its port {}", root.port("2")))),
        "{}",
        serve.log()
    );
    assert_eq!(root.ssh("1", PID1_COMM), "init\n");
    drop(squatter);
    // Taken up at the next check once free.
    assert!(
        wait_until(Duration::from_secs(10), || serve.log().contains("held now")),
        "{}",
        serve.log()
    );
    assert_eq!(root.ssh("2", PID1_COMM), "init\n");
}

#[test]
fn on_demand_enable_and_disable_change_stopped_instances_only() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "1", "2", "-q"]);
    root.ok(&["start", "1", "-q"]);
    let before = std::fs::read(root.path().join("instances/1/instance.toml")).unwrap();
    // A running one is refused, with what to do; nothing changes.
    let e = root.fails(&["on-demand", "enable", "1", "2"]);
    assert!(e.contains("stop them first") && e.contains('1'), "{e}");
    assert_eq!(
        std::fs::read(root.path().join("instances/1/instance.toml")).unwrap(),
        before
    );
    assert!(root.instance_toml("2").get("on_demand").is_none());
    let e = root.fails(&["on-demand", "enable", "2", "--idle-timeout", "0"]);
    assert!(e.contains("idle-timeout"), "{e}");
    assert!(root.instance_toml("2").get("on_demand").is_none());

    // No serve runs yet: it says so, and how to run it.
    let said = root.ok(&["on-demand", "enable", "2", "--idle-timeout", "3s"]);
    assert!(
        said.contains("1 on-demand instance(s) wait for `nifty --root")
            && said.contains("serve`, which does not run"),
        "{said}"
    );
    let doctor = |want: &str| {
        let out = root.run(&["doctor"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.lines()
                .any(|l| l.starts_with(want) && l.contains("on-demand serve")),
            "{text}"
        );
    };
    doctor("WARN");
    let tab = std::fs::read_to_string(root.upper("2").join("etc/inittab")).unwrap();
    assert!(
        !tab.lines()
            .any(|l| !l.starts_with('#') && l.contains("dropbear")),
        "{tab}"
    );
    let serve = Serve::start(&root);
    let port = root.port("2");
    assert!(
        wait_until(Duration::from_secs(20), || served(&root, "2")),
        "{}",
        serve.log()
    );
    doctor("ok");
    assert_eq!(root.ssh("2", PID1_COMM), "init\n");
    assert!(
        wait_until(Duration::from_secs(30), || phases(&root)["2"]["phase"]
            == "idle"),
        "{:?}\n{}",
        phases(&root)["2"],
        serve.log()
    );
    // Back to always-on: serve lets go of the port, the instance's own
    // Dropbear listens on it when started.
    root.ok(&["on-demand", "disable", "2"]);
    assert!(root.instance_toml("2").get("on_demand").is_none());
    assert!(
        wait_until(Duration::from_secs(20), || !held_ports(&root)
            .contains(&port)),
        "serve still holds {port}: {}",
        serve.log()
    );
    root.ok(&["start", "2", "-q"]);
    assert!(wait_port(port, Duration::from_secs(10)));
    assert_eq!(root.ssh("2", PID1_COMM), "init\n");
    assert!(phases(&root)["2"].is_null());

    // A network of its own: loopback only, reached through the host's
    // listener all the same; it cannot be made always-on.
    let e = root.fails(&["create", "3", "--network", "none"]);
    assert!(e.contains("--on-demand"), "{e}");
    assert!(!root.path().join("instances/3").exists());
    // serve runs: nothing to say about it.
    let said = root.ok(&["create", "3", "--on-demand", "--network", "none"]);
    assert!(!said.contains("wait for"), "{said}");
    assert!(
        wait_until(Duration::from_secs(20), || served(&root, "3")),
        "{}",
        serve.log()
    );
    assert_eq!(root.ssh("3", "ls /sys/class/net"), "lo\n");
    let inside = root.ssh("3", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | wc -l");
    assert!(
        inside.trim().parse::<u32>().unwrap() <= 2,
        "host sockets seen: {inside}"
    );
    // Its network has a TCP table of its own (Linux 6.1, `netns`), which
    // /proc/net/tcp walks in place of the host's; the host's sysctl is
    // left as it was. Forced to the fallback, it shares the host's (the
    // kernel says so with a negative size).
    let host_child = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_child_ehash_entries");
    let table = |root: &Root| {
        root.ssh(
            "3",
            "cat /proc/sys/net/ipv4/tcp_ehash_entries 2>/dev/null; true",
        )
    };
    match &host_child {
        Ok(_) => assert_eq!(table(&root), "1024\n"),
        Err(_) => assert_eq!(table(&root), "", "a kernel before 6.1 has no such sysctl"),
    }
    root.ok(&["stop", "3", "-q"]);
    root.forced("netns-ehash", &["start", "3", "-q"]);
    if host_child.is_ok() {
        assert!(table(&root).starts_with('-'), "{}", table(&root));
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_child_ehash_entries").ok(),
        host_child.ok()
    );
    root.ok(&["stop", "3", "-q"]);
    let e = root.fails(&["on-demand", "disable", "3"]);
    assert!(e.contains("network of its own"), "{e}");
    drop(serve);
    root.ok(&["stop", "--all", "-q"]);
    assert_clean(&root, &[]);
}

/// The spawn under every session `serve` starts (`sys::spawn_into_cgroup`:
/// clone3 with CLONE_INTO_CGROUP, sharing serve's memory until the exec):
/// the child is born in the cgroup given, runs what it was given, and a
/// failure before its exec comes back as that error, with nothing left.
#[test]
fn a_session_is_born_in_its_cgroup_and_a_failed_exec_is_reported() {
    if !privileged() {
        return;
    }
    use std::os::fd::AsFd;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let v2 = mounts
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split_whitespace().nth(4))
        .expect("a cgroup2 mount")
        .to_string();
    /// The test's cgroup: its processes killed and the directory removed
    /// when dropped.
    struct Group(std::path::PathBuf, Vec<i32>);
    impl Drop for Group {
        fn drop(&mut self) {
            for pid in &self.1 {
                if let Some(p) = rustix::process::Pid::from_raw(*pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::Kill);
                    let _ =
                        rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
                }
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let name = format!("nifty-test-spawn-{}", std::process::id());
    let mut group = Group(std::path::Path::new(&v2).join(&name), Vec::new());
    std::fs::create_dir(&group.0).unwrap();
    let dir = std::fs::File::open(&group.0).unwrap();
    let prog = c"/bin/sleep";
    let argv = [c"sleep".as_ptr(), c"30".as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    let pid =
        nifty::sys::spawn_into_cgroup(dir.as_fd(), &mut || nifty::sys::execve(prog, &argv, &envp))
            .unwrap();
    group.1.push(pid);
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&name)),
        "{cg}"
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("sleep"), "{exe:?}");
    // A child whose exec fails: its errno, and it is reaped.
    let missing = c"/nonexistent/nifty-test";
    let argv = [missing.as_ptr(), std::ptr::null()];
    match nifty::sys::spawn_into_cgroup(dir.as_fd(), &mut || {
        nifty::sys::execve(missing, &argv, &envp)
    }) {
        Err(nifty::sys::SpawnError::Child(e)) => {
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let procs = std::fs::read_to_string(group.0.join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), pid.to_string(), "{procs}");
}

/// An on-demand instance's own listener says who it is in a pidfile that
/// is the tenant's: one that is not a plain file (a symlink here, which
/// nifty never follows) names no listener, and nothing of nifty waits on
/// it; the instance's logins go on through `serve`.
#[test]
fn a_listener_pidfile_is_asked_of_the_kernel_never_followed() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "1", "--on-demand", "-q"]);
    let serve = Serve::start(&root);
    assert!(
        wait_until(Duration::from_secs(20), || served(&root, "1")),
        "{}",
        serve.log()
    );
    let parent = "cat /proc/$PPID/cmdline | tr '\\0' ' '";
    let port = root.port("1");
    assert!(root.ssh("1", parent).starts_with("/usr/sbin/dropbear -i "));
    assert!(
        wait_until(Duration::from_secs(10), || listening(port)),
        "no listener of its own: {}",
        serve.log()
    );
    // Its root ends the listener and puts a link where the next one
    // writes its PID (Dropbear, in the container, follows it).
    let listener = root.ssh("1", "cut -d' ' -f4 /proc/$PPID/stat");
    root.ok(&["exec", "1", "--", "kill", "-9", listener.trim()]);
    assert!(wait_until(Duration::from_secs(10), || !listening(port)));
    root.ok(&[
        "exec",
        "1",
        "--",
        "ln",
        "-sf",
        "/tmp/listener.pid",
        "/var/run/nifty-listener.pid",
    ]);
    // The next login comes through serve, which starts another listener
    // and reads the link as nothing.
    assert!(root.ssh("1", parent).starts_with("/usr/sbin/dropbear -i "));
    assert!(
        wait_until(Duration::from_secs(10), || serve
            .log()
            .contains("/var/run/nifty-listener.pid (a symlink is on the way")),
        "{}",
        serve.log()
    );
    // Its logins go on through serve.
    for _ in 0..2 {
        let out = root.ssh("1", parent);
        assert!(out.starts_with("/usr/sbin/dropbear -i "), "{out}");
    }
    // (No mark at all is an empty one.)
    let mark = std::fs::read_to_string(root.path().join("instances/1/on-demand.json"))
        .unwrap_or_else(|_| "{}".into());
    let rec: serde_json::Value = serde_json::from_str(&mark).unwrap();
    assert!(
        rec.get("listener").is_none_or(|l| l.is_null()),
        "no listener on the link's word: {mark}"
    );
    drop(serve);
    root.ok(&["stop", "--all", "-q"]);
    assert_clean(&root, &[]);
}

#[test]
fn a_restart_keeps_its_files_and_sets_the_old_work_directory_aside() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    // Its layers beside its record, where the test can see them.
    root.ok(&["create", "1", "--on-demand", "--disk", "unlimited", "-q"]);
    let dir = root.path().join("instances/1");
    let (old_work, aside) = (dir.join("work/work"), dir.join(".nifty-work-old"));
    let serve = Serve::start(&root);
    assert!(
        wait_until(Duration::from_secs(20), || served(&root, "1")),
        "{}",
        serve.log()
    );
    assert_eq!(root.ssh("1", "echo one > ~/f; cat ~/f"), "one\n");
    root.ok(&["stop", "1", "-q"]);
    // What its overlay left, and the mark of its run.
    assert!(old_work.is_dir(), "no {}", old_work.display());
    // Watched: moved away (aside) or removed in place (by overlayfs, at
    // the mount). Its inode number says nothing: a freed one is reused.
    use rustix::fs::inotify;
    let watch =
        inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(
        &watch,
        dir.join("work"),
        inotify::WatchFlags::MOVED_FROM | inotify::WatchFlags::DELETE,
    )
    .unwrap();
    // Started again by a login: its files are there, and the old work
    // directory went aside and then away, on serve's own thread.
    assert_eq!(root.ssh("1", "cat ~/f"), "one\n", "{}", serve.log());
    assert!(
        wait_until(Duration::from_secs(10), || aside
            .symlink_metadata()
            .is_err()),
        "{} is still there: {}",
        aside.display(),
        serve.log()
    );
    assert!(old_work.is_dir(), "no new {}", old_work.display());
    let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
    let mut events = inotify::Reader::new(&watch, &mut buf);
    let mut seen = Vec::new();
    while let Ok(e) = events.next() {
        if e.file_name().is_some_and(|n| n.to_bytes() == b"work") {
            seen.push(e.events());
        }
    }
    assert!(
        seen.first()
            .is_some_and(|f| f.contains(inotify::ReadFlags::MOVED_FROM)),
        "work/work was not moved aside first: {seen:?}"
    );
    assert!(
        !seen.iter().any(|f| f.contains(inotify::ReadFlags::DELETE)),
        "work/work was removed in place: {seen:?}"
    );
    // A leftover from a process that ended before removing it (played by
    // a directory put there) goes at the next start.
    drop(serve);
    root.ok(&["stop", "1", "-q"]);
    std::fs::create_dir_all(aside.join("work/#1")).unwrap();
    root.ok(&["start", "1", "-q"]);
    assert!(
        wait_until(Duration::from_secs(10), || aside
            .symlink_metadata()
            .is_err()),
        "{} is still there",
        aside.display()
    );
    root.ok(&["stop", "1", "-q"]);
    assert_clean(&root, &[]);
}

/// The SSH banner a server sends first, read within `within`.
fn banner(conn: &mut std::net::TcpStream, within: Duration) -> String {
    use std::io::Read;
    conn.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.contains(&b'\n') {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Whether a process of `name`'s cgroup is named `comm` (as the kernel
/// says: nifty's own first process names itself, the tenant cannot
/// here).
fn has_comm(root: &Root, name: &str, comm: &str) -> bool {
    with_comm(root, name, comm).is_some()
}

/// A process of `name`'s cgroup named `comm` (see `has_comm`).
fn with_comm(root: &Root, name: &str, comm: &str) -> Option<i32> {
    root.procs(name).into_iter().find(|p| {
        std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim_end() == comm)
    })
}

/// The held first process of `name` runs nifty's code in memory it shares
/// with `serve` (root on the host), with copies of `serve`'s fds, while
/// the tenant's first login already runs beside it: the container's root
/// must not get at it. A process in the instance's user namespace as its
/// root (as a tenant's are) cannot read its memory, maps, environment,
/// fds or executable (nifty makes it not dumpable right after its change
/// of IDs, whatever `fs.suid_dumpable` says), while it
/// can read those of the login's Dropbear (its own). (Opening a file is
/// the check: `mem` read at offset 0 fails anyway.)
fn held_process_is_out_of_the_tenants_reach(root: &Root, name: &str) {
    let held = with_comm(root, name, "nifty:held").expect("the held process");
    let dropbear = with_comm(root, name, "dropbear").expect("the login's Dropbear");
    let probe = format!(
        "id -u; for f in mem maps environ; do (exec 3</proc/{held}/$f) 2>/dev/null && echo $f; done; \
         ls /proc/{held}/fd >/dev/null 2>&1 && echo fd; \
         readlink /proc/{held}/exe >/dev/null 2>&1 && echo exe; \
         head -c1 /proc/{dropbear}/maps >/dev/null 2>&1 && echo own"
    );
    let out = std::process::Command::new("nsenter")
        .args(["-U", "-t", &held.to_string(), "--", "/bin/sh", "-c", &probe])
        .output()
        .expect("run nsenter");
    let still = std::fs::read_to_string(format!("/proc/{held}/comm")).unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0\nown\n",
        "the container's root got at what it may not of the held process {held} \
         (its comm after the probe: {still:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        still.trim_end(),
        "nifty:held",
        "the hold ended during the probe"
    );
}

/// The `fs.suid_dumpable` sysctl set for a while: the value it had comes
/// back when this is dropped (also when the test fails).
struct SuidDumpable(String);

impl SuidDumpable {
    const PATH: &'static str = "/proc/sys/fs/suid_dumpable";

    fn set(value: &str) -> SuidDumpable {
        let was = std::fs::read_to_string(Self::PATH).expect("read fs.suid_dumpable");
        std::fs::write(Self::PATH, value).expect("set fs.suid_dumpable");
        SuidDumpable(was.trim().to_string())
    }
}

impl Drop for SuidDumpable {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// A cold start's first process is held after its logins' banners until
/// `serve` has no start left, a second at most: while another start of
/// the same burst waits (its instance locked by this test), the held
/// instance has answered and counts as running, its init takes over on
/// its own, and logins work; a held instance can be stopped; the waiting
/// start goes on once its lock is free.
#[test]
fn a_held_first_process_answers_and_hands_over_to_init_while_a_burst_waits() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    root.ok(&["create", "1..4", "--on-demand", "-q"]);
    let mut serve = Serve::start(&root);
    assert!(
        wait_until(Duration::from_secs(20), || (1..=4)
            .all(|n| served(&root, &n.to_string()))),
        "{}",
        serve.log()
    );
    let serve_pid = rustix::process::Pid::from_child(&serve.child);
    let lock = |name: &str| {
        let dir = std::fs::File::open(root.path().join("instances").join(name)).unwrap();
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive).unwrap();
        dir
    };
    // Connections to `first` and to `locked` in one batch of starts
    // (`serve` stopped while both arrive): `first`'s banner, while
    // `locked`'s start waits for its lock.
    let burst = |first: &str, locked: &str| {
        rustix::process::kill_process(serve_pid, rustix::process::Signal::Stop).unwrap();
        // Stopped for sure (a stop comes to each thread in its own time).
        let status =
            rustix::process::waitpid(Some(serve_pid), rustix::process::WaitOptions::UNTRACED)
                .unwrap()
                .expect("serve's status");
        assert!(status.stopped(), "serve did not stop: {status:?}");
        let c1 = std::net::TcpStream::connect(("127.0.0.1", root.port(first)));
        let c2 = std::net::TcpStream::connect(("127.0.0.1", root.port(locked)));
        rustix::process::kill_process(serve_pid, rustix::process::Signal::Cont).unwrap();
        let (mut c1, c2) = (c1.unwrap(), c2.unwrap());
        let b = banner(&mut c1, Duration::from_secs(COLD_LOGIN_WITHIN));
        assert!(
            b.starts_with("SSH-2.0-"),
            "{first}'s banner: {b:?}\n{}",
            serve.log()
        );
        (c1, c2)
    };

    let locked3 = lock("3");
    // At `fs.suid_dumpable` 1, the kernel leaves a process that changed
    // its IDs dumpable: nifty's own must not be.
    let debug_dumps = SuidDumpable::set("1");
    let (_c1, mut c3) = burst("1", "3");
    // Held: `nifty:held` is 1's PID 1 until init's exec, which comes
    // within a second although the burst is not over. (It names itself
    // once it has seen the banner out, a moment after the client.)
    let seen = Instant::now();
    let mut comms = Vec::new();
    while !comms.iter().any(|c| c == "nifty:held") && seen.elapsed() < Duration::from_millis(900) {
        comms = root
            .procs("1")
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .map(|c| c.trim_end().to_string())
            .collect();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        comms.iter().any(|c| c == "nifty:held"),
        "1's first process was not held: {comms:?}"
    );
    held_process_is_out_of_the_tenants_reach(&root, "1");
    drop(debug_dumps);
    assert!(
        running(&root).iter().any(|(n, _)| n == "1"),
        "a held instance is running: {:?}",
        root.list_json()
    );
    assert!(
        wait_until(Duration::from_secs(5), || has_comm(&root, "1", "init")),
        "1's init was not exec'd while 3's start waited"
    );
    assert!(!has_comm(&root, "1", "nifty:held"));
    assert_eq!(root.ssh("1", PID1_COMM), "init\n");
    // 3 has no answer until its lock is free, then it starts.
    c3.set_nonblocking(true).unwrap();
    let mut one = [0u8; 1];
    assert!(
        std::io::Read::read(&mut c3, &mut one).is_err(),
        "3 answered while its start waited for its lock"
    );
    c3.set_nonblocking(false).unwrap();
    drop(locked3);
    let b = banner(&mut c3, Duration::from_secs(COLD_LOGIN_WITHIN));
    assert!(
        b.starts_with("SSH-2.0-"),
        "3's banner: {b:?}\n{}",
        serve.log()
    );

    // A held instance stopped (cgroup.kill): stopped, nothing of it left,
    // on demand again. (If this machine took longer than the hold to get
    // here, it stops a running init: the same outcome.)
    let locked4 = lock("4");
    let (c2, c4) = burst("2", "4");
    root.ok(&["stop", "2", "-q"]);
    assert!(!running(&root).iter().any(|(n, _)| n == "2"));
    assert!(root.procs("2").is_empty(), "{:?}", root.procs("2"));
    drop((c2, locked4));
    let mut c4 = c4;
    let b = banner(&mut c4, Duration::from_secs(COLD_LOGIN_WITHIN));
    assert!(
        b.starts_with("SSH-2.0-"),
        "4's banner: {b:?}\n{}",
        serve.log()
    );
    assert!(running(&root).iter().any(|(n, _)| n == "4"));
    // (`list` shows 2 starting until its batch is over.)
    assert!(
        wait_until(Duration::from_secs(10), || served(&root, "2")),
        "2 is not on demand again: {:?}\n{}",
        phases(&root)["2"],
        serve.log()
    );
    // Each got its listener once its batch was over (300 ms after the
    // last start) or had it from a login meanwhile (1): one that it keeps
    // (a second would find the port taken), none for 2, stopped meanwhile
    // (no word of that).
    std::thread::sleep(Duration::from_secs(2));
    let log = serve.log();
    assert!(!log.contains("listening Dropbear exited"), "{log}");
    assert!(!log.contains("is not running"), "{log}");
    serve.kill();
    root.ok(&["stop", "--all", "-q"]);
    assert_clean(&root, &[]);
}
