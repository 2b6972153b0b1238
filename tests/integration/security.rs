//! Privileged: each attack runs as root inside a real container and must
//! fail (EPERM/EACCES/EROFS...) or stay contained; the host is checked
//! afterwards. SECURITY.md lists these tests by name.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{assert_clean, fleet, privileged, wait_port, Root};

/// Runs a shell command as the container's root; returns (status code, stdout+stderr).
fn as_root(root: &Root, name: &str, script: &str) -> (i32, String) {
    let o = root.run(&["exec", name, "--", "sh", "-c", script]);
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The attack must fail; its output must say why.
fn refused(root: &Root, name: &str, script: &str, why: &[&str]) {
    let (code, out) = as_root(root, name, script);
    assert_ne!(code, 0, "{script:?} succeeded: {out}");
    assert!(
        why.iter().any(|w| out.contains(w)),
        "{script:?}: unexpected failure {out:?}"
    );
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

#[test]
fn container_root_is_an_unprivileged_host_uid() {
    if !privileged() {
        return;
    }
    let root = fleet(&["501"], &[]);
    let (_, out) = as_root(&root, "501", "id -u; id -g");
    assert_eq!(out, "0\n0\n");
    let base = root.instance_toml("501")["security"]["uid_base"]
        .as_integer()
        .unwrap() as u32;
    assert!(base >= 0x80000, "uid base {base}");
    let v = root.list_json();
    let pid = v[0]["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().nth(1).unwrap(),
        base.to_string(),
        "{uid_line}"
    );
    // The login user is base + 1000 on the host.
    assert_eq!(root.ssh("501", "id -u"), "1000\n");
    // Two instances never share a range.
    root.ok(&["create", "502"]);
    let other = root.instance_toml("502")["security"]["uid_base"]
        .as_integer()
        .unwrap() as u32;
    assert!(other.abs_diff(base) >= 65536);
}

#[test]
fn read_only_stays_read_only() {
    if !privileged() {
        return;
    }
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("data"), "host data\n").unwrap();
    let bind = format!("{}:/mnt/ro", host_dir.path().display());
    let root = fleet(&["511"], &["--bind-ro", &bind]);
    let template_inittab = sha(&root.rootfs().join("etc/inittab"));
    let template_tz = sha(&root.rootfs().join("usr/share/zoneinfo/UTC"));
    assert_eq!(as_root(&root, "511", "cat /mnt/ro/data").1, "host data\n");
    refused(
        &root,
        "511",
        "mount -o remount,rw /",
        &["permission denied", "Operation not permitted"],
    );
    refused(
        &root,
        "511",
        "mount -o remount,rw /mnt/ro",
        &["permission denied", "Operation not permitted"],
    );
    refused(
        &root,
        "511",
        "mount -o remount,rw /proc",
        &["permission denied", "Operation not permitted"],
    );
    refused(
        &root,
        "511",
        "echo evil > /mnt/ro/data",
        &["Read-only file system"],
    );
    refused(
        &root,
        "511",
        "touch /mnt/ro/new",
        &["Read-only file system"],
    );
    refused(
        &root,
        "511",
        "umount /mnt/ro",
        &[
            "permission denied",
            "Operation not permitted",
            "Invalid argument",
        ],
    );
    // Writes to template files land in the instance's own layer.
    let (code, out) = as_root(
        &root,
        "511",
        "echo evil >> /etc/inittab && echo evil > /usr/share/zoneinfo/UTC",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read_to_string(host_dir.path().join("data")).unwrap(),
        "host data\n"
    );
    assert!(!host_dir.path().join("new").exists());
    assert_eq!(
        sha(&root.rootfs().join("etc/inittab")),
        template_inittab,
        "template changed"
    );
    assert_eq!(
        sha(&root.rootfs().join("usr/share/zoneinfo/UTC")),
        template_tz,
        "template changed"
    );
    // /sys is read-only too.
    refused(
        &root,
        "511",
        "echo 1 > /sys/kernel/mm/ksm/run",
        &["Read-only file system", "Permission denied", "nonexistent"],
    );
}

#[test]
fn kernel_interfaces_are_refused() {
    if !privileged() {
        return;
    }
    let root = fleet(&["521"], &[]);
    let denied = [
        "Operation not permitted",
        "permission denied",
        "Permission denied",
    ];
    refused(&root, "521", "mknod /tmp/sda b 8 0", &denied);
    refused(
        &root,
        "521",
        "mkdir -p /tmp/p && mount -t proc proc /tmp/p",
        &denied,
    );
    refused(
        &root,
        "521",
        "mkdir -p /tmp/t && mount -t tmpfs none /tmp/t",
        &denied,
    );
    refused(
        &root,
        "521",
        "echo x > /tmp/x.ko && insmod /tmp/x.ko",
        &denied,
    );
    refused(
        &root,
        "521",
        "unshare -Ur sh -c 'mount -o remount,rw /'",
        &denied,
    );
    refused(&root, "521", "unshare -m true", &denied);
    let (_, out) = as_root(&root, "521", "date -s 2000-01-01 >/dev/null; date +%Y");
    assert!(
        out.contains("Operation not permitted") && !out.contains("2000\n"),
        "clock set: {out}"
    );
    // /proc/kcore and /proc/sysrq-trigger are masked where the kernel has them.
    let (_, out) = as_root(&root, "521", "cat /proc/kcore 2>/dev/null | wc -c");
    assert_eq!(out.trim(), "0", "kcore readable");
    // The host's interrupt counts too (the host's file has a line per
    // interrupt source at least).
    let host = std::fs::read_to_string("/proc/interrupts").unwrap();
    assert!(!host.is_empty(), "the host shows no /proc/interrupts");
    let (_, out) = as_root(&root, "521", "cat /proc/interrupts | wc -c");
    assert_eq!(out.trim(), "0", "/proc/interrupts readable");
    let (code, out) = as_root(&root, "521", "echo h > /proc/sysrq-trigger");
    assert_ne!(code, 0, "sysrq-trigger writable: {out}");
    let (code, out) = as_root(&root, "521", "echo 1 > /proc/sys/kernel/sysrq");
    assert_ne!(code, 0, "/proc/sys writable: {out}");
    // A host process cannot be signalled: it does not exist in here.
    let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
    refused(
        &root,
        "521",
        &format!("kill -9 {}", victim.id()),
        &["No such process"],
    );
    assert!(
        victim.try_wait().unwrap().is_none(),
        "host process was killed"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
    // The bounding set is small and no_new_privs is on, for every process.
    let (_, out) = as_root(
        &root,
        "521",
        "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/1/status",
    );
    assert!(
        out.contains("NoNewPrivs:\t1") && out.contains("Seccomp:\t2"),
        "{out}"
    );
    let bnd = u64::from_str_radix(
        out.lines()
            .find(|l| l.starts_with("CapBnd"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap(),
        16,
    )
    .unwrap();
    assert_eq!(bnd & (1 << 21), 0, "CAP_SYS_ADMIN kept");
    assert_eq!(bnd & (1 << 16), 0, "CAP_SYS_MODULE kept");
}

#[test]
fn no_host_fd_leaks_into_a_container() {
    if !privileged() {
        return;
    }
    let root = fleet(&["531"], &[]);
    let (_, out) = as_root(&root, "531", "ls /proc/1/fd");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "1", "2"],
        "init's fds"
    );
    // An exec'd command gets 0-2 (and ls's own directory fd) only.
    let (_, out) = as_root(&root, "531", "ls /proc/self/fd");
    assert!(out.split_whitespace().count() <= 4, "fds: {out}");
}

#[test]
fn no_signal_disposition_of_nifty_reaches_a_container() {
    if !privileged() {
        return;
    }
    // nifty ignores SIGPIPE, as every Rust program does (and whatever ran
    // it may ignore more: a shell's background job ignores SIGINT and
    // SIGQUIT). Exec keeps ignored signals ignored: the container's init
    // must start as a new process does, or every process of the tenant's
    // inherits them.
    let root = fleet(&["532"], &[]);
    let (code, out) = as_root(&root, "532", "grep -E '^Sig(Blk|Ign)' /proc/1/status");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
        "init's blocked and ignored signals"
    );
}

#[test]
fn planted_symlinks_do_not_redirect_host_writes() {
    if !privileged() {
        return;
    }
    let root = fleet(&["541"], &[]);
    let before_shadow = sha(std::path::Path::new("/etc/shadow"));
    let before_gshadow = sha(std::path::Path::new("/etc/gshadow"));
    let plant = "rm -rf /etc/dropbear && ln -s /etc /etc/dropbear && \
                 ln -sf /etc/shadow /home/luser/.ssh/authorized_keys && \
                 mv /etc/shadow /etc/shadow.real && ln -s /etc/gshadow /etc/shadow";
    let (code, out) = as_root(&root, "541", plant);
    assert_eq!(code, 0, "{out}");
    let key = std::fs::read_to_string(root.path().join("keys/id_ed25519.pub")).unwrap();
    let check = |state: &str| {
        let e = root.fails(&["rekey", "541"]);
        assert!(e.contains("symlink"), "{state}: {e}");
        let o = root.run(&["authorized-keys", "541", "luser", "--add", key.trim()]);
        let o2 = common::nifty()
            .arg("--root")
            .arg(root.path())
            .args(["passwd", "541", "luser"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(b"pw\n")?;
                c.wait()
            })
            .unwrap();
        assert!(!o2.success(), "{state}: passwd through a symlink succeeded");
        assert!(
            !std::path::Path::new("/etc/dropbear_ed25519_host_key").exists(),
            "{state}: host /etc written"
        );
        assert_eq!(
            sha(std::path::Path::new("/etc/shadow")),
            before_shadow,
            "{state}: host /etc/shadow written"
        );
        assert_eq!(
            sha(std::path::Path::new("/etc/gshadow")),
            before_gshadow,
            "{state}: host /etc/gshadow written"
        );
        o
    };
    check("running");
    root.ok(&["stop", "541"]);
    // Stopped: the links now sit in the instance's upper dir on the host.
    let upper = root.upper("541");
    assert!(upper
        .join("etc/dropbear")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
    check("stopped");
}

#[test]
fn fork_bomb_stays_contained() {
    if !privileged() {
        return;
    }
    let root = fleet(&["551", "552"], &["--tasks", "64", "--memory", "64M"]);
    // The bomb runs as the login user, like a hostile tenant would.
    let port = root.port("551").to_string();
    let key = root.path().join("keys/id_ed25519");
    let mut bomb = Command::new("ssh")
        .arg("-i")
        .arg(&key)
        .args([
            "-p",
            &port,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["luser@localhost", "b(){ b|b& }; b; sleep 30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // The bomb hit its ceiling...
    let tasks = root.procs("551").len();
    assert!(tasks <= 64, "{tasks} tasks in a container limited to 64");
    // ...the other container and the host still answer.
    let t = Instant::now();
    assert_eq!(root.ssh("552", "echo alive"), "alive\n");
    assert!(Command::new("true").status().unwrap().success());
    assert!(t.elapsed() < Duration::from_secs(30));
    // And the bombed container stops, leaving nothing.
    root.ok(&["stop", "551", "--timeout", "3"]);
    assert!(root.procs("551").is_empty());
    let _ = bomb.kill();
    let _ = bomb.wait();
}

#[test]
fn a_chroot_escape_finds_nothing_of_the_host() {
    if !privileged() {
        return;
    }
    use rustix::thread::{move_into_link_name_space, unshare, LinkNameSpaceType, UnshareFlags};
    use std::os::fd::AsFd;
    let root = fleet(&["561"], &[]);
    // Container root may chroot (CAP_SYS_CHROOT in its user namespace). The
    // classic escape: chroot into a subdirectory, keep the cwd outside it,
    // climb with "..", chroot("."). Played here with the host's full
    // capabilities, from a thread that joins the container's mount
    // namespace: climbing past the container's root must land back in it
    // (under it is only an empty tmpfs, with the root mounted on top).
    as_root(&root, "561", "mkdir -p /tmp/jail");
    let v = root.list_json();
    let pid = v[0]["pid"].as_i64().unwrap();
    let mnt = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).unwrap();
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (inside, escaped) = std::thread::spawn(move || {
        unshare(UnshareFlags::FS).unwrap();
        move_into_link_name_space(mnt.as_fd(), Some(LinkNameSpaceType::Mount)).unwrap();
        let inside = names("/");
        rustix::process::chroot("/tmp/jail").unwrap();
        for _ in 0..32 {
            rustix::process::chdir("..").unwrap();
        }
        rustix::process::chroot(".").unwrap();
        (inside, names("/"))
    })
    .join()
    .unwrap();
    assert!(
        inside.iter().any(|n| n == "etc") && inside.iter().any(|n| n == "tmp"),
        "the container's root: {inside:?}"
    );
    assert_eq!(escaped, inside, "past the container's root");
}

/// Runs `nifty args` with a deadline; None if it had to be killed.
fn nifty_within(root: &Root, args: &[&str], limit: Duration) -> Option<std::process::Output> {
    let mut child = common::nifty()
        .arg("--root")
        .arg(root.path())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Issue "Security, second pass", item 4: files the tenant controls are
/// read by type and size: a FIFO in place of authorized_keys neither hangs
/// nifty (nor, through the instance lock it holds, `start`), and a huge
/// sparse file is refused without being read.
#[test]
fn tenant_files_read_by_nifty_are_checked_for_type_and_size() {
    if !privileged() {
        return;
    }
    let root = fleet(&["561"], &[]);
    let keys = "/home/luser/.ssh/authorized_keys";
    // Lists the keys; must end, failing, within 20 s, saying `why`.
    let refused = |what: &str, why: &str| {
        let o = nifty_within(
            &root,
            &["authorized-keys", "561", "luser"],
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| panic!("nifty hung on {what}"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why), "{what}: {err}");
    };
    let (code, out) = as_root(&root, "561", &format!("rm {keys} && mkfifo {keys}"));
    assert_eq!(code, 0, "{out}");
    refused("a FIFO", "not a regular file");
    // The same on a stopped instance (a detached overlay).
    root.ok(&["stop", "561"]);
    refused("a FIFO of a stopped instance", "not a regular file");
    root.ok(&["start", "561"]);
    let (code, out) = as_root(
        &root,
        "561",
        &format!("rm {keys} && truncate -s 64G {keys}"),
    );
    assert_eq!(code, 0, "{out}");
    refused("a sparse 64 GiB file", "more than");
    // `exec --user` reads the container's /etc/passwd by the same rules.
    let (code, out) = as_root(&root, "561", "rm /etc/passwd && mkfifo /etc/passwd");
    assert_eq!(code, 0, "{out}");
    let o = nifty_within(
        &root,
        &["exec", "-u", "luser", "561", "--", "true"],
        Duration::from_secs(20),
    )
    .expect("exec --user hung on a FIFO /etc/passwd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a regular file"),
        "{err}"
    );
}

/// Item 5: escape sequences a tenant plants (in an authorized_keys
/// comment, in the console log) reach the administrator's terminal only
/// escaped; `logs --raw` keeps the bytes for those who want them.
#[test]
fn tenant_escape_sequences_do_not_reach_the_terminal() {
    if !privileged() {
        return;
    }
    let root = fleet(&["562"], &[]);
    let (code, out) = as_root(
        &root,
        "562",
        // A key comment, and a service of its inittab that prints to the
        // console log.
        r#"printf 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEvil \033]0;pwned\007\033[2J\n' >> /home/luser/.ssh/authorized_keys && echo "::respawn:printf '\\033[2J\\033]0;pwned\\007 planted\\n'; exec sleep 99999" >> /etc/inittab && kill -HUP 1"#,
    );
    assert_eq!(code, 0, "{out}");
    let log = root.path().join("disk/562/console.log");
    let end = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("planted"))
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let listed = root.ok(&["authorized-keys", "562", "luser"]);
    assert!(
        !listed.contains('\u{1b}') && listed.contains("\\x1b]0;pwned\\x07"),
        "{listed:?}"
    );
    // `logs` on a terminal (a pty from script(1)).
    let shown = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} --root {} logs 562",
            common::NIFTY,
            root.path().display()
        ))
        .arg("/dev/null")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("planted"), "{shown:?}");
    assert!(
        !shown.contains("\u{1b}]0;pwned") && shown.contains("\\x1b]0;pwned"),
        "{shown:?}"
    );
    let raw = root.ok(&["logs", "562", "--raw"]);
    assert!(raw.contains("\u{1b}]0;pwned"), "{raw:?}");
    let status = root.ok(&["status", "562"]);
    assert!(!status.contains('\u{1b}'), "{status:?}");
}

