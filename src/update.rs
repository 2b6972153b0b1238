//! `nifty update`: instances move to a newer (or a given) version of their
//! template. Stopped ones only change their record; running ones restart
//! in batches, and each batch must come back healthy (init running,
//! Dropbear listening on the instance's port, an SSH login answered with
//! the instance's own host key) before the next begins. A batch that does
//! not goes back to the version it had and runs again, and the update
//! stops there. Instances keep their upper layer (homes, keys, passwords);
//! a file both the new template and the instance changed is reported.
//!
//! One update at a time per state root (`update.lock`, naming its holder).
//! Before a batch stops, its names go to `update.journal`; an update killed
//! mid-batch leaves each instance on one version (the record is written
//! between its stop and its start), and the next `update` first starts the
//! journal's instances that are not running, then goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::runtime::{Runtime, State, StopOptions};
use crate::store::{Instance, Store};
use crate::{Error, Result};

/// How to update.
#[derive(Debug, Clone)]
pub struct Options {
    /// The version to move to (default: each template's newest).
    pub to: Option<u32>,
    /// Running instances restarted at once.
    pub batch: usize,
    /// How long a restarted instance has to answer an SSH login.
    pub health_timeout: Duration,
}

/// What happened to one instance.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub name: String,
    pub from: u32,
    pub to: u32,
    /// `record` (it was stopped), `restarted`, or `rolled back`.
    pub how: &'static str,
}

/// An instance whose update failed, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Failed {
    pub name: String,
    pub from: u32,
    pub to: u32,
    pub error: String,
    /// It runs its old version again.
    pub rolled_back: bool,
}

/// A file that the new version changes and the instance changed too: the
/// instance's copy (in its upper layer) stays and hides the template's.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Conflict {
    pub name: String,
    pub path: String,
}

/// One batch of restarts, timed from the update's start (milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    pub names: Vec<String>,
    pub began_ms: u64,
    pub ended_ms: u64,
    pub healthy: bool,
}

/// The whole update, for `--json` and for the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub moved: Vec<Moved>,
    pub current: Vec<String>,
    pub failed: Vec<Failed>,
    /// Instances a killed update left stopped, started again first.
    pub resumed: Vec<String>,
    pub conflicts: Vec<Conflict>,
    pub batches: Vec<Batch>,
    pub seconds: f64,
}

