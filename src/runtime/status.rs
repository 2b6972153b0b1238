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
    sockets().listening.contains(&port)
}

/// The TCP sockets of nifty's network namespace (the host's), by local
/// port: which ports listen, and how many connections each has.
#[derive(Debug, Default)]
pub struct Sockets {
    pub listening: std::collections::HashSet<u16>,
    pub established: std::collections::HashMap<u16, u32>,
}

/// Reads [`Sockets`] from /proc/net/tcp and tcp6 (one read each).
pub fn sockets() -> Sockets {
    let mut out = Sockets::default();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            parse_sockets(&text, &mut out);
        }
    }
    out
}

/// One /proc/net/tcp table into `out`: `sl local rem st ...`, the local
/// address `HEX:PORT`, the state `0A` LISTEN or `01` ESTABLISHED.
fn parse_sockets(text: &str, out: &mut Sockets) {
    for l in text.lines().skip(1) {
        let mut cols = l.split_whitespace().skip(1);
        let (Some(local), Some(_), Some(st)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        let Some(port) = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        match st {
            "0A" => {
                out.listening.insert(port);
            }
            "01" => *out.established.entry(port).or_default() += 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_read_by_local_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0899 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:0899 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:0899 0100007F:D2F2 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0100007F:D2F0 0100007F:0899 01 00000000:00000000 00:00000000 00000000     0        0 4 1
   4: 0100007F:089A 0100007F:D2F4 06 00000000:00000000 00:00000000 00000000     0        0 5 1
";
        let mut s = Sockets::default();
        parse_sockets(table, &mut s);
        assert!(s.listening.contains(&2201) && s.listening.len() == 1);
        assert_eq!(s.established.get(&2201), Some(&2));
        assert_eq!(s.established.get(&54000), Some(&1));
        assert_eq!(s.established.get(&2202), None, "TIME_WAIT is no session");
    }

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
