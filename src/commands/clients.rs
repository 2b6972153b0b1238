//! `nifty ssh-config`, `inventory`, `completions`, `manpages`: nifty as
//! OpenSSH, Ansible, shells and man see it.

use std::io::Write;

use anyhow::{Context, Result};
use nifty::sshconfig::{self, Format};
use nifty::store::Instance;

use super::Ctx;
use crate::cli::{ClientSelection, InventoryArgs, InventoryFormat};

/// The selected instances; no names: all of them.
fn selected(ctx: &Ctx, sel: &ClientSelection) -> Result<Vec<Instance>> {
    let existing = ctx.store.instance_names()?;
    let names = if sel.names.is_empty() {
        existing
    } else {
        nifty::fleet::select(&sel.names, false, &existing)?
    };
    names.iter().map(|n| Ok(ctx.store.instance(n)?)).collect()
}

pub fn ssh_config(ctx: &Ctx, sel: ClientSelection) -> Result<bool> {
    let insts = selected(ctx, &sel)?;
    // The file the config points at is made current first.
    sshconfig::refresh_known_hosts(&ctx.store)?;
    print!("{}", sshconfig::ssh_config(&ctx.store, &insts));
    Ok(true)
}

pub fn inventory(ctx: &Ctx, a: InventoryArgs) -> Result<bool> {
    if let Some(host) = &a.host {
        let inst = sshconfig::unalias(host).and_then(|n| ctx.store.instance(n).ok());
        println!("{}", sshconfig::dynamic_host(&ctx.store, inst.as_ref()));
        return Ok(true);
    }
    let insts = selected(ctx, &a.sel)?;
    sshconfig::refresh_known_hosts(&ctx.store)?;
    if a.list {
        println!(
            "{}",
            serde_json::to_string_pretty(&sshconfig::dynamic_list(&ctx.store, &insts))?
        );
        return Ok(true);
    }
    let format = match a.format {
        InventoryFormat::Ini => Format::Ini,
        InventoryFormat::Yaml => Format::Yaml,
        InventoryFormat::Json => Format::Json,
    };
    print!("{}", sshconfig::inventory(&ctx.store, &insts, format)?);
    Ok(true)
}

pub fn completions(shell: &str) -> Result<bool> {
    let script = crate::complete::script(shell).context("completions")?;
    std::io::stdout().write_all(&script)?;
    Ok(true)
}

/// One page per verb: `nifty.1`, `nifty-create.1`, `nifty-template-build.1`.
pub fn manpages(ctx: &Ctx, dir: &std::path::Path) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cmd = <crate::cli::Cli as clap::CommandFactory>::command();
    cmd.build();
    let mut written = 0;
    write_pages(&cmd, "nifty", dir, &mut written)?;
    ctx.printer
        .info(format!("{written} man pages written to {}", dir.display()));
    Ok(true)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &std::path::Path,
    n: &mut usize,
) -> Result<()> {
    let page = cmd
        .clone()
        .name(name.to_string())
        .bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut buf)
        .with_context(|| format!("render the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("write {}", path.display()))?;
    *n += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, n)?;
    }
    Ok(())
}
