//! `nifty create`, `rm` and `up`.

use anyhow::Result;
use nifty::fleet;

use nifty::provision::{self, CreateSpec};
use nifty::runtime::{self, Runtime, State, StopOptions};
use nifty::store::Limits;
use nifty::template::{self, BuildOptions};
use nifty::Error;

use super::Ctx;
use crate::cli::{CreateArgs, RmArgs, Selection, UpArgs};

pub fn create(ctx: &Ctx, a: CreateArgs) -> Result<bool> {
    let existing = ctx.store.instance_names()?;
    let names = match a.count {
        Some(n) => fleet::next_free(n, &existing),
        None => fleet::expand_new(&a.names)?,
    };
    anyhow::ensure!(!names.is_empty(), "nothing to create");
    if a.port.is_some() && names.len() > 1 {
        anyhow::bail!("--port names one port: give it with one instance only");
    }
    // Check everything that can be checked before the first instance.
    ctx.store.template(&a.template)?;
    for n in &names {
        if existing.contains(n) {
            return Err(Error::InstanceExists(n.clone()).into());
        }
    }
    let limits = super::limits::Change::parse(&a.limits)?.apply(&Limits::default());
    anyhow::ensure!(
        limits.inodes.is_none() || limits.disk.is_some(),
        "--inodes limits files in the disk store: not with --disk unlimited"
    );
    nifty::volume::check_limits(&ctx.store, limits.inodes)?;
    for b in &a.bind_ro {
        nifty::store::parse_bind(b)?;
    }
    let on_demand = match (&a.idle_timeout, a.on_demand) {
        (Some(t), _) => Some(nifty::store::OnDemand::parse_idle(t)?),
        (None, true) => Some(nifty::store::OnDemand {
            idle_timeout_secs: nifty::store::OnDemand::DEFAULT_IDLE.as_secs(),
        }),
        (None, false) => None,
    };
    anyhow::ensure!(
        a.network != Some(nifty::store::Network::None) || on_demand.is_some(),
        "--network none needs --on-demand: an always-on instance's Dropbear listens inside \
         it, where nothing could reach it without the host's network"
    );
    let backend = a.backend.unwrap_or_else(runtime::default_backend);
    let rt = Runtime::new(&ctx.store)?;
    let spec = CreateSpec {
        name: String::new(),
        template: a.template.clone(),
        backend,
        port: a.port,
        limits,
        bind_ro: a.bind_ro.clone(),
        userns: !a.no_userns,
        seccomp: !a.no_seccomp,
        drop_caps: !a.keep_caps,
        on_demand,
        network: a.network.unwrap_or_default(),
    };
    let out = create_all(ctx, &rt, &names, &spec)?;
    if names.len() == 1 && out.failed.is_empty() {
        let inst = ctx.store.instance(&names[0])?;
        ctx.printer
            .info(format!("created {} (port {})", inst.name, inst.port));
    }
    let made: Vec<_> = match spec.on_demand {
        Some(_) => out
            .ok
            .iter()
            .filter_map(|n| ctx.store.instance(n).ok())
            .collect(),
        None => Vec::new(),
    };
    let ok = out.report(&ctx.printer, "create");
    super::serve::hint_serve(ctx, &rt, &made);
    Ok(ok)
}

/// Creates the instances `names` as `spec` says (its `name` is each of
/// them), once the kernel and the backend have been asked whether they can
/// run them, and registers them with their backend.
fn create_all(
    ctx: &Ctx,
    rt: &Runtime,
    names: &[String],
    spec: &CreateSpec,
) -> Result<fleet::Outcome> {
    // Refuse before creating anything: a kernel that cannot mount the
    // instance's overlay (idmapped unless --no-userns), a backend that is
    // not here (no systemd), a name or a bind it cannot take.
    rt.preflight(spec.userns)?;
    rt.check_create(spec.backend, names, &spec.bind_ro)?;
    ctx.store.ensure()?;
    // Once, before any instance: a host that cannot have the disk store
    // says so in one line.
    if spec.limits.disk.is_some() {
        nifty::volume::ensure(&ctx.store)?;
    }
    let mut out = fleet::run(&ctx.printer, "create", names, |name| {
        provision::create(
            &ctx.store,
            &CreateSpec {
                name: name.to_string(),
                ..spec.clone()
            },
        )
    });
    register(ctx, rt, &mut out)?;
    nifty::sshconfig::refresh_known_hosts(&ctx.store)?;
    Ok(out)
}

/// Registers new instances with their backend (systemd: the unit files,
/// one reload for all). If the backend cannot take them, the instances are
/// removed again: nothing half-made is left.
fn register(ctx: &Ctx, rt: &Runtime, out: &mut fleet::Outcome) -> Result<()> {
    if out.ok.is_empty() {
        return Ok(());
    }
    let insts = out
        .ok
        .iter()
        .map(|n| ctx.store.instance(n))
        .collect::<Result<Vec<_>, _>>()?;
    if let Err(e) = rt.register(&insts) {
        for i in &insts {
            let _ = ctx.store.remove_instance(i);
        }
        let _ = rt.forget(&insts);
        for n in out.ok.drain(..) {
            out.failed.push((
                n.clone(),
                Error::Host(format!("instance {n:?}: not created: {e}")),
            ));
        }
    }
    Ok(())
}

