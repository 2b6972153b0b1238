//! `nifty update`, `nifty diff`.

use std::time::Duration;

use anyhow::{Context, Result};
use nifty::runtime::Runtime;
use nifty::update::{self, Options};

use super::instance::select_instances;
use super::Ctx;
use crate::cli::{DiffArgs, UpdateArgs};

/// `--batch`: a number, or a share of `running` (at least one).
fn batch_size(spec: &str, running: usize) -> Result<usize> {
    let n = match spec.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p
                .parse()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .with_context(|| format!("--batch {spec:?}: give a share from 1% to 100%"))?;
            ((running as f64 * p / 100.0).ceil() as usize).max(1)
        }
        None => spec
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| {
                format!(
                    "--batch {spec:?}: give a number of instances (at least 1) or a share (10%)"
                )
            })?,
    };
    Ok(n)
}

pub fn update(ctx: &Ctx, a: UpdateArgs) -> Result<bool> {
    let insts = select_instances(ctx, &a.sel)?;
    let rt = Runtime::new(&ctx.store)?;
    let running = rt
        .infos(&insts)
        .iter()
        .filter(|i| i.state == nifty::runtime::State::Running)
        .count();
    let mut batch = batch_size(&a.batch, running)?;
    if let Some(m) = a.max_unavailable {
        anyhow::ensure!(
            m > 0,
            "--max-unavailable 0: an update restarts at least one instance at a time"
        );
        batch = batch.min(m);
    }
    let opts = Options {
        to: a.to,
        batch,
        health_timeout: Duration::from_secs(a.health_timeout.max(1)),
    };
    let bar = ctx.printer.progress("update", insts.len() as u64);
    let report = update::run(&ctx.store, &rt, &insts, &opts, &|_| bar.inc(1));
    bar.finish_and_clear();
    let report = report?;
    let ok = report.failed.is_empty();
    if ctx.printer.json {
        ctx.printer.json(&report);
        return Ok(ok);
    }
    for n in &report.resumed {
        ctx.printer
            .info(format!("{n}: started again (an update was interrupted)"));
    }
    for c in &report.conflicts {
        ctx.printer.info(format!(
            "{}: {} is changed by the new template and by the instance; the instance's copy stays",
            c.name, c.path
        ));
    }
    for f in &report.failed {
        eprintln!(
            "nifty: update: {}: v{} -> v{} failed: {}; {}",
            f.name,
            f.from,
            f.to,
            f.error,
            if f.rolled_back {
                format!("back on v{} and running", f.from)
            } else {
                "it could not be put back: see `nifty status`".to_string()
            }
        );
    }
    let restarted = report.moved.iter().filter(|m| m.how == "restarted").count();
    ctx.printer.info(format!(
        "update: {} moved ({restarted} restarted in {} batch(es) of up to {batch}, {} stopped), {} already current, {} failed, in {:.2}s",
        report.moved.len(),
        report.batches.len(),
        report.moved.len() - restarted,
        report.current.len(),
        report.failed.len(),
        report.seconds
    ));
    if !ok {
        ctx.printer.info(
            "the update stopped at the failed batch: later instances were not touched; fix the template and run `nifty update` again",
        );
    }
    Ok(ok)
}

pub fn diff(ctx: &Ctx, a: DiffArgs) -> Result<bool> {
    let inst = ctx.store.instance(&a.name)?;
    let changes = nifty::update::instance_changes(&ctx.store, &inst)?;
    if ctx.printer.json {
        ctx.printer.json(&changes);
        return Ok(true);
    }
    for c in &changes {
        println!(
            "{} {}",
            c.kind,
            nifty::printer::escape_controls(c.path.as_bytes())
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::batch_size;

    #[test]
    fn batches_are_a_number_or_a_share_and_never_zero() {
        assert_eq!(batch_size("4", 12).unwrap(), 4);
        assert_eq!(batch_size("10%", 1000).unwrap(), 100);
        assert_eq!(batch_size("10%", 5).unwrap(), 1);
        assert_eq!(batch_size("100%", 7).unwrap(), 7);
        for bad in ["0", "0%", "-1", "x", "101%", ""] {
            assert!(batch_size(bad, 10).is_err(), "{bad}");
        }
    }
}
