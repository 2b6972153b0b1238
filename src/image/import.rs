//! `nifty import`: an OCI image (layout directory or archive) or a root
//! filesystem tarball made into the next version of a template.
//!
//! The image is someone else's: every blob is checked against its digest,
//! the layers are extracted by [`super::unpack`] (nothing written outside
//! the new root, no devices, no setuid bits), and the checks of
//! `template build` apply before the version appears: BusyBox init,
//! a shell, syslogd and Dropbear must be there, every ELF file's loader
//! and libraries must be in the image (for this machine's architecture),
//! host keys are removed (each instance gets its own), and the login user
//! must exist. Nothing of the image runs on the host while it is checked.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use rustix::fs::{AtFlags, FileType, OFlags};
use sha2::{Digest, Sha256};

use super::unpack::{components, Report, Tree};
use super::{Hashing, LABEL};
use crate::store::{now, Source as SourceRecord, Store, TemplateMeta};
use crate::template::{dev, new_version, procnet};
use crate::{keys, Error, Result};

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An OCI image layout directory; `reference` picks one of its images.
    Oci {
        dir: PathBuf,
        reference: Option<String>,
    },
    /// An OCI archive (the layout as one tar file).
    OciArchive {
        file: PathBuf,
        reference: Option<String>,
    },
    /// A root filesystem tarball (`.tar` or `.tar.gz`).
    Rootfs(PathBuf),
}

/// What `nifty import` is asked for.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub name: String,
    pub source: Source,
    /// The login user [default: the image's `io.nifty.user` label, else
    /// `luser`].
    pub user: Option<String>,
}

/// What an import made, and what it changed on the way.
#[derive(Debug, Clone)]
pub struct Imported {
    pub meta: TemplateMeta,
    pub report: Report,
    /// Host keys found in the image and removed.
    pub removed_keys: Vec<String>,
}

/// JSON documents of an image are small; more than this is refused.
const MAX_DOCUMENT: u64 = 4 << 20;
/// ELF files larger than this are not parsed (and refused).
const MAX_ELF: u64 = 512 << 20;

