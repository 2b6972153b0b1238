//! `nifty export` and `nifty import`.

use std::io::Write;

use anyhow::{Context, Result};
use nifty::image::{compose, import, kube, oci};

use super::Ctx;
use crate::cli::{ExportArgs, Expose, ImportArgs, Workload};

pub fn export(ctx: &Ctx, a: ExportArgs) -> Result<bool> {
    if let Some(r) = &a.image {
        oci::check_reference(r)?;
    }
    let meta = match a.template_version {
        None => ctx.store.template(&a.template)?,
        Some(v) => ctx
            .store
            .template_versions(&a.template)?
            .into_iter()
            .find(|t| t.version == v)
            .with_context(|| {
                format!(
                    "template {:?} has no version {v} on disk: see `nifty template show {}`",
                    a.template, a.template
                )
            })?,
    };
    let rootfs = ctx.store.template_rootfs_at(&meta.name, meta.version);
    let reference = a
        .image
        .clone()
        .unwrap_or_else(|| oci::default_reference(&meta));
    oci::check_reference(&reference)?;
    let (written, target) = if let Some(dir) = &a.oci {
        (
            oci::write_layout(&rootfs, &meta, dir, &reference)?,
            format!("oci:{}", dir.display()),
        )
    } else if let Some(file) = &a.oci_archive {
        (
            oci::write_archive(&rootfs, &meta, file, &reference)?,
            format!("oci-archive:{}", file.display()),
        )
    } else {
        let text = if a.kube {
            let mut keys = Vec::new();
            for f in &a.authorized_keys {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("--authorized-keys {}", f.display()))?;
                keys.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from),
                );
            }
            if keys.is_empty() {
                keys.push(nifty::keys::ensure_client_key(&ctx.store.client_key())?);
            }
            kube::manifests(&kube::Fleet {
                name: nifty::image::fleet_name(&meta.name),
                image: reference,
                replicas: a.replicas,
                expose: match a.expose {
                    Expose::Nodeport => kube::Expose::NodePort,
                    Expose::Loadbalancer => kube::Expose::LoadBalancer,
                    Expose::None => kube::Expose::None,
                },
                workload: match a.workload {
                    Workload::Statefulset => kube::Workload::StatefulSet,
                    Workload::Deployment => kube::Workload::Deployment,
                },
                user: meta.user.clone(),
                authorized_keys: keys,
            })?
        } else {
            compose::compose(&reference, a.replicas, ctx.store.port_base())?
        };
        match &a.output {
            Some(path) => nifty::disk::write_atomic(path, text.as_bytes(), 0o644)?,
            None => std::io::stdout().write_all(text.as_bytes())?,
        }
        return Ok(true);
    };
    ctx.printer.info(format!(
        "template {:?} v{} exported to {target} as {} ({}, layer {})",
        meta.name,
        meta.version,
        written.reference,
        written.manifest,
        nifty::limits::human(written.layer_size)
    ));
    Ok(true)
}

pub fn import(ctx: &Ctx, a: ImportArgs) -> Result<bool> {
    let source = if let Some(dir) = a.oci {
        import::Source::Oci {
            dir,
            reference: a.reference,
        }
    } else if let Some(file) = a.oci_archive {
        import::Source::OciArchive {
            file,
            reference: a.reference,
        }
    } else if let Some(file) = a.rootfs {
        anyhow::ensure!(
            a.reference.is_none(),
            "--ref picks an image of an OCI layout; a --rootfs tarball has one root"
        );
        import::Source::Rootfs(file)
    } else {
        anyhow::bail!("give --oci DIR, --oci-archive FILE or --rootfs FILE");
    };
    let done = import::import(
        &ctx.store,
        &import::ImportOptions {
            name: a.name,
            source,
            user: a.user,
        },
    )?;
    let m = &done.meta;
    ctx.printer.info(format!(
        "template {:?} v{} imported from {}: {}, {}, user {}; {} entries, {}",
        m.name,
        m.version,
        m.imported.as_ref().map_or("", |s| s.path.as_str()),
        m.busybox.version,
        m.dropbear.version,
        m.user,
        done.report.entries,
        nifty::limits::human(done.report.bytes)
    ));
    if !done.removed_keys.is_empty() {
        ctx.printer.info(format!(
            "removed host keys from the image (each instance gets its own): {}",
            done.removed_keys.join(" ")
        ));
    }
    if !done.report.setuid_cleared.is_empty() {
        ctx.printer.info(format!(
            "cleared setuid/setgid bits: {}",
            done.report.setuid_cleared.join(" ")
        ));
    }
    if !done.report.skipped.is_empty() {
        ctx.printer.info(format!(
            "device and FIFO entries not made (the launchers give containers their devices): {}",
            done.report.skipped.join(" ")
        ));
    }
    Ok(true)
}
