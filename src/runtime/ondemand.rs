//! On-demand instances (`create --on-demand`) on either backend: what
//! `nifty serve` (native) and the systemd socket units share. Whoever
//! holds the port starts the instance at a connection; the idle sweep
//! stops it when nothing of its users has run for its idle timeout.
//!
//! What nifty keeps of a running on-demand instance is its mark,
//! `instances/NAME/on-demand.json`, a host-side file (not in the
//! container's tree): since when it is idle (so a restarted `serve` or the
//! next sweep of the systemd timer keeps counting), and a start in
//! progress by a systemd socket's session (`serve` lists the starts of a
//! batch in one file, `serve.starting`). Sessions are counted from the
//! kernel: the connections to its port, which the host side accepted.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::linux::proc;
use super::{Info, Results, Runtime, State, StopOptions};
use crate::store::{Instance, Store};

/// Processes of an idle instance: its init and syslogd.
pub const IDLE_PROCESSES: usize = 2;

/// How long a start's mark, or `serve`'s list of starts, is believed: one
/// left by a session or a `serve` killed in the middle of a start is stale
/// after this.
const STARTING_FOR_SECS: u64 = 60;

/// The largest mark file read (it is nifty's own, but read with a bound).
const MARK_MAX: u64 = 4096;

/// What nifty keeps of an on-demand instance between sweeps.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Unix time a start at a connection began (cleared once started): a
    /// session of a systemd socket's; `serve` lists its starts in
    /// `serve.starting` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting: Option<u64>,
    /// Unix time since which it has had no session and no process of its
    /// users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<u64>,
    /// The Dropbear `serve` runs listening in the running instance, whose
    /// listening sockets take its port's connections straight from the
    /// kernel: not a process of its users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<Listener>,
}

/// One process for good: its PID and when it started (clock ticks since
/// boot), so that a reused PID is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub pid: i32,
    pub started: u64,
}

impl Listener {
    /// The process `pid` as it is now.
    pub fn of(pid: i32) -> Option<Listener> {
        super::linux::proc::start_ticks(pid).map(|started| Listener { pid, started })
    }