/// Imports an image as the next version of template `opts.name`.
pub fn import(store: &Store, opts: &ImportOptions) -> Result<Imported> {
    crate::names::check_name("template", &opts.name)?;
    if let Some(u) = &opts.user {
        crate::names::check_user(u)?;
    }
    store.ensure()?;
    let client_key = keys::ensure_client_key(&store.client_key())?;
    // An archive is unpacked (safely, like a layer) to read it as a layout.
    let scratch =
        store
            .templates_dir()
            .join(format!(".import-{}-{}", opts.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = (|| {
        let (origin, plan) = match &opts.source {
            Source::Oci { dir, reference } => {
                let origin = format!("oci:{}", dir.display());
                (
                    origin.clone(),
                    Plan::Image(select(dir, reference.as_deref(), &origin)?),
                )
            }
            Source::OciArchive { file, reference } => {
                let origin = format!("oci-archive:{}", file.display());
                let f = std::fs::File::open(file).map_err(Error::io("open", file))?;
                let mut t = Tree::create(&scratch)?;
                t.apply(io::BufReader::new(f), false, &origin)?;
                (
                    origin.clone(),
                    Plan::Image(select(&scratch, reference.as_deref(), &origin)?),
                )
            }
            Source::Rootfs(file) => {
                let origin = format!("rootfs:{}", file.display());
                (origin, Plan::Rootfs(file.clone()))
            }
        };
        let mut out = None;
        let meta = new_version(store, &opts.name, |rootfs, version| {
            let mut tree = Tree::create(rootfs)?;
            let (labels, provenance) = match &plan {
                Plan::Image(img) => {
                    for layer in &img.layers {
                        apply_layer(&mut tree, layer, &origin)?;
                    }
                    let hex = img
                        .manifest_digest
                        .trim_start_matches("sha256:")
                        .to_string();
                    (
                        img.labels.clone(),
                        SourceRecord {
                            path: origin.clone(),
                            version: img.reference.clone().unwrap_or_default(),
                            sha256: hex,
                        },
                    )
                }
                Plan::Rootfs(file) => {
                    let f = std::fs::File::open(file).map_err(Error::io("open", file))?;
                    let mut h = Hashing::new(io::BufReader::new(f));
                    apply_tarball(&mut tree, &mut h, &origin)?;
                    io::copy(&mut h, &mut io::sink()).map_err(Error::io("read", file))?;
                    let hex = h.digest().trim_start_matches("sha256:").to_string();
                    (
                        Default::default(),
                        SourceRecord {
                            path: origin.clone(),
                            version: String::new(),
                            sha256: hex,
                        },
                    )
                }
            };
            let (meta, removed_keys) = finish(
                &tree,
                &opts.name,
                version,
                opts.user.as_deref(),
                &labels,
                provenance,
                &client_key,
            )?;
            out = Some((tree.report.clone(), removed_keys));
            Ok(meta)
        })?;
        let (report, removed_keys) = out.unwrap_or_default();
        Ok(Imported {
            meta,
            report,
            removed_keys,
        })
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

enum Plan {
    Image(Image),
    Rootfs(PathBuf),
}

/// One image of a layout, its documents read and checked.
struct Image {
    manifest_digest: String,
    reference: Option<String>,
    labels: std::collections::HashMap<String, String>,
    layers: Vec<Layer>,
}

struct Layer {
    path: PathBuf,
    digest: String,
    size: u64,
    gzip: bool,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Picks the image of a layout: the one named `reference`, else the only
/// one for this machine.
fn select(dir: &Path, reference: Option<&str>, origin: &str) -> Result<Image> {
    let index_path = dir.join("index.json");
    let index = read_limited(&index_path, origin)?;
    let index: ImageIndex = serde_json::from_slice(&index).map_err(|e| {
        Error::Invalid(format!(
            "{origin}: index.json: {e}; is it an OCI image layout?"
        ))
    })?;
    let mut candidates = Vec::new();
    collect(dir, &index, origin, 0, &mut candidates)?;
    let host = super::oci::arch();
    let fits = |d: &Descriptor| {
        d.platform().as_ref().map_or(true, |p| {
            p.architecture() == &host && p.os() == &oci_spec::image::Os::Linux
        })
    };
    let named = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned()
    };
    let chosen: Vec<&Descriptor> = match reference {
        Some(r) => candidates
            .iter()
            .filter(|d| named(d).is_some_and(|n| n == r || n.rsplit(':').next() == Some(r)))
            .filter(|d| fits(d))
            .collect(),
        None => candidates.iter().filter(|d| fits(d)).collect(),
    };
    let names: Vec<String> = candidates.iter().filter_map(named).collect();
    let desc = match chosen.as_slice() {
        [one] => *one,
        [] => {
            return Err(Error::Invalid(match reference {
                Some(r) => format!(
                    "{origin}: no image named {r:?} for linux/{host}; the layout has: {}",
                    names.join(", ")
                ),
                None => format!("{origin}: no image for linux/{host} in this layout"),
            }))
        }
        _ => {
            return Err(Error::Invalid(format!(
                "{origin}: several images; pick one with --ref ({})",
                names.join(", ")
            )))
        }
    };
    let manifest: ImageManifest = read_document(dir, desc, origin)?;
    let config: ImageConfiguration = read_document(dir, manifest.config(), origin)?;
    if config.os() != &oci_spec::image::Os::Linux || config.architecture() != &host {
        return Err(Error::Invalid(format!(
            "{origin}: the image is for {}/{}; this machine runs linux/{host}",
            config.os(),
            config.architecture()
        )));
    }
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let gzip = match l.media_type() {
            MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => false,
            MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => true,
            MediaType::Other(t) if t == "application/vnd.docker.image.rootfs.diff.tar.gzip" => true,
            other => {
                return Err(Error::Invalid(format!(
                    "{origin}: a layer of type {other}, which nifty does not read; convert it with `skopeo copy --dest-compress-format gzip`"
                )))
            }
        };
        layers.push(Layer {
            path: blob_path(dir, l, origin)?,
            digest: l.digest().to_string(),
            size: l.size(),
            gzip,
        });
    }
    Ok(Image {
        manifest_digest: desc.digest().to_string(),
        reference: named(desc),
        labels: config
            .config()
            .as_ref()
            .and_then(|c| c.labels().clone())
            .unwrap_or_default(),
        layers,
    })
}

/// The image manifests an index names, through nested indexes.
fn collect(
    dir: &Path,
    index: &ImageIndex,
    origin: &str,
    depth: u32,
    out: &mut Vec<Descriptor>,
) -> Result<()> {
    if depth > 4 {
        return Err(Error::Invalid(format!("{origin}: indexes nested too deep")));
    }
    for d in index.manifests() {
        match d.media_type() {
            MediaType::ImageIndex => {
                let nested: ImageIndex = read_document(dir, d, origin)?;
                collect(dir, &nested, origin, depth + 1, out)?;
            }
            MediaType::ImageManifest => out.push(d.clone()),
            MediaType::Other(t)
                if t.starts_with("application/vnd.docker.distribution.manifest.v2") =>
            {
                out.push(d.clone())
            }
            _ => {}
        }
    }
    Ok(())
}

/// The path of a blob, from a digest checked to be `sha256:<64 hex>`.
fn blob_path(dir: &Path, d: &Descriptor, origin: &str) -> Result<PathBuf> {
    let digest = d.digest().to_string();
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::Invalid(format!(
            "{origin}: digest {digest}: only sha256 digests are read"
        )));
    }
    Ok(dir.join("blobs/sha256").join(hex))
}

fn read_limited(path: &Path, origin: &str) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    let mut data = Vec::new();
    f.take(MAX_DOCUMENT + 1)
        .read_to_end(&mut data)
        .map_err(Error::io("read", path))?;
    if data.len() as u64 > MAX_DOCUMENT {
        return Err(Error::Invalid(format!(
            "{origin}: {} is larger than an image document can be",
            path.display()
        )));
    }
    Ok(data)
}

/// A JSON blob, checked against its descriptor's size and digest.
fn read_document<T: serde::de::DeserializeOwned>(
    dir: &Path,
    d: &Descriptor,
    origin: &str,
) -> Result<T> {
    let path = blob_path(dir, d, origin)?;
    let data = read_limited(&path, origin)?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    if data.len() as u64 != d.size() || digest != d.digest().to_string() {
        return Err(Error::Invalid(format!(
            "{origin}: blob {} does not match its digest or size; the image is damaged",
            d.digest()
        )));
    }
    serde_json::from_slice(&data)
        .map_err(|e| Error::Invalid(format!("{origin}: blob {}: {e}", d.digest())))
}

/// Applies one layer, its digest and size checked first: a layer that
/// is not the one the manifest names is never extracted.
fn apply_layer(tree: &mut Tree, layer: &Layer, origin: &str) -> Result<()> {
    let open = || std::fs::File::open(&layer.path).map_err(Error::io("open", &layer.path));
    let mut h = Hashing::new(io::BufReader::new(open()?));
    io::copy(&mut h, &mut io::sink()).map_err(Error::io("read", &layer.path))?;
    if h.digest() != layer.digest || h.count != layer.size {
        return Err(Error::Invalid(format!(
            "{origin}: layer {} does not match its digest or size; the image is damaged",
            layer.digest
        )));
    }
    let f = io::BufReader::new(open()?);
    if layer.gzip {
        let mut gz = flate2::read::GzDecoder::new(f);
        tree.apply(&mut gz, true, origin)
    } else {
        tree.apply(f, true, origin)
    }
}

/// A root filesystem tarball, gzipped or not.
fn apply_tarball<R: Read>(tree: &mut Tree, r: &mut R, origin: &str) -> Result<()> {
    let mut r = io::BufReader::new(r);
    let head = io::BufRead::fill_buf(&mut r)
        .map_err(|e| Error::Invalid(format!("{origin}: {e}")))?
        .to_vec();
    match head.as_slice() {
        [0x1f, 0x8b, ..] => {
            let mut gz = flate2::read::GzDecoder::new(&mut r);
            tree.apply(&mut gz, false, origin)?;
            io::copy(&mut gz, &mut io::sink())
                .map_err(|e| Error::Invalid(format!("{origin}: {e}")))?;
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..]
        | [0xfd, b'7', b'z', b'X', b'Z', ..]
        | [b'B', b'Z', b'h', ..] => {
            return Err(Error::Invalid(format!(
                "{origin}: compressed with zstd, xz or bzip2; give it as .tar or .tar.gz"
            )))
        }
        _ => tree.apply(&mut r, false, origin)?,
    }
    Ok(())
}

/// What nifty needs in a template, beside what its launchers make.
const REQUIRED: [(&str, &str); 4] = [
    ("sbin/init", "BusyBox init, PID 1 of every instance"),
    ("bin/sh", "the login shell"),
    ("sbin/syslogd", "BusyBox syslogd, which init starts"),
    ("usr/sbin/dropbear", "Dropbear, the SSH server"),
];

/// Checks and completes an extracted root; returns its record and the
/// host keys removed.
fn finish(
    tree: &Tree,
    name: &str,
    version: u32,
    user: Option<&str>,
    labels: &std::collections::HashMap<String, String>,
    provenance: SourceRecord,
    client_key: &str,
) -> Result<(TemplateMeta, Vec<String>)> {
    let origin = &provenance.path;
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|(p, _)| !is_file(tree, p))
        .map(|(p, what)| format!("/{p} ({what})"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Invalid(format!(
            "{origin}: not a nifty image: missing {}; build images with `nifty template build` and `nifty export`",
            missing.join(", ")
        )));
    }

    // Host keys: every instance gets its own.
    let mut removed_keys = Vec::new();
    for (dir, prefix, suffix) in [
        ("etc/dropbear", "dropbear_", "_host_key"),
        ("etc/ssh", "ssh_host_", ""),
    ] {
        for n in list(tree, dir)? {
            if n.starts_with(prefix) && n.ends_with(suffix) {
                let rel = format!("{dir}/{n}");
                tree.remove(&rel)?;
                removed_keys.push(format!("/{rel}"));
            }
        }
    }

    // What the launchers mount on and bind onto.
    for (d, mode) in [
        ("dev", 0o755),
        ("dev/pts", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("etc/dropbear", 0o700),
        ("var/log", 0o755),
    ] {
        if !is_dir(tree, d) {
            tree.mkdir(d, 0, 0, mode)?;
        }
    }
    for d in dev::DEVICES {
        let rel = format!("dev/{d}");
        if !is_file(tree, &rel) {
            tree.write(&rel, b"", 0, 0, 0o666)?;
        }
    }
    let devdir = tree
        .open("dev", OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(|e| Error::Invalid(format!("{origin}: /dev: {e}")))?;
    for (target, link) in dev::DEV_LINKS {
        let leaf = link
            .to_bytes()
            .strip_prefix(b"dev/")
            .unwrap_or(link.to_bytes());
        let leaf = std::ffi::OsStr::new(std::str::from_utf8(leaf).unwrap_or_default());
        if rustix::fs::statat(&devdir, leaf, AtFlags::SYMLINK_NOFOLLOW).is_err() {
            rustix::fs::symlinkat(target, &devdir, leaf).map_err(|e| Error::Sys {
                call: format!("symlink /{}", link.to_string_lossy()),
                err: e.into(),
            })?;
        }
    }

    // What /proc/net shows on the host's network (see `procnet`): nifty's
    // directory, whatever the image had there.
    tree.remove(procnet::DIR)?;
    tree.mkdir(procnet::DIR, 0, 0, 0o755)?;
    let netdir = tree
        .open(procnet::DIR, OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(|e| Error::Invalid(format!("{origin}: /{}: {e}", procnet::DIR)))?;
    for (name, target) in procnet::links() {
        rustix::fs::symlinkat(target.as_str(), &netdir, name).map_err(|e| Error::Sys {
            call: format!("symlink /{}/{name}", procnet::DIR),
            err: e.into(),
        })?;
    }

    // The login user, and nifty's key in its authorized_keys.
    let user = user
        .map(String::from)
        .or_else(|| labels.get(&format!("{LABEL}.user")).cloned())
        .unwrap_or_else(|| "luser".to_string());
    let passwd = tree.read("etc/passwd", 1 << 20)?.unwrap_or_default();
    let entry = String::from_utf8_lossy(&passwd)
        .lines()
        .map(|l| l.split(':').map(String::from).collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{origin}: user {user:?} is not in the image's /etc/passwd; name its login user with --user"
            ))
        })?;
    let (uid, gid): (u32, u32) = match (entry[2].parse(), entry[3].parse()) {
        (Ok(u), Ok(g)) if u != 0 && u < 65536 && g < 65536 => (u, g),
        _ => {
            return Err(Error::Invalid(format!(
                "{origin}: user {user:?} has uid {} gid {}; the login user needs its own IDs below 65536, not root's",
                entry[2], entry[3]
            )))
        }
    };
    let home = entry[5].trim_start_matches('/').to_string();
    if components(home.as_bytes())?.is_empty() {
        return Err(Error::Invalid(format!(
            "{origin}: user {user:?} has / as its home"
        )));
    }
    if !is_dir(tree, &home) {
        tree.mkdir(&home, uid, gid, 0o700)?;
    }
    let ssh = format!("{home}/.ssh");
    if !is_dir(tree, &ssh) {
        tree.mkdir(&ssh, uid, gid, 0o700)?;
    }
    let keys_rel = format!("{ssh}/authorized_keys");
    let mut keys = tree
        .read(&keys_rel, 1 << 20)?
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .unwrap_or_default();
    if !keys.lines().any(|l| l.trim() == client_key) {
        if !keys.is_empty() && !keys.ends_with('\n') {
            keys.push('\n');
        }
        keys.push_str(client_key);
        keys.push('\n');
        tree.write(&keys_rel, keys.as_bytes(), uid, gid, 0o600)?;
    }

    let libraries = check_elves(tree, origin)?;
    let source =
        |what: &str, rel: &str, scan: &dyn Fn(&[u8]) -> Option<String>| -> Result<SourceRecord> {
            let data = tree.read(rel, MAX_ELF)?.unwrap_or_default();
            let version = labels
                .get(&format!("{LABEL}.{what}.version"))
                .cloned()
                .or_else(|| scan(&data))
                .unwrap_or_default();
            Ok(SourceRecord {
                path: format!("{origin}:/{rel}"),
                version,
                sha256: hex::encode(Sha256::digest(&data)),
            })
        };
    let busybox = source("busybox", "sbin/init", &|d| {
        find_text(d, b"BusyBox v", b')').map(|v| format!("{v})"))
    })?;
    let dropbear = source("dropbear", "usr/sbin/dropbear", &|d| {
        find_text(d, b"SSH-2.0-dropbear_", 0).map(|v| format!("Dropbear v{}", &v[17..]))
    })?;
    let sftp = is_file(tree, "usr/lib/openssh/sftp-server")
        .then(|| source("sftp-server", "usr/lib/openssh/sftp-server", &|_| None))
        .transpose()?;
    let scp = is_file(tree, "usr/bin/scp")
        .then(|| source("scp", "usr/bin/scp", &|_| None))
        .transpose()?;
    let meta = TemplateMeta {
        name: name.to_string(),
        version,
        built: now(),
        user,
        busybox,
        dropbear,
        extra: Vec::new(),
        libraries,
        zoneinfo: if is_dir(tree, "usr/share/zoneinfo") {
            "copied".into()
        } else {
            "none".into()
        },
        applets: count_applets(tree)?,
        sftp_server: sftp,
        scp,
        imported: Some(provenance),
    };
    Ok((meta, removed_keys))
}

