//! Test harness: a temp state root per test, the real binary, and cleanup
//! that runs even when the test fails (Drop).

#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const NIFTY: &str = env!("CARGO_BIN_EXE_nifty");

/// Tests' numeric instances listen on TEST_PORT_BASE + N, never on the
/// default 2200 + N, so the suite passes while a user's fleet runs.
pub const TEST_PORT_BASE: u16 = 20000;

/// Shell that prints the name of the container's PID 1 once it is init:
/// a start at a connection holds its first process (named `nifty:held`)
/// until its burst of cold starts is over, a second at most, before it
/// execs init; a login may come first.
pub const PID1_COMM: &str = "i=0; while [ \"$(cat /proc/1/comm)\" != init ] && [ $i -lt 50 ]; \
     do sleep 0.1; i=$((i+1)); done; cat /proc/1/comm";

/// The nifty under test, with the tests' port base, and the native
/// launcher unless a test names `--backend` (the default would be systemd
/// on a systemd host, such as the VMs of tests/vm).
/// `nifty` arguments that give a running instance's inittab a shutdown
/// action (BusyBox init re-reads it on SIGHUP): its stop is then left to
/// init's own poweroff, so that the action runs.
pub fn add_shutdown_action(name: &str) -> [&str; 6] {
    [
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "echo '::shutdown:/bin/echo custom shutdown ran' >> /etc/inittab && kill -HUP 1",
    ]
}

pub fn nifty() -> Command {
    let mut c = Command::new(NIFTY);
    c.env("NIFTY_PORT_BASE", TEST_PORT_BASE.to_string())
        .env("NIFTY_BACKEND", "native");
    c
}

/// Are privileged tests possible here? If not: skip, or fail when CI
/// requires them (NIFTY_REQUIRE_PRIVILEGED=1).
pub fn privileged() -> bool {
    let root = rustix::process::geteuid().is_root();
    let can =
        root && Path::new("/bin/busybox").exists() && Path::new("/usr/sbin/dropbear").exists();
    if !can {
        let why = if root {
            "busybox-static and dropbear-bin are not installed"
        } else {
            "not running as root"
        };
        if std::env::var("NIFTY_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!("privileged test cannot run ({why}) but NIFTY_REQUIRE_PRIVILEGED=1");
        }
        eprintln!("SKIP: privileged test ({why})");
    }
    can
}

/// A tool a test needs (`package` says where it comes from): missing, the
/// test fails under CI (NIFTY_REQUIRE_PRIVILEGED=1) and skips elsewhere.
pub fn tool(path: &str, package: &str) -> Option<PathBuf> {
    let p = PathBuf::from(path);
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("NIFTY_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!(
            "{path} is missing: `make test` installs it ({package}, scripts/install-deps --test)"
        );
    }
    eprintln!("SKIP: no {path} ({package})");
    None
}

/// The suite's lock: tests that run containers take turns (they share
/// the host's network, and two tests may number instances alike).
static SUITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    /// How many `Serial`s this thread holds, and the lock while it holds any.
    static HELD: std::cell::RefCell<(usize, Option<std::sync::MutexGuard<'static, ()>>)> =
        const { std::cell::RefCell::new((0, None)) };
}

/// A turn at the suite's lock, for as long as it lives; a thread may hold
/// several at once (a test with two state roots).
pub struct Serial(std::marker::PhantomData<std::sync::MutexGuard<'static, ()>>);

impl Serial {
    pub fn take() -> Serial {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.0 == 0 {
                // A test that failed while holding it poisoned it: the
                // next one still runs.
                h.1 = Some(SUITE.lock().unwrap_or_else(|p| p.into_inner()));
            }
            h.0 += 1;
        });
        Serial(std::marker::PhantomData)
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            h.0 -= 1;
            if h.0 == 0 {
                h.1 = None;
            }
        });
    }
}

/// A state root in a temp dir; on drop, kills every container of it and
/// removes it. It holds a turn at the suite's lock while it lives.
pub struct Root {
    pub dir: tempfile::TempDir,
    _serial: Serial,
}

impl Root {
    pub fn new() -> Root {
        let serial = Serial::take();
        Root {
            dir: tempfile::Builder::new()
                .prefix("nifty-test-")
                .tempdir()
                .unwrap(),
            _serial: serial,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// nifty with this root and `args`, to run.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = nifty();
        c.arg("--root")
            .arg(self.path())
            .args(args)
            .env_remove("NIFTY_ROOT");
        c
    }

    /// Runs nifty with this root.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run nifty")
    }

