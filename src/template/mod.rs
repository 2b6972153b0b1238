//! `nifty template build`: the shared, read-only root every instance boots
//! from (the article's steps 1-5 and 8, done right).
//!
//! The tree is built in `templates/.build-<name>-<pid>` and swapped in with
//! one `renameat2(RENAME_EXCHANGE)` (or `RENAME_NOREPLACE` the first time):
//! a failed build leaves the previous template untouched and nothing
//! half-made.
//!
//! Zoneinfo is *copied* (3.9 MB, once per template, shared by every
//! instance through the overlay's lower layer), not bound from the host:
//! the template stays self-contained, no host directory is exposed to the
//! containers, and there is no bind to be remounted read-write.

pub mod accounts;
pub mod dev;
pub mod elf;
pub mod inittab;
pub mod procnet;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::names::{check_name, check_user};
use crate::store::{now, write_atomic, write_file, Source, Store, TemplateMeta};
use crate::{keys, Error, Result};

/// Applets that are never linked: without setuid they cannot work, and with
/// it they are a hole (the article's security point 3). `nifty passwd`
/// changes passwords from the host instead.
pub const EXCLUDED_APPLETS: &[&str] = &["su", "passwd"];

/// What `template build` is asked for.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub name: String,
    pub busybox: PathBuf,
    pub dropbear: PathBuf,
    pub with: Vec<PathBuf>,
    pub user: String,
    pub authorized_keys: Vec<PathBuf>,
    /// A password for the login user, in clear (hashed here).
    pub password: Option<String>,
    /// Zoneinfo to copy in; `None`: the host's `/usr/share/zoneinfo` if it
    /// exists, else none (the containers keep UTC).
    pub zoneinfo: Option<PathBuf>,
    /// File transfer: OpenSSH's `sftp-server` (what Dropbear execs for the
    /// `sftp` subsystem, and so what OpenSSH's `scp` speaks by default)
    /// and OpenSSH's `scp` (for `scp -O`, the legacy protocol). `None`:
    /// neither (`--without-sftp`).
    pub sftp: Option<FileTransfer>,
}

/// The host binaries of file transfer (Debian: openssh-sftp-server and
/// openssh-client).
#[derive(Debug, Clone)]
pub struct FileTransfer {
    pub sftp_server: PathBuf,
    pub scp: PathBuf,
}

impl Default for FileTransfer {
    fn default() -> Self {
        FileTransfer {
            sftp_server: SFTP_SERVER.into(),
            scp: "/usr/bin/scp".into(),
        }
    }
}

/// Where Debian's openssh-sftp-server puts the server.
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// Where Dropbear execs it (its `SFTPSERVER_PATH`), a link in the template.
pub const SFTP_SERVER_LINK: &str = "usr/lib/sftp-server";

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            name: "default".into(),
            busybox: "/bin/busybox".into(),
            dropbear: "/usr/sbin/dropbear".into(),
            with: Vec::new(),
            user: "luser".into(),
            authorized_keys: Vec::new(),
            password: None,
            zoneinfo: None,
            sftp: Some(FileTransfer::default()),
        }
    }
}

/// One binary to copy into the template, with what it needs.
struct Binary {
    host: PathBuf,
    dest: PathBuf,
    needs: elf::Needs,
}

/// Builds (or rebuilds) a template. Everything is checked before anything
/// is written.
/// Where Debian's tzdata puts zoneinfo.
const HOST_ZONEINFO: &str = "/usr/share/zoneinfo";

