//! `nifty set`, and the limits `create` takes: what users type, checked
//! whole before anything changes.

use anyhow::Result;
use nifty::fleet;
use nifty::limits::{self, Limits};
use nifty::runtime::Runtime;

use super::instance::select;
use super::Ctx;
use crate::cli::{LimitArgs, SetArgs};

/// The limits a command line changes; `None`: left as they are.
#[derive(Debug, Default, Clone)]
pub struct Change {
    tasks: Option<u64>,
    memory: Option<Option<u64>>,
    cpu_weight: Option<Option<u64>>,
    cpus: Option<Option<f64>>,
    io_weight: Option<Option<u64>>,
    disk: Option<Option<u64>>,
    inodes: Option<Option<u64>>,
}

impl Change {
    /// Parses every flag given; any bad one fails before anything is done.
    pub fn parse(a: &LimitArgs) -> Result<Change> {
        Ok(Change {
            tasks: a.tasks.as_deref().map(limits::parse_tasks).transpose()?,
            memory: a.memory.as_deref().map(limits::parse_memory).transpose()?,
            cpu_weight: a
                .cpu_weight
                .as_deref()
                .map(|s| limits::parse_weight("--cpu-weight", s))
                .transpose()?,
            cpus: a.cpus.as_deref().map(limits::parse_cpus).transpose()?,
            io_weight: a
                .io_weight
                .as_deref()
                .map(|s| limits::parse_weight("--io-weight", s))
                .transpose()?,
            disk: a.disk.as_deref().map(limits::parse_disk).transpose()?,
            inodes: a.inodes.as_deref().map(limits::parse_inodes).transpose()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_none()
            && self.memory.is_none()
            && self.cpu_weight.is_none()
            && self.cpus.is_none()
            && self.io_weight.is_none()
            && self.disk.is_none()
            && self.inodes.is_none()
    }

    /// `base` with this change.
    pub fn apply(&self, base: &Limits) -> Limits {
        let mut l = base.clone();
        if let Some(t) = self.tasks {
            l.tasks = t;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { l.$f = v; } )* };
        }
        set!(memory, cpu_weight, cpus, io_weight, disk, inodes);
        l
    }
}

pub fn set(ctx: &Ctx, a: SetArgs) -> Result<bool> {
    let change = Change::parse(&a.limits)?;
    anyhow::ensure!(
        !change.is_empty(),
        "set: give a limit to change (--cpus, --cpu-weight, --io-weight, --disk, --inodes, --memory, --tasks)"
    );
    let names = select(ctx, &a.sel)?;
    let rt = Runtime::new(&ctx.store)?;
    let later = std::sync::Mutex::new(Vec::new());
    let out = fleet::run(&ctx.printer, "set", &names, |name| {
        let inst = ctx.store.instance(name)?;
        let new = change.apply(&inst.limits);
        for what in rt.set_limits(&inst, &new)? {
            later
                .lock()
                .expect("not poisoned")
                .push(format!("{name} ({what})"));
        }
        Ok(())
    });
    let later = later.into_inner().expect("not poisoned");
    if !later.is_empty() {
        ctx.printer.info(format!(
            "takes effect at the next start: {}",
            later.join(", ")
        ));
    }
    if names.len() == 1 && out.failed.is_empty() {
        let inst = ctx.store.instance(&names[0])?;
        ctx.printer
            .info(format!("{}: {}", inst.name, describe(&inst.limits)));
    }
    Ok(out.report(&ctx.printer, "set"))
}

/// The limits in a line: "tasks 512, memory shared, cpu weight 100, ...".
pub fn describe(l: &Limits) -> String {
    format!(
        "tasks {}, memory {}, cpu weight {}, cpus {}, io weight {}, disk {}, inodes {}",
        l.tasks,
        l.memory.map_or("shared".into(), limits::human),
        l.cpu_weight(),
        l.cpus.map_or("max".into(), |c| c.to_string()),
        l.io_weight(),
        l.disk.map_or("unlimited".into(), limits::human),
        l.inodes.map_or("unlimited".into(), |n| n.to_string()),
    )
}