    /// Is it still the process it was?
    pub fn alive(&self) -> bool {
        Listener::of(self.pid).as_ref() == Some(self)
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mark_path(store: &Store, name: &str) -> PathBuf {
    store.instance_dir(name).join("on-demand.json")
}

/// An instance's mark (empty when it has none or it cannot be read).
pub fn read_mark(store: &Store, name: &str) -> Mark {
    use std::io::Read;
    let mut text = String::new();
    match std::fs::File::open(mark_path(store, name)) {
        Ok(f) => {
            let _ = f.take(MARK_MAX).read_to_string(&mut text);
            serde_json::from_str(&text).unwrap_or_default()
        }
        Err(_) => Mark::default(),
    }
}

/// Writes an instance's mark (an empty one removes the file).
pub fn write_mark(store: &Store, name: &str, mark: &Mark) {
    let path = mark_path(store, name);
    let r = if *mark == Mark::default() {
        crate::disk::remove_file(&path)
    } else {
        let text = serde_json::to_vec(mark).unwrap_or_default();
        crate::disk::write_atomic(&path, &text, 0o644)
    };
    if let Err(e) = r {
        tracing::warn!("instance {name:?}: on-demand mark: {e}");
    }
}

/// Changes an instance's mark by `f`, under a lock of its own: processes
/// that each change one field of it (a systemd session, the idle sweep of
/// systemd's timer) run at once, and none may write back what another
/// just changed.
pub fn update_mark(store: &Store, name: &str, f: impl FnOnce(&mut Mark)) {
    let lock = store.instance_dir(name).join("on-demand.lock");
    let _held = crate::disk::lock_file(&lock)
        .map_err(|e| tracing::warn!("instance {name:?}: on-demand mark: {e}"))
        .ok();
    let mut mark = read_mark(store, name);
    let before = mark.clone();
    f(&mut mark);
    if mark != before {
        write_mark(store, name, &mark);
    }
}

/// A login ends an instance's idle time (its session's processes would,
/// at the next sweep, unless it has ended by then). The lock is taken only
/// when there is an idle time to end, not at every login.
pub fn end_idle(store: &Store, name: &str) {
    if read_mark(store, name).idle_since.is_some() {
        update_mark(store, name, |m| m.idle_since = None);
    }
}

/// Marks instances as being started at a connection (`on`) or no longer;
/// a mark is written only where this changes it (the first start of an
/// instance that never ran has nothing to clear).
pub fn mark_starting(store: &Store, insts: &[Instance], on: bool) {
    let t = now();
    for i in insts {
        let before = read_mark(store, &i.name);
        let mut m = before.clone();
        m.starting = on.then_some(t);
        if !on {
            // A fresh start: whatever idleness was counted is over, and
            // nothing of its last run listens.
            m.idle_since = None;
            m.listener = None;
        }
        if m != before {
            write_mark(store, &i.name, &m);
        }
    }
}

/// Where `nifty serve` lists the ports it holds (steered ports do not
/// show as listening in the kernel's socket table).
pub fn served_ports_path(store: &Store) -> PathBuf {
    store.root().join("serve.ports")
}

/// Where `nifty serve` lists the instances it is starting, one name a
/// line: one file for a whole batch of starts, written once before it
/// begins (a mark per instance, written one after another, held back every
/// start of a burst of cold logins behind them).
pub fn serve_starting_path(store: &Store) -> PathBuf {
    store.root().join("serve.starting")
}

/// Lists `names` as the instances this `serve` is starting now (none
/// removes the list).
pub fn publish_starting(store: &Store, names: &[&str]) {
    let path = serve_starting_path(store);
    let r = if names.is_empty() {
        crate::disk::remove_file(&path)
    } else {
        let text: String = names.iter().map(|n| format!("{n}\n")).collect();
        crate::disk::write_atomic(&path, text.as_bytes(), 0o644)
    };
    if let Err(e) = r {
        tracing::warn!("the instances being started: {e}");
    }
}

/// What a running `nifty serve` of a state root says of itself.
#[derive(Debug, Default)]
pub struct ServeState {
    /// The ports it holds.
    pub ports: std::collections::HashSet<u16>,
    /// The instances it is starting.
    pub starting: std::collections::HashSet<String>,
}

impl ServeState {
    /// Empty when no `serve` runs (the PID in its lock is gone, or is no
    /// nifty); a list of starts older than a start may take is not
    /// believed.
    pub fn read(store: &Store) -> ServeState {
        if !serve_alive(store) {
            return ServeState::default();
        }
        ServeState::read_files(store)
    }

    /// [`ServeState::read`] of a `serve` known to run.
    fn read_files(store: &Store) -> ServeState {
        let starting = std::fs::File::open(serve_starting_path(store))
            .ok()
            .filter(|f| {
                f.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() < STARTING_FOR_SECS)
            })
            .and_then(|f| std::io::read_to_string(f).ok())
            .unwrap_or_default();
        ServeState {
            ports: parse_ports(
                &std::fs::read_to_string(served_ports_path(store)).unwrap_or_default(),
            ),
            starting: parse_names(&starting),
        }
    }
}

fn parse_ports(text: &str) -> std::collections::HashSet<u16> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn parse_names(text: &str) -> std::collections::HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Is a `nifty serve` of this state root running: the PID in its lock,
/// the same program (by name: a serve started before an upgrade runs a
/// deleted binary), running `serve`?
fn serve_alive(store: &Store) -> bool {
    let pid = std::fs::read_to_string(store.root().join("serve.lock"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    pid.is_some_and(|pid| {
        let name = |p: &str| {
            std::fs::read_link(p).ok().and_then(|e| {
                let s = e.to_string_lossy();
                let s = s.trim_end_matches(" (deleted)");
                Some(std::path::Path::new(s).file_name()?.to_owned())
            })
        };
        name(&format!("/proc/{pid}/exe")).is_some_and(|n| Some(n) == name("/proc/self/exe"))
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"serve"))
    })
}

/// Where an on-demand instance is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Stopped, its port held: the next connection starts it.
    Idle,
    /// Being started by a connection.
    Starting,
    /// Running (sessions or not).
    Running,
    /// Stopped and nobody holds its port: a connection is refused until
    /// `nifty serve` runs (native) or its socket unit is started (systemd).
    Unserved,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Idle => "idle",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Unserved => "unserved",
        })
    }
}

