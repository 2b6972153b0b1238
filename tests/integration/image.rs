//! `nifty export` and `nifty import`: the template as an OCI image read by
//! skopeo and umoci, run by Podman (one container, a Compose fleet, and
//! `podman kube play` of the generated Deployment), the Kubernetes
//! manifests checked by kubernetes-validate, and the image made back into
//! a template that boots. Podman runs with a store of its own in a temp
//! dir (never the host's images), and everything it made is removed on
//! drop, even after a failed assertion.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common::{privileged, succeeded, tool, wait_port, Root, TEST_PORT_BASE};

/// A root with the default template, exported as an OCI layout and an
/// OCI archive.
struct Exported {
    root: Root,
    work: tempfile::TempDir,
}

impl Exported {
    fn new() -> Exported {
        let root = Root::new();
        root.ok(&["template", "build"]);
        let work = tempfile::tempdir().unwrap();
        let e = Exported { root, work };
        e.root
            .ok(&["export", "default", "--oci", e.layout().to_str().unwrap()]);
        e.root.ok(&[
            "export",
            "default",
            "--oci-archive",
            e.archive().to_str().unwrap(),
        ]);
        e
    }
    fn layout(&self) -> PathBuf {
        self.work.path().join("layout")
    }
    fn archive(&self) -> PathBuf {
        self.work.path().join("image.tar")
    }
    fn key(&self) -> PathBuf {
        self.root.path().join("keys/id_ed25519")
    }
}

const IMAGE: &str = "localhost/nifty-default:v1";

/// Podman with a store of its own. `podman run` as root sets the open
/// files and processes limits above the caller's hard limits, which only
/// CAP_SYS_RESOURCE may do (some hosts, this CI's among them, drop it):
/// its containers.conf sets them below.
struct Podman {
    dir: tempfile::TempDir,
    /// In the name of every network this test makes: the networks are the
    /// host's, shared with the tests that run beside it, so only these are
    /// removed on drop.
    tag: String,
}