pub fn build(store: &Store, opts: &BuildOptions) -> Result<TemplateMeta> {
    check_name("template", &opts.name)?;
    check_user(&opts.user)?;
    elf::check_elf("--busybox", &opts.busybox)?;
    elf::check_elf("--dropbear", &opts.dropbear)?;

    // Resolve every binary and its libraries first: a Dropbear whose
    // libraries cannot be found fails here, before anything is written.
    let mut binaries = vec![Binary {
        host: opts.busybox.clone(),
        dest: "bin/busybox".into(),
        needs: elf::resolve(&opts.busybox)?,
    }];
    binaries.push(Binary {
        host: opts.dropbear.clone(),
        dest: "usr/sbin/dropbear".into(),
        needs: elf::resolve(&opts.dropbear)?,
    });
    let companions = dropbear_companions(&opts.dropbear);
    for (host, dest) in &companions {
        binaries.push(Binary {
            host: host.clone(),
            dest: dest.into(),
            needs: elf::resolve(host)?,
        });
    }
    let mut transfer = None;
    if let Some(ft) = &opts.sftp {
        for (what, host, package) in [
            ("sftp-server", &ft.sftp_server, "openssh-sftp-server"),
            ("scp", &ft.scp, "openssh-client"),
        ] {
            if !host.is_file() {
                return Err(Error::Invalid(format!(
                    "{what}: {} does not exist; install it (Debian: apt-get install {package}) or build with --without-sftp",
                    host.display()
                )));
            }
            elf::check_elf(what, host)?;
        }
        binaries.push(Binary {
            host: ft.sftp_server.clone(),
            dest: SFTP_SERVER.trim_start_matches('/').into(),
            needs: elf::resolve(&ft.sftp_server)?,
        });
        binaries.push(Binary {
            host: ft.scp.clone(),
            dest: "usr/bin/scp".into(),
            needs: elf::resolve(&ft.scp)?,
        });
        transfer = Some((
            source(&ft.sftp_server, package_version(&ft.sftp_server))?,
            source(&ft.scp, package_version(&ft.scp))?,
        ));
    }
    let mut extra = Vec::new();
    for w in &opts.with {
        let host = std::path::absolute(w).map_err(Error::io("resolve", w))?;
        elf::check_elf("--with", &host)?;
        binaries.push(Binary {
            dest: host.strip_prefix("/").unwrap_or(&host).to_path_buf(),
            needs: elf::resolve(&host)?,
            host: host.clone(),
        });
        extra.push(source(&host, None)?);
    }
    let mut authorized = Vec::new();
    for f in &opts.authorized_keys {
        let text = fs::read_to_string(f)
            .map_err(|e| Error::Invalid(format!("--authorized-keys {}: {e}", f.display())))?;
        authorized.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    let zoneinfo = match &opts.zoneinfo {
        Some(dir) if !dir.is_dir() => {
            return Err(Error::Invalid(format!(
                "--zoneinfo {} is not a directory (Debian's tzdata installs /usr/share/zoneinfo)",
                dir.display()
            )))
        }
        Some(dir) => Some(dir.clone()),
        None => Some(PathBuf::from(HOST_ZONEINFO)).filter(|d| d.is_dir()),
    };
    let hash = opts
        .password
        .as_deref()
        .map(accounts::hash_password)
        .transpose()?;
    let busybox_version = version(&opts.busybox, &[], "BusyBox")?;
    let dropbear_version = version(&opts.dropbear, &["-V"], "Dropbear")?;
    let applets = applets(&opts.busybox)?;

    store.ensure()?;
    authorized.insert(0, keys::ensure_client_key(&store.client_key())?);
    new_version(store, &opts.name, |rootfs, version| {
        let mut libraries = Vec::new();
        populate(
            rootfs,
            opts,
            &binaries,
            &applets,
            &authorized,
            hash.as_deref(),
            zoneinfo.as_deref(),
            &mut libraries,
        )?;
        Ok(TemplateMeta {
            name: opts.name.clone(),
            version,
            built: now(),
            user: opts.user.clone(),
            busybox: source(&opts.busybox, Some(busybox_version.clone()))?,
            dropbear: source(&opts.dropbear, Some(dropbear_version.clone()))?,
            extra: extra.clone(),
            libraries,
            zoneinfo: if zoneinfo.is_some() {
                "copied".into()
            } else {
                "none".into()
            },
            applets: applets.len(),
            sftp_server: transfer.as_ref().map(|t| t.0.clone()),
            scp: transfer.as_ref().map(|t| t.1.clone()),
            imported: None,
        })
    })
}

/// Adds the next version of template `name`: `make` fills the root it is
/// given (which does not exist yet) and returns the record, for the
/// version number it is given. The version is made in
/// `templates/.build-<name>-<pid>` and appears whole under its own name;
/// a failure leaves nothing. One build or import at a time per name.
pub(crate) fn new_version(
    store: &Store,
    name: &str,
    make: impl FnOnce(&Path, u32) -> Result<TemplateMeta>,
) -> Result<TemplateMeta> {
    check_name("template", name)?;
    store.ensure()?;
    let top = store.template_dir(name);
    fs::create_dir_all(&top).map_err(Error::io("create", &top))?;
    let _lock = crate::disk::lock_dir(&top)?;
    let version = match store.template(name) {
        Ok(t) => t.version + 1,
        Err(Error::NoTemplate(_)) => 1,
        Err(e) => return Err(e),
    };
    if version > 1 {
        keep_legacy_as_v1(&top)?;
    }

    let tmp = store
        .templates_dir()
        .join(format!(".build-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| {
        mkdir(&tmp, 0o755)?;
        let meta = make(&tmp.join("rootfs"), version)?;
        let text = toml::to_string(&meta).map_err(|err| Error::Encode {
            what: "a template record",
            err,
        })?;
        write_file(&tmp.join("template.toml"), text.as_bytes(), 0o644)?;
        // The version appears whole under its own name; then the record
        // at the top names it the newest. Older versions stay where they
        // are for the instances that run them (`template prune`).
        let dest = top.join(format!("v{version}"));
        fs::rename(&tmp, &dest).map_err(Error::io("rename into place", &dest))?;
        write_atomic(&top.join("template.toml"), text.as_bytes(), 0o644)?;
        Ok(meta)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
        // A first version that failed leaves no template behind.
        if version == 1 {
            let _ = fs::remove_dir(&top);
        }
    }
    result
}

/// A template built before versions keeps its root at the top of its
/// directory: that is version 1, moved under `v1/` before the next
/// version is added (instances running on it keep their mounts; their
/// records already say version 1).
fn keep_legacy_as_v1(top: &Path) -> Result<()> {
    let (rootfs, v1) = (top.join("rootfs"), top.join("v1"));
    if !rootfs.is_dir() || v1.exists() {
        return Ok(());
    }
    mkdir(&v1, 0o755)?;
    fs::copy(top.join("template.toml"), v1.join("template.toml"))
        .map_err(Error::io("copy", top.join("template.toml")))?;
    fs::rename(&rootfs, v1.join("rootfs")).map_err(Error::io("rename", &rootfs))
}

/// Removes the versions of template `name` that no instance runs, but
/// never the newest; returns the versions removed.
pub fn prune(store: &Store, name: &str) -> Result<Vec<u32>> {
    let top = store.template_dir(name);
    let _lock = crate::disk::lock_dir(&top)?;
    let newest = store.template(name)?.version;
    let mut used = std::collections::BTreeSet::new();
    for n in store.instance_names()? {
        if let Ok(i) = store.instance(&n) {
            if i.template == name {
                used.insert(i.template_version);
            }
        }
    }
    let mut removed = Vec::new();
    for t in store.template_versions(name)? {
        if t.version == newest || used.contains(&t.version) {
            continue;
        }
        let dir = store.template_version_dir(name, t.version);
        if dir == top {
            // A legacy version 1 at the top: only its root goes.
            fs::remove_dir_all(top.join("rootfs")).map_err(Error::io("remove", &dir))?;
        } else {
            fs::remove_dir_all(&dir).map_err(Error::io("remove", &dir))?;
        }
        removed.push(t.version);
    }
    Ok(removed)
}

/// `dropbearkey` and `dbclient` (also as `ssh`), where present next to
/// Dropbear or in the usual places.
fn dropbear_companions(dropbear: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut dirs: Vec<PathBuf> = dropbear
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    dirs.extend(["/usr/bin", "/usr/sbin", "/bin"].map(PathBuf::from));
    let mut out = Vec::new();
    for (name, dest) in [
        ("dropbearkey", "usr/bin/dropbearkey"),
        ("dbclient", "usr/bin/dbclient"),
    ] {
        if let Some(p) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            out.push((p, dest));
        }
    }
    out
}

/// BusyBox's applets with their full paths (`busybox --list-full`), falling
/// back to `bin/<applet>` for builds without that option.
fn applets(busybox: &Path) -> Result<Vec<String>> {
    let run = |arg: &str| {
        Command::new(busybox)
            .arg(arg)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let list = if let Some(full) = run("--list-full") {
        full.lines().map(String::from).collect::<Vec<_>>()
    } else if let Some(short) = run("--list") {
        short.lines().map(|a| format!("bin/{a}")).collect()
    } else {
        return Err(Error::Invalid(format!(
            "--busybox {}: `busybox --list` failed; is it BusyBox?",
            busybox.display()
        )));
    };
    let list: Vec<String> = list
        .into_iter()
        .filter(|p| {
            let name = p.rsplit('/').next().unwrap_or(p);
            !p.is_empty() && !p.contains("..") && !EXCLUDED_APPLETS.contains(&name)
        })
        .collect();
    if !list.iter().any(|p| p == "sbin/init" || p == "bin/init") {
        return Err(Error::Invalid(format!(
            "--busybox {}: this BusyBox has no init applet",
            busybox.display()
        )));
    }
    Ok(list)
}

/// The version line a binary reports (`busybox`, `dropbear -V`).
fn version(bin: &Path, args: &[&str], word: &str) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(Error::io("run", bin))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.contains(word))
        .map(|l| l.trim().to_string())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: does not report a {word} version; is it {word}?",
                bin.display()
            ))
        })
}

