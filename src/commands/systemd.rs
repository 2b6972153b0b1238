//! `nifty systemd install|uninstall|show`, `enable`, `disable`, and the
//! hidden `systemd exec`, `systemd post` and `systemd stop` that
//! nifty@.service runs.

use anyhow::{Context, Result};
use nifty::runtime::{Runtime, StopOptions};

use super::instance::select_instances;
use super::Ctx;
use crate::cli::{EnableArgs, SystemdCmd};

pub fn run(ctx: &Ctx, c: SystemdCmd) -> Result<bool> {
    let rt = Runtime::new(&ctx.store)?;
    match c {
        SystemdCmd::Exec { name, nspawn } => {
            let e = nifty::runtime::systemd::exec_nspawn(&ctx.store, &name, &nspawn);
            Err(e.into())
        }
        SystemdCmd::Session => {
            use std::os::fd::AsFd;
            let conn = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("the connection on standard input")?;
            // The connection is the session's alone: it ends when the
            // session's Dropbear closes it.
            let null = std::fs::File::open("/dev/null").context("open /dev/null")?;
            nifty::sys::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0)
                .context("dup2(/dev/null, 0)")?;
            let code = nifty::serve::session(&ctx.store, &rt, conn)?;
            std::process::exit(code);
        }
        SystemdCmd::Stop { name } => {
            let inst = ctx.store.instance(&name)?;
            rt.systemd()?
                .power_off_inside(&inst, StopOptions::default().timeout)
                .with_context(|| format!("instance {name}: power off"))?;
            Ok(true)
        }
        SystemdCmd::Post { name } => {
            let inst = ctx.store.instance(&name)?;
            rt.cover_proc_net(&inst)
                .with_context(|| format!("instance {name}: its /proc/net view"))?;
            Ok(true)
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
            let removed = sd.uninstall()?;
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
        SystemdCmd::Show {
            nifty: Some(nifty),
            nspawn,
        } => {
            print!(
                "{}",
                nifty::runtime::systemd::render_unit(&ctx.store, &nifty, &nspawn)
            );
            Ok(true)
        }
        SystemdCmd::Show { nifty: None, .. } => {
            print!("{}", rt.systemd()?.render_template()?);
            Ok(true)
        }
    }
}

/// `nifty enable` / `nifty disable`.
pub fn enable(ctx: &Ctx, a: EnableArgs, on: bool) -> Result<bool> {
    let verb = if on { "enable" } else { "disable" };
    let insts = select_instances(ctx, &a.sel)?;
    let rt = Runtime::new(&ctx.store)?;
    let changes = rt.enable(&insts, on)?;
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
