//! What `nifty status` and `nifty logs` show of one instance, gathered
//! here (from the kernel, /proc and the instance's launcher) so that the
//! commands only print.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

use super::Info;

/// A process of a container.
#[derive(Debug, Clone, Serialize)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    /// Its command line, as the tenant set it (escape before printing).
    pub cmdline: String,
}

/// The systemd unit of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct UnitStatus {
    pub name: String,
    /// systemd-nspawn, the unit's main process.
    pub main_pid: Option<u32>,
    pub file: String,
    pub enabled: String,
}

/// Everything `status` shows of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub info: Info,
    /// Its cgroup, as its launcher names it ("-" when it has none).
    pub cgroup: String,
    /// Something listens on its SSH port.
    pub listening: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<UnitStatus>,
    pub processes: Vec<Proc>,
    /// The last lines of its console output (tenant bytes).
    pub log: Vec<String>,
}

/// How much of the end of a console log `tail` reads: the log is written
/// by the tenant and may be of any size.
const TAIL_BYTES: u64 = 256 * 1024;

/// The last `n` lines of the file at `path`, read from its last
/// [`TAIL_BYTES`] only.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(TAIL_BYTES);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if f.take(TAIL_BYTES).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        // The first line was cut by the window.
        lines.remove(0);
    }
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The processes `pids`, with their parents and command lines (a process
/// gone meanwhile is left out).
pub fn processes(pids: Vec<i32>) -> Vec<Proc> {
    pids.into_iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat[stat.rfind(')')? + 2..]
                .split(' ')
                .nth(1)?
                .parse()
                .ok()?;
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw)
                .trim_end_matches('\0')
                .replace('\0', " ");
            Some(Proc { pid, ppid, cmdline })
        })
        .collect()
}

/// Is a TCP port in LISTEN state on the host (the containers share its
/// network)?
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|s| {
            s.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_only_the_end_of_a_large_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut text = String::new();
        for i in 0..100_000 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&p, &text).unwrap();
        assert_eq!(tail(&p, 2), vec!["line 99998", "line 99999"]);
        // Asked for more than the window holds: whole lines only.
        let all = tail(&p, usize::MAX);
        assert!(all.len() < 100_000 && all.iter().all(|l| l.starts_with("line ")));
        assert_eq!(all.last().unwrap(), "line 99999");
        assert!(tail(&dir.path().join("none"), 3).is_empty());
    }
}
