//! Privileged: files in and out (OpenSSH's scp and sftp against the
//! template's sftp-server, `nifty cp`), and nifty in every SSH tool
//! (`ssh-config` with strict host key checking, an Ansible inventory).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::{fleet, privileged, succeeded, wait_port, Root};

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A file of `len` random bytes.
fn random_file(path: &Path, len: usize) {
    use rand::RngCore;
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    std::fs::write(path, v).unwrap();
}

/// nifty's client config for this root, written where `ssh -F` reads it.
fn ssh_config(root: &Root) -> PathBuf {
    let p = root.path().join("test_ssh_config");
    std::fs::write(&p, root.ok(&["ssh-config"])).unwrap();
    p
}

/// An OpenSSH tool run with nifty's client config (batch mode).
fn tool(cmd: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(cmd)
        .arg("-F")
        .arg(config)
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd} (openssh-client): {e}"))
}

#[test]
fn scp_and_sftp_move_files_both_ways() {
    if !privileged() {
        return;
    }
    let root = fleet(&["3"], &[]);
    let show = root.ok(&["template", "show", "default"]);
    assert!(
        show.contains("[sftp_server]") && show.contains("[scp]"),
        "{show}"
    );
    let rootfs = root.rootfs();
    assert!(rootfs.join("usr/lib/openssh/sftp-server").is_file());
    assert_eq!(
        std::fs::read_link(rootfs.join("usr/lib/sftp-server")).unwrap(),
        Path::new("openssh/sftp-server")
    );
    let conf = ssh_config(&root);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("five");
    random_file(&src, 5 << 20);
    let want = sha256(&src);
    let s = src.to_str().unwrap();

    // OpenSSH's scp speaks SFTP by default; -O is the legacy protocol.
    let back = dir.path().join("back-sftp");
    succeeded(&tool("scp", &conf, &["-q", s, "nifty-3:five"]), "scp in");
    succeeded(
        &tool(
            "scp",
            &conf,
            &["-q", "nifty-3:five", back.to_str().unwrap()],
        ),
        "scp out",
    );
    assert_eq!(sha256(&back), want, "scp (SFTP) round trip");
    let back = dir.path().join("back-legacy");
    succeeded(
        &tool("scp", &conf, &["-q", "-O", s, "nifty-3:legacy"]),
        "scp -O in",
    );
    succeeded(
        &tool(
            "scp",
            &conf,
            &["-q", "-O", "nifty-3:legacy", back.to_str().unwrap()],
        ),
        "scp -O out",
    );
    assert_eq!(sha256(&back), want, "scp -O round trip");

    let batch = dir.path().join("batch");
    let got = dir.path().join("back-batch");
    std::fs::write(
        &batch,
        format!("put {s} batch\nls -l\nget batch {}\n", got.display()),
    )
    .unwrap();
    let o = succeeded(
        &tool("sftp", &conf, &["-b", batch.to_str().unwrap(), "nifty-3"]),
        "sftp -b",
    );
    assert!(
        o.contains("batch") && o.contains("legacy") && o.contains("5242880"),
        "ls: {o}"
    );
    assert_eq!(sha256(&got), want, "sftp round trip");
    // In the container, the files are the login user's and whole.
    let inside = root.ssh("3", "sha256sum five legacy batch; stat -c %U five");
    assert_eq!(inside.matches(&want).count(), 3, "{inside}");
    assert!(inside.trim_end().ends_with("luser"), "{inside}");
}

#[test]
fn a_template_without_sftp_has_no_file_transfer() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build", "--without-sftp"]);
    let show = root.ok(&["template", "show", "default"]);
    assert!(!show.contains("sftp_server"), "{show}");
    assert!(!root.rootfs().join("usr/lib/openssh/sftp-server").exists());
    assert!(!root.rootfs().join("usr/bin/scp").exists());
    // A missing sftp-server is named, with the package and the way out.
    let e = root.fails(&[
        "template",
        "build",
        "--sftp-server",
        "/nonexistent/sftp-server",
    ]);
    assert!(
        e.contains("openssh-sftp-server") && e.contains("--without-sftp"),
        "{e}"
    );
}

/// Runs a shell command as a user of the container; asserts success.
fn exec(root: &Root, name: &str, user: &str, script: &str) -> String {
    root.ok(&["exec", name, "-u", user, "--", "sh", "-c", script])
}

