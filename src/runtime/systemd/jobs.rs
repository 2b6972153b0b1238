//! The job engine: one StartUnit or StopUnit per instance, all queued at
//! once (systemd runs them in parallel, a window of them at a time), and
//! their ends awaited on one D-Bus connection.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zbus::zvariant::OwnedObjectPath;

use super::dbus::dbus_err;
use super::{unit, StopOptions, Systemd};
use crate::store::Instance;
use crate::{Error, Result};

/// Jobs queued at once. systemd runs queued jobs in parallel, and tracks
/// the client of each through a match rule on the bus; dbus-daemon allows
/// a connection 512 of them and cuts systemd off past that (seen with a
/// thousand queued stops). 200 stay well below.
const JOB_WINDOW: usize = 200;

/// How a job of ours ended.
struct JobEnd {
    unit: String,
    result: String,
}

impl Systemd {
    /// Runs one job per instance (`start` or `stop`), all queued at once,
    /// and waits for them: systemd runs them in parallel. `deadline`, when
    /// given, is when jobs still running are cut short by killing their
    /// units.
    fn jobs(
        &self,
        insts: &[&Instance],
        verb: &str,
        kill_after: Option<Duration>,
        done: &(dyn Fn(&str) + Sync),
    ) -> Vec<(String, Result<()>)> {
        let mut results: Vec<(String, Result<()>)> = Vec::new();
        let manager = match self.manager() {
            Ok(m) => m,
            Err(e) => return crate::runtime::fail(insts, &e),
        };
        // Listen before queueing anything, from a thread of its own, so no
        // JobRemoved is missed and none blocks the replies behind it.
        if self.subscribed.get().is_none() {
            match manager.subscribe() {
                Ok(()) => {
                    let _ = self.subscribed.set(());
                }
                Err(e) => return crate::runtime::fail(insts, &dbus_err("Subscribe")(e)),
            }
        }
        let signals = match manager.receive_job_removed() {
            Ok(s) => s,
            Err(e) => return crate::runtime::fail(insts, &dbus_err("JobRemoved")(e)),
        };
        let (tx, rx) = mpsc::channel::<(OwnedObjectPath, JobEnd)>();
        let listener = std::thread::spawn(move || {
            for sig in signals {
                let Ok(a) = sig.args() else { continue };
                let end = JobEnd {
                    unit: a.unit.clone(),
                    result: a.result.clone(),
                };
                if tx.send((a.job.clone(), end)).is_err() {
                    break;
                }
            }
        });
        // Jobs in flight: job object -> (instance, when it was queued).
        let mut pending: HashMap<OwnedObjectPath, (String, Instant)> = HashMap::new();
        let mut queue = insts.iter();
        let mut killed: std::collections::HashSet<OwnedObjectPath> = Default::default();
        let mut last_progress = Instant::now();
        loop {
            // Keep the window full.
            while pending.len() < JOB_WINDOW {
                let Some(inst) = queue.next() else { break };
                let unit = self.names.unit(&inst.name);
                let r = match verb {
                    "start" => manager.start_unit(&unit, "replace"),
                    _ => manager.stop_unit(&unit, "replace"),
                };
                match r {
                    Ok(job) => {
                        pending.insert(job, (inst.name.clone(), Instant::now()));
                    }
                    Err(e) => {
                        done(&inst.name);
                        results.push((
                            inst.name.clone(),
                            Err(Error::Host(format!(
                                "instance {:?}: systemd refused to {verb} {unit}: {e}",
                                inst.name
                            ))),
                        ));
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            // A stop that outlives its timeout: kill what is left of it.
            if let Some(k) = kill_after {
                for (job, (name, queued)) in &pending {
                    if queued.elapsed() >= k && killed.insert(job.clone()) {
                        let _ = manager.kill_unit(&self.names.unit(name), "all", libc::SIGKILL);
                    }
                }
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((job, end)) => {
                    let Some((name, _)) = pending.remove(&job) else {
                        continue;
                    };
                    last_progress = Instant::now();
                    done(&name);
                    let r = if end.result == "done" {
                        Ok(())
                    } else {
                        Err(Error::Host(format!(
                            "instance {name:?}: {verb} job of {} ended {:?}; see `journalctl -u '{}'`",
                            end.unit, end.result, end.unit
                        )))
                    };
                    results.push((name, r));
                }
                // The units' own timeouts bound every job; this only guards
                // against a systemd that went silent.
                Err(mpsc::RecvTimeoutError::Timeout)
                    if last_progress.elapsed()
                        < Duration::from_secs(unit::STOP_TIMEOUT_SECS + 120) => {}
                Err(_) => {
                    for (_, (name, _)) in pending.drain() {
                        done(&name);
                        results.push((
                            name.clone(),
                            Err(Error::Host(format!(
                                "instance {name:?}: systemd did not finish the {verb} job in time"
                            ))),
                        ));
                    }
                    for inst in queue.by_ref() {
                        results.push((
                            inst.name.clone(),
                            Err(Error::Host(format!(
                                "instance {:?}: not {verb}ed: systemd stopped answering",
                                inst.name
                            ))),
                        ));
                    }
                }
            }
        }
        drop(rx);
        // The listener ends with the connection; do not wait for it.
        drop(listener);
        results
    }

    /// Starts instances: writes what is missing of their unit files, then
    /// one StartUnit each. An instance that runs already is an error.
    pub fn start_many(
        &self,
        insts: &[&Instance],
        done: &(dyn Fn(&str) + Sync),
    ) -> Vec<(String, Result<()>)> {
        let mut out = Vec::new();
        if let Err(e) = self.prepare(insts) {
            return crate::runtime::fail(insts, &e);
        }
        let states = self.unit_states().unwrap_or_default();
        let mut todo = Vec::new();
        for inst in insts {
            let active = states
                .get(&inst.name)
                .is_some_and(|(s, _)| s == "active" || s == "activating");
            if active {
                done(&inst.name);
                out.push((
                    inst.name.clone(),
                    Err(Error::Running(inst.name.clone(), "")),
                ));
            } else if !self.store.instance_lower(inst).is_dir() {
                done(&inst.name);
                out.push((
                    inst.name.clone(),
                    Err(Error::NoTemplate(inst.template.clone())),
                ));
            } else {
                // A unit left failed by an earlier run would refuse nothing,
                // but its old result would linger in `status`.
                let _ = self
                    .manager()
                    .map(|m| m.reset_failed_unit(&self.names.unit(&inst.name)));
                todo.push(*inst);
            }
        }
        out.extend(self.jobs(&todo, "start", None, done));
        out
    }

    /// Stops instances: one StopUnit each (systemd-nspawn passes init
    /// SIGUSR2, BusyBox init powers off); after `opts.timeout` what is
    /// left is killed. A stopped instance is not an error.
    pub fn stop_many(
        &self,
        insts: &[&Instance],
        opts: StopOptions,
        done: &(dyn Fn(&str) + Sync),
    ) -> Vec<(String, Result<()>)> {
        if opts.signal != rustix::process::Signal::Usr2 && !opts.kill {
            return insts
                .iter()
                .map(|i| {
                    (
                        i.name.clone(),
                        Err(Error::Invalid(format!(
                            "instance {:?} runs under systemd, whose unit stops it with SIGUSR2 \
                             (BusyBox init's poweroff); --signal is for native instances; \
                             use `nifty kill` to kill it at once",
                            i.name
                        ))),
                    )
                })
                .collect();
        }
        if opts.kill {
            if let Ok(m) = self.manager() {
                for inst in insts {
                    let _ = m.kill_unit(&self.names.unit(&inst.name), "all", libc::SIGKILL);
                }
            }
        }
        let out = self.jobs(insts, "stop", Some(opts.timeout), done);
        if let Ok(m) = self.manager() {
            for inst in insts {
                // A killed container leaves its unit "failed": clear it.
                let _ = m.reset_failed_unit(&self.names.unit(&inst.name));
            }
        }
        out
    }
}