    /// Runs nifty with this root and the fallback of older kernels
    /// `fallback` forced (`NIFTY_FALLBACKS`).
    pub fn run_forced(&self, fallback: &str, args: &[&str]) -> Output {
        self.command(args)
            .env("NIFTY_FALLBACKS", fallback)
            .output()
            .expect("run nifty")
    }

    /// [`Root::run_forced`], asserting success; returns stdout.
    pub fn forced(&self, fallback: &str, args: &[&str]) -> String {
        succeeded(
            &self.run_forced(fallback, args),
            &format!("nifty {args:?} with NIFTY_FALLBACKS={fallback}"),
        )
    }

    /// Runs nifty and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeded(&self.run(args), &format!("nifty {args:?}"))
    }

    /// Each instance as `list --json` shows it.
    pub fn list_json(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["list", "--json"]);
        match serde_json::from_str(&out) {
            Ok(serde_json::Value::Array(v)) => v,
            other => panic!("list --json gave no array ({other:?}): {out}"),
        }
    }

    /// Runs nifty, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "nifty {args:?} should fail: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// The root of the default template's newest version.
    pub fn rootfs(&self) -> PathBuf {
        let top = self.path().join("templates/default");
        let v = std::fs::read_to_string(top.join("template.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("version").and_then(|v| v.as_integer()))
            .unwrap_or(1);
        let versioned = top.join(format!("v{v}/rootfs"));
        if versioned.is_dir() {
            versioned
        } else {
            top.join("rootfs")
        }
    }

    pub fn instance_toml(&self, name: &str) -> toml::Table {
        let s = std::fs::read_to_string(
            self.path()
                .join("instances")
                .join(name)
                .join("instance.toml"),
        )
        .unwrap();
        s.parse().unwrap()
    }

    /// The host directory of an instance's upper layer (in the disk
    /// store, or in its instance directory when its disk is unlimited).
    pub fn upper(&self, name: &str) -> PathBuf {
        let on_store = self
            .instance_toml(name)
            .get("disk_store")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if on_store {
            self.path().join("disk").join(name).join("upper")
        } else {
            self.path().join("instances").join(name).join("upper")
        }
    }

    pub fn port(&self, name: &str) -> u16 {
        self.instance_toml(name)["port"].as_integer().unwrap() as u16
    }

    /// The v2 cgroup directory of this root's containers.
    pub fn cgroup_base(&self) -> PathBuf {
        let store = nifty::store::Store::new(Some(self.path().into()));
        let h = nifty::runtime::linux::cgroup::Hierarchy::detect().unwrap();
        h.v2.join(h.base(&store.cgroup_name()))
    }

    /// The file that holds a running instance's CPU share (v2
    /// `cpu.weight`, or v1 `cpu.shares` on a hybrid host).
    pub fn cpu_share_file(&self, name: &str) -> Option<PathBuf> {
        let store = nifty::store::Store::new(Some(self.path().into()));
        let h = nifty::runtime::linux::cgroup::Hierarchy::detect().unwrap();
        h.instance(&h.base(&store.cgroup_name()), name)
            .cpu_share_file()
    }

    /// PIDs in an instance's cgroup.
    pub fn procs(&self, name: &str) -> Vec<i32> {
        std::fs::read_to_string(self.cgroup_base().join(name).join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Logs in over SSH with a real client, nifty's key, and the instance's
    /// known host key; returns (exit ok, stdout, stderr). The client waits
    /// 10 s for the connection and the banner.
    pub fn ssh_as(&self, name: &str, user: &str, cmd: &str) -> (bool, String, String) {
        self.ssh_within(name, user, cmd, 10)
    }

    /// [`Root::ssh_as`], the client waiting `secs` for the connection and
    /// the banner (ssh's `ConnectTimeout`).
    pub fn ssh_within(
        &self,
        name: &str,
        user: &str,
        cmd: &str,
        secs: u64,
    ) -> (bool, String, String) {
        let port = self.port(name);
        let known = self.path().join(format!("known_hosts.test.{name}"));
        let key = self.instance_toml(name)["host_key"]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::write(&known, format!("[localhost]:{port} {key}\n")).unwrap();
        let o = Command::new("ssh")
            .args(["-i"])
            .arg(self.path().join("keys/id_ed25519"))
            .args(["-p", &port.to_string(), "-l", user])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .args(["-o", &format!("ConnectTimeout={secs}")])
            .args(["-o", "LogLevel=ERROR"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["localhost", cmd])
            .output()
            .expect("run ssh (openssh-client)");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// The host-wide UID-range claims (/var/lib/nifty-uids) that point
    /// into this root.
    pub fn uid_claims(&self) -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir("/var/lib/nifty-uids") else {
            return Vec::new();
        };
        dir.flatten()
            .map(|e| e.path())
            .filter(|p| std::fs::read_link(p).is_ok_and(|t| t.starts_with(self.path())))
            .collect()
    }

    /// SSH as the template's user, asserting success.
    pub fn ssh(&self, name: &str, cmd: &str) -> String {
        let (ok, out, err) = self.ssh_as(name, "luser", cmd);
        assert!(ok, "ssh to {name} failed: {err}");
        out
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        // Kill whatever this root still runs, even after a failed
        // assertion, then remove its instances: their UID-range claims are
        // host-wide (/var/lib/nifty-uids) and must not outlive the test.
        for verb in [&["kill", "--all", "-q"][..], &["rm", "-f", "--all", "-q"]] {
            let _ = nifty().arg("--root").arg(self.path()).args(verb).output();
        }
        // A claim an rm that failed left (a failed test's) goes too: only
        // this root's.
        for link in self.uid_claims() {
            let _ = std::fs::remove_file(link);
        }
        // rm of the last instance unmounts the disk store; if a test
        // left it mounted some other way, it goes now (never left behind).
        let store = self.path().join("disk");
        if all_mounts_under(self.path())
            .iter()
            .any(|l| l.contains(&format!(" {} ", store.display())))
        {
            let _ = rustix::mount::unmount(&store, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// A root with the default template and running instances `names`,
/// created with `extra` arguments, each answering on its port.
pub fn fleet(names: &[&str], extra: &[&str]) -> Root {
    let root = Root::new();
    root.ok(&["template", "build"]);
    let mut args = vec!["create"];
    args.extend_from_slice(names);
    args.extend_from_slice(extra);
    root.ok(&args);
    let mut args = vec!["start"];
    args.extend_from_slice(names);
    root.ok(&args);
    for n in names {
        assert!(
            wait_port(root.port(n), Duration::from_secs(20)),
            "{n} did not boot"
        );
    }
    root
}

/// Waits until a TCP port accepts connections.
/// Asserts that the command `what` succeeded (its output says why not);
/// returns its stdout.
pub fn succeeded(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether a program's error says EDQUOT, as glibc ("Disk quota
/// exceeded") or musl ("Quota exceeded", a static BusyBox) words it.
pub fn quota_exceeded(err: &str) -> bool {
    err.contains("Disk quota exceeded") || err.contains("Quota exceeded")
}

pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Does any mount of the host mention `path`? The disk store of a state
/// root (`<root>/disk`, its instances' own files) is not a container's
/// mount: it stays while the root has instances on it, and `rm` of the
/// last one unmounts it (`Drop for Root` checks that).
pub fn mounted_under(path: &Path) -> Vec<String> {
    let p = path.display().to_string();
    let store = format!(" {p}/disk ");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&p) && !l.contains(&store))
        .map(String::from)
        .collect()
}

/// Every mount of the host that mentions `path`, the disk store included.
pub fn all_mounts_under(path: &Path) -> Vec<String> {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&p))
        .map(String::from)
        .collect()
}

/// Everything of this root is gone: no process, no cgroup, no mount.
pub fn assert_clean(root: &Root, pids: &[i32]) {
    for pid in pids {
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            cmd.is_empty() || !cmd.contains("dropbear") && !cmd.starts_with("init"),
            "pid {pid} survives: {cmd}"
        );
    }
    let base = root.cgroup_base();
    // On a systemd host, a scope with no process left is systemd's to end
    // and remove, with the stopped containers' groups in it (nifty leaves
    // them to it rather than race its removal): wait for that; what is
    // still there after is left behind.
    let end = Instant::now() + Duration::from_secs(15);
    while nifty::runtime::linux::delegate::populated(&base) == Some(false)
        && base
            .components()
            .any(|c| c.as_os_str() == nifty::runtime::linux::delegate::SLICE)
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = std::fs::read_dir(&base)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                // On a systemd host, the empty leaf of the process that made
                // the delegated scope: systemd removes it with the scope,
                // once it sees the scope empty.
                .filter(|e| {
                    e.file_name() != ".nifty"
                        || std::fs::read_to_string(e.path().join("cgroup.procs"))
                            .is_ok_and(|p| !p.trim().is_empty())
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    assert!(
        mounted_under(root.path()).is_empty(),
        "mounts left: {:?}",
        mounted_under(root.path())
    );
}