#[test]
fn cp_copies_both_ways_and_refuses_what_the_tenant_planted() {
    if !privileged() {
        return;
    }
    let root = fleet(&["7"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f");
    random_file(&src, 5 << 20);
    let want = sha256(&src);
    let s = src.to_str().unwrap();
    let d = dir.path().to_str().unwrap();

    // Into a running instance: owned by the user whose directory it lands in.
    root.ok(&["cp", s, "7:/home/luser/f"]);
    let inside = exec(
        &root,
        "7",
        "root",
        "sha256sum /home/luser/f; stat -c %u:%g:%a /home/luser/f",
    );
    assert!(inside.contains(&want), "{inside}");
    assert!(inside.contains("1000:1000:"), "owner: {inside}");
    // ... which on the host is an ID of the instance's range.
    let base = root.instance_toml("7")["security"]["uid_base"]
        .as_integer()
        .unwrap() as u32;
    let upper = root.upper("7").join("home/luser/f");
    let st = std::fs::metadata(&upper).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((st.uid(), st.gid()), (base + 1000, base + 1000));
    // --owner, and a relative path is the login user's home.
    root.ok(&["cp", s, "7:/tmp/rootfile", "--owner", "root"]);
    assert_eq!(
        exec(&root, "7", "root", "stat -c %u /tmp/rootfile").trim(),
        "0"
    );
    root.ok(&["cp", s, "7:rel"]);
    assert!(exec(&root, "7", "root", "ls /home/luser").contains("rel"));

    // Out of it, a file and a tree.
    root.ok(&["cp", "7:/home/luser/f", &format!("{d}/out")]);
    assert_eq!(sha256(&dir.path().join("out")), want);
    root.ok(&["cp", "7:/etc/os-release", d]);
    assert!(std::fs::read_to_string(dir.path().join("os-release"))
        .unwrap()
        .contains("nifty"));
    exec(&root, "7", "luser", "mkdir -p t/sub && echo a > t/a && echo b > t/sub/b && ln -s /etc/shadow t/link && mkfifo t/fifo");
    let o = root.run(&["cp", "-r", "7:t", &format!("{d}/tree")]);
    succeeded(&o, "cp -r out");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("t/link: a symlink") && err.contains("t/fifo: a FIFO"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tree/sub/b")).unwrap(),
        "b\n"
    );
    assert!(!dir.path().join("tree/link").exists() && !dir.path().join("tree/fifo").exists());
    // A tree in, without -r refused.
    let e = root.fails(&["cp", &format!("{d}/tree"), "7:"]);
    assert!(e.contains("give -r"), "{e}");
    root.ok(&["cp", "-r", &format!("{d}/tree"), "7:/home/luser/"]);
    assert_eq!(
        exec(&root, "7", "luser", "cat tree/sub/b; stat -c %U tree/sub/b").trim(),
        "b\nluser"
    );

    // What the tenant plants is refused, and nothing is written through it.
    exec(
        &root,
        "7",
        "luser",
        "ln -s /etc evil; ln -s /etc/shadow shadow; mkfifo fifo",
    );
    for (args, why) in [
        (vec!["cp", s, "7:/home/luser/evil/passwd"], "symlink"),
        (vec!["cp", s, "7:/home/luser/evil"], "symlink"),
        (vec!["cp", "7:/home/luser/shadow", d], "symlink"),
        (vec!["cp", "7:/home/luser/evil/shadow", d], "symlink"),
        (vec!["cp", "7:/home/luser/fifo", d], "FIFO"),
        (vec!["cp", s, "7:/home/luser/fifo"], "FIFO"),
        (vec!["cp", "7:../../etc/passwd", d], "`..`"),
        (vec!["cp", s, "7:/home/luser/../../etc/x"], "`..`"),
        (vec!["cp", s, d], "NAME:PATH"),
        (
            vec!["cp", s, "7:/tmp/x", "--owner", "nobody-here"],
            "no user",
        ),
        (vec!["cp", "7:/home/luser/f", "7:/tmp/g"], "both sides"),
        (vec!["cp", s, "nosuch:/tmp/x"], "does not exist"),
    ] {
        let e = root.fails(&args);
        assert!(e.contains(why), "{args:?}: expected {why:?} in {e}");
    }
    assert!(!dir.path().join("shadow").exists() && !dir.path().join("fifo").exists());
    let passwd = exec(&root, "7", "root", "cat /etc/passwd");
    assert!(passwd.contains("luser") && !passwd.contains('\u{0}'));
    let etc = exec(&root, "7", "root", "ls /etc");
    assert!(!etc.lines().any(|l| l == "x" || l == "evil"), "{etc}");

    // A stopped instance, both ways.
    root.ok(&["stop", "7"]);
    root.ok(&["cp", s, "7:/home/luser/stopped"]);
    root.ok(&["cp", "7:/home/luser/stopped", &format!("{d}/stopped")]);
    assert_eq!(sha256(&dir.path().join("stopped")), want);
    root.ok(&["start", "7"]);
    assert!(wait_port(root.port("7"), Duration::from_secs(20)));
    let inside = exec(
        &root,
        "7",
        "root",
        "sha256sum /home/luser/stopped; stat -c %U /home/luser/stopped",
    );
    assert!(
        inside.contains(&want) && inside.contains("luser"),
        "{inside}"
    );
}

#[test]
fn ssh_config_pins_host_keys_through_rekey_and_rm() {
    if !privileged() {
        return;
    }
    let root = fleet(&["3", "4"], &[]);
    let conf = ssh_config(&root);
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.contains("Host nifty-3\n") && text.contains("StrictHostKeyChecking yes"),
        "{text}"
    );
    // The file nifty keeps is the same config.
    assert_eq!(
        std::fs::read_to_string(root.path().join("ssh_config")).unwrap(),
        text
    );
    let login = |conf: &Path| tool("ssh", conf, &["nifty-3", "true"]);
    succeeded(&login(&conf), "ssh -F ssh-config nifty-3");
    let known = root.path().join("known_hosts");
    let old = root.instance_toml("3")["host_key"]
        .as_str()
        .unwrap()
        .to_string();
    let old_b64 = old.split_whitespace().nth(1).unwrap().to_string();

    // A rekey: both keys trusted until the restart, then only the new one.
    root.ok(&["rekey", "3"]);
    succeeded(
        &login(&conf),
        "ssh before the restart (old key still served)",
    );
    root.ok(&["restart", "3"]);
    assert!(wait_port(root.port("3"), Duration::from_secs(20)));
    let new = root.instance_toml("3")["host_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    let k = std::fs::read_to_string(&known).unwrap();
    assert!(!k.contains(&old_b64), "the old key is still trusted: {k}");
    assert!(k.contains(new.split_whitespace().nth(1).unwrap()), "{k}");
    succeeded(&login(&conf), "ssh -F after rekey + restart");
    // A client that knows only the old key, or a neighbour's, is refused.
    let k4 = root.instance_toml("4")["host_key"]
        .as_str()
        .unwrap()
        .to_string();
    for (key, what) in [(&old, "the old host key"), (&k4, "nifty-4's key")] {
        let stale = root.path().join("stale_known_hosts");
        std::fs::write(&stale, format!("nifty-3 {key}\n")).unwrap();
        let known = format!("UserKnownHostsFile={}", stale.display());
        let o = tool("ssh", &conf, &["-o", &known, "nifty-3", "true"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what} was accepted for nifty-3");
        assert!(
            err.contains("HOST IDENTIFICATION HAS CHANGED"),
            "{what}: {err}"
        );
    }

    // rm drops the instance from both files.
    root.ok(&["rm", "-f", "4"]);
    assert!(!std::fs::read_to_string(&known)
        .unwrap()
        .contains("nifty-4 "));
    assert!(!std::fs::read_to_string(root.path().join("ssh_config"))
        .unwrap()
        .contains("nifty-4"));
    // A selection prints only its hosts.
    let one = root.ok(&["ssh-config", "3"]);
    assert_eq!(one.matches("\nHost ").count(), 1, "{one}");
}

/// Ansible from PyPI (ansible-core), in the venv `make test` installs.
fn ansible() -> Option<PathBuf> {
    let path = std::env::var("NIFTY_TEST_ANSIBLE")
        .unwrap_or_else(|_| "/var/cache/nifty-test/ansible/bin/ansible".into());
    crate::common::tool(&path, "ansible-core from PyPI")
}

fn run_ansible(ansible: &Path, inventory: &Path, work: &Path) -> Output {
    Command::new(ansible)
        .args(["-i"])
        .arg(inventory)
        .args(["all", "-m", "raw", "-a", "uname -a", "--forks", "10"])
        .env("HOME", work)
        .env("ANSIBLE_LOCAL_TEMP", work.join("tmp"))
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", work.join("cp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_TIMEOUT", "30")
        .output()
        .expect("run ansible")
}

#[test]
fn ansible_reaches_twenty_instances_by_the_inventory() {
    if !privileged() {
        return;
    }
    let Some(ansible) = ansible() else { return };
    let names: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let root = fleet(&refs, &[]);
    let work = tempfile::tempdir().unwrap();
    let count_ok = |o: &Output| {
        let out = String::from_utf8_lossy(&o.stdout);
        let ok: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(" | CHANGED | rc=0"))
            .collect();
        (
            ok.len(),
            out.into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for format in ["ini", "yaml", "json"] {
        let inv = work.path().join(format!("inventory.{format}"));
        std::fs::write(&inv, root.ok(&["inventory", "--format", format])).unwrap();
        let (n, out, err) = count_ok(&run_ansible(&ansible, &inv, work.path()));
        assert_eq!(n, 20, "{format}: {n} of 20 answered\n{out}\n{err}");
        assert!(out.contains("Linux"), "{out}");
    }
    // As a dynamic inventory script.
    let script = work.path().join("nifty-inventory");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} --root {} inventory \"$@\"\n",
            crate::common::NIFTY,
            root.path().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (n, out, err) = count_ok(&run_ansible(&ansible, &script, work.path()));
    assert_eq!(n, 20, "dynamic: {n} of 20 answered\n{out}\n{err}");
    let host: serde_json::Value =
        serde_json::from_str(&root.ok(&["inventory", "--host", "nifty-5"])).unwrap();
    assert_eq!(host["ansible_port"], root.port("5"));
}
