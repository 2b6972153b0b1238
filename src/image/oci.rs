//! A template version as an OCI image: an image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) or the same as one tar
//! file (an "oci-archive", what `podman load` and `skopeo` read).
//!
//! Reproducible: the layer's entries are in name order with the
//! template's build time as every mtime, no user or group names and no
//! extended attributes; gzip carries no time or name; the JSON documents
//! are written with sorted keys. The same template version exports to
//! the same manifest digest on any host.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, RootFsBuilder,
};
use sha2::{Digest, Sha256};

use super::{image_inittab, labels, Hashing};
use crate::store::TemplateMeta;
use crate::template::inittab::PORT_ENV;
use crate::{Error, Result};

/// The signal that makes BusyBox init power the container off.
pub const STOP_SIGNAL: &str = "SIGUSR2";

/// What was written.
#[derive(Debug, Clone)]
pub struct Exported {
    /// `sha256:…` of the image manifest: the image's identity.
    pub manifest: String,
    /// The reference the image is named by in the layout.
    pub reference: String,
    /// Size of the compressed layer, in bytes.
    pub layer_size: u64,
}

/// Checks an image reference (`--image`): what registries and
/// `podman load` accept, `[registry/]path[:tag]`, in one line.
pub fn check_reference(r: &str) -> Result<()> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
        && !r.starts_with(['/', ':', '-', '.'])
        && !r.ends_with(['/', ':']);
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "--image {r:?}: not an image reference; give one like localhost/nifty-default:v1 or registry.example.com/team/nifty:1"
        )))
    }
}

/// The default reference of an exported template version.
pub fn default_reference(meta: &TemplateMeta) -> String {
    format!(
        "localhost/{}:v{}",
        super::fleet_name(&meta.name),
        meta.version
    )
}

/// Writes template `meta` (one version, its root at `rootfs`) as an OCI
/// image layout in `dir`, which must not exist or be empty. It is made
/// beside `dir` and renamed into place: a failure leaves nothing.
pub fn write_layout(
    rootfs: &Path,
    meta: &TemplateMeta,
    dir: &Path,
    reference: &str,
) -> Result<Exported> {
    let empty = match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(Error::io("read directory", dir)(e)),
    };
    if !empty {
        return Err(Error::Invalid(format!(
            "--oci {}: not empty; give a new directory",
            dir.display()
        )));
    }
    let tmp = sibling(dir, "tmp")?;
    let result = build_layout(rootfs, meta, &tmp, reference).and_then(|out| {
        let _ = fs::remove_dir(dir);
        fs::rename(&tmp, dir).map_err(Error::io("rename into place", dir))?;
        Ok(out)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes the same image as one tar file (an OCI archive) at `file`.
pub fn write_archive(
    rootfs: &Path,
    meta: &TemplateMeta,
    file: &Path,
    reference: &str,
) -> Result<Exported> {
    let tmp = sibling(file, "layout")?;
    let part = sibling(file, "part")?;
    let result = (|| {
        let out = build_layout(rootfs, meta, &tmp, reference)?;
        let f = fs::File::create(&part).map_err(Error::io("create", &part))?;
        let mut tar = tar::Builder::new(io::BufWriter::new(f));
        append_tree(&mut tar, &tmp, Path::new(""), 0, false).map_err(Error::io("write", &part))?;
        let mut w = tar.into_inner().map_err(Error::io("write", &part))?;
        w.flush().map_err(Error::io("write", &part))?;
        fs::rename(&part, file).map_err(Error::io("rename into place", file))?;
        Ok(out)
    })();
    let _ = fs::remove_dir_all(&tmp);
    if result.is_err() {
        let _ = fs::remove_file(&part);
    }
    result
}

/// A hidden name beside `path` for work in progress.
fn sibling(path: &Path, what: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::Invalid(format!("{}: give a file or directory name", path.display()))
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: directory {} does not exist",
            path.display(),
            parent.display()
        )));
    }
    Ok(parent.join(format!(
        ".{}.{what}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn build_layout(
    rootfs: &Path,
    meta: &TemplateMeta,
    dir: &Path,
    reference: &str,
) -> Result<Exported> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(Error::io("create", &blobs))?;
    let mtime = build_time(meta);

    // The layer: tar, hashed (diff ID) and gzipped, hashed again (digest).
    let part = blobs.join(".layer");
    let f = fs::File::create(&part).map_err(Error::io("create", &part))?;
    let gz =
        flate2::GzBuilder::new().write(Hashing::new(io::BufWriter::new(f)), Compression::new(6));
    let mut tar = tar::Builder::new(Hashing::new(gz));
    append_tree(&mut tar, rootfs, Path::new(""), mtime, true).map_err(Error::io("read", rootfs))?;
    let tarred = tar.into_inner().map_err(Error::io("write", &part))?;
    let diff_id = tarred.digest();
    let gz = tarred.inner.finish().map_err(Error::io("write", &part))?;
    let layer_digest = gz.digest();
    let layer_size = gz.count;
    gz.inner
        .into_inner()
        .map_err(|e| Error::io("write", &part)(e.into_error()))?
        .sync_all()
        .map_err(Error::io("write", &part))?;
    let layer_path = blobs.join(&layer_digest[7..]);
    fs::rename(&part, &layer_path).map_err(Error::io("rename", &layer_path))?;

    let created = meta.built.clone();
    let label_map = labels(meta);
    let config = ConfigBuilder::default()
        .entrypoint(vec!["/sbin/init".to_string()])
        .env(vec![
            "PATH=/bin:/sbin:/usr/bin:/usr/sbin".to_string(),
            format!("{PORT_ENV}=22"),
        ])
        .exposed_ports(vec!["22/tcp".to_string()])
        .stop_signal(STOP_SIGNAL)
        .labels(label_map)
        .build()
        .map_err(spec_err)?;
    let image_config = ImageConfigurationBuilder::default()
        .created(created.clone())
        .architecture(arch())
        .os(Os::Linux)
        .config(config)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()
                .map_err(spec_err)?,
        )
        .history(vec![HistoryBuilder::default()
            .created(created.clone())
            .created_by(format!(
                "nifty {} export {} v{}",
                env!("CARGO_PKG_VERSION"),
                meta.name,
                meta.version
            ))
            .build()
            .map_err(spec_err)?])
        .build()
        .map_err(spec_err)?;
    let config_desc = write_blob(
        &blobs,
        MediaType::ImageConfig,
        &canonical(&image_config)?,
        None,
    )?;
    let layer_desc = DescriptorBuilder::default()
        .media_type(MediaType::ImageLayerGzip)
        .digest(parse_digest(&layer_digest)?)
        .size(layer_size)
        .build()
        .map_err(spec_err)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(vec![layer_desc])
        .build()
        .map_err(spec_err)?;
    let annotations = HashMap::from([(
        "org.opencontainers.image.ref.name".to_string(),
        reference.to_string(),
    )]);
    let manifest_desc = write_blob(
        &blobs,
        MediaType::ImageManifest,
        &canonical(&manifest)?,
        Some(annotations),
    )?;
    let manifest_digest = manifest_desc.digest().to_string();
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()
        .map_err(spec_err)?;
    crate::disk::write_file(&dir.join("index.json"), &canonical(&index)?, 0o644)?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec_err)?;
    crate::disk::write_file(&dir.join("oci-layout"), &canonical(&layout)?, 0o644)?;
    Ok(Exported {
        manifest: manifest_digest,
        reference: reference.to_string(),
        layer_size,
    })
}