/// The Debian package a host file comes from, with its version
/// ("openssh-sftp-server 1:9.2p1-2+deb12u6"); `None` off Debian or for a
/// file no package owns.
fn package_version(path: &Path) -> Option<String> {
    let query = |args: &[&std::ffi::OsStr]| {
        Command::new("dpkg-query")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let owner = query(&["-S".as_ref(), path.as_os_str()])?;
    let package = owner.split(':').next()?.trim().to_string();
    let version = query(&["-W".as_ref(), "-f=${Version}".as_ref(), package.as_ref()])?;
    Some(format!("{package} {version}"))
}

fn source(path: &Path, version: Option<String>) -> Result<Source> {
    let mut f = fs::File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Source {
        path: path.display().to_string(),
        version: version.unwrap_or_default(),
        sha256: hex::encode(h.finalize()),
    })
}

/// Which of a template's BusyBox and Dropbear differ on the host now
/// from what it was built from (an `apt upgrade` of busybox-static or
/// dropbear-bin): their names, empty when the template is current.
pub fn stale_sources(meta: &TemplateMeta) -> Vec<&'static str> {
    [
        ("BusyBox", Some(&meta.busybox)),
        ("Dropbear", Some(&meta.dropbear)),
        ("sftp-server", meta.sftp_server.as_ref()),
        ("scp", meta.scp.as_ref()),
    ]
    .into_iter()
    .filter_map(|(name, src)| src.map(|s| (name, s)))
    .filter(|(_, src)| source(Path::new(&src.path), None).is_ok_and(|now| now.sha256 != src.sha256))
    .map(|(name, _)| name)
    .collect()
}