impl Podman {
    fn new() -> Option<Podman> {
        tool("/usr/bin/podman", "podman")?;
        let dir = tempfile::Builder::new()
            .prefix("nifty-podman-")
            .tempdir()
            .unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n",
        )
        .unwrap();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "niftytest{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Some(Podman { dir, tag })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        self.env(&mut c);
        c.arg("--root")
            .arg(self.dir.path().join("storage"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"));
        c
    }

    fn env(&self, c: &mut Command) {
        c.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"));
    }

    fn ok(&self, args: &[&str]) -> String {
        succeeded(
            &self.cmd().args(args).output().unwrap(),
            &format!("podman {args:?}"),
        )
    }

    fn networks(&self) -> BTreeSet<String> {
        let o = self
            .cmd()
            .args(["network", "ls", "--format", "{{.Name}}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(String::from)
            .collect()
    }

    /// The address of a container on its network.
    fn ip(&self, container: &str) -> String {
        self.ok(&[
            "inspect",
            container,
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        ])
        .trim()
        .to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["pod", "rm", "-f", "-a", "-t", "0"][..],
            &["rm", "-f", "-a", "-t", "0"],
            &["volume", "rm", "-f", "-a"],
            &["secret", "rm", "-a"],
            &["rmi", "-f", "-a"],
        ] {
            let _ = self.cmd().args(args).output();
        }
        for n in self.networks().iter().filter(|n| n.contains(&self.tag)) {
            let _ = self.cmd().args(["network", "rm", "-f", n]).output();
        }
        // Podman's overlay mounts of this store, if any survived.
        for m in crate::common::all_mounts_under(self.dir.path()) {
            if let Some(point) = m.split(' ').nth(4) {
                let _ = rustix::mount::unmount(point, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

/// A login with a real OpenSSH client and nifty's key; the host key is
/// new to the client (the container made it), so it is not checked.
fn login(key: &Path, host: &str, port: u16, cmd: &str) -> Output {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), "-l", "luser"])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
        .args([host, cmd])
        .output()
        .unwrap()
}

/// Logs in, retrying while the container boots.
fn login_ok(key: &Path, host: &str, port: u16, cmd: &str) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let o = login(key, host, port, cmd);
        if o.status.success() || Instant::now() > end {
            return succeeded(&o, &format!("ssh {host}:{port}"));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Every entry of a tree: path -> (type, mode, uid, gid, content or link).
fn tree(root: &Path) -> std::collections::BTreeMap<String, (String, u32, u32, u32, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = md.file_type();
            let (kind, data) = if ft.is_symlink() {
                (
                    "link",
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if ft.is_dir() {
                stack.push(p.clone());
                ("dir", Vec::new())
            } else {
                ("file", std::fs::read(&p).unwrap())
            };
            let mode = if ft.is_symlink() {
                0
            } else {
                md.mode() & 0o7777
            };
            out.insert(rel, (kind.to_string(), mode, md.uid(), md.gid(), data));
        }
    }
    out
}

#[test]
fn export_is_a_reproducible_oci_image_that_skopeo_and_umoci_read() {
    if !privileged() {
        return;
    }
    let (Some(skopeo), Some(umoci)) = (
        tool("/usr/bin/skopeo", "skopeo"),
        tool("/usr/bin/umoci", "umoci"),
    ) else {
        return;
    };
    let e = Exported::new();
    let meta: toml::Table =
        std::fs::read_to_string(e.root.path().join("templates/default/template.toml"))
            .unwrap()
            .parse()
            .unwrap();

    // The config the issue names.
    let o = Command::new(&skopeo)
        .args(["inspect", "--config"])
        .arg(format!("oci:{}", e.layout().display()))
        .output()
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(&succeeded(&o, "skopeo inspect")).unwrap();
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/sbin/init"]));
    assert_eq!(c["StopSignal"], "SIGUSR2");
    assert!(c["ExposedPorts"]["22/tcp"].is_object(), "{c}");
    assert!(
        c["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "NIFTY_PORT=22"),
        "{c}"
    );
    for what in ["busybox", "dropbear"] {
        assert_eq!(
            c["Labels"][format!("io.nifty.{what}.sha256")]
                .as_str()
                .unwrap(),
            meta[what]["sha256"].as_str().unwrap()
        );
        assert_eq!(
            c["Labels"][format!("io.nifty.{what}.version")]
                .as_str()
                .unwrap(),
            meta[what]["version"].as_str().unwrap()
        );
    }

    // Reproducible: a second export is the same image, byte for byte,
    // and the archive holds the same manifest.
    let again = e.work.path().join("again");
    e.root
        .ok(&["export", "default", "--oci", again.to_str().unwrap()]);
    let index = |d: &Path| std::fs::read(d.join("index.json")).unwrap();
    assert_eq!(index(&e.layout()), index(&again));
    let digest: serde_json::Value = serde_json::from_slice(&index(&e.layout())).unwrap();
    let digest = digest["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let o = Command::new(&skopeo)
        .arg("inspect")
        .arg(format!("oci-archive:{}", e.archive().display()))
        .output()
        .unwrap();
    let inspected: serde_json::Value =
        serde_json::from_str(&succeeded(&o, "skopeo inspect archive")).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());

    // umoci gives back the template's files: same names, types, modes,
    // owners, contents and link targets; and no host key.
    let bundle = e.work.path().join("bundle");
    let o = Command::new(&umoci)
        .args(["unpack", "--image"])
        .arg(format!("{}:{IMAGE}", e.layout().display()))
        .arg(&bundle)
        .output()
        .unwrap();
    succeeded(&o, "umoci unpack");
    let (ours, theirs) = (tree(&e.root.rootfs()), tree(&bundle.join("rootfs")));
    let differ: Vec<&String> = ours
        .keys()
        .chain(theirs.keys())
        .filter(|k| ours.get(*k) != theirs.get(*k))
        .collect();
    assert!(differ.is_empty(), "unpacked image differs at {differ:?}");
    assert!(ours.len() > 1000, "{} entries", ours.len());
    assert_eq!(
        std::fs::read_dir(bundle.join("rootfs/etc/dropbear"))
            .unwrap()
            .count(),
        0
    );
    let etc = std::fs::metadata(bundle.join("rootfs/etc"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        etc & 0o777,
        0o755,
        "/etc must be readable by the login user"
    );

    // Bad input changes nothing.
    let err = e
        .root
        .fails(&["export", "default", "--oci", e.layout().to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(index(&e.layout()), index(&again));
    let err = e.root.fails(&["export", "nope", "--oci", "/tmp/x"]);
    assert!(err.contains("\"nope\" does not exist"), "{err}");
    let err = e.root.fails(&[
        "export",
        "default",
        "--template-version",
        "9",
        "--oci-archive",
        "/tmp/x.tar",
    ]);
    assert!(err.contains("no version 9"), "{err}");
    assert!(!Path::new("/tmp/x.tar").exists());
}

#[test]
fn podman_runs_the_image_and_stops_it_with_its_stop_signal() {
    if !privileged() {
        return;
    }
    let Some(podman) = Podman::new() else { return };
    let e = Exported::new();
    podman.ok(&["load", "-q", "-i", e.archive().to_str().unwrap()]);
    // Two containers of the image: each its own host key.
    let mut keys = Vec::new();
    for (name, port) in [("n1", TEST_PORT_BASE + 91), ("n2", TEST_PORT_BASE + 92)] {
        podman.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--net",
            "host",
            "-e",
            &format!("NIFTY_PORT={port}"),
            IMAGE,
        ]);
        assert!(
            wait_port(port, Duration::from_secs(30)),
            "{name} does not listen on {port}"
        );
        let out = login_ok(&e.key(), "127.0.0.1", port, "id -un; cat /proc/1/comm");
        assert_eq!(out, "luser\ninit\n");
        keys.push(podman.ok(&[
            "exec",
            name,
            "dropbearkey",
            "-y",
            "-f",
            "/etc/dropbear/dropbear_ed25519_host_key",
        ]));
    }
    assert!(
        keys[0].contains("ssh-ed25519") && keys[0] != keys[1],
        "{keys:?}"
    );

    // `podman stop` sends SIGUSR2: BusyBox init powers off, well before
    // the timeout would have it killed (exit 137).
    let start = Instant::now();
    podman.ok(&["stop", "-t", "30", "n1"]);
    let took = start.elapsed();
    let code = podman.ok(&["inspect", "n1", "--format", "{{.State.ExitCode}}"]);
    assert_eq!(code.trim(), "0", "init did not power off cleanly");
    assert!(
        took < Duration::from_secs(15),
        "stop took {took:?} of its 30 s timeout"
    );
}

#[test]
fn kube_manifests_validate_and_podman_kube_play_runs_three_replicas() {
    if !privileged() {
        return;
    }
    let Some(validate) = tool(
        "/var/cache/nifty-test/ansible/bin/kubernetes-validate",
        "kubernetes-validate from PyPI",
    ) else {
        return;
    };
    let Some(podman) = Podman::new() else { return };
    let e = Exported::new();
    let dir = e.work.path();
    let write = |name: &str, args: &[&str]| {
        let path = dir.join(name);
        let mut a = vec!["export", "default", "--kube", "-o", path.to_str().unwrap()];
        a.extend_from_slice(args);
        e.root.ok(&a);
        path
    };
    let sts = write("sts.yaml", &[]);
    let lb = write("lb.yaml", &["--expose", "loadbalancer", "--replicas", "5"]);
    let dep = write(
        "dep.yaml",
        &["--workload", "deployment", "--expose", "none"],
    );
    for f in [&sts, &lb, &dep] {
        let o = Command::new(&validate)
            .arg("--strict")
            .arg(f)
            .output()
            .unwrap();
        let out = succeeded(&o, &format!("kubernetes-validate {}", f.display()));
        assert!(!out.contains("failed"), "{out}");
    }
    let text = std::fs::read_to_string(&sts).unwrap();
    for want in [
        "kind: StatefulSet",
        "hostUsers: false",
        "nifty-default-2-ssh",
        "type: NodePort",
        "volumeClaimTemplates",
        "kind: Secret",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert_eq!(
        std::fs::read_to_string(&lb)
            .unwrap()
            .matches("type: LoadBalancer")
            .count(),
        5
    );
    let err = e
        .root
        .fails(&["export", "default", "--kube", "--workload", "deployment"]);
    assert!(err.contains("--expose none"), "{err}");

    podman.ok(&["load", "-q", "-i", e.archive().to_str().unwrap()]);
    // A network of its own, on a subnet that Podman does not pick by
    // itself (it picks from 10.89.0.0/16): `kube play`'s default network
    // would be made by the first user, and a Compose network made at the
    // same moment by the test beside this one could be given the same
    // subnet, its containers then answering these pods' addresses.
    let net = format!("{}-kube", podman.tag);
    let subnet = format!("10.213.{}.0/24", std::process::id() % 250);
    podman.ok(&["network", "create", "--subnet", &subnet, &net]);
    podman.ok(&["kube", "play", "--network", &net, dep.to_str().unwrap()]);
    let mut maps = BTreeSet::new();
    for i in 0..3 {
        let ip = podman.ip(&format!("nifty-default-pod-{i}-ssh"));
        assert!(
            ip.starts_with(subnet.trim_end_matches("0/24")),
            "pod {i} is at {ip:?}, not on its network {subnet}"
        );
        let out = login_ok(
            &e.key(),
            &ip,
            22,
            "hostname; id -un; cat /proc/self/uid_map",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[..2],
            [format!("nifty-default-pod-{i}").as_str(), "luser"]
        );
        // hostUsers: false: its own user namespace, root not the host's.
        let map: Vec<&str> = lines[2].split_whitespace().collect();
        assert_ne!(map[1], "0", "pod {i} runs as host root: {out}");
        maps.insert(map[1].to_string());
    }
    assert_eq!(maps.len(), 3, "the pods share an ID range: {maps:?}");
    // Podman 4.3 sometimes fails to remove a container's shm mount on the
    // first try ("device or resource busy", after stopping the pods), and
    // a second `kube down` then stops at the first pod it had removed ("no
    // pod with name or ID ... found") without going on to the others: what
    // is left after the first down is removed by name, each asked again
    // up to 4 times.
    let o = podman
        .cmd()
        .args(["kube", "down", dep.to_str().unwrap()])
        .output()
        .unwrap();
    let pods = || podman.ok(&["pod", "ps", "-q"]);
    for wait in 1..=4 {
        let left = pods();
        if left.trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(wait));
        for pod in left.split_whitespace() {
            let _ = podman.cmd().args(["pod", "rm", "-f", pod]).output();
        }
    }
    assert!(
        pods().trim().is_empty(),
        "pods left after podman kube down: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_compose_file_runs_a_fleet_with_podman_compose() {
    if !privileged() {
        return;
    }
    let Some(compose) = tool("/usr/bin/podman-compose", "podman-compose") else {
        return;
    };
    let Some(podman) = Podman::new() else { return };
    let e = Exported::new();
    podman.ok(&["load", "-q", "-i", e.archive().to_str().unwrap()]);
    let file = e.work.path().join("compose.yaml");
    e.root.ok(&[
        "export",
        "default",
        "--compose",
        "--replicas",
        "2",
        "-o",
        file.to_str().unwrap(),
    ]);
    let project = podman.tag.clone();
    let run = |verb: &[&str]| {
        let mut c = Command::new(&compose);
        podman.env(&mut c);
        c.arg(format!(
            "--podman-args=--root={}",
            podman.dir.path().join("storage").display()
        ))
        .arg(format!(
            "--podman-args=--runroot={}",
            podman.dir.path().join("run").display()
        ))
        .args(["-p", &project, "-f"])
        .arg(&file)
        .args(verb);
        succeeded(&c.output().unwrap(), &format!("podman-compose {verb:?}"))
    };
    run(&["up", "-d"]);
    for n in 1..=2u16 {
        let out = login_ok(
            &e.key(),
            "127.0.0.1",
            TEST_PORT_BASE + n,
            "hostname; id -un",
        );
        assert_eq!(out, format!("nifty-{n}\nluser\n"));
    }
    run(&["down", "-v"]);
}

#[test]
fn an_exported_image_imports_back_as_a_template_that_boots() {
    if !privileged() {
        return;
    }
    let e = Exported::new();
    // Another host: a root of its own, its own client key.
    let other = Root::new();
    other.ok(&[
        "import",
        "moved",
        "--oci-archive",
        e.archive().to_str().unwrap(),
    ]);
    let show = other.ok(&["template", "show", "moved"]);
    assert!(
        show.contains("oci-archive:") && show.contains("Dropbear v"),
        "{show}"
    );
    other.ok(&["create", "1", "--template", "moved"]);
    other.ok(&["start", "1"]);
    assert!(wait_port(other.port("1"), Duration::from_secs(20)));
    // nifty's own key on this host logs in, with the host key nifty made.
    assert_eq!(
        other.ssh("1", "id -un; cat /etc/os-release | head -1"),
        "luser\nNAME=\"nifty\"\n"
    );

    // From the layout, by its reference, as a second version.
    e.root.ok(&[
        "import",
        "back",
        "--oci",
        e.layout().to_str().unwrap(),
        "--ref",
        "v1",
    ]);
    e.root
        .ok(&["import", "back", "--oci", e.layout().to_str().unwrap()]);
    let list = e.root.ok(&["template", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("back ") && l.contains(" v2 ")),
        "{list}"
    );
    let err = e.root.fails(&[
        "import",
        "x",
        "--oci",
        e.layout().to_str().unwrap(),
        "--ref",
        "nope",
    ]);
    assert!(err.contains("no image named \"nope\""), "{err}");
}

#[test]
fn import_checks_what_it_is_given() {
    if !privileged() {
        return;
    }
    let root = Root::new();
    root.ok(&["template", "build"]);
    let work = tempfile::tempdir().unwrap();
    let tar = |name: &str, dir: &Path| {
        let path = work.path().join(name);
        let o = Command::new("tar")
            .arg("-C")
            .arg(dir)
            .args(["--numeric-owner", "-czf"])
            .arg(&path)
            .arg(".")
            .output()
            .unwrap();
        succeeded(&o, "tar");
        path
    };
    // A copy of the template with a host key planted and a setuid shell.
    let copy = work.path().join("copy");
    let o = Command::new("cp")
        .arg("-a")
        .arg(root.rootfs())
        .arg(&copy)
        .output()
        .unwrap();
    succeeded(&o, "cp -a");
    std::fs::write(
        copy.join("etc/dropbear/dropbear_ed25519_host_key"),
        "shared",
    )
    .unwrap();
    std::fs::set_permissions(
        copy.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let planted = tar("planted.tar.gz", &copy);
    let out = root.ok(&["import", "planted", "--rootfs", planted.to_str().unwrap()]);
    let top = root.path().join("templates/planted/v1/rootfs");
    assert!(!top.join("etc/dropbear/dropbear_ed25519_host_key").exists());
    let mode = std::fs::metadata(top.join("bin/busybox")).unwrap().mode();
    assert_eq!(mode & 0o7000, 0, "setuid kept");
    assert!(
        out.contains("removed host keys")
            && out.contains("/etc/dropbear/dropbear_ed25519_host_key"),
        "{out}"
    );
    assert!(
        out.contains("cleared setuid/setgid bits: /bin/busybox"),
        "{out}"
    );
    root.ok(&["create", "7", "--template", "planted"]);
    root.ok(&["start", "7"]);
    assert!(wait_port(root.port("7"), Duration::from_secs(20)));
    assert_eq!(root.ssh("7", "id -un"), "luser\n");

    // A library missing: refused, naming it, and no template left.
    std::fs::remove_file(copy.join("lib/x86_64-linux-gnu/libz.so.1")).unwrap();
    let broken = tar("nolibz.tar.gz", &copy);
    let err = root.fails(&["import", "broken", "--rootfs", broken.to_str().unwrap()]);
    assert!(err.contains("needs libz.so.1"), "{err}");
    // Not a nifty image at all.
    let bare = work.path().join("bare");
    std::fs::create_dir_all(bare.join("etc")).unwrap();
    std::fs::write(bare.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    let err = root.fails(&[
        "import",
        "bare",
        "--rootfs",
        tar("bare.tar", &bare).to_str().unwrap(),
    ]);
    assert!(
        err.contains("not a nifty image") && err.contains("/usr/sbin/dropbear"),
        "{err}"
    );
    let list = root.ok(&["template", "list"]);
    assert!(!list.contains("broken") && !list.contains("bare"), "{list}");
    assert!(!root.path().join("templates/broken").exists());
    // A damaged OCI layer: refused by its digest.
    let layout = work.path().join("layout");
    root.ok(&["export", "default", "--oci", layout.to_str().unwrap()]);
    let blobs = layout.join("blobs/sha256");
    let layer = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut data = std::fs::read(&layer).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&layer, data).unwrap();
    let err = root.fails(&["import", "damaged", "--oci", layout.to_str().unwrap()]);
    assert!(
        err.contains("damaged") || err.contains("does not match"),
        "{err}"
    );
    assert!(!root.path().join("templates/damaged").exists());
}
