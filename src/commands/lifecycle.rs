//! `nifty start`, `stop`, `restart`, `kill`.

use std::time::{Duration, Instant};

use anyhow::Result;
use nifty::fleet::{self, Outcome};
use nifty::runtime::native::Native;
use nifty::runtime::{parse_signal, StopOptions};
use nifty::store::Instance;

use super::instance::select;
use super::Ctx;
use crate::cli::{Selection, StopArgs};

pub fn start(ctx: &Ctx, sel: Selection) -> Result<bool> {
    let names = select(ctx, &sel)?;
    let native = Native::new(&ctx.store)?;
    let out = fleet::run(&ctx.printer, "start", &names, |name| {
        let inst = ctx.store.instance(name)?;
        native.start(&inst)
    });
    if names.len() == 1 && out.failed.is_empty() {
        let inst = ctx.store.instance(&names[0])?;
        ctx.printer
            .info(format!("started {} (ssh port {})", inst.name, inst.port));
    }
    Ok(out.report(&ctx.printer, "start"))
}

fn stop_selected(
    ctx: &Ctx,
    native: &Native,
    a: &StopArgs,
    kill: bool,
    verb: &str,
) -> Result<Outcome> {
    let opts = StopOptions {
        signal: parse_signal(&a.signal)?,
        timeout: Duration::from_secs(a.timeout),
        kill,
    };
    let mut names = select(ctx, &a.sel)?;
    if a.sel.all {
        // Also end containers whose instance record is gone.
        for n in native.cgroup_names() {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let mut out = Outcome::default();
    let mut insts: Vec<Instance> = Vec::new();
    for n in &names {
        match ctx.store.instance(n) {
            Ok(i) => insts.push(i),
            Err(nifty::Error::NoInstance(_)) if a.sel.all => {
                // An orphan cgroup: kill and remove it directly.
                let cg = native.cgroup(n);
                let _ = cg.kill();
                cg.wait_empty(Duration::from_secs(5));
                match cg.remove() {
                    Ok(()) => out.ok.push(n.clone()),
                    Err(e) => out.failed.push((n.clone(), e)),
                }
            }
            Err(e) => out.failed.push((n.clone(), e)),
        }
    }
    let start = Instant::now();
    let bar = ctx.printer.progress(verb, insts.len() as u64);
    for (n, r) in native.stop_many(&insts, opts, &|_| bar.inc(1)) {
        match r {
            Ok(()) => out.ok.push(n),
            Err(e) => out.failed.push((n, e)),
        }
    }
    bar.finish_and_clear();
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

pub fn stop(ctx: &Ctx, a: StopArgs, kill: bool) -> Result<bool> {
    let native = Native::new(&ctx.store)?;
    let verb = if kill { "kill" } else { "stop" };
    let out = stop_selected(ctx, &native, &a, kill, verb)?;
    if out.ok.len() == 1 && out.failed.is_empty() {
        ctx.printer.info(format!("stopped {}", out.ok[0]));
    }
    Ok(out.report(&ctx.printer, verb))
}

pub fn restart(ctx: &Ctx, a: StopArgs) -> Result<bool> {
    let native = Native::new(&ctx.store)?;
    let stopped = stop_selected(ctx, &native, &a, false, "stop")?;
    let names = stopped.ok.clone();
    let failed_stop = stopped.failed;
    let mut out = fleet::run(&ctx.printer, "start", &names, |name| {
        let inst = ctx.store.instance(name)?;
        native.start(&inst)
    });
    out.failed.extend(failed_stop);
    Ok(out.report(&ctx.printer, "restart"))
}
