//! One file per verb group: glue between the CLI and the library, no logic.

mod accounts;
mod clients;
mod files;
mod image;
mod instance;
mod lifecycle;
mod limits;
mod observe;
mod serve;
mod systemd;
mod template;
mod update;

use std::process::ExitCode;

use anyhow::Result;
use nifty::printer::Printer;
use nifty::store::Store;

use crate::cli::{Cli, Command};

/// What every command gets.
pub struct Ctx {
    pub store: Store,
    pub printer: Printer,
}

/// Runs the parsed command line; the exit code says whether all of it worked.
pub fn run(cli: Cli) -> Result<ExitCode> {
    raise_nofile();
    let store = Store::new(Some(cli.root.clone())).with_port_base(cli.port_base);
    let json = match &cli.command {
        Command::List(j) => j.json,
        Command::Status(s) => s.json,
        Command::Doctor(d) => d.json,
        Command::Template(crate::cli::TemplateCmd::List(j)) => j.json,
        Command::Template(crate::cli::TemplateCmd::Show { json, .. }) => json.json,
        Command::Update(u) => u.json,
        Command::Diff(d) => d.json,
        _ => false,
    };
    let ctx = Ctx {
        store,
        printer: Printer {
            quiet: cli.quiet,
            json,
        },
    };
    let ok = match cli.command {
        Command::Template(t) => template::run(&ctx, t)?,
        Command::Create(a) => instance::create(&ctx, a)?,
        Command::Rm(a) => instance::rm(&ctx, a)?,
        Command::Up(a) => instance::up(&ctx, a)?,
        Command::Start(s) => lifecycle::start(&ctx, s)?,
        Command::Stop(a) => lifecycle::stop(&ctx, a, false)?,
        Command::Restart(a) => lifecycle::restart(&ctx, a)?,
        Command::Kill(s) => lifecycle::stop(
            &ctx,
            crate::cli::StopArgs {
                sel: s,
                timeout: 0,
                signal: "KILL".into(),
            },
            true,
        )?,
        Command::List(_) => observe::list(&ctx)?,
        Command::Status(a) => observe::status(&ctx, a)?,
        Command::Logs(a) => observe::logs(&ctx, a)?,
        Command::Exec(a) => return observe::exec(&ctx, a),
        Command::Ssh(a) => return observe::ssh(&ctx, a),
        Command::Passwd(a) => accounts::passwd(&ctx, a)?,
        Command::AuthorizedKeys(a) => accounts::authorized_keys(&ctx, a)?,
        Command::Rekey(s) => accounts::rekey(&ctx, s)?,
        Command::Update(a) => update::update(&ctx, a)?,
        Command::Diff(a) => update::diff(&ctx, a)?,
        Command::Set(a) => limits::set(&ctx, a)?,
        Command::Doctor(a) => doctor(&ctx, a)?,
        Command::Serve(a) => serve::serve(&ctx, &a)?,
        Command::OnDemand(c) => serve::on_demand(&ctx, c)?,
        Command::Systemd(c) => systemd::run(&ctx, c)?,
        Command::Enable(a) => systemd::enable(&ctx, a, true)?,
        Command::Disable(a) => systemd::enable(&ctx, a, false)?,
        Command::Cp(a) => files::cp(&ctx, a)?,
        Command::SshConfig(s) => clients::ssh_config(&ctx, s)?,
        Command::Inventory(a) => clients::inventory(&ctx, a)?,
        Command::Export(a) => image::export(&ctx, a)?,
        Command::Import(a) => image::import(&ctx, a)?,
        Command::Completions { shell } => clients::completions(&shell)?,
        Command::Manpages { dir } => clients::manpages(&ctx, &dir)?,
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn doctor(ctx: &Ctx, a: crate::cli::DoctorArgs) -> Result<bool> {
    use nifty::doctor::{self, Status};
    let mut findings = doctor::check(&ctx.store, a.count);
    if a.fix {
        // The disk store, made (or mounted) now rather than at the first
        // create; a host that cannot have one keeps its warning.
        if !nifty::volume::mounted(&ctx.store) {
            match nifty::volume::ensure(&ctx.store) {
                Ok(()) => ctx.printer.info(format!(
                    "disk store: {}",
                    nifty::volume::describe(&ctx.store)
                )),
                Err(e) => eprintln!("nifty: doctor: disk store: {e}"),
            }
        }
        let applied = doctor::fix(&findings);
        let mut sysctls = Vec::new();
        for (change, r) in &applied {
            match (change, r) {
                (doctor::Change::Sysctl { key, value }, Ok(())) => {
                    ctx.printer.info(format!("set {key} = {value}"));
                    sysctls.push(format!("  {key} = {value}"));
                }
                (doctor::Change::Sysctl { key, .. }, Err(e)) => {
                    eprintln!("nifty: doctor: cannot set {key}: {e}")
                }
                (doctor::Change::FavorDynmods, Ok(())) => ctx.printer.info(
                    "turned on favordynmods: a start's v1 cgroup joins no longer wait for an \
                     RCU grace period (until the next boot; the kernel command line \
                     cgroup_favordynmods=true, Linux 6.7, makes it last)",
                ),
                (doctor::Change::FavorDynmods, Err(e)) => {
                    eprintln!("nifty: doctor: cannot turn on favordynmods: {e}")
                }
            }
        }
        if !sysctls.is_empty() {
            ctx.printer.info(
                "to keep them after a reboot, put these lines in /etc/sysctl.d/90-nifty.conf:",
            );
            for line in sysctls {
                ctx.printer.info(line);
            }
        }
        if applied.iter().any(|(_, r)| r.is_ok()) {
            findings = doctor::check(&ctx.store, a.count);
        }
    }
    if ctx.printer.json {
        ctx.printer.json(&findings);
    } else {
        for f in &findings {
            let mark = match f.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{mark} {:<26} {}", f.check, f.value);
            if f.status != Status::Ok {
                println!("     {:<26} need {}", "", f.need);
                if !f.fix.is_empty() {
                    println!("     {:<26} fix: {}", "", f.fix);
                }
            }
        }
    }
    let failed = findings.iter().filter(|f| f.status == Status::Fail).count();
    ctx.printer.info(format!(
        "{failed} check(s) failed for a fleet of {}",
        a.count
    ));
    Ok(failed == 0)
}

/// Fleets of thousands hold many pidfds and files at once (`stop` one per
/// container process): lift the limit on open files, the hard one too when
/// nifty may (root: up to fs.nr_open, as systemd does for itself), else
/// the soft one to the hard one.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let want = nr_open.min(1 << 20);
    if l.maximum.is_some_and(|m| m < want) {
        let all = Rlimit {
            current: Some(want),
            maximum: Some(want),
        };
        if setrlimit(Resource::Nofile, all).is_ok() {
            return;
        }
    }
    if l.current < l.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: l.maximum,
                maximum: l.maximum,
            },
        );
    }
}