/// Moves `insts` to their target version (see the module).
pub fn run(
    store: &Store,
    rt: &Runtime,
    insts: &[Instance],
    opts: &Options,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report> {
    if opts.batch == 0 {
        return Err(Error::Invalid(
            "--batch 0: a batch restarts at least one instance".into(),
        ));
    }
    let began = Instant::now();
    let _lock = UpdateLock::take(store)?;
    let mut report = Report::default();
    // Where each instance goes; anything wrong is said before anything moves.
    // (The template record is read once per template, not per instance.)
    let mut targets = Vec::new();
    let mut newest: BTreeMap<&str, u32> = BTreeMap::new();
    for inst in insts {
        let newest = match newest.get(inst.template.as_str()) {
            Some(v) => *v,
            None => {
                let v = store.template(&inst.template)?.version;
                newest.insert(&inst.template, v);
                v
            }
        };
        let to = opts.to.unwrap_or(newest);
        if !store.template_rootfs_at(&inst.template, to).is_dir() {
            let have: Vec<String> = store
                .template_versions(&inst.template)?
                .iter()
                .map(|t| t.version.to_string())
                .collect();
            return Err(Error::Invalid(format!(
                "template {:?} has no version {to} (it has {}); see `nifty template show {}`",
                inst.template,
                have.join(", "),
                inst.template
            )));
        }
        targets.push((inst.clone(), to));
    }
    let infos = rt.infos(insts);
    if let Some(i) = infos.iter().find(|i| i.state == State::Stopping) {
        return Err(Error::Invalid(format!(
            "instance {:?} is in the middle of a stop: finish it with `nifty stop {}`, then update",
            i.name, i.name
        )));
    }
    // An update killed mid-batch: its instances run again first.
    let journal = store.root().join("update.journal");
    if let Ok(text) = std::fs::read_to_string(&journal) {
        let names: BTreeSet<&str> = text.lines().collect();
        let stopped: Vec<Instance> = infos
            .iter()
            .zip(insts)
            .filter(|(i, _)| names.contains(i.name.as_str()) && i.state == State::Stopped)
            .map(|(_, inst)| store.instance(&inst.name))
            .collect::<Result<_>>()?;
        for (name, r) in rt.start_many(&stopped, &|n| progress(n)) {
            match r {
                Ok(()) => report.resumed.push(name),
                Err(e) => return Err(Error::Host(format!(
                    "an interrupted update left instance {name:?} stopped and it does not start: {e}"
                ))),
            }
        }
        let _ = std::fs::remove_file(&journal);
    }
    let running: BTreeSet<String> = rt
        .infos(insts)
        .into_iter()
        .filter(|i| i.state == State::Running)
        .map(|i| i.name)
        .collect();
    let mut changes = Changes::default();
    let mut restart = Vec::new();
    for (inst, to) in targets {
        if inst.template_version == to {
            report.current.push(inst.name.clone());
            progress(&inst.name);
            continue;
        }
        for path in changes.between(store, &inst.template, inst.template_version, to) {
            if shadowed(store, &inst, path) {
                report.conflicts.push(Conflict {
                    name: inst.name.clone(),
                    path: path.clone(),
                });
            }
        }
        if running.contains(&inst.name) {
            restart.push((inst, to));
        } else {
            let from = inst.template_version;
            match set_version(store, &inst.name, to, rt) {
                Ok(()) => report.moved.push(Moved {
                    name: inst.name.clone(),
                    from,
                    to,
                    how: "record",
                }),
                Err(e) => report.failed.push(Failed {
                    name: inst.name.clone(),
                    from,
                    to,
                    error: e.to_string(),
                    rolled_back: false,
                }),
            }
            progress(&inst.name);
        }
    }
    for chunk in restart.chunks(opts.batch) {
        let names: Vec<String> = chunk.iter().map(|(i, _)| i.name.clone()).collect();
        crate::disk::write_atomic(&journal, (names.join("\n") + "\n").as_bytes(), 0o644)?;
        let began_ms = began.elapsed().as_millis() as u64;
        let healthy = restart_batch(store, rt, chunk, opts, &mut report, progress);
        report.batches.push(Batch {
            names,
            began_ms,
            ended_ms: began.elapsed().as_millis() as u64,
            healthy,
        });
        let _ = std::fs::remove_file(&journal);
        if !healthy {
            break;
        }
    }
    report.seconds = began.elapsed().as_secs_f64();
    Ok(report)
}

/// Restarts one batch on its new version; on any failure puts the failed
/// ones back on their old version, running. Says whether all came back.
fn restart_batch(
    store: &Store,
    rt: &Runtime,
    chunk: &[(Instance, u32)],
    opts: &Options,
    report: &mut Report,
    progress: &(dyn Fn(&str) + Sync),
) -> bool {
    let insts: Vec<Instance> = chunk.iter().map(|(i, _)| i.clone()).collect();
    let mut failed: Vec<(Instance, u32, String)> = Vec::new();
    let mut stopped: std::collections::HashMap<String, Result<()>> = rt
        .stop_many(&insts, StopOptions::default(), &|_| {})
        .into_iter()
        .collect();
    let mut moved = Vec::new();
    for (inst, to) in chunk {
        let r = stopped.remove(&inst.name).unwrap_or_else(|| {
            Err(Error::Host(format!(
                "instance {:?}: no stop result",
                inst.name
            )))
        });
        match r.and_then(|()| set_version(store, &inst.name, *to, rt)) {
            Ok(()) => moved.push((inst.clone(), *to)),
            Err(e) => failed.push((inst.clone(), *to, format!("stop: {e}"))),
        }
    }
    let fresh: Vec<Instance> = moved
        .iter()
        .filter_map(|(i, _)| store.instance(&i.name).ok())
        .collect();
    // Each start's result by name: a result is never paired with another
    // instance's (a record that cannot be read is a failure of its own).
    let mut started: std::collections::HashMap<String, Result<()>> =
        rt.start_many(&fresh, &|_| {}).into_iter().collect();
    let checks: Vec<(Instance, u32, Result<()>)> = std::thread::scope(|s| {
        let handles: Vec<_> = moved
            .iter()
            .map(|(old, to)| {
                let inst = fresh.iter().find(|i| i.name == old.name);
                let r = match (inst, started.remove(&old.name)) {
                    (Some(i), Some(Ok(()))) => Ok(i),
                    (_, Some(Err(e))) => Err(e.to_string()),
                    _ => Err(format!(
                        "its record cannot be read: see `nifty status {}`",
                        old.name
                    )),
                };
                s.spawn(move || {
                    let h = match r {
                        Ok(inst) => healthy(store, rt, inst, opts.health_timeout),
                        Err(e) => Err(Error::Host(format!("start: {e}"))),
                    };
                    (old.clone(), *to, h)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("health check thread"))
            .collect()
    });
    for (inst, to, h) in checks {
        match h {
            Ok(()) => {
                report.moved.push(Moved {
                    name: inst.name.clone(),
                    from: inst.template_version,
                    to,
                    how: "restarted",
                });
                progress(&inst.name);
            }
            Err(e) => failed.push((inst, to, e.to_string())),
        }
    }
    if failed.is_empty() {
        return true;
    }
    // Back to the version each had, running again.
    let back: Vec<Instance> = failed.iter().map(|(i, _, _)| i.clone()).collect();
    // A clean stop, as for any instance (what does not go within the
    // stop timeout is killed then).
    let _ = rt.stop_many(&back, StopOptions::default(), &|_| {});
    for (inst, to, error) in failed {
        let rolled_back = set_version(store, &inst.name, inst.template_version, rt)
            .and_then(|()| store.instance(&inst.name))
            .and_then(|i| {
                rt.start_many(std::slice::from_ref(&i), &|_| {})
                    .remove(0)
                    .1
                    .and_then(|()| healthy(store, rt, &i, opts.health_timeout))
            })
            .is_ok();
        report.failed.push(Failed {
            name: inst.name.clone(),
            from: inst.template_version,
            to,
            error,
            rolled_back,
        });
        progress(&inst.name);
    }
    false
}

/// Writes version `to` into an instance's record, under its lock, unless
/// it runs (a running instance is moved only by a restart).
fn set_version(store: &Store, name: &str, to: u32, rt: &Runtime) -> Result<()> {
    let _lock = crate::runtime::linux::proc::lock(&store.instance_dir(name))?;
    let mut inst = store.instance(name)?;
    if rt.info(&inst).state != State::Stopped {
        return Err(Error::Running(name.to_string(), ""));
    }
    inst.template_version = to;
    store.save_instance(&inst)
}

/// Waits until the instance is healthy: its init runs, its port listens,
/// and an SSH login answers with its own host key.
pub fn healthy(store: &Store, rt: &Runtime, inst: &Instance, timeout: Duration) -> Result<()> {
    let end = Instant::now() + timeout;
    let mut last = String::from("not checked");
    while Instant::now() < end {
        let info = rt.info(inst);
        if info.state != State::Running {
            last = format!("its init is not running ({})", info.state);
        } else if !crate::runtime::status::listening(inst.port) {
            last = format!("nothing listens on its port {}", inst.port);
        } else {
            let left = end
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1);
            let out = crate::sshclient::command(store, inst)?
                .args(["-o", "BatchMode=yes"])
                .arg("-o")
                .arg(format!("ConnectTimeout={}", left.min(10)))
                .args(["--", "true"])
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| {
                    Error::Host(format!(
                        "cannot run ssh for the health check: {e} (Debian's openssh-client)"
                    ))
                })?;
            if out.status.success() {
                return Ok(());
            }
            last = format!(
                "an SSH login with its host key failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(Error::Host(format!(
        "instance {:?} not healthy after {} s: {last}",
        inst.name,
        timeout.as_secs()
    )))
}

/// The files that differ between two versions of a template, cached per
/// pair.
#[derive(Default)]
struct Changes {
    cache: BTreeMap<(String, u32, u32), Vec<String>>,
}

impl Changes {
    fn between(&mut self, store: &Store, template: &str, from: u32, to: u32) -> &Vec<String> {
        self.cache
            .entry((template.to_string(), from, to))
            .or_insert_with(|| {
                diff_trees(
                    &store.template_rootfs_at(template, from),
                    &store.template_rootfs_at(template, to),
                )
            })
    }
}

/// Paths (`/etc/inittab`) that differ between two template roots: present
/// in one only, of another type, or with other contents or link target.
pub fn diff_trees(a: &Path, b: &Path) -> Vec<String> {
    let (ta, tb) = (tree(a), tree(b));
    let mut out = BTreeSet::new();
    for (p, ea) in &ta {
        match tb.get(p) {
            Some(eb) if same(a, b, p, ea, eb) => {}
            _ => {
                out.insert(p.clone());
            }
        }
    }
    for p in tb.keys() {
        if !ta.contains_key(p) {
            out.insert(p.clone());
        }
    }
    out.into_iter().collect()
}

/// A template's entries: path -> (kind, size). Templates are nifty's own
/// trees (root-owned, built from host binaries), walked without following
/// links.
fn tree(root: &Path) -> BTreeMap<String, (char, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let rel = rel.join(e.file_name());
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            let kind = if m.is_dir() {
                stack.push(rel.clone());
                'd'
            } else if m.file_type().is_symlink() {
                'l'
            } else {
                'f'
            };
            out.insert(format!("/{}", rel.display()), (kind, m.size()));
        }
    }
    out
}

