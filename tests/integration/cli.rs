//! CLI tests that need no root: help, verbs not built yet, bad input.

use crate::common;

use std::path::Path;

use crate::common::Root;

fn nifty(args: &[&str]) -> std::process::Output {
    common::nifty()
        .args(args)
        .env_remove("NIFTY_ROOT")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_verb() {
    let o = nifty(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for verb in [
        "template",
        "create",
        "start",
        "stop",
        "restart",
        "kill",
        "rm",
        "list",
        "status",
        "logs",
        "exec",
        "ssh",
        "up",
        "passwd",
        "authorized-keys",
        "update",
        "doctor",
        "systemd",
        "enable",
        "disable",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(verb)),
            "{verb} missing from --help:\n{help}"
        );
    }
}

#[test]
fn update_and_diff_name_what_they_cannot_find() {
    let root = Root::new();
    let e = root.fails(&["update", "x"]);
    assert!(e.contains("does not exist"), "update: {e}");
    let e = root.fails(&["diff", "x"]);
    assert!(e.contains("does not exist"), "diff: {e}");
}

/// Every bad input fails with one clear line and writes nothing.
fn bad_build(args: &[&str], expect: &str) {
    let root = Root::new();
    let state = root.path().join("state");
    let o = common::nifty()
        .arg("--root")
        .arg(&state)
        .args(["template", "build"])
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in {err:?}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(!state.exists(), "{args:?} wrote {}", state.display());
}

#[test]
fn template_build_rejects_bad_input() {
    bad_build(
        &["--busybox", "/nonexistent/busybox"],
        "/nonexistent/busybox",
    );
    bad_build(&["--busybox", "/etc/passwd"], "not an ELF executable");
    bad_build(&["--dropbear", "/etc/hostname"], "not an ELF executable");
    bad_build(&["--user", "Bad:User"], "invalid user name");
    bad_build(&["--user", "root"], "invalid user name");
    bad_build(&["--name", "a/b"], "invalid template name");
    bad_build(&["--name", ".."], "invalid template name");
    bad_build(&["--with", "/etc/passwd"], "not an ELF executable");
}

#[test]
fn template_build_rejects_unresolvable_libraries() {
    let dropbear = Path::new("/usr/sbin/dropbear");
    if !dropbear.exists() {
        assert!(
            std::env::var("NIFTY_REQUIRE_PRIVILEGED").is_err(),
            "dropbear-bin is not installed"
        );
        eprintln!("SKIP: dropbear-bin is not installed");
        return;
    }
    // A real Dropbear whose DT_NEEDED names a library no host has.
    let dir = tempfile::tempdir().unwrap();
    let mut bin = std::fs::read(dropbear).unwrap();
    let from = b"libtommath.so.1";
    let pos = bin
        .windows(from.len())
        .position(|w| w == from)
        .expect("dropbear needs libtommath");
    bin[pos..pos + from.len()].copy_from_slice(b"libnothere.so.1");
    let fake = dir.path().join("dropbear");
    std::fs::write(&fake, bin).unwrap();
    bad_build(
        &["--dropbear", fake.to_str().unwrap()],
        "libnothere.so.1 cannot be found",
    );
}

#[test]
fn unwritable_root_is_refused() {
    if !Path::new("/bin/busybox").exists() || !Path::new("/usr/sbin/dropbear").exists() {
        eprintln!("SKIP: busybox-static or dropbear-bin missing");
        return;
    }
    let o = common::nifty()
        .args(["--root", "/proc/nifty-state", "template", "build"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("cannot create state directory /proc/nifty-state"),
        "{err}"
    );
}

#[test]
fn selections_are_checked_before_anything() {
    let root = Root::new();
    assert!(root
        .fails(&["create", "5..1"])
        .contains("5 is greater than 1"));
    assert!(root.fails(&["create", "a..b"]).contains("invalid range"));
    assert!(root
        .fails(&["create", "x/y"])
        .contains("invalid instance name"));
    assert!(root
        .fails(&["create", "1"])
        .contains("template \"default\" does not exist"));
    assert!(root
        .fails(&["start", "nope"])
        .contains("instance \"nope\" does not exist"));
    assert!(root.fails(&["stop", "1..3"]).contains("does not exist"));
    assert!(root.fails(&["start"]).contains("no instances given"));
    assert!(root
        .fails(&["create", "1", "2", "--port", "3000"])
        .contains("--port"));
    assert!(
        !root.path().join("instances").exists()
            || std::fs::read_dir(root.path().join("instances"))
                .unwrap()
                .count()
                == 0
    );
}