/// The template's build time as seconds since the epoch (every entry's
/// mtime in the layer); 0 if the record's time cannot be read.
fn build_time(meta: &TemplateMeta) -> u64 {
    humantime::parse_rfc3339(&meta.built)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// The image architecture of this build of nifty (the template's
/// binaries are the host's).
pub(crate) fn arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        "riscv64" => Arch::RISCV64,
        "powerpc64" => Arch::PowerPC64le,
        "s390x" => Arch::s390x,
        other => Arch::Other(other.to_string()),
    }
}

fn spec_err(e: oci_spec::OciSpecError) -> Error {
    Error::Invalid(format!("OCI image document: {e}"))
}

pub(crate) fn parse_digest(d: &str) -> Result<oci_spec::image::Digest> {
    d.parse().map_err(spec_err)
}

/// A JSON document with sorted keys (oci-spec keeps maps as HashMaps,
/// whose order changes from run to run): the same content, the same bytes.
fn canonical<T: serde::Serialize>(doc: &T) -> Result<Vec<u8>> {
    let value = serde_json::to_value(doc)
        .map_err(|e| Error::Invalid(format!("OCI image document: {e}")))?;
    serde_json::to_vec(&value).map_err(|e| Error::Invalid(format!("OCI image document: {e}")))
}

fn write_blob(
    blobs: &Path,
    media_type: MediaType,
    data: &[u8],
    annotations: Option<HashMap<String, String>>,
) -> Result<Descriptor> {
    let hex = hex::encode(Sha256::digest(data));
    crate::disk::write_file(&blobs.join(&hex), data, 0o644)?;
    let mut b = DescriptorBuilder::default()
        .media_type(media_type)
        .digest(parse_digest(&format!("sha256:{hex}"))?)
        .size(data.len() as u64);
    if let Some(a) = annotations {
        b = b.annotations(a);
    }
    b.build().map_err(spec_err)
}

/// Appends the tree under `dir` (named `prefix` in the archive), in name
/// order. `as_layer`: a root filesystem (owners and modes kept, mtimes
/// set to `mtime`, the image's inittab in place of the template's);
/// otherwise plain files of the layout, owned by root.
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    prefix: &Path,
    mtime: u64,
    as_layer: bool,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = prefix.join(e.file_name());
        let md = fs::symlink_metadata(&path)?;
        let mut h = tar::Header::new_gnu();
        let (uid, gid, mode) = if as_layer {
            (md.uid(), md.gid(), md.mode() & 0o7777)
        } else {
            (0, 0, md.mode() & 0o755)
        };
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_mode(mode);
        h.set_mtime(mtime);
        let ft = md.file_type();
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            tar.append_data(&mut h, &name, io::empty())?;
            append_tree(tar, &path, &name, mtime, as_layer)?;
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            tar.append_link(&mut h, &name, fs::read_link(&path)?)?;
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            if as_layer && name == Path::new("etc/inittab") {
                let text = image_inittab();
                h.set_size(text.len() as u64);
                tar.append_data(&mut h, &name, text.as_bytes())?;
            } else {
                // The size read above, even if the file changed since.
                h.set_size(md.len());
                let f = fs::File::open(&path)?;
                tar.append_data(&mut h, &name, io::Read::take(f, md.len()))?;
            }
        }
        // Sockets, FIFOs and devices: a template has none (its /dev holds
        // empty files for the launchers to bind devices onto).
    }
    Ok(())
}