fn same(a: &Path, b: &Path, p: &str, ea: &(char, u64), eb: &(char, u64)) -> bool {
    let rel = p.trim_start_matches('/');
    match (ea.0, eb.0) {
        ('d', 'd') => true,
        ('l', 'l') => std::fs::read_link(a.join(rel)).ok() == std::fs::read_link(b.join(rel)).ok(),
        ('f', 'f') if ea.1 == eb.1 => same_bytes(&a.join(rel), &b.join(rel)),
        _ => false,
    }
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let (Ok(na), Ok(nb)) = (fa.read(&mut ba), fb.read(&mut bb)) else {
            return false;
        };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

/// Does the instance's upper layer hold its own copy of `path` (or a
/// whiteout of it)? Only metadata is read, and no link the tenant planted
/// is followed on the way (openat2 with RESOLVE_NO_SYMLINKS, beneath the
/// upper layer).
fn shadowed(store: &Store, inst: &Instance, path: &str) -> bool {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let Ok((upper, _)) = store.instance_layers(inst) else {
        return false;
    };
    let Ok(dir) = rustix::fs::open(
        &upper,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    rustix::fs::openat2(
        &dir,
        path.trim_start_matches('/'),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .and_then(|fd| rustix::fs::fstat(&fd))
    .is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory
    })
}

/// One change of an instance against its template (`nifty diff`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    /// `A` added, `M` its own copy of a template file, `D` a template file
    /// it deleted.
    pub kind: char,
    pub path: String,
}