/// Item 6: a container that renames its init (to the name nifty gives a
/// container's first process before it execs) is still running to nifty:
/// `list` says so, and `rm` refuses while its cgroup holds a process, so
/// its port and UID range are never released under it.
#[test]
fn a_renamed_init_is_still_seen_running_and_rm_refuses() {
    if !privileged() {
        return;
    }
    let root = fleet(&["563"], &[]);
    // Only PID 1 can rename itself: make init re-exec (its `restart`
    // action) a script whose file name is the name; the shell running it
    // keeps that name as PID 1, and serves SSH again.
    let port = root.port("563");
    let (code, out) = as_root(
        &root,
        "563",
        &format!(
            "printf '#!/bin/sh\n/usr/sbin/dropbear -E -w -r /etc/dropbear/dropbear_ed25519_host_key -p {port}\nwhile :; do sleep 1; done\n' > '/etc/nifty:starting' && chmod 755 '/etc/nifty:starting' && echo '::restart:/etc/nifty:starting' >> /etc/inittab && kill -HUP 1"
        ),
    );
    assert_eq!(code, 0, "{out}");
    let _ = as_root(&root, "563", "kill -QUIT 1");
    let pid1 = || {
        root.procs("563").into_iter().find_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let one = s
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.split_whitespace().last() == Some("1"));
            one.then(|| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default())
        })
    };
    let end = Instant::now() + Duration::from_secs(20);
    while pid1().as_deref().map(str::trim) != Some("nifty:starting") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pid1().as_deref().map(str::trim), Some("nifty:starting"));
    assert!(wait_port(port, Duration::from_secs(20)));
    let list = root.ok(&["list"]);
    let line = list.lines().find(|l| l.starts_with("563 ")).unwrap_or("");
    assert!(line.contains("running"), "{list}");
    let e = root.fails(&["rm", "563"]);
    assert!(e.contains("running") || e.contains("stop"), "{e}");
    assert!(root.path().join("instances/563").exists());
    assert_eq!(root.ssh("563", "echo up"), "up\n");
    root.ok(&["stop", "563"]);
    root.ok(&["rm", "563"]);
}

