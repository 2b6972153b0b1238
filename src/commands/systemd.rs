//! `nifty systemd install|uninstall|show`, `enable`, `disable`, and the
//! hidden `systemd exec` that nifty@.service runs.

use anyhow::Result;
use nifty::runtime::{Runtime, StopOptions};
use nifty::store::{Backend, Instance};

use super::instance::select;
use super::Ctx;
use crate::cli::{EnableArgs, SystemdCmd};

pub fn run(ctx: &Ctx, c: SystemdCmd) -> Result<bool> {
    let rt = Runtime::new(&ctx.store)?;
    match c {
        SystemdCmd::Exec { name, nspawn } => {
            let e = nifty::runtime::systemd::exec_nspawn(&ctx.store, &name, &nspawn);
            Err(e.into())
        }
        SystemdCmd::Install => {
            let sd = rt.systemd()?;
            let changed = sd.install()?;
            ctx.printer.info(format!(
                "{} {}{}",
                if changed { "installed" } else { "up to date:" },
                sd.template_path().display(),
                if changed { " (systemd reloaded)" } else { "" }
            ));
            Ok(true)
        }
        SystemdCmd::Uninstall => {
            let sd = rt.systemd()?;
            let users: Vec<String> = systemd_instances(ctx)?
                .into_iter()
                .map(|i| i.name)
                .collect();
            let removed = sd.uninstall(&users)?;
            ctx.printer.info(if removed {
                format!(
                    "removed {} (systemd reloaded)",
                    sd.template_path().display()
                )
            } else {
                format!("{} was not installed", sd.template_path().display())
            });
            Ok(true)
        }
        SystemdCmd::Show => {
            print!("{}", rt.systemd()?.render_template()?);
            Ok(true)
        }
    }
}

fn systemd_instances(ctx: &Ctx) -> Result<Vec<Instance>> {
    Ok(ctx
        .store
        .instance_names()?
        .iter()
        .filter_map(|n| ctx.store.instance(n).ok())
        .filter(|i| i.backend == Backend::Systemd)
        .collect())
}

/// `nifty enable` / `nifty disable`.
pub fn enable(ctx: &Ctx, a: EnableArgs, on: bool) -> Result<bool> {
    let verb = if on { "enable" } else { "disable" };
    let names = select(ctx, &a.sel)?;
    let insts = names
        .iter()
        .map(|n| ctx.store.instance(n))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = insts.iter().find(|i| i.backend != Backend::Systemd) {
        anyhow::bail!(
            "instance {:?} uses the native launcher, which has no boot-time start; \
             only systemd instances (create --backend systemd) can be {verb}d",
            i.name
        );
    }
    let rt = Runtime::new(&ctx.store)?;
    let sd = rt.systemd()?;
    let refs: Vec<&Instance> = insts.iter().collect();
    let changes = if on {
        sd.enable(&refs)?
    } else {
        sd.disable(&refs)?
    };
    for (kind, link, dest) in &changes {
        match kind.as_str() {
            "symlink" => ctx
                .printer
                .info(format!("created symlink {link} -> {dest}")),
            "unlink" => ctx.printer.info(format!("removed {link}")),
            _ => ctx.printer.info(format!("{kind} {link} {dest}")),
        }
    }
    let mut ok = true;
    if a.now {
        let results = if on {
            rt.start_many(&insts, &|_| {})
        } else {
            rt.stop_many(&insts, StopOptions::default(), &|_| {})
        };
        let out = nifty::fleet::outcome(results, 0.0);
        ok = out.report(&ctx.printer, if on { "start" } else { "stop" });
    }
    ctx.printer.info(format!(
        "{verb}d {} instance(s){}",
        insts.len(),
        if on { ": they start at boot" } else { "" }
    ));
    Ok(ok)
}
