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
        "export",
        "import",
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

#[test]
fn help_lists_the_file_and_client_verbs() {
    let o = nifty(&["--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for verb in ["cp", "ssh-config", "inventory", "completions", "manpages"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(verb)),
            "{verb} missing from --help:\n{help}"
        );
    }
}

/// bash with nifty's directory first on the PATH (the completion script
/// calls `nifty`) and `root` as the store.
fn bash(root: &Root, script: &str) -> std::process::Output {
    let dir = Path::new(common::NIFTY).parent().unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::process::Command::new("bash")
        .args(["-c", script])
        .env("PATH", path)
        .env("NIFTY_ROOT", root.path())
        .output()
        .unwrap()
}

#[test]
fn completions_load_and_complete_names_from_the_store() {
    let root = Root::new();
    for n in ["7", "web-1", "web-2"] {
        std::fs::create_dir_all(root.path().join("instances").join(n)).unwrap();
    }
    let o = bash(&root, "source <(nifty completions bash); complete -p nifty");
    let out = common::succeeded(&o, "source <(nifty completions bash)");
    assert!(out.contains("-F _clap_complete_nifty nifty"), "{out}");
    // What bash offers after `nifty start web`, `nifty cp 7`, `nifty st`.
    let ask = |words: &str, cword: usize, cur: &str| {
        let o = bash(
            &root,
            &format!(
                "source <(nifty completions bash); COMP_WORDS=({words}); COMP_CWORD={cword}; \
                 _clap_complete_nifty nifty {cur:?} x; printf '%s\\n' \"${{COMPREPLY[@]}}\""
            ),
        );
        common::succeeded(&o, words)
    };
    let names = ask("nifty start web", 2, "web");
    assert_eq!(
        names.split_whitespace().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{names}"
    );
    let cp = ask("nifty cp 7", 2, "7");
    assert!(cp.lines().any(|l| l == "7:"), "{cp}");
    let verbs = ask("nifty st", 1, "st");
    for v in ["start", "stop", "status"] {
        assert!(verbs.lines().any(|l| l == v), "{v} in {verbs}");
    }
    for shell in ["zsh", "fish"] {
        let s = root.ok(&["completions", shell]);
        assert!(
            s.contains("NIFTY_COMPLETE") && s.contains("nifty"),
            "{shell}: {s}"
        );
    }
    let e = root.fails(&["completions", "tcsh"]);
    assert!(e.contains("tcsh"), "{e}");
}

#[test]
fn man_pages_one_per_verb_render() {
    let root = Root::new();
    let dir = root.path().join("man");
    root.ok(&["manpages", dir.to_str().unwrap()]);
    for page in [
        "nifty",
        "nifty-cp",
        "nifty-create",
        "nifty-ssh-config",
        "nifty-template-build",
    ] {
        let p = dir.join(format!("{page}.1"));
        let o = std::process::Command::new("man")
            .arg("-l")
            .arg(&p)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("run man (man-db)");
        let text = common::succeeded(&o, &format!("man -l {}", p.display()));
        assert!(
            text.contains("NAME") && text.contains("SYNOPSIS"),
            "{page}: {text}"
        );
        assert!(text.contains(&page.replace("nifty-", "")), "{page}: {text}");
    }
    // The hidden verb has no page; every other verb has one.
    assert!(!dir.join("nifty-systemd-exec.1").exists());
    let help = String::from_utf8_lossy(&nifty(&["--help"]).stdout).into_owned();
    let verbs = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // Wrapped descriptions are indented further.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .collect::<Vec<_>>();
    assert!(verbs.len() > 20, "{help}");
    for v in verbs {
        assert!(
            dir.join(format!("nifty-{v}.1")).is_file(),
            "no page for {v}"
        );
    }
}

#[test]
fn export_and_import_refuse_bad_input() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let mut a = vec!["--root", r];
        a.extend_from_slice(args);
        let o = nifty(&a);
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // One format, one source, each required.
    let e = run(&["export", "default"]);
    assert!(e.contains("--oci") && e.contains("--kube"), "{e}");
    let e = run(&["export", "default", "--kube", "--compose"]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = run(&["import", "t"]);
    assert!(e.contains("--rootfs"), "{e}");
    let e = run(&["export", "default", "--kube", "--image", "Not A Ref"]);
    assert!(e.contains("not an image reference"), "{e}");
    let e = run(&["export", "default", "--kube", "--replicas", "0"]);
    assert!(e.contains("--replicas"), "{e}");
    let e = run(&["import", "bad/name", "--rootfs", "/nonexistent.tar"]);
    assert!(e.contains("invalid template name"), "{e}");
    let e = run(&["import", "t", "--rootfs", "/nonexistent.tar", "--ref", "v1"]);
    assert!(e.contains("--ref"), "{e}");
    // Nothing was made.
    assert!(!root.path().join("templates/t").exists());
    assert!(!root.path().join("templates/bad").exists());
}