/// Makes directory `p` with `mode`; parents it has to make get 0755
/// (not `mode`: `etc/dropbear`'s 0700 must not make `/etc` unreadable).
fn mkdir(p: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = p.parent() {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            mkdir(parent, 0o755)?;
        }
    }
    match fs::DirBuilder::new().mode(mode).create(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
        Err(e) => return Err(Error::io("create", p)(e)),
    }
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(Error::io("chmod", p))
}

/// Copies a host file's content to `dest` (following symlinks), without
/// any setuid/setgid bit.
fn copy_binary(host: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        mkdir(parent, 0o755)?;
    }
    fs::copy(host, dest).map_err(Error::io("copy", host))?;
    let mode = fs::metadata(host).map_err(Error::io("stat", host))?.mode() & 0o755;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode | 0o444))
        .map_err(Error::io("chmod", dest))
}

#[allow(clippy::too_many_arguments)]
fn populate(
    rootfs: &Path,
    opts: &BuildOptions,
    binaries: &[Binary],
    applets: &[String],
    authorized: &[String],
    hash: Option<&str>,
    zoneinfo: Option<&Path>,
    libraries: &mut Vec<String>,
) -> Result<()> {
    for (d, mode) in [
        ("", 0o755),
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc/dropbear", 0o700),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("root", 0o700),
        ("home", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("var/run", 0o755),
        ("var/log", 0o755),
        ("usr/share", 0o755),
        ("mnt", 0o755),
    ] {
        mkdir(&rootfs.join(d), mode)?;
    }

    // Binaries and, for the dynamic ones, their loader and libraries at the
    // paths the loader searches. No host library directory is bound in.
    let mut libs = std::collections::BTreeSet::new();
    for b in binaries {
        copy_binary(&b.host, &rootfs.join(&b.dest))?;
        libs.extend(b.needs.interpreter.iter().cloned());
        libs.extend(b.needs.libraries.iter().cloned());
    }
    for lib in &libs {
        copy_binary(lib, &rootfs.join(lib.strip_prefix("/").unwrap_or(lib)))?;
        libraries.push(lib.display().to_string());
    }

    // One link per applet, where BusyBox expects it.
    for a in applets {
        let link = rootfs.join(a);
        if link.symlink_metadata().is_ok() {
            continue; // a real binary (e.g. Dropbear's) takes precedence
        }
        if let Some(parent) = link.parent() {
            mkdir(parent, 0o755)?;
        }
        symlink("/bin/busybox", &link).map_err(Error::io("symlink", &link))?;
    }
    let sftp = rootfs.join(SFTP_SERVER.trim_start_matches('/'));
    if sftp.exists() {
        let link = rootfs.join(SFTP_SERVER_LINK);
        symlink("openssh/sftp-server", &link).map_err(Error::io("symlink", &link))?;
    }
    let ssh = rootfs.join("usr/bin/ssh");
    if rootfs.join("usr/bin/dbclient").exists() && ssh.symlink_metadata().is_err() {
        symlink("dbclient", &ssh).map_err(Error::io("symlink", &ssh))?;
    }

    // /dev's entries, for the launchers to bind the host's devices onto
    // and to mount devpts on (no tmpfs per container).
    for d in crate::template::dev::DEVICES {
        write_file(&rootfs.join("dev").join(d), b"", 0o666)?;
    }
    mkdir(&rootfs.join("dev/pts"), 0o755)?;
    for (target, link) in crate::template::dev::DEV_LINKS {
        let link = rootfs.join(link.to_str().unwrap_or_default());
        symlink(target.to_str().unwrap_or_default(), &link).map_err(Error::io("symlink", &link))?;
    }

    // What /proc/net shows on the host's network (see `procnet`).
    let net = rootfs.join(procnet::DIR);
    mkdir(&net, 0o755)?;
    for (name, target) in procnet::links() {
        let link = net.join(name);
        symlink(&target, &link).map_err(Error::io("symlink", &link))?;
    }

    let user = &opts.user;
    let etc = rootfs.join("etc");
    let files: [(&str, String, u32); 10] = [
        ("os-release", os_release(), 0o644),
        ("passwd", accounts::passwd(user), 0o644),
        ("group", accounts::group(user), 0o644),
        ("shadow", accounts::shadow(user, hash), 0o600),
        ("shells", "/bin/sh\n/bin/ash\n".into(), 0o644),
        ("hostname", "nifty\n".into(), 0o644),
        ("inittab", inittab::render(None), 0o644),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n".into(),
            0o644,
        ),
        (
            "hosts",
            "127.0.0.1 localhost\n::1 localhost\n".into(),
            0o644,
        ),
        (
            "profile",
            "export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport PS1='\\h:\\w\\$ '\n".into(),
            0o644,
        ),
    ];
    for (name, text, mode) in files {
        write_file(&etc.join(name), text.as_bytes(), mode)?;
    }
    symlink("/usr/share/zoneinfo/UTC", etc.join("localtime"))
        .map_err(Error::io("symlink", etc.join("localtime")))?;
    ld_cache(rootfs, libraries)?;
    write_file(&rootfs.join("var/log/lastlog"), b"", 0o644)?;

    match zoneinfo {
        Some(dir) => copy_tree(dir, &rootfs.join("usr/share/zoneinfo"))?,
        // Without tzdata on the host (a minimal install): UTC only, which
        // is what the `localtime` link names; BusyBox reads no TZ file then.
        None => fs::create_dir_all(rootfs.join("usr/share/zoneinfo"))
            .map_err(Error::io("mkdir", rootfs.join("usr/share/zoneinfo")))?,
    }

    // The login user's home, reachable by nifty's key (and any others).
    let home = rootfs.join("home").join(user);
    let ssh_dir = home.join(".ssh");
    mkdir(&ssh_dir, 0o700)?;
    let keys_file = ssh_dir.join("authorized_keys");
    write_file(
        &keys_file,
        format!("{}\n", authorized.join("\n")).as_bytes(),
        0o600,
    )?;
    let id = Some(accounts::USER_ID);
    for p in [&home, &ssh_dir, &keys_file] {
        std::os::unix::fs::chown(p, id, id).map_err(Error::io("chown", p))?;
    }
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700))
        .map_err(Error::io("chmod", &home))?;

    strip_setuid(rootfs)
}

