//! `nifty serve`: holds the SSH ports of on-demand instances, starts each
//! at its first connection and stops it when idle (see `nifty::serve`).

use anyhow::{Context, Result};

use super::Ctx;
use crate::cli::ServeArgs;

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
