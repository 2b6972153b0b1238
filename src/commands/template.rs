//! `nifty template build|list|show`.

use std::io::Read;

use anyhow::{Context, Result};
use nifty::template::{self, BuildOptions};

use super::Ctx;
use crate::cli::TemplateCmd;

pub fn run(ctx: &Ctx, cmd: TemplateCmd) -> Result<bool> {
    match cmd {
        TemplateCmd::Build(a) => {
            let password = if a.password_stdin {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the password from stdin")?;
                let p = s.lines().next().unwrap_or("").to_string();
                anyhow::ensure!(!p.is_empty(), "--password-stdin: stdin holds no password");
                Some(p)
            } else {
                None
            };
            let opts = BuildOptions {
                name: a.name,
                busybox: a.busybox,
                dropbear: a.dropbear,
                with: a.with,
                user: a.user,
                authorized_keys: a.authorized_keys,
                password,
                zoneinfo: a.zoneinfo,
                sftp: (!a.without_sftp).then_some(template::FileTransfer {
                    sftp_server: a.sftp_server,
                    scp: a.scp,
                }),
            };
            let meta = template::build(&ctx.store, &opts)?;
            ctx.printer.info(format!(
                "template {:?} built: {} ({} applets), {}, user {}; at {}",
                meta.name,
                meta.busybox.version,
                meta.applets,
                meta.dropbear.version,
                meta.user,
                ctx.store.template_rootfs(&meta.name).display()
            ));
            if meta.sftp_server.is_none() {
                ctx.printer
                    .info("built without sftp-server and scp: no file transfer over SSH (`nifty cp` still works)");
            }
            if meta.zoneinfo == "none" {
                ctx.printer
                    .info("no zoneinfo on this host (Debian's tzdata): the containers keep UTC");
            }
        }
        TemplateCmd::List(_) => {
            let all = ctx.store.templates()?;
            if ctx.printer.json {
                ctx.printer.json(&all);
            } else {
                println!(
                    "{:<16} {:<8} {:<26} {:<22} {:<8} {:<21} HOST",
                    "NAME", "VERSION", "BUSYBOX", "DROPBEAR", "USER", "BUILT"
                );
                for t in all {
                    let stale = template::stale_sources(&t);
                    println!(
                        "{:<16} {:<8} {:<26} {:<22} {:<8} {:<21} {}",
                        t.name,
                        format!("v{}", t.version),
                        short_version(&t.busybox.version),
                        t.dropbear.version,
                        t.user,
                        t.built,
                        if stale.is_empty() {
                            "current".to_string()
                        } else {
                            format!(
                                "newer {} on the host: `nifty template build --name {}`, then `nifty update`",
                                stale.join(" and "),
                                t.name
                            )
                        }
                    );
                }
            }
        }
        TemplateCmd::Show { name, .. } => {
            let versions = ctx.store.template_versions(&name)?;
            if ctx.printer.json {
                ctx.printer.json(&versions);
            } else {
                let used = versions_in_use(ctx, &name);
                for t in &versions {
                    println!(
                        "# version {}{}, {} instance(s)",
                        t.version,
                        if Some(t) == versions.last() {
                            " (newest)"
                        } else {
                            ""
                        },
                        used.get(&t.version).copied().unwrap_or(0)
                    );
                    print!("{}", toml::to_string(t)?);
                    println!(
                        "# rootfs = {:?}\n",
                        ctx.store.template_rootfs_at(&name, t.version)
                    );
                }
            }
        }
        TemplateCmd::Prune { name } => {
            let removed = template::prune(&ctx.store, &name)?;
            ctx.printer.info(if removed.is_empty() {
                format!("template {name:?}: no unused version to remove")
            } else {
                format!(
                    "template {name:?}: removed version(s) {}",
                    removed
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        }
    }
    Ok(true)
}

/// How many instances run each version of template `name`.
fn versions_in_use(ctx: &Ctx, name: &str) -> std::collections::BTreeMap<u32, usize> {
    let mut used = std::collections::BTreeMap::new();
    for n in ctx.store.instance_names().unwrap_or_default() {
        if let Ok(i) = ctx.store.instance(&n) {
            if i.template == name {
                *used.entry(i.template_version).or_insert(0) += 1;
            }
        }
    }
    used
}

fn short_version(v: &str) -> &str {
    v.split(" (").next().unwrap_or(v)
}
