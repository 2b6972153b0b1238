//! Templates past one host: a template version as an OCI image
//! ([`oci`]), manifests that run a fleet of it on Kubernetes or Podman
//! ([`kube`], [`compose`]), and images built elsewhere made into
//! templates ([`import`], through the safe extraction of [`unpack`]).

pub mod compose;
pub mod import;
pub mod kube;
pub mod oci;
pub mod unpack;

use std::collections::HashMap;

use crate::store::TemplateMeta;

/// Label prefix of what nifty records in an image.
pub const LABEL: &str = "io.nifty";

/// `nifty-<template>` as a name registries and Kubernetes accept (a DNS
/// label: lowercase letters, digits and `-`, at most 40 characters, so
/// that pod names and their Services stay within 63).
pub fn fleet_name(template: &str) -> String {
    let mut n: String = format!("nifty-{template}")
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .collect();
    n.truncate(40);
    n.trim_end_matches('-').to_string()
}

/// The image's `/etc/inittab`: the template's, with the port from
/// `NIFTY_PORT` and host keys made at first use (Dropbear's `-R`).
pub fn image_inittab() -> String {
    crate::template::inittab::render(None)
}

/// The labels of an exported template: the OCI ones, and where its
/// BusyBox, Dropbear and sftp-server came from (versions and digests, as
/// in `template.toml`), which `nifty import` reads back.
pub fn labels(meta: &TemplateMeta) -> HashMap<String, String> {
    let mut l = HashMap::from([
        (
            "org.opencontainers.image.title".to_string(),
            format!("nifty-{}", meta.name),
        ),
        (
            "org.opencontainers.image.description".to_string(),
            "BusyBox init as PID 1 and Dropbear on $NIFTY_PORT (default 22), from a nifty template"
                .to_string(),
        ),
        (
            "org.opencontainers.image.version".to_string(),
            format!("v{}", meta.version),
        ),
        (
            "org.opencontainers.image.created".to_string(),
            meta.built.clone(),
        ),
        (format!("{LABEL}.template"), meta.name.clone()),
        (
            format!("{LABEL}.template.version"),
            meta.version.to_string(),
        ),
        (format!("{LABEL}.user"), meta.user.clone()),
    ]);
    let sources = [
        ("busybox", Some(&meta.busybox)),
        ("dropbear", Some(&meta.dropbear)),
        ("sftp-server", meta.sftp_server.as_ref()),
        ("scp", meta.scp.as_ref()),
    ];
    for (what, src) in sources {
        if let Some(s) = src {
            l.insert(format!("{LABEL}.{what}.version"), s.version.clone());
            l.insert(format!("{LABEL}.{what}.sha256"), s.sha256.clone());
        }
    }
    l
}

/// A reader or writer that hashes (SHA-256) and counts what passes
/// through it: digests of blobs as they are written or checked.
pub(crate) struct Hashing<T> {
    pub(crate) inner: T,
    hash: sha2::Sha256,
    pub(crate) count: u64,
}

impl<T> Hashing<T> {
    pub(crate) fn new(inner: T) -> Self {
        use sha2::Digest;
        Hashing {
            inner,
            hash: sha2::Sha256::new(),
            count: 0,
        }
    }

    /// `sha256:<hex>` of what passed so far.
    pub(crate) fn digest(&self) -> String {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(self.hash.clone().finalize()))
    }
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fleet_names_are_dns_labels() {
        assert_eq!(super::fleet_name("default"), "nifty-default");
        assert_eq!(super::fleet_name("Web_1"), "nifty-web-1");
        let long = super::fleet_name(&"x".repeat(64));
        assert_eq!(long.len(), 40);
    }
}
