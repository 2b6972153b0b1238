//! `nifty start`, `stop`, `restart`, `kill`.

use std::time::Duration;

use anyhow::Result;
use nifty::fleet::{self, Outcome};
use nifty::runtime::{parse_signal, Runtime, StopOptions};
use nifty::store::Instance;

use super::instance::select;
use super::Ctx;
use crate::cli::{Selection, StopArgs};

/// Loads the selected instances; names that fail to load are failures.
fn load(ctx: &Ctx, names: &[String]) -> (Vec<Instance>, Outcome) {
    let mut out = Outcome::default();
    let mut insts = Vec::new();
    for n in names {
        match ctx.store.instance(n) {
            Ok(i) => insts.push(i),
            Err(e) => out.failed.push((n.clone(), e)),
        }
    }
    (insts, out)
}

fn start_insts(ctx: &Ctx, rt: &Runtime, insts: &[Instance]) -> Outcome {
    fleet::tracked(&ctx.printer, "start", insts.len(), |done| {
        rt.start_many(insts, done)
    })
}

pub fn start(ctx: &Ctx, sel: Selection) -> Result<bool> {
    let names = select(ctx, &sel)?;
    let rt = Runtime::new(&ctx.store)?;
    let (insts, failed) = load(ctx, &names);
    let mut out = start_insts(ctx, &rt, &insts);
    out.failed.extend(failed.failed);
    if insts.len() == 1 && out.failed.is_empty() {
        let inst = &insts[0];
        let how = rt.launched_as(inst);
        ctx.printer.info(format!(
            "started {}{how} (ssh port {})",
            inst.name, inst.port
        ));
    }
    Ok(out.report(&ctx.printer, "start"))
}

fn stop_selected(ctx: &Ctx, rt: &Runtime, a: &StopArgs, kill: bool, verb: &str) -> Result<Outcome> {
    let opts = StopOptions {
        signal: parse_signal(&a.signal)?,
        timeout: Duration::from_secs(a.timeout),
        kill,
    };
    let names = select(ctx, &a.sel)?;
    let (insts, mut out) = load(ctx, &names);
    if a.sel.all {
        // Also end containers whose instance record is gone.
        for (n, r) in rt.reap_orphans(&names) {
            match r {
                Ok(()) => out.ok.push(n),
                Err(e) => out.failed.push((n, e)),
            }
        }
    }
    let done = fleet::tracked(&ctx.printer, verb, insts.len(), |done| {
        rt.stop_many(&insts, opts, done)
    });
    out.ok.extend(done.ok);
    out.failed.extend(done.failed);
    out.seconds = done.seconds;
    Ok(out)
}

pub fn stop(ctx: &Ctx, a: StopArgs, kill: bool) -> Result<bool> {
    let rt = Runtime::new(&ctx.store)?;
    let verb = if kill { "kill" } else { "stop" };
    let out = stop_selected(ctx, &rt, &a, kill, verb)?;
    if out.ok.len() == 1 && out.failed.is_empty() {
        ctx.printer.info(format!("stopped {}", out.ok[0]));
    }
    Ok(out.report(&ctx.printer, verb))
}

pub fn restart(ctx: &Ctx, a: StopArgs) -> Result<bool> {
    let rt = Runtime::new(&ctx.store)?;
    let stopped = stop_selected(ctx, &rt, &a, false, "stop")?;
    let (insts, _) = load(ctx, &stopped.ok);
    let mut out = start_insts(ctx, &rt, &insts);
    out.failed.extend(stopped.failed);
    Ok(out.report(&ctx.printer, "restart"))
}