/// At most this many entries of an upper layer are listed: it is the
/// tenant's and may hold any number of files.
const MAX_CHANGES: usize = 100_000;

/// What an instance changed against its template version: its upper
/// layer, walked by fd (never through a link the tenant planted),
/// whiteouts as deletions.
pub fn instance_changes(store: &Store, inst: &Instance) -> Result<Vec<Change>> {
    use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
    let (upper, _) = store.instance_layers(inst)?;
    let lower = store.instance_lower(inst);
    let open = |at: &rustix::fd::OwnedFd, name: &std::ffi::CStr| {
        rustix::fs::openat(
            at,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let root = rustix::fs::open(
        &upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Error::sys(format!("open({})", upper.display())))?;
    let mut out = Vec::new();
    let mut stack = vec![(root, String::new())];
    while let Some((fd, rel)) = stack.pop() {
        let dir = Dir::read_from(&fd)
            .map_err(Error::sys(format!("read_dir({}{rel})", upper.display())))?;
        for e in dir.flatten() {
            let name = e.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            if out.len() >= MAX_CHANGES {
                return Err(Error::Invalid(format!(
                    "instance {:?}: its upper layer holds more than {MAX_CHANGES} entries; nifty lists no more",
                    inst.name
                )));
            }
            let path = format!("{rel}/{}", name.to_string_lossy());
            let Ok(st) = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            let in_template = lower
                .join(path.trim_start_matches('/'))
                .symlink_metadata()
                .is_ok();
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    if !in_template {
                        out.push(Change {
                            kind: 'A',
                            path: path.clone(),
                        });
                    }
                    if let Ok(sub) = open(&fd, name) {
                        stack.push((sub, path));
                    }
                }
                FileType::CharacterDevice if st.st_rdev == 0 => {
                    out.push(Change { kind: 'D', path });
                }
                _ => out.push(Change {
                    kind: if in_template { 'M' } else { 'A' },
                    path,
                }),
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// One update at a time per state root: `update.lock`, flocked while an
/// update runs, holding its PID for the one that is refused.
struct UpdateLock;

impl UpdateLock {
    fn take(store: &Store) -> Result<crate::disk::PidLock> {
        store.ensure()?;
        let path = store.root().join("update.lock");
        crate::disk::lock_with_pid(&path, |pid| {
            Error::Invalid(format!(
                "an update is running already (nifty PID {pid}, holding {}): wait for it to end",
                path.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_differ_where_a_file_link_or_entry_does() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for r in [&a, &b] {
            std::fs::create_dir_all(r.join("etc")).unwrap();
            std::fs::create_dir_all(r.join("bin")).unwrap();
            std::fs::write(r.join("etc/same"), "x").unwrap();
            std::os::unix::fs::symlink("busybox", r.join("bin/sh")).unwrap();
        }
        std::fs::write(a.join("etc/inittab"), "one").unwrap();
        std::fs::write(b.join("etc/inittab"), "two").unwrap();
        std::fs::write(b.join("etc/new"), "n").unwrap();
        std::os::unix::fs::symlink("busybox", a.join("bin/ls")).unwrap();
        std::os::unix::fs::symlink("toybox", b.join("bin/ls")).unwrap();
        assert_eq!(diff_trees(&a, &b), ["/bin/ls", "/etc/inittab", "/etc/new"]);
        assert!(diff_trees(&a, &a).is_empty());
    }
}