pub fn rm(ctx: &Ctx, a: RmArgs) -> Result<bool> {
    let rt = Runtime::new(&ctx.store)?;
    let insts = select_instances(ctx, &a.sel)?;
    let mut failed = Vec::new();
    let mut removable = Vec::new();
    let running = rt.with_state(&insts, |s| s != State::Stopped);
    if !running.is_empty() && !a.force {
        for i in &running {
            failed.push((
                i.name.clone(),
                Error::Running(i.name.clone(), ", or use `nifty rm -f`"),
            ));
        }
    } else if !running.is_empty() {
        let out = fleet::tracked(&ctx.printer, "stop", running.len(), |done| {
            rt.stop_many(&running, StopOptions::default(), done)
        });
        failed.extend(out.failed);
    }
    for i in insts {
        if !failed.iter().any(|(n, _)| *n == i.name) {
            removable.push(i);
        }
    }
    let names: Vec<String> = removable.iter().map(|i| i.name.clone()).collect();
    let mut out = fleet::run(&ctx.printer, "rm", &names, |name| {
        let inst = removable.iter().find(|i| i.name == name).expect("selected");
        rt.release(inst)?;
        ctx.store.remove_instance(inst)
    });
    let gone: Vec<nifty::store::Instance> = removable
        .into_iter()
        .filter(|i| out.ok.contains(&i.name))
        .collect();
    // What their backends keep (systemd: drop-ins, boot links) goes too.
    if let Err(e) = rt.forget(&gone) {
        eprintln!("nifty: rm: {e}");
    }
    nifty::volume::release_if_unused(&ctx.store);
    if !gone.is_empty() {
        nifty::sshconfig::refresh_known_hosts(&ctx.store)?;
    }
    out.failed.extend(failed);
    Ok(out.report(&ctx.printer, "rm"))
}

pub fn up(ctx: &Ctx, a: UpArgs) -> Result<bool> {
    anyhow::ensure!(a.count >= 1, "up: give a number of instances, at least 1");
    anyhow::ensure!(
        a.count <= fleet::MAX_RANGE,
        "up: at most {} instances",
        fleet::MAX_RANGE
    );
    match ctx.store.template(&a.template) {
        Ok(_) => {}
        Err(Error::NoTemplate(_)) if a.template == "default" => {
            ctx.printer
                .info("building the default template from the host's BusyBox and Dropbear");
            // NIFTY_DROPBEAR and NIFTY_BUSYBOX, as for `template build
            // --dropbear` and `--busybox`.
            let mut opts = BuildOptions::default();
            if let Some(d) = std::env::var_os("NIFTY_DROPBEAR") {
                opts.dropbear = d.into();
            }
            if let Some(b) = std::env::var_os("NIFTY_BUSYBOX") {
                opts.busybox = b.into();
            }
            template::build(&ctx.store, &opts)?;
        }
        Err(e) => return Err(e.into()),
    }
    let existing = ctx.store.instance_names()?;
    let wanted: Vec<String> = (1..=a.count).map(|n| n.to_string()).collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|n| !existing.contains(n))
        .cloned()
        .collect();
    let rt = Runtime::new(&ctx.store)?;
    if !missing.is_empty() {
        let spec = CreateSpec {
            name: String::new(),
            template: a.template.clone(),
            backend: a.backend.unwrap_or_else(runtime::default_backend),
            port: None,
            limits: super::limits::Change::parse(&a.limits)?.apply(&Limits::default()),
            bind_ro: Vec::new(),
            userns: true,
            seccomp: true,
            drop_caps: true,
            on_demand: None,
            network: Default::default(),
        };
        let out = create_all(ctx, &rt, &missing, &spec)?;
        if !out.report(&ctx.printer, "create") {
            return Ok(false);
        }
    }
    let insts = wanted
        .iter()
        .map(|n| ctx.store.instance(n))
        .collect::<Result<Vec<_>, _>>()?;
    let stopped = rt.with_state(&insts, |s| s == State::Stopped);
    let out = fleet::tracked(&ctx.printer, "start", stopped.len(), |done| {
        rt.start_many(&stopped, done)
    });
    let started_ok = out.ok.clone();
    let ok = out.report(&ctx.printer, "start");
    // The client config the message points at (a store older than it
    // gets it now).
    nifty::sshconfig::refresh_known_hosts(&ctx.store)?;
    // Count what is up, not what was asked for: those that ran already
    // and those whose start succeeded (their init was exec'd).
    let running: Vec<&nifty::store::Instance> = insts
        .iter()
        .filter(|i| !stopped.iter().any(|s| s.name == i.name) || started_ok.contains(&i.name))
        .collect();
    let (Some(first), Some(last)) = (running.first(), running.last()) else {
        ctx.printer
            .info(format!("none of the {} instance(s) is up", a.count));
        return Ok(false);
    };
    let of = if running.len() == insts.len() {
        String::new()
    } else {
        format!(" of {}", insts.len())
    };
    ctx.printer.info(format!(
        "{}{of} instance(s) up. Log in with `nifty ssh {}`, or\n  ssh -F {} nifty-{}   (nifty-{}..nifty-{}; scp and sftp too)",
        running.len(),
        first.name,
        ctx.store.ssh_config().display(),
        first.name,
        first.name,
        last.name
    ));
    Ok(ok)
}

/// Resolves a selection against the store's instances.
pub fn select(ctx: &Ctx, sel: &Selection) -> Result<Vec<String>> {
    let existing = ctx.store.instance_names()?;
    Ok(fleet::select(&sel.names, sel.all, &existing)?)
}

/// The records of the selected instances (any unreadable one is an error).
pub fn select_instances(ctx: &Ctx, sel: &Selection) -> Result<Vec<nifty::store::Instance>> {
    select(ctx, sel)?
        .iter()
        .map(|n| Ok(ctx.store.instance(n)?))
        .collect()
}