fn stat(tree: &Tree, rel: &str) -> Option<FileType> {
    let fd = tree.open(rel, OFlags::PATH).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    Some(FileType::from_raw_mode(st.st_mode))
}

fn is_file(tree: &Tree, rel: &str) -> bool {
    stat(tree, rel) == Some(FileType::RegularFile)
}

fn is_dir(tree: &Tree, rel: &str) -> bool {
    stat(tree, rel) == Some(FileType::Directory)
}

/// The names in a directory of the tree (none if it is not there).
fn list(tree: &Tree, rel: &str) -> Result<Vec<String>> {
    let Ok(fd) = tree.open(rel, OFlags::RDONLY | OFlags::DIRECTORY) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut it = rustix::fs::Dir::read_from(&fd).map_err(|e| Error::Sys {
        call: format!("read directory /{rel}"),
        err: e.into(),
    })?;
    while let Some(Ok(e)) = it.next() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

/// The printable text from `start` to `end` (or the first unprintable
/// byte) in a binary.
fn find_text(data: &[u8], start: &[u8], end: u8) -> Option<String> {
    let at = data.windows(start.len()).position(|w| w == start)?;
    let rest = &data[at..];
    let len = rest
        .iter()
        .take(80)
        .position(|b| *b == end || !(0x20..0x7f).contains(b))
        .unwrap_or(rest.len().min(80));
    Some(String::from_utf8_lossy(&rest[..len]).into_owned())
}

/// BusyBox's applet links in the usual directories.
fn count_applets(tree: &Tree) -> Result<usize> {
    let mut n = 0;
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin"] {
        let Ok(fd) = tree.open(dir, OFlags::RDONLY | OFlags::DIRECTORY) else {
            continue;
        };
        for name in list(tree, dir)? {
            if let Ok(target) = rustix::fs::readlinkat(&fd, name.as_str(), Vec::new()) {
                if target.to_bytes().ends_with(b"busybox") {
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}

/// The ELF machine of this build of nifty.
fn host_machine() -> Option<u16> {
    match std::env::consts::ARCH {
        "x86_64" => Some(goblin::elf::header::EM_X86_64),
        "aarch64" => Some(goblin::elf::header::EM_AARCH64),
        _ => None,
    }
}

/// Checks that every ELF file of the tree finds its loader and libraries
/// in the tree and is built for this machine; returns the libraries.
fn check_elves(tree: &Tree, origin: &str) -> Result<Vec<String>> {
    let search = library_dirs(tree)?;
    let mut problems = Vec::new();
    let mut libraries = BTreeSet::new();
    for rel in elf_files(tree)? {
        let Some(data) = tree.read(&rel, MAX_ELF)? else {
            continue;
        };
        let elf = match goblin::elf::Elf::parse(&data) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("/{rel}: unreadable ELF ({e})"));
                continue;
            }
        };
        if let Some(m) = host_machine() {
            if elf.header.e_machine != m
                && (elf.interpreter.is_some() || elf.header.e_type == goblin::elf::header::ET_EXEC)
            {
                problems.push(format!(
                    "/{rel}: built for another machine ({}); this one runs {}",
                    goblin::elf::header::machine_to_str(elf.header.e_machine),
                    std::env::consts::ARCH
                ));
                continue;
            }
        }
        if let Some(interp) = elf.interpreter {
            if !is_file(tree, interp) {
                problems.push(format!("/{rel}: its loader {interp} is not in the image"));
            }
        }
        let dir_of = Path::new(&rel)
            .parent()
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_default();
        let own: Vec<String> = elf
            .runpaths
            .iter()
            .chain(elf.rpaths.iter())
            .flat_map(|p| p.split(':'))
            .map(|p| p.replace("$ORIGIN", &dir_of).replace("${ORIGIN}", &dir_of))
            .collect();
        for lib in &elf.libraries {
            let found = if lib.contains('/') {
                is_file(tree, lib).then(|| lib.to_string())
            } else {
                own.iter()
                    .chain(search.iter())
                    .map(|d| format!("{}/{lib}", d.trim_end_matches('/')))
                    .find(|p| is_file(tree, p))
            };
            match found {
                Some(p) => {
                    libraries.insert(p);
                }
                None => problems.push(format!("/{rel}: needs {lib}, which is not in the image")),
            }
        }
    }
    if !problems.is_empty() {
        problems.truncate(10);
        return Err(Error::Invalid(format!(
            "{origin}: the image's programs cannot run:\n  {}",
            problems.join("\n  ")
        )));
    }
    Ok(libraries.into_iter().collect())
}

/// The loader's search path in the tree: its ld.so.conf (with included
/// files), then the usual directories.
fn library_dirs(tree: &Tree) -> Result<Vec<String>> {
    let mut text =
        String::from_utf8_lossy(&tree.read("etc/ld.so.conf", 1 << 20)?.unwrap_or_default())
            .into_owned();
    if text.lines().any(|l| l.trim_start().starts_with("include")) {
        for n in list(tree, "etc/ld.so.conf.d")? {
            if n.ends_with(".conf") {
                let more = tree
                    .read(&format!("etc/ld.so.conf.d/{n}"), 1 << 20)?
                    .unwrap_or_default();
                text.push('\n');
                text.push_str(&String::from_utf8_lossy(&more));
            }
        }
    }
    let mut dirs: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with('/'))
        .map(String::from)
        .collect();
    let triple = format!("{}-linux-gnu", std::env::consts::ARCH);
    for d in ["/lib", "/usr/lib", "/lib64", "/usr/lib64"] {
        dirs.push(format!("{d}/{triple}"));
        dirs.push(d.to_string());
    }
    Ok(dirs)
}

/// Every regular file of the tree that starts with the ELF magic and is
/// executable or named like a library; links are not followed.
fn elf_files(tree: &Tree) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let rel = if dir.is_empty() {
            ".".to_string()
        } else {
            dir.clone()
        };
        let Ok(dfd) = tree.open(&rel, OFlags::PATH | OFlags::DIRECTORY) else {
            continue;
        };
        for n in list(tree, &rel)? {
            let path = if dir.is_empty() {
                n.clone()
            } else {
                format!("{dir}/{n}")
            };
            let Ok(st) = rustix::fs::statat(&dfd, n.as_str(), AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => stack.push(path),
                FileType::RegularFile if st.st_mode & 0o111 != 0 || n.contains(".so") => {
                    let Ok(fd) = rustix::fs::openat(
                        &dfd,
                        n.as_str(),
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                    ) else {
                        continue;
                    };
                    let mut magic = [0u8; 4];
                    if std::fs::File::from(fd).read_exact(&mut magic).is_ok()
                        && &magic == b"\x7fELF"
                    {
                        out.push(path);
                    }
                }
                _ => {}
            }
        }
    }
    out.sort();
    Ok(out)
}
