//! `nifty serve`: holds the SSH ports of on-demand instances, starts each
//! at its first connection and stops it when idle (see `nifty::serve`);
//! `nifty on-demand enable|disable|sweep`.

use anyhow::{Context, Result};
use nifty::runtime::Runtime;
use nifty::store::OnDemand;

use super::instance::select_instances;
use super::Ctx;
use crate::cli::{OnDemandCmd, ServeArgs};

/// `nifty on-demand enable|disable|sweep`.
pub fn on_demand(ctx: &Ctx, c: OnDemandCmd) -> Result<bool> {
    let rt = Runtime::new(&ctx.store)?;
    let (sel, want) = match c {
        OnDemandCmd::Sweep => {
            // Those a running `serve` holds are its own to sweep: it takes
            // their ports back from their listeners before it stops them.
            let serving = nifty::serve::serving(&ctx.store);
            let insts: Vec<_> = rt
                .running_on_demand()
                .into_iter()
                .filter(|i| !(serving && rt.served_by_serve(i)))
                .collect();
            let swept = nifty::serve::sweep_unserved(&ctx.store, &rt, &insts);
            let mut ok = true;
            for (name, r) in &swept.stopped {
                match r {
                    Ok(()) => ctx.printer.info(format!("instance {name}: idle, stopped")),
                    Err(e) => {
                        ok = false;
                        eprintln!("nifty: instance {name}: idle, stop failed: {e}");
                    }
                }
            }
            return Ok(ok);
        }
        OnDemandCmd::Enable { sel, idle_timeout } => {
            let od = match idle_timeout {
                Some(t) => OnDemand::parse_idle(&t)?,
                None => OnDemand {
                    idle_timeout_secs: OnDemand::DEFAULT_IDLE.as_secs(),
                },
            };
            (sel, Some(od))
        }
        OnDemandCmd::Disable { sel } => (sel, None),
    };
    let insts = select_instances(ctx, &sel)?;
    // Refused as a whole before anything changes: a running one.
    let running: Vec<String> = rt
        .with_state(&insts, |s| s != nifty::runtime::State::Stopped)
        .into_iter()
        .filter(|i| i.on_demand.is_some() != want.is_some())
        .map(|i| i.name)
        .collect();
    anyhow::ensure!(
        running.is_empty(),
        "{} running ({}): stop them first (`nifty stop`); an instance changes between \
         on-demand and always-on while stopped (its inittab gains or loses its own Dropbear)",
        running.len(),
        nifty::fleet::name_list(&running)
    );
    let mut changed = 0;
    for i in &insts {
        if rt
            .set_on_demand(i, want)
            .with_context(|| format!("instance {}", i.name))?
        {
            changed += 1;
        }
    }
    ctx.printer.info(match want {
        Some(od) => format!(
            "{changed} of {} instance(s) made on demand (idle timeout {}); their ports are \
             held by `nifty serve` (native backend) or their socket units (systemd)",
            insts.len(),
            humantime::format_duration(std::time::Duration::from_secs(od.idle_timeout_secs)),
        ),
        None => format!(
            "{changed} of {} instance(s) run always again: `nifty start` them",
            insts.len()
        ),
    });
    if want.is_some() {
        let now: Vec<_> = insts
            .iter()
            .filter_map(|i| ctx.store.instance(&i.name).ok())
            .collect();
        hint_serve(ctx, &rt, &now);
    }
    Ok(true)
}

/// Says so when on-demand instances wait for a `nifty serve` that does not
/// run (nothing holds their ports until one does).
pub fn hint_serve(ctx: &Ctx, rt: &Runtime, insts: &[nifty::store::Instance]) {
    let waiting = insts.iter().filter(|i| rt.served_by_serve(i)).count();
    if waiting == 0 || nifty::serve::serving(&ctx.store) {
        return;
    }
    let root = ctx.store.root_flag();
    let service = if nifty::runtime::dbus::booted() {
        format!(
            ", or as a service: `nifty{root} systemd install`, then `systemctl enable --now {}`",
            nifty::runtime::systemd::serve_unit(&ctx.store)
        )
    } else {
        String::new()
    };
    ctx.printer.info(format!(
        "{waiting} on-demand instance(s) wait for `nifty{root} serve`, which does not run \
         (nothing holds their ports until it does): run it{service}"
    ));
}

pub fn serve(ctx: &Ctx, a: &ServeArgs) -> Result<bool> {
    anyhow::ensure!(
        a.check_every > 0,
        "--check-every 0: give the seconds between idle checks (1 or more)"
    );
    let opts = nifty::serve::Options {
        check_every: std::time::Duration::from_secs(a.check_every),
    };
    ctx.printer.info(format!(
        "serving the on-demand instances of {} (Ctrl-C ends it; running ones keep running)",
        ctx.store.root().display()
    ));
    let printer = &ctx.printer;
    nifty::serve::run(&ctx.store, &opts, &|line| printer.info(line))
        .with_context(|| format!("nifty serve for {}", ctx.store.root().display()))?;
    Ok(true)
}