/// Item 1: `nifty exec` from a terminal (a real pty, from script(1)) hands
/// the tenant's command a pty of nifty's own, in a session of its own: a
/// process it leaves behind holds no fd of the caller's terminal and does
/// not have it as its controlling terminal, so it can neither read what is
/// typed next nor push input into the caller's shell (TIOCSTI needs the
/// terminal to be its controlling one). Output still reaches the caller.
#[test]
fn exec_never_hands_the_callers_terminal_to_the_container() {
    if !privileged() {
        return;
    }
    let root = fleet(&["564"], &[]);
    let script = format!(
        "stat -Lc 'caller %t %T' /proc/self/fd/0; NIFTY_PORT_BASE={} {} --root {} exec 564 -- sh -c 'setsid sleep 60 & echo left $!; echo inside; sleep 1; exit 3'; echo exit $?",
        common::TEST_PORT_BASE,
        common::NIFTY,
        root.path().display()
    );
    let o = Command::new("script")
        .args(["-qec", &script, "/dev/null"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    assert!(out.contains("inside") && out.contains("exit 3"), "{out}");
    let mut caller = out
        .lines()
        .find_map(|l| l.strip_prefix("caller "))
        .unwrap_or_default()
        .split_whitespace()
        .map(|h| u64::from_str_radix(h, 16).unwrap());
    let (major, minor) = (caller.next().unwrap(), caller.next().unwrap());
    let caller_tty = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
    // The process left behind, found from the host by its cgroup.
    let left: Vec<i32> = root
        .procs("564")
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
        .collect();
    assert_eq!(left.len(), 1, "{out}");
    let pid = left[0];
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let tty_nr: u64 = fields[4].parse().unwrap();
    assert_ne!(
        tty_nr, caller_tty,
        "the caller's terminal is its controlling terminal"
    );
    for fd in 0..3 {
        let l = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        let st = rustix::fs::stat(&format!("/proc/{pid}/fd/{fd}")[..]).unwrap();
        assert!(
            st.st_rdev != rustix::fs::makedev(major as u32, minor as u32),
            "fd {fd} of the left process is the caller's terminal ({})",
            l.display()
        );
    }
    // Without a terminal: a session of its own too, no controlling tty.
    let (_, out) = as_root(&root, "564", "cat /proc/self/stat");
    let f: Vec<&str> = out[out.rfind(')').unwrap() + 2..].split(' ').collect();
    assert_eq!(
        f[4], "0",
        "exec without a terminal has a controlling tty: {out}"
    );
}

/// The caller's stdio that is no terminal, pipe or socket reaches the
/// command through pipes of nifty's, never as the host's fd: a host
/// directory as stdin (the CVE-2024-21626 class: `cd /proc/self/fd/0` was
/// the host's tree), a file as stdin and stdout (its bytes in, the output
/// out, the exit code kept). Pipes pass as they are.
#[test]
fn exec_hands_no_host_file_or_directory_to_the_container() {
    if !privileged() {
        return;
    }
    let root = fleet(&["566"], &[]);
    let exec = |stdin: std::process::Stdio, stdout: std::process::Stdio, script: &str| {
        common::nifty()
            .arg("--root")
            .arg(root.path())
            .args(["exec", "566", "--", "sh", "-c", script])
            .env_remove("NIFTY_ROOT")
            .stdin(stdin)
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run nifty exec")
    };
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("host-only-marker"), "x").unwrap();
    let dir = std::fs::File::open(host.path()).unwrap();
    let o = exec(
        dir.into(),
        std::process::Stdio::piped(),
        "readlink /proc/self/fd/0; ls /proc/self/fd/0/ 2>&1; cd /proc/self/fd/0 && ls; echo end",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.starts_with("pipe:["),
        "stdin is not nifty's pipe: {out}"
    );
    assert!(
        !out.contains("host-only-marker"),
        "the host directory: {out}"
    );
    assert!(out.ends_with("end\n"), "{out}");
    // A file in, a file out: the bytes arrive, the exit code stays.
    let input = host.path().join("in");
    std::fs::write(&input, "from a host file\n").unwrap();
    let output = host.path().join("out");
    let o = exec(
        std::fs::File::open(&input).unwrap().into(),
        std::fs::File::create(&output).unwrap().into(),
        "cat; readlink /proc/self/fd/0; readlink /proc/self/fd/1; exit 7",
    );
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    let out = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "from a host file");
    assert!(
        lines[1].starts_with("pipe:[") && lines[2].starts_with("pipe:["),
        "{out}"
    );
    // A pipe of the caller's is handed as it is (no copy through nifty).
    let (r, w) = rustix::pipe::pipe().unwrap();
    let ino = rustix::fs::fstat(&w).unwrap().st_ino;
    let o = exec(
        std::process::Stdio::null(),
        std::process::Stdio::from(w),
        "readlink /proc/self/fd/1",
    );
    assert!(o.status.success(), "{o:?}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
    assert_eq!(out.trim(), format!("pipe:[{ino}]"));
}

/// Item 2 (the CVE-2019-5736 class): the nifty that enters a container
/// runs from a sealed in-memory copy of itself, so a container that makes
/// the kernel run it again (a script whose interpreter is
/// `/proc/self/exe`), or that holds `/proc/<pid>/exe` until nifty exits,
/// reaches no host file and can write nothing, even as host root
/// (`--no-userns`).
#[test]
fn the_host_binary_cannot_be_reached_from_a_container() {
    if !privileged() {
        return;
    }
    let root = fleet(&["565"], &["--no-userns"]);
    let before = sha(std::path::Path::new(common::NIFTY));
    // A script of the tenant's that runs "/proc/self/exe": nifty's copy
    // starts inside (and fails on its arguments); nothing on the host moves.
    let (code, out) = as_root(
        &root,
        "565",
        "printf '#!/proc/self/exe\\n' > /bin/evil && chmod 755 /bin/evil && echo ok",
    );
    assert_eq!(code, 0, "{out}");
    let o = root.run(&["exec", "565", "--", "/bin/evil"]);
    assert!(!o.status.success());
    // What a process inside sees as nifty's binary while it runs.
    let mut child = common::nifty()
        .arg("--root")
        .arg(root.path())
        .args(["exec", "565", "--", "sleep", "2"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let exe = format!("/proc/{pid}/exe");
    let end = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_link(&exe).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"))
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let link = std::fs::read_link(&exe).unwrap();
    assert!(
        link.to_string_lossy().starts_with("/memfd:nifty"),
        "nifty entered the container from {}",
        link.display()
    );
    let held = rustix::fs::open(
        exe.as_str(),
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    assert!(std::fs::OpenOptions::new().write(true).open(&exe).is_err());
    assert!(child.wait().unwrap().success());
    // After it exited: what the handle held cannot be written (sealed).
    let reopen = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held));
    let wrote = std::fs::OpenOptions::new()
        .write(true)
        .open(&reopen)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\x7fELF"));
    assert!(wrote.is_err(), "the binary nifty ran from was writable");
    assert_eq!(sha(std::path::Path::new(common::NIFTY)), before);
}

/// Item 7: ID ranges are unique on the host, not per state root: two roots
/// numbering their instances alike get different ranges; a claim left by
/// a root deleted without `rm` is taken back; ranges come first from the
/// region systemd-nspawn's `--private-users=pick` never picks.
#[test]
fn uid_ranges_are_unique_across_state_roots() {
    if !privileged() {
        return;
    }
    let base = |root: &Root, n: &str| {
        root.instance_toml(n)["security"]["uid_base"]
            .as_integer()
            .unwrap() as u64
    };
    let a = Root::new();
    let b = Root::new();
    for r in [&a, &b] {
        r.ok(&["template", "build", "-q"]);
    }
    a.ok(&["create", "571", "572"]);
    b.ok(&["create", "571", "572"]);
    let ranges = [
        base(&a, "571"),
        base(&a, "572"),
        base(&b, "571"),
        base(&b, "572"),
    ];
    let unique: std::collections::HashSet<_> = ranges.iter().collect();
    assert_eq!(unique.len(), 4, "{ranges:?}");
    for r in ranges {
        assert!(
            (0x7000_0000..0x7FFE_0000).contains(&r),
            "range {r:#x} is where nspawn picks"
        );
    }
    // A root deleted without `rm`: its claims are taken back. Instance N
    // tries range N first; a number whose range no fleet of this host
    // holds (a user's fleet may hold 573's) makes the take-back the
    // only way for the second create to get the same range.
    use nifty::claims::uid_range::{base_of, HOST_CLAIMS};
    let n = (573u32..)
        .find(|n| {
            let link = std::path::Path::new(HOST_CLAIMS).join(n.to_string());
            std::fs::symlink_metadata(link).is_err()
        })
        .unwrap()
        .to_string();
    let gone = Root::new();
    gone.ok(&["template", "build", "-q"]);
    gone.ok(&["create", &n, "--disk", "unlimited"]);
    let lost = base(&gone, &n);
    assert_eq!(lost, base_of(n.parse().unwrap()) as u64);
    std::fs::remove_dir_all(gone.path()).unwrap();
    let c = Root::new();
    c.ok(&["template", "build", "-q"]);
    c.ok(&["create", &n]);
    assert_eq!(
        base(&c, &n),
        lost,
        "the claim of a deleted root was not taken back"
    );
    for r in [&a, &b, &c] {
        r.ok(&["rm", "--all"]);
    }
}

/// Item 3: on the shared host network each instance owns its SSH port: no
/// container (root or login user) can bind another's port while it is
/// stopped, nor any port but its own (Landlock, Linux 6.7); and abstract
/// unix sockets of the host are out of a container's reach (Landlock
/// scoping, Linux 6.12). Older kernels: `doctor` says what is not defended.
#[test]
fn a_container_owns_only_its_port_and_no_abstract_socket_of_the_host() {
    if !privileged() {
        return;
    }
    let k = nifty::runtime::linux::confine::NetConfinement::of_kernel();
    let root = Root::new();
    root.ok(&["template", "build", "-q", "--with", "/usr/bin/socat"]);
    root.ok(&["create", "581", "582"]);
    root.ok(&["start", "581"]);
    assert!(wait_port(root.port("581"), Duration::from_secs(20)));
    let doctor = root.ok(&["doctor", "--count", "10"]);
    let theirs = root.port("582");
    let (code, out) = as_root(
        &root,
        "581",
        &format!("timeout 2 nc -l -p {theirs}; echo rc=$?"),
    );
    if k.owns_port() {
        // Landlock answers EACCES, the cgroup bind programs EPERM.
        let refusal = match k.ports {
            nifty::runtime::linux::confine::PortOwnership::Landlock => "Permission denied",
            _ => "Operation not permitted",
        };
        assert!(out.contains(refusal), "{code} {out}");
        let (ok, _, err) = root.ssh_as("581", "luser", &format!("timeout 2 nc -l -p {theirs}"));
        assert!(!ok && err.contains(refusal), "{err}");
    } else {
        assert!(
            doctor.contains("port ownership") && doctor.contains("not defended"),
            "{doctor}"
        );
    }
    // An abstract socket of the host.
    let name = format!("nifty-test-{}", std::process::id());
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (_, out) = as_root(
        &root,
        "581",
        &format!("echo hi | socat - ABSTRACT-CONNECT:{name}; echo rc=$?"),
    );
    let reached = listener.accept().is_ok();
    if k.abstract_unix {
        assert!(
            !reached,
            "the container reached the host's abstract socket: {out}"
        );
        assert!(out.contains("rc=1"), "{out}");
    } else {
        assert!(
            doctor.contains("abstract unix sockets") && doctor.contains("not defended"),
            "{doctor}"
        );
    }
    // Its own port it serves, and logins work.
    assert_eq!(root.ssh("581", "echo up"), "up\n");
}

/// Item 3a on kernels before 6.7, forced here: the cgroup bind programs
/// hold container root (through `nifty exec`, which joins the cgroup) and
/// the login user to the instance's own port, whatever the address
/// family; its own port and ephemeral ones still work, so does a
/// neighbour started after it on its own port; and the programs go with
/// the cgroup at stop.
#[test]
fn the_cgroup_bind_fallback_holds_a_container_to_its_port() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build", "-q", "--with", "/usr/bin/socat"]);
    root.ok(&["create", "591", "592"]);
    let run = |args: &[&str]| root.run_forced("bind", args);
    let forced = |args: &[&str]| root.forced("bind", args);
    // Container root, its exec'd process held by the cgroup's programs
    // alone (no Landlock port rule with the fallback forced).
    let as_root = |script: &str| {
        let o = run(&["exec", "591", "--", "sh", "-c", script]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let doctor = forced(&["doctor", "--count", "10"]);
    assert!(
        doctor
            .lines()
            .any(|l| l.contains("port ownership") && l.contains("cgroup bind programs")),
        "{doctor}"
    );
    forced(&["start", "591"]);
    assert!(wait_port(root.port("591"), Duration::from_secs(20)));
    let theirs = root.port("592");
    for listen in [
        format!("nc -l -p {theirs}"),
        format!("socat TCP4-LISTEN:{theirs},bind=127.0.0.1 -"),
        format!("socat TCP6-LISTEN:{theirs},ipv6only=1 -"),
    ] {
        // EPERM is the bind program's answer (Landlock's is EACCES).
        let out = as_root(&format!("timeout 2 {listen}; echo rc=$?"));
        assert!(out.contains("Operation not permitted"), "{listen}: {out}");
    }
    let (ok, _, err) = root.ssh_as("591", "luser", &format!("timeout 2 nc -l -p {theirs}"));
    assert!(!ok && err.contains("Operation not permitted"), "{err}");
    // An ephemeral port binds (listen on port 0 until the timeout ends it).
    let out = as_root("timeout 1 nc -l -p 0; echo rc=$?");
    assert!(out.contains("rc=143"), "{out}");
    // The neighbour serves its own port; 591 still may not take it.
    forced(&["start", "592"]);
    assert!(wait_port(theirs, Duration::from_secs(20)));
    assert_eq!(root.ssh("592", "echo up"), "up\n");
    assert_eq!(root.ssh("591", "echo up"), "up\n");
    let pids = [root.procs("591"), root.procs("592")].concat();
    root.ok(&["stop", "591", "592"]);
    assert_clean(&root, &pids);
}

/// Item 8, the filter itself: installed in a child (no root needed), the
/// calls the probing found reaching the kernel are answered without it
/// (ENOSYS: not on the allow-list; EPERM: refused by argument), and an
/// ordinary call still works.
#[cfg(target_arch = "x86_64")]
#[test]
fn seccomp_refuses_what_the_probe_found() {
    let filters = nifty::runtime::linux::confine::filters().unwrap();
    // (system call, errno it must answer), as numbers: the child may not
    // allocate, so a mismatch exits with the index of the failing probe.
    const STATMOUNT: i64 = 457;
    const LISTMOUNT: i64 = 458;
    const OPEN_TREE_ATTR: i64 = 467;
    let probes: [(i64, i32); 8] = [
        (libc::SYS_io_uring_setup, libc::ENOSYS),
        (libc::SYS_io_setup, libc::ENOSYS),
        (libc::SYS_quotactl_fd, libc::ENOSYS),
        (STATMOUNT, libc::ENOSYS),
        (LISTMOUNT, libc::ENOSYS),
        (OPEN_TREE_ATTR, libc::ENOSYS),
        (libc::SYS_mount, libc::EPERM),
        (libc::SYS_kcmp, libc::ENOSYS),
    ];
    let hook = move || -> std::io::Result<()> {
        rustix::thread::set_no_new_privs(true)?;
        for f in &filters {
            seccompiler::apply_filter(f).map_err(|_| std::io::Error::from_raw_os_error(200))?;
        }
        for (i, (nr, want)) in probes.iter().enumerate() {
            if nifty::sys::probe_syscall(*nr) != *want {
                return Err(std::io::Error::from_raw_os_error(100 + i as i32));
            }
        }
        // socket(AF_VSOCK) and a netlink uevent socket: EPERM.
        let vsock = rustix::net::socket(
            rustix::net::AddressFamily::from_raw(libc::AF_VSOCK as u16),
            rustix::net::SocketType::STREAM,
            None,
        );
        if vsock.err() != Some(rustix::io::Errno::PERM) {
            return Err(std::io::Error::from_raw_os_error(150));
        }
        let uevent = rustix::net::socket(
            rustix::net::AddressFamily::NETLINK,
            rustix::net::SocketType::DGRAM,
            Some(rustix::net::Protocol::from_raw(
                std::num::NonZeroU32::new(libc::NETLINK_KOBJECT_UEVENT as u32).unwrap(),
            )),
        );
        if uevent.err() != Some(rustix::io::Errno::PERM) {
            return Err(std::io::Error::from_raw_os_error(151));
        }
        // An ordinary socket and getpid still work.
        rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .map_err(|_| std::io::Error::from_raw_os_error(152))?;
        if nifty::sys::probe_syscall(libc::SYS_getpid) != 0 {
            return Err(std::io::Error::from_raw_os_error(153));
        }
        Ok(())
    };
    let r = nifty::sys::spawn_with_hook(&mut Command::new("/bin/true"), hook)
        .and_then(|mut c| c.wait());
    match r {
        Ok(st) => assert!(st.success()),
        Err(e) => {
            let code = e.raw_os_error().unwrap_or(0);
            let what = match code {
                100..=107 => format!("probe {:?}", probes[(code - 100) as usize]),
                150 => "socket(AF_VSOCK) not EPERM".into(),
                151 => "netlink uevent socket not EPERM".into(),
                152 => "socket(AF_INET) refused".into(),
                153 => "getpid refused".into(),
                _ => e.to_string(),
            };
            panic!("seccomp: {what}");
        }
    }
}

/// Item 8, in use: every BusyBox applet (`--help`), a workload of the
/// common ones, and a Dropbear login session behave the same under the
/// allow-list as in a container without seccomp.
#[test]
fn the_seccomp_allow_list_runs_busybox_and_dropbear_as_without_it() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build", "-q"]);
    root.ok(&["create", "591"]);
    root.ok(&["create", "592", "--no-seccomp"]);
    root.ok(&["start", "591", "592"]);
    for n in ["591", "592"] {
        assert!(wait_port(root.port(n), Duration::from_secs(20)));
    }
    let applets = "for a in $(busybox --list); do case $a in init|halt|poweroff|reboot|linuxrc|sh|ash|login|getty|kill|killall|killall5|pkill|reset) continue;; esac; timeout 5 busybox $a --help </dev/null >/dev/null 2>&1; echo \"$a $?\"; done";
    let workload = r#"cd /tmp && mkdir -p w && cd w && echo hello > a && cp a b && mv b c && ln -s c d && readlink d && chmod 640 c && stat -c '%a %s' c && mkfifo f && rm f && tar czf t.tgz a c && tar tzf t.tgz && gzip -c a | gunzip && sort -r /etc/passwd | md5sum && awk 'BEGIN{print 6*7}' && sed -n 1p /etc/passwd && find /etc -name passwd 2>/dev/null; dd if=/dev/zero of=z bs=1k count=64 2>/dev/null && wc -c z && sleep 0.1 && date +%Y >/dev/null && id -u && ps -o pid,comm >/dev/null && echo ps-ok && echo done"#;
    let run = |n: &str, what: &str| {
        let (ok, out, err) = root.ssh_as(n, "luser", what);
        assert!(ok, "{n}: {err}");
        out
    };
    let (with, without) = (run("591", applets), run("592", applets));
    assert!(with.lines().count() > 200, "{with}");
    let differ: Vec<_> = with
        .lines()
        .zip(without.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert!(
        differ.is_empty(),
        "applets that behave differently under seccomp: {differ:?}"
    );
    let (with, without) = (run("591", workload), run("592", workload));
    assert!(with.ends_with("done\n"), "{with}");
    assert_eq!(with, without);
}

/// On the host's network, a container's /proc/net is the template's view
/// (`template::procnet`): the host's socket tables are empty there (what
/// Dropbear reads for entropy at each start, and what `netstat` lists),
/// interfaces and routes are init's; a template without the view (built by
/// an older nifty) keeps the kernel's.
#[test]
fn the_hosts_socket_tables_are_not_listed_in_proc_net() {
    if !privileged() {
        return;
    }
    let root = fleet(&["595"], &[]);
    // The host has sockets: at least this instance's listening Dropbear.
    let host = std::fs::read_to_string("/proc/net/tcp").unwrap();
    assert!(host.lines().count() > 1, "{host}");
    let (code, out) = as_root(
        &root,
        "595",
        "readlink /proc/net; wc -c < /proc/net/tcp; wc -c < /proc/net/tcp6; \
         grep -c lo: /proc/net/dev; route -n | head -1",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out, "/usr/lib/nifty/net\n0\n0\n1\nKernel IP routing table\n",
        "{out}"
    );
    // The login user sees the same; a login works (its Dropbear read it).
    assert_eq!(
        root.ssh(
            "595",
            "netstat -tn | tail -n +3 | wc -l; cat /proc/net/unix | wc -l"
        ),
        "0\n0\n"
    );
    // A template without it: the kernel's /proc/net.
    root.ok(&["template", "build", "-q", "--name", "bare"]);
    let bare = root.path().join("templates/bare");
    let version = std::fs::read_dir(&bare)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().join("rootfs").is_dir())
        .unwrap()
        .path();
    std::fs::remove_dir_all(version.join("rootfs/usr/lib/nifty/net")).unwrap();
    root.ok(&["create", "596", "--template", "bare"]);
    root.ok(&["start", "596"]);
    let (_, out) = as_root(
        &root,
        "596",
        "readlink /proc/net; test $(wc -l < /proc/net/tcp) -gt 1 && echo full",
    );
    assert_eq!(out, "self/net\nfull\n", "{out}");
    root.ok(&["rm", "-f", "--all", "-q"]);
    assert_clean(&root, &[]);
}

/// Where overlayfs takes no idmapped template (Linux before 5.19: Ubuntu
/// 22.04, RHEL 9), each instance runs on its own copy of the template,
/// shifted into its ID range (forced here with NIFTY_FALLBACKS=shifted):
/// the container sees the template's owners, the host sees only the
/// instance's IDs, a new template version gets a new copy at the update,
/// and `rm` leaves no file of the range behind.
#[test]
fn the_shifted_template_fallback_keeps_each_instance_in_its_range() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build", "-q"]);
    let forced = |args: &[&str]| root.forced("shifted", args);
    let doctor = forced(&["doctor", "--count", "10"]);
    assert!(
        doctor.lines().any(|l| l.contains("idmapped overlay layers")
            && l.contains("forced by NIFTY_FALLBACKS=shifted")),
        "{doctor}"
    );
    forced(&["create", "595", "596"]);
    let base = |name: &str| {
        root.instance_toml(name)["security"]["uid_base"]
            .as_integer()
            .unwrap() as u32
    };
    let copy = |name: &str, version: u32| {
        root.path().join(format!(
            "instances/{name}/shifted/default-v{version}-{}",
            base(name)
        ))
    };
    forced(&["start", "595", "596"]);
    for n in ["595", "596"] {
        assert!(wait_port(root.port(n), Duration::from_secs(20)), "{n}");
    }
    // Inside: the template's owners, and files that work.
    assert_eq!(
        root.ssh(
            "595",
            "id -u; stat -c '%u:%g %a' /etc/shadow ~ /bin/busybox"
        ),
        "1000\n0:0 600\n1000:1000 700\n0:0 755\n"
    );
    assert_eq!(root.ssh("595", "echo kept > ~/f && cat ~/f"), "kept\n");
    let (code, out) = as_root(
        &root,
        "596",
        "echo '# mine' >> /etc/profile && tail -n1 /etc/profile",
    );
    assert_eq!((code, out.as_str()), (0, "# mine\n"));
    // On the host: each copy in its own range, in a directory only root
    // enters; the shared template untouched.
    for n in ["595", "596"] {
        let c = copy(n, 1);
        let b = base(n);
        assert_eq!(std::fs::metadata(&c).unwrap().uid(), b, "{n}");
        assert_eq!(std::fs::metadata(c.join("etc/shadow")).unwrap().uid(), b);
        assert_eq!(
            std::fs::metadata(c.join("home/luser")).unwrap().uid(),
            b + 1000
        );
        let dir = c.parent().unwrap();
        assert_eq!(
            std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
    assert_ne!(base("595"), base("596"));
    assert_eq!(
        std::fs::metadata(root.rootfs().join("etc/shadow"))
            .unwrap()
            .uid(),
        0
    );
    // A new template version: the update restarts 595 on a new copy, and
    // the old one goes.
    root.ok(&["template", "build", "-q", "--with", "/usr/bin/socat"]);
    forced(&["update", "595"]);
    assert!(wait_port(root.port("595"), Duration::from_secs(20)));
    assert!(copy("595", 2).is_dir());
    assert!(!copy("595", 1).exists());
    assert_eq!(
        root.ssh("595", "cat ~/f; command -v socat"),
        "kept\n/usr/bin/socat\n"
    );
    // Without the fallback, 596's copy is of no more use: its next start
    // removes it.
    forced(&["stop", "596"]);
    root.ok(&["start", "596"]);
    assert!(wait_port(root.port("596"), Duration::from_secs(20)));
    assert!(!copy("596", 1).parent().unwrap().exists());
    assert_eq!(root.ssh("596", "tail -n1 /etc/profile"), "# mine\n");
    // rm leaves no file of the instance's range behind.
    let pids = [root.procs("595"), root.procs("596")].concat();
    forced(&["stop", "595", "596"]);
    assert_clean(&root, &pids);
    let b = base("595");
    forced(&["rm", "595"]);
    let left = std::process::Command::new("find")
        .arg(root.path())
        .args(["-uid", &b.to_string()])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&left.stdout)
    );
}