fn os_release() -> String {
    format!(
        "NAME=\"nifty\"\nID=nifty\nPRETTY_NAME=\"nifty BusyBox container\"\nVERSION_ID=\"{}\"\nHOME_URL=\"https://www.linuxjournal.com/content/infinite-busybox-systemd\"\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The dynamic loader's cache of the template's libraries
/// (`/etc/ld.so.cache`, made by the host's `ldconfig -r`): every exec of
/// Dropbear, sftp-server or an extra binary finds its libraries there
/// instead of probing each directory of the search path in turn. With an
/// `/etc/ld.so.conf` that names the directories the libraries are in.
/// Without ldconfig on the host (not Debian), the loader probes as before.
fn ld_cache(rootfs: &Path, libraries: &[String]) -> Result<()> {
    if libraries.is_empty() {
        return Ok(());
    }
    let dirs: std::collections::BTreeSet<&str> = libraries
        .iter()
        .filter_map(|l| Path::new(l).parent()?.to_str())
        .collect();
    let conf: String = dirs.iter().map(|d| format!("{d}\n")).collect();
    write_file(&rootfs.join("etc/ld.so.conf"), conf.as_bytes(), 0o644)?;
    let ldconfig = ["/usr/sbin/ldconfig", "/sbin/ldconfig"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    let Some(ldconfig) = ldconfig else {
        tracing::warn!("no ldconfig on this host: the template has no ld.so.cache");
        return Ok(());
    };
    let out = Command::new(ldconfig)
        .arg("-r")
        .arg(rootfs)
        .output()
        .map_err(Error::io("run", ldconfig))?;
    if !out.status.success() || !rootfs.join("etc/ld.so.cache").is_file() {
        return Err(Error::Host(format!(
            "{} -r {}: {}",
            ldconfig.display(),
            rootfs.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Copies a directory tree, keeping symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    mkdir(to, 0o755)?;
    for entry in fs::read_dir(from).map_err(Error::io("read directory", from))? {
        let entry = entry.map_err(Error::io("read directory", from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ft = entry.file_type().map_err(Error::io("stat", &src))?;
        if ft.is_symlink() {
            let target = fs::read_link(&src).map_err(Error::io("readlink", &src))?;
            symlink(&target, &dst).map_err(Error::io("symlink", &dst))?;
        } else if ft.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            fs::copy(&src, &dst).map_err(Error::io("copy", &src))?;
        }
    }
    Ok(())
}

/// Clears any setuid/setgid bit left in the tree.
fn strip_setuid(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        let entry = entry.map_err(Error::io("read directory", dir))?;
        let p = entry.path();
        let md = fs::symlink_metadata(&p).map_err(Error::io("stat", &p))?;
        if md.file_type().is_symlink() {
            continue;
        }
        if md.mode() & 0o6000 != 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(md.mode() & 0o1777))
                .map_err(Error::io("chmod", &p))?;
        }
        if md.is_dir() {
            strip_setuid(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_template_is_stale_when_the_host_binary_changed() {
        let d = tempfile::tempdir().unwrap();
        let (bb, db) = (d.path().join("busybox"), d.path().join("dropbear"));
        std::fs::write(&bb, "busybox 1").unwrap();
        std::fs::write(&db, "dropbear 1").unwrap();
        let meta = TemplateMeta {
            name: "t".into(),
            version: 1,
            built: now(),
            user: "luser".into(),
            busybox: source(&bb, None).unwrap(),
            dropbear: source(&db, None).unwrap(),
            extra: Vec::new(),
            libraries: Vec::new(),
            zoneinfo: "none".into(),
            applets: 1,
            sftp_server: None,
            scp: None,
            imported: None,
        };
        assert!(stale_sources(&meta).is_empty());
        std::fs::write(&db, "dropbear 2").unwrap();
        assert_eq!(stale_sources(&meta), ["Dropbear"]);
        // A binary gone from the host is not "newer".
        std::fs::remove_file(&bb).unwrap();
        assert_eq!(stale_sources(&meta), ["Dropbear"]);
    }

    use super::*;

    #[test]
    fn excluded_applets_are_filtered() {
        let list = applets(Path::new("/bin/busybox"));
        // busybox-static is a test dependency; without it, say so.
        let list = list.expect("Debian's busybox-static must be installed for unit tests");
        assert!(list.iter().any(|a| a == "sbin/init"));
        assert!(!list
            .iter()
            .any(|a| a.ends_with("/su") || a.ends_with("/passwd")));
    }
}