/// What `list` and `status` show of an on-demand instance.
#[derive(Debug, Clone, Serialize)]
pub struct OnDemandInfo {
    pub phase: Phase,
    /// Open SSH connections to its port.
    pub sessions: u32,
    /// Unix time since which a running one has had nothing of its users
    /// running (it is stopped at `idle_since + idle_timeout_secs`).
    pub idle_since: Option<u64>,
    pub idle_timeout_secs: u64,
}

impl OnDemandInfo {
    /// One short phrase: `idle`, `running, 2 sessions`, `running, idle 3m`.
    pub fn summary(&self, now: u64) -> String {
        match (self.phase, self.idle_since) {
            (Phase::Running, _) if self.sessions > 0 => {
                format!(
                    "running, {} session{}",
                    self.sessions,
                    if self.sessions == 1 { "" } else { "s" }
                )
            }
            (Phase::Running, Some(t)) => format!(
                "running, idle {}",
                humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(t)))
            ),
            (Phase::Unserved, _) => "unserved: nothing holds its port".into(),
            (p, _) => p.to_string(),
        }
    }
}

/// Fills in the on-demand state of `infos` (one read of the host's TCP
/// tables, one small file per running on-demand instance).
pub fn describe(store: &Store, insts: &[Instance], infos: &mut [Info]) {
    if !insts.iter().any(|i| i.on_demand.is_some()) {
        return;
    }
    let socks = super::status::sockets();
    let served = ServeState::read(store);
    let t = now();
    for (inst, info) in insts.iter().zip(infos.iter_mut()) {
        let Some(od) = inst.on_demand else {
            continue;
        };
        let mark = read_mark(store, &inst.name);
        let starting = served.starting.contains(&inst.name)
            || mark
                .starting
                .is_some_and(|s| t.saturating_sub(s) < STARTING_FOR_SECS);
        let running = info.state != State::Stopped;
        let phase = match (starting, running) {
            (true, _) => Phase::Starting,
            (false, true) => Phase::Running,
            (false, false)
                if socks.listening.contains(&inst.port) || served.ports.contains(&inst.port) =>
            {
                Phase::Idle
            }
            (false, false) => Phase::Unserved,
        };
        info.on_demand = Some(OnDemandInfo {
            phase,
            sessions: socks.established.get(&inst.port).copied().unwrap_or(0),
            idle_since: fresh_idle_since(&mark, info.uptime_secs).filter(|_| running),
            idle_timeout_secs: od.idle_timeout_secs,
        });
    }
}

/// A mark's idle time, unless it is older than the instance's current
/// run (left from before a stop that did not clear it).
fn fresh_idle_since(mark: &Mark, uptime_secs: Option<u64>) -> Option<u64> {
    let since = mark.idle_since?;
    let started = now().saturating_sub(uptime_secs?);
    // Uptime is in whole seconds.
    (since + 1 >= started).then_some(since)
}

/// How many of `pids` are in the PID namespace of the container's `init`
/// (a backend's cgroup may hold its launcher too: systemd-nspawn), but
/// `serve`'s listening Dropbear.
fn container_processes(pids: &[i32], init: i32, listener: Option<Listener>) -> usize {
    let Some(own) = proc::pid_ns(init) else {
        return pids.len();
    };
    let listener = listener.filter(Listener::alive).map(|l| l.pid);
    pids.iter()
        .filter(|p| Some(**p) != listener && proc::pid_ns(**p).as_ref() == Some(&own))
        .count()
}

