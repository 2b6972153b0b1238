//! Provisioning: a new instance from a template. Its upper layer gets its
//! own identity (host key, hostname, machine-id, an inittab with its port),
//! owned by its ID range; its port and range are claimed; its record is
//! written; and it appears under its name only when complete.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::disk::write_file;
use crate::names::check_name;
use crate::store::{
    now, parse_bind, unprivileged_port_start, Backend, Instance, Limits, Security, Store,
    TemplateMeta,
};
use crate::{keys, Error, Result};

/// What `create` needs to know about a new instance.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub name: String,
    pub template: String,
    pub backend: Backend,
    pub port: Option<u16>,
    pub limits: Limits,
    pub bind_ro: Vec<String>,
    /// Map container root to an unprivileged host range.
    pub userns: bool,
    pub seccomp: bool,
    pub drop_caps: bool,
    /// Started by `nifty serve` at its first connection (no Dropbear of
    /// its own in its inittab).
    pub on_demand: Option<crate::store::OnDemand>,
    /// Its network (`none` only for on-demand instances).
    pub network: crate::store::Network,
}

/// Directories of the template that BusyBox init, syslogd and Dropbear
/// write into at every boot, parents first.
const BOOT_WRITES: &[&str] = &["dev", "var", "var/run"];

/// Creates one instance: its upper layer with its own identity (host
/// key, hostname, machine-id), its port claim and its record. The
/// instance appears under its name only when complete (rename); on any
/// error nothing of it remains.
pub fn create(store: &Store, spec: &CreateSpec) -> Result<Instance> {
    check_name("instance", &spec.name)?;
    let tmpl = store.template(&spec.template)?;
    let final_dir = store.instance_dir(&spec.name);
    if final_dir.exists() {
        return Err(Error::InstanceExists(spec.name.clone()));
    }
    for b in &spec.bind_ro {
        parse_bind(b)?;
    }
    let port = store.claim_port(&spec.name, spec.port)?;
    if spec.userns && port < unprivileged_port_start() {
        store.release_port(port, &spec.name);
        return Err(Error::Port {
            port,
            why: format!(
                "below {}: container root is unprivileged and cannot bind it; pick a higher port, or lower net.ipv4.ip_unprivileged_port_start (--no-userns would also do it, at the cost of container root being host root: see SECURITY.md)",
                unprivileged_port_start()
            ),
        });
    }
    let uid_base = if spec.userns {
        let hint = spec.name.parse::<u32>().ok();
        store.adopt_legacy_ranges();
        match crate::claims::uid_range::claim(&store.uids_dir(), &final_dir, hint) {
            Ok(b) => Some(b),
            Err(e) => {
                store.release_port(port, &spec.name);
                return Err(e);
            }
        }
    } else {
        None
    };
    let security = Security {
        uid_base,
        seccomp: spec.seccomp,
        drop_caps: spec.drop_caps,
    };
    // Its own files go to a subvolume of the disk store when its disk is
    // limited (made here, removed again if anything below fails).
    let layers = match spec.limits.disk {
        Some(limit) => {
            match crate::volume::create(store, &spec.name, Some(limit), spec.limits.inodes) {
                Ok(d) => Some(d),
                Err(e) => {
                    store.release_port(port, &spec.name);
                    if let Some(b) = uid_base {
                        crate::claims::uid_range::release(&store.uids_dir(), &final_dir, b);
                    }
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let tmp = store
        .instances_dir()
        .join(format!(".new-{}-{}", spec.name, std::process::id()));
    let result = write_instance(store, &tmp, spec, &tmpl, port, security, layers.as_deref())
        .and_then(|inst| {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::CWD,
                &final_dir,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(|e| {
                if e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY {
                    Error::InstanceExists(spec.name.clone())
                } else {
                    Error::sys(format!(
                        "renameat2({}, {}, RENAME_NOREPLACE)",
                        tmp.display(),
                        final_dir.display()
                    ))(e)
                }
            })
            .map(|()| inst)
        });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
        if layers.is_some() {
            let _ = crate::volume::remove(store, &spec.name);
        }
        store.release_port(port, &spec.name);
        if let Some(b) = uid_base {
            crate::claims::uid_range::release(&store.uids_dir(), &final_dir, b);
        }
    }
    result
}

fn write_instance(
    store: &Store,
    dir: &Path,
    spec: &CreateSpec,
    tmpl: &TemplateMeta,
    port: u16,
    security: Security,
    layers: Option<&Path>,
) -> Result<Instance> {
    let mk = |p: &Path, mode: u32| {
        fs::DirBuilder::new()
            .mode(mode)
            .create(p)
            .map_err(Error::io("create", p))
    };
    mk(dir, 0o700)?;
    let layers = layers.unwrap_or(dir);
    let upper = layers.join("upper");
    mk(&upper, 0o755)?;
    mk(&layers.join("work"), 0o700)?;
    let etc = upper.join("etc");
    mk(&etc, 0o755)?;
    mk(&etc.join("dropbear"), 0o700)?;
    // The directories every boot writes into (syslogd's /dev/log, the
    // pid files in /var/run) exist in the upper layer from the start, as
    // the template has them: the first boot copies nothing up.
    let lower = store.template_rootfs_at(&spec.template, tmpl.version);
    let mut made = Vec::new();
    for rel in BOOT_WRITES {
        if let Ok(m) = fs::metadata(lower.join(rel)) {
            if m.is_dir() {
                let p = upper.join(rel);
                mk(&p, 0o755)?;
                fs::set_permissions(
                    &p,
                    fs::Permissions::from_mode(std::os::unix::fs::MetadataExt::mode(&m) & 0o7777),
                )
                .map_err(Error::io("chmod", &p))?;
                made.push(p);
            }
        }
    }

    let key = keys::HostKey::generate();
    write_file(
        &etc.join("dropbear/dropbear_ed25519_host_key"),
        &key.dropbear_private(),
        0o600,
    )?;
    write_file(
        &etc.join("inittab"),
        match spec.on_demand {
            Some(_) => crate::template::inittab::render_on_demand(),
            None => crate::template::inittab::render(Some(port)),
        }
        .as_bytes(),
        0o644,
    )?;
    write_file(
        &etc.join("hostname"),
        format!("nifty{}\n", spec.name).as_bytes(),
        0o644,
    )?;
    let machine_id: [u8; 16] = rand::random();
    write_file(
        &etc.join("machine-id"),
        format!("{}\n", hex::encode(machine_id)).as_bytes(),
        0o444,
    )?;
    let inst = Instance {
        name: spec.name.clone(),
        template: spec.template.clone(),
        backend: spec.backend,
        port,
        user: tmpl.user.clone(),
        host_key: key.openssh_public(),
        host_key_previous: None,
        created: now(),
        limits: spec.limits.clone(),
        bind_ro: spec.bind_ro.clone(),
        security,
        template_version: tmpl.version,
        disk_store: spec.limits.disk.is_some(),
        on_demand: spec.on_demand,
        network: spec.network,
    };
    // The upper layer belongs to the container's root.
    if let Some(base) = inst.security.uid_base {
        for p in [&upper, &etc, &etc.join("dropbear")]
            .into_iter()
            .cloned()
            .chain(made)
            .chain(
                [
                    "dropbear/dropbear_ed25519_host_key",
                    "hostname",
                    "machine-id",
                    "inittab",
                ]
                .map(|f| etc.join(f)),
            )
        {
            std::os::unix::fs::lchown(&p, Some(base), Some(base))
                .map_err(Error::io("chown", &p))?;
        }
    }
    let text = toml::to_string(&inst).map_err(|err| Error::Encode {
        what: "an instance record",
        err,
    })?;
    write_file(&dir.join("instance.toml"), text.as_bytes(), 0o644)?;
    Ok(inst)
}
