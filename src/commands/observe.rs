//! `nifty list`, `status`, `logs`, `exec`, `ssh`.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use nifty::limits::human;
use nifty::runtime::status::{tail, Proc};
use nifty::runtime::{Runtime, State};
use nifty::store::Instance;
use rayon::prelude::*;

use super::Ctx;
use crate::cli::{ExecArgs, LogsArgs, SshArgs, StatusArgs};

pub fn list(ctx: &Ctx) -> Result<bool> {
    let names = ctx.store.instance_names()?;
    let rt = Runtime::new(&ctx.store)?;
    let rows: Vec<Result<Instance, nifty::Error>> =
        names.par_iter().map(|n| ctx.store.instance(n)).collect();
    let mut insts = Vec::with_capacity(rows.len());
    let mut ok = true;
    for r in rows {
        match r {
            Ok(i) => insts.push(i),
            Err(e) => {
                eprintln!("nifty: list: {e}");
                ok = false;
            }
        }
    }
    let mut infos = rt.infos(&insts);
    rt.measure(&insts, &mut infos);
    if ctx.printer.json {
        ctx.printer.json(&infos);
        return Ok(ok);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // The on-demand column only where there are on-demand instances.
    let any_on_demand = infos.iter().any(|i| i.on_demand.is_some());
    let now = nifty::runtime::ondemand::now();
    let _ = writeln!(
        out,
        "{:<12} {:<8} {:<8} {:>8} {:>6} {:>9} {:>9} {:>6} {:>13}  {}",
        "NAME",
        "STATE",
        "BACKEND",
        "PID",
        "PORT",
        "UPTIME",
        "MEMORY",
        "CPU",
        "DISK",
        if any_on_demand {
            format!("{:<16}  ON DEMAND", "TEMPLATE")
        } else {
            "TEMPLATE".into()
        },
    );
    for i in &infos {
        let mut template = format!(
            "{} v{}{}",
            i.template,
            i.template_version,
            if i.behind { " (behind)" } else { "" }
        );
        if any_on_demand {
            template = format!("{template:<16}");
        }
        let _ = writeln!(
            out,
            "{:<12} {:<8} {:<8} {:>8} {:>6} {:>9} {:>9} {:>6} {:>13}  {}{}",
            i.name,
            i.state,
            i.backend,
            i.pid.map_or("-".into(), |p| p.to_string()),
            i.port,
            i.uptime_secs.map_or("-".into(), duration),
            i.memory_bytes.map_or("-".into(), human),
            i.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
            disk(i.disk_bytes, i.limits.disk),
            template,
            match &i.on_demand {
                Some(od) => format!("  {}", od.summary(now)),
                None if any_on_demand => "  -".into(),
                None => String::new(),
            },
        );
    }
    let count = |st: State| infos.iter().filter(|i| i.state == st).count();
    let running = count(State::Running);
    let stopping = match count(State::Stopping) {
        0 => String::new(),
        n => format!(", {n} stopping (finish with `nifty stop`)"),
    };
    let behind = match infos.iter().filter(|i| i.behind).count() {
        0 => String::new(),
        n => format!(", {n} behind their template (`nifty update`)"),
    };
    let _ = writeln!(
        out,
        "{} instance(s), {running} running{stopping}{behind}",
        infos.len()
    );
    Ok(ok)
}

pub fn status(ctx: &Ctx, a: StatusArgs) -> Result<bool> {
    let inst = ctx.store.instance(&a.name)?;
    let rt = Runtime::new(&ctx.store)?;
    let st = rt.status(&inst, a.lines)?;
    if ctx.printer.json {
        ctx.printer.json(&st);
        return Ok(true);
    }
    let dot = if st.info.state == State::Running {
        "●"
    } else {
        "○"
    };
    println!("{dot} {} - nifty container # {}", inst.name, inst.name);
    println!(
        "    Template: {} v{}{} ({})",
        inst.template,
        inst.template_version,
        if st.info.behind {
            " (behind its newest version: `nifty update`)"
        } else {
            ""
        },
        ctx.store.instance_lower(&inst).display()
    );
    match (st.info.pid, st.info.uptime_secs) {
        (Some(pid), up) => {
            println!(
                "      Active: running for {}",
                up.map_or("?".into(), duration)
            );
            println!("    Init PID: {pid}");
        }
        _ => println!("      Active: stopped"),
    }
    match &st.unit {
        Some(u) => {
            println!(
                "     Backend: systemd: {} ({}; {})",
                u.name, u.file, u.enabled
            );
            if let Some(p) = u.main_pid {
                println!("    Main PID: {p} (systemd-nspawn)");
            }
        }
        None => println!("     Backend: {}", st.info.backend),
    }
    let port_state = match &st.info.on_demand {
        Some(od) if od.phase == nifty::runtime::ondemand::Phase::Unserved => {
            format!("not held: {}", rt.hold_ports_hint(&inst))
        }
        Some(_) => "held by the host: a connection starts it".into(),
        None if st.listening => "listening".into(),
        None => "not listening".into(),
    };
    println!(
        "        Port: {} ({port_state})  ssh -p {} {}@localhost",
        inst.port, inst.port, inst.user
    );
    if let Some(od) = &st.info.on_demand {
        println!(
            "   On demand: {}; idle timeout {}",
            od.summary(nifty::runtime::ondemand::now()),
            humantime::format_duration(std::time::Duration::from_secs(od.idle_timeout_secs))
        );
    }
    if let Some(m) = st.info.memory_bytes {
        println!("      Memory: {}", human(m));
    }
    if let Some(c) = st.info.cpu_percent {
        println!(
            "         CPU: {c:.1}% of one CPU (over the last {} ms)",
            nifty::runtime::CPU_WINDOW.as_millis()
        );
    }
    println!(
        "        Disk: {}",
        disk(st.info.disk_bytes, inst.limits.disk)
    );
    println!("      Limits: {}", super::limits::describe(&inst.limits));
    println!("      CGroup: {}", st.cgroup);
    let mut children: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in &st.processes {
        children.entry(p.ppid).or_default().push(p);
    }
    let pids: Vec<i32> = st.processes.iter().map(|p| p.pid).collect();
    let roots: Vec<&Proc> = st
        .processes
        .iter()
        .filter(|p| !pids.contains(&p.ppid))
        .collect();
    fn walk(p: &Proc, prefix: &str, last: bool, children: &HashMap<i32, Vec<&Proc>>) {
        println!(
            "              {prefix}{}{} {}",
            if last { "└─" } else { "├─" },
            p.pid,
            nifty::printer::escape_controls(p.cmdline.as_bytes())
        );
        let kids = children.get(&p.pid).map(Vec::as_slice).unwrap_or(&[]);
        let next = format!("{prefix}{}", if last { "  " } else { "│ " });
        for (i, k) in kids.iter().enumerate() {
            walk(k, &next, i + 1 == kids.len(), children);
        }
    }
    for (i, r) in roots.iter().enumerate() {
        walk(r, "", i + 1 == roots.len(), &children);
    }
    if !st.log.is_empty() {
        println!();
        for l in &st.log {
            println!("{}", nifty::printer::escape_controls(l.as_bytes()));
        }
    }
    Ok(true)
}

pub fn logs(ctx: &Ctx, a: LogsArgs) -> Result<bool> {
    let inst = ctx.store.instance(&a.name)?;
    let rt = Runtime::new(&ctx.store)?;
    let path = rt.console_log(&inst);
    let mut out = std::io::stdout().lock();
    // What the container wrote, escaped on a terminal (a tenant's escape
    // sequences must not drive the administrator's terminal) unless --raw.
    let escape = !a.raw && std::io::stdout().is_terminal();
    let emit = |out: &mut std::io::StdoutLock<'_>, bytes: &[u8]| {
        if escape {
            out.write_all(nifty::printer::escape_controls(bytes).as_bytes())
        } else {
            out.write_all(bytes)
        }
    };
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !a.follow => return Ok(true),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    match a.lines {
        Some(n) => {
            for l in tail(&path, n) {
                emit(&mut out, format!("{l}\n").as_bytes()).ok();
            }
            f.seek(std::io::SeekFrom::End(0))?;
        }
        None => {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        if emit(&mut out, &buf[..k]).is_err() {
                            return Ok(true); // broken pipe: the reader is gone
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
                }
            }
        }
    }
    if !a.follow {
        return Ok(true);
    }
    let mut reader = std::io::BufReader::new(f);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            out.flush().ok();
            std::thread::sleep(Duration::from_millis(200));
            // Rotated at a restart: reopen.
            let pos = reader.stream_position()?;
            if std::fs::metadata(&path).is_ok_and(|m| m.len() < pos) {
                reader = std::io::BufReader::new(std::fs::File::open(&path)?);
            }
            continue;
        }
        if emit(&mut out, &line).is_err() {
            return Ok(true);
        }
    }
}

pub fn exec(ctx: &Ctx, a: ExecArgs) -> Result<ExitCode> {
    let inst = ctx.store.instance(&a.name)?;
    let rt = Runtime::new(&ctx.store)?;
    let env = a
        .env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {kv:?}: use KEY=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    let code = rt.exec(&inst, a.user.as_deref(), &a.cmd, &env)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

pub fn ssh(ctx: &Ctx, a: SshArgs) -> Result<ExitCode> {
    let inst = ctx.store.instance(&a.name)?;
    Runtime::new(&ctx.store)?.reachable(&inst)?;
    let mut cmd = nifty::sshclient::command(&ctx.store, &inst)?;
    if !a.cmd.is_empty() {
        cmd.arg("--").args(&a.cmd);
    }
    let e = cmd.exec();
    Err(e).context("cannot run ssh: install Debian's openssh-client")
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Disk use against its limit: "12M/1.0G", "12M", "-/1.0G".
fn disk(used: Option<u64>, limit: Option<u64>) -> String {
    let used = used.map_or("-".into(), human);
    match limit {
        Some(l) => format!("{used}/{}", human(l)),
        None => used,
    }
}