/// What the idle sweep asks of whoever holds the instances' ports before
/// it stops idle ones (`nifty serve`, or systemd's sockets with the
/// pinned steering), whose instances may take their connections
/// themselves (a listening Dropbear of their own).
pub trait Release {
    /// Takes the ports of `due` back (new connections come to the holder
    /// from now on, not to the instance); returns those that may be
    /// stopped (none of which has a connection waiting).
    fn release(&self, due: Vec<Instance>) -> Vec<Instance>;
    /// Gives back what `release` took of one not stopped after all.
    fn restore(&self, inst: &Instance);
}

/// What one sweep did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Instances stopped for idleness, with how each stop went.
    pub stopped: Results,
    /// On-demand instances still running after it.
    pub running: Vec<String>,
}

impl Runtime {
    /// The idle sweep: of `insts`, the running on-demand instances that
    /// have had nothing but init and syslogd for their idle timeout are
    /// stopped; the others have their idle time counted (in their marks).
    pub fn sweep(&self, store: &Store, insts: &[Instance], holder: &dyn Release) -> Swept {
        let insts: Vec<Instance> = insts
            .iter()
            .filter(|i| i.on_demand.is_some())
            .cloned()
            .collect();
        let t = now();
        let mut due = Vec::new();
        let mut out = Swept::default();
        // Only whether each runs and what runs in it: at every check, for
        // every running instance.
        for (inst, (state, pid)) in insts.iter().zip(self.states(&insts)) {
            if state != State::Running {
                continue;
            }
            let mut mark = read_mark(store, &inst.name);
            let busy = self.busy(inst, pid, mark.listener);
            let before = mark.clone();
            if busy {
                mark.idle_since = None;
            } else if fresh_idle_since(&mark, pid.and_then(proc::uptime)).is_none() {
                mark.idle_since = Some(t);
            }
            if mark != before {
                update_mark(store, &inst.name, |m| m.idle_since = mark.idle_since);
            }
            let timeout = inst.on_demand.map_or(u64::MAX, |o| o.idle_timeout_secs);
            match mark.idle_since {
                Some(since) if t.saturating_sub(since) >= timeout => due.push(inst.clone()),
                _ => out.running.push(inst.name.clone()),
            }
        }
        if due.is_empty() {
            return out;
        }
        // Once the holder has the ports back, one last look: a session
        // that began meanwhile keeps its instance up.
        let mut stopping = Vec::new();
        for inst in holder.release(due) {
            let mark = read_mark(store, &inst.name);
            if self.busy(&inst, self.init_pid(&inst), mark.listener) {
                holder.restore(&inst);
                out.running.push(inst.name.clone());
            } else {
                stopping.push(inst);
            }
        }
        out.stopped = self.stop_many(&stopping, StopOptions::default(), &|_| {});
        for (name, r) in &out.stopped {
            if r.is_ok() {
                write_mark(store, name, &Mark::default());
            } else {
                if let Some(inst) = stopping.iter().find(|i| &i.name == name) {
                    holder.restore(inst);
                }
                out.running.push(name.clone());
            }
        }
        out
    }

