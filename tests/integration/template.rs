//! Privileged: build a template, then check it from inside a chroot.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::common::{privileged, Root};

fn chroot(rootfs: &Path, cmd: &str) -> (bool, String) {
    let o = Command::new("chroot")
        .arg(rootfs)
        .args(["/bin/sh", "-c", cmd])
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let md = std::fs::symlink_metadata(&p).unwrap();
        f(&p, &md);
        if md.is_dir() {
            walk(&p, f);
        }
    }
}

#[test]
fn template_boots_in_a_chroot() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    let rootfs = root.rootfs();

    let (ok, out) = chroot(&rootfs, "sh --help");
    assert!(out.starts_with("BusyBox v"), "{ok} {out}");
    // Dropbear runs with only the template's libraries (no host dir bound).
    let (ok, out) = chroot(&rootfs, "/usr/sbin/dropbear -V");
    assert!(ok && out.contains("Dropbear v"), "{out}");
    // ... found through the loader's cache of them, which names each one.
    let cache = std::fs::read(rootfs.join("etc/ld.so.cache")).expect("etc/ld.so.cache");
    for lib in ["libtomcrypt.so.1", "libc.so.6", "libz.so.1"] {
        assert!(
            cache.windows(lib.len()).any(|w| w == lib.as_bytes()),
            "{lib} is not in the template's ld.so.cache"
        );
    }
    let conf = std::fs::read_to_string(rootfs.join("etc/ld.so.conf")).unwrap();
    assert!(
        conf.lines().count() > 0
            && conf
                .lines()
                .all(|l| rootfs.join(l.trim_start_matches('/')).is_dir()),
        "ld.so.conf names directories the template has: {conf}"
    );
    let (ok, out) = chroot(
        &rootfs,
        "dropbearkey -t ed25519 -f /tmp/k && dropbearkey -y -f /tmp/k",
    );
    assert!(ok && out.contains("ssh-ed25519 "), "{out}");
    std::fs::remove_file(rootfs.join("tmp/k")).unwrap();
    let (ok, out) = chroot(&rootfs, "dbclient -h 2>&1; ls -l /usr/bin/ssh");
    assert!(ok && out.contains("Dropbear SSH client"), "{out}");

    // Accounts: the login user exists, root has no password and no network login.
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("luser:x:1000:1000:")),
        "{passwd}"
    );
    let (ok, out) = chroot(&rootfs, "id luser");
    assert!(ok && out.contains("uid=1000(luser)"), "{out}");
    let shadow = rootfs.join("etc/shadow");
    assert_eq!(
        std::fs::metadata(&shadow).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    assert!(std::fs::read_to_string(&shadow)
        .unwrap()
        .starts_with("root:!:"));
    let inittab = std::fs::read_to_string(rootfs.join("etc/inittab")).unwrap();
    let dropbear_line = inittab.lines().find(|l| l.contains("dropbear")).unwrap();
    assert!(
        dropbear_line.contains(" -w ") && dropbear_line.contains(" -F "),
        "{dropbear_line}"
    );
    let keys = std::fs::read_to_string(rootfs.join("home/luser/.ssh/authorized_keys")).unwrap();
    let nifty_pub = std::fs::read_to_string(root.path().join("keys/id_ed25519.pub")).unwrap();
    assert!(keys.contains(nifty_pub.trim()));
    assert_eq!(
        std::fs::metadata(rootfs.join("home/luser")).unwrap().uid(),
        1000
    );

    // No setuid anywhere, no su/passwd, no host keys, the right modes.
    let mut setuid = Vec::new();
    walk(&rootfs, &mut |p, md| {
        if !md.file_type().is_symlink() && md.mode() & 0o6000 != 0 {
            setuid.push(p.to_path_buf());
        }
    });
    assert!(setuid.is_empty(), "setuid files: {setuid:?}");
    for gone in ["bin/su", "usr/bin/passwd", "bin/passwd"] {
        assert!(
            rootfs.join(gone).symlink_metadata().is_err(),
            "{gone} is linked"
        );
    }
    assert_eq!(
        std::fs::read_dir(rootfs.join("etc/dropbear"))
            .unwrap()
            .count(),
        0,
        "host keys in the template"
    );
    for (d, mode) in [("tmp", 0o1777), ("var/tmp", 0o1777)] {
        assert_eq!(
            std::fs::metadata(rootfs.join(d))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            mode,
            "{d}"
        );
    }
    for must in [
        "etc/os-release",
        "etc/group",
        "etc/shells",
        "etc/hostname",
        "var/run",
        "var/log",
        "root",
        "usr/share/zoneinfo/UTC",
    ] {
        assert!(rootfs.join(must).exists(), "{must} missing");
    }
    // Every applet path BusyBox expects resolves.
    let list = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.ends_with("/su") || applet.ends_with("/passwd") {
            continue;
        }
        assert!(rootfs.join(applet).exists(), "{applet} does not resolve");
    }

    // template.toml records sources, versions and digests; `show` lists
    // every version (here one).
    let show = root.ok(&["template", "show", "default", "--json"]);
    let all: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{show}");
    let v = &all[0];
    assert_eq!(v["version"], 1);
    assert!(v["busybox"]["version"]
        .as_str()
        .unwrap()
        .starts_with("BusyBox v"));
    assert!(v["dropbear"]["version"]
        .as_str()
        .unwrap()
        .starts_with("Dropbear v"));
    assert_eq!(v["busybox"]["sha256"].as_str().unwrap().len(), 64);
    assert!(root.ok(&["template", "list"]).contains("default"));
}

#[test]
fn rebuild_is_atomic_and_failed_build_keeps_the_old_one() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    let before =
        std::fs::read_to_string(root.path().join("templates/default/template.toml")).unwrap();
    // A failing rebuild (bad extra binary) leaves the template untouched.
    root.fails(&["template", "build", "--with", "/etc/passwd"]);
    let after =
        std::fs::read_to_string(root.path().join("templates/default/template.toml")).unwrap();
    assert_eq!(before, after);
    // A good rebuild with an extra program makes version 2, with its
    // libraries; version 1 stays for the instances that run it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    root.ok(&["template", "build", "--with", "/usr/bin/env"]);
    let rebuilt =
        std::fs::read_to_string(root.path().join("templates/default/template.toml")).unwrap();
    assert_ne!(before, rebuilt);
    assert!(rebuilt.contains("version = 2"), "{rebuilt}");
    assert!(root.path().join("templates/default/v1/rootfs").is_dir());
    assert_eq!(
        std::fs::read_to_string(root.path().join("templates/default/v1/template.toml")).unwrap(),
        before
    );
    let (ok, out) = chroot(&root.rootfs(), "/usr/bin/env --version | head -1");
    assert!(ok && out.contains("env (GNU coreutils)"), "{out}");
    let leftovers: Vec<_> = std::fs::read_dir(root.path().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["default"], "temporary build dirs left behind");
}