    /// Does anything of its users run in an instance (more than init and
    /// syslogd, `serve`'s listener aside)?
    fn busy(&self, inst: &Instance, init: Option<i32>, listener: Option<Listener>) -> bool {
        match init {
            Some(init) => {
                container_processes(&self.processes(inst), init, listener) > IDLE_PROCESSES
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_an_empty_one_is_no_file() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(Some(d.path().to_path_buf()));
        std::fs::create_dir_all(store.instance_dir("1")).unwrap();
        assert_eq!(read_mark(&store, "1"), Mark::default());
        let m = Mark {
            starting: None,
            idle_since: Some(1234),
            listener: Some(Listener {
                pid: 42,
                started: 99,
            }),
        };
        write_mark(&store, "1", &m);
        assert_eq!(read_mark(&store, "1"), m);
        write_mark(&store, "1", &Mark::default());
        assert!(!mark_path(&store, "1").exists());
        // A mark that is not one reads as none.
        std::fs::write(mark_path(&store, "1"), "{{{").unwrap();
        assert_eq!(read_mark(&store, "1"), Mark::default());
    }

    #[test]
    fn serve_lists_a_batch_of_starts_in_one_file_believed_while_fresh() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(Some(d.path().to_path_buf()));
        std::fs::create_dir_all(store.instance_dir("1")).unwrap();
        publish_starting(&store, &["1", "web-2"]);
        let names = |s: &ServeState| {
            let mut v: Vec<String> = s.starting.iter().cloned().collect();
            v.sort();
            v
        };
        assert_eq!(names(&ServeState::read_files(&store)), ["1", "web-2"]);
        // Without a `serve` running (no lock), nothing is believed.
        assert!(ServeState::read(&store).starting.is_empty());
        // A list older than a start may take is stale (a killed `serve`).
        let old =
            std::time::SystemTime::now() - std::time::Duration::from_secs(STARTING_FOR_SECS + 5);
        std::fs::File::options()
            .write(true)
            .open(serve_starting_path(&store))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(ServeState::read_files(&store).starting.is_empty());
        // The end of the batch removes it.
        publish_starting(&store, &["1"]);
        publish_starting(&store, &[]);
        assert!(!serve_starting_path(&store).exists());
        assert!(ServeState::read_files(&store).starting.is_empty());
        // A start's end writes no mark for an instance that had none.
        let inst = |name: &str| -> Instance {
            toml::from_str(&format!(
                "name = {name:?}\ntemplate = \"t\"\nbackend = \"native\"\nport = 2201\n\
                 user = \"u\"\nhost_key = \"ssh-ed25519 AAAA nifty\"\ncreated = \"now\"\n\
                 [limits]\ntasks = 512\n"
            ))
            .unwrap()
        };
        mark_starting(&store, &[inst("1")], false);
        assert!(!mark_path(&store, "1").exists());
        mark_starting(&store, &[inst("1")], true);
        assert!(read_mark(&store, "1").starting.is_some());
        mark_starting(&store, &[inst("1")], false);
        assert!(!mark_path(&store, "1").exists());
    }

    #[test]
    fn a_listener_is_the_process_it_was_and_not_a_user_s() {
        let me = Listener::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        // The same PID with another start is another process.
        let other = Listener {
            started: me.started + 1,
            ..me
        };
        assert!(!other.alive());
        // It is not counted among the container's processes; another
        // process of the same PID namespace is.
        let pids = [me.pid];
        assert_eq!(container_processes(&pids, me.pid, None), 1);
        assert_eq!(container_processes(&pids, me.pid, Some(me)), 0);
        assert_eq!(container_processes(&pids, me.pid, Some(other)), 1);
    }

    #[test]
    fn summaries_say_sessions_or_idle_time() {
        let i = |phase, sessions, idle_since| OnDemandInfo {
            phase,
            sessions,
            idle_since,
            idle_timeout_secs: 600,
        };
        assert_eq!(i(Phase::Idle, 0, None).summary(100), "idle");
        assert_eq!(
            i(Phase::Running, 2, None).summary(100),
            "running, 2 sessions"
        );
        assert_eq!(
            i(Phase::Running, 1, None).summary(100),
            "running, 1 session"
        );
        assert_eq!(
            i(Phase::Running, 0, Some(10)).summary(100),
            "running, idle 1m 30s"
        );
        assert_eq!(i(Phase::Starting, 0, None).summary(100), "starting");
        assert!(i(Phase::Unserved, 0, None).summary(100).contains("port"));
    }
}
