//! An instance's fair shares and hard limits: tasks, memory, CPU, I/O and
//! disk, as recorded in `instance.toml`, with the parsing and checks of
//! what users type for them. The backends turn them into cgroup files
//! (native) or unit properties (systemd).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Resource limits of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Maximum number of tasks (pids cgroup).
    pub tasks: u64,
    /// Maximum memory in bytes: a memory cgroup of the instance's own.
    /// `None`: it shares its store's memory cgroup, limited as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// CPU fair share, 1..=10000 (cgroup v2 `cpu.weight`; v1 `cpu.shares`
    /// is 1024 * weight / 100). `None`: 100, like every other instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// CPU cap in CPUs (0.5: half of one CPU), enforced over 100 ms
    /// periods (`cpu.max`, v1 `cpu.cfs_quota_us`). `None`: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// I/O fair share, 1..=10000 (v2 `io.weight` and `io.bfq.weight`, v1
    /// `blkio.weight`). `None`: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u64>,
    /// Bytes the instance's own files (its upper layer) may take.
    /// `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
    /// Files and directories the instance's own layer may hold.
    /// `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tasks: DEFAULT_TASKS,
            memory: None,
            cpu_weight: None,
            cpus: None,
            io_weight: None,
            disk: Some(DEFAULT_DISK),
            inodes: None,
        }
    }
}

/// Tasks an instance may hold unless told otherwise.
pub const DEFAULT_TASKS: u64 = 512;
/// Disk an instance's own files may take unless told otherwise (1 GiB).
pub const DEFAULT_DISK: u64 = 1 << 30;
/// The weight an instance has unless told otherwise (cgroup v2's default).
pub const DEFAULT_WEIGHT: u64 = 100;
/// The period over which `--cpus` is enforced, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    /// `cpu.max` for cgroup v2: "QUOTA PERIOD", or "max PERIOD".
    pub fn cpu_max(&self) -> String {
        match self.cpu_quota_us() {
            Some(q) => format!("{q} {CPU_PERIOD_US}"),
            None => format!("max {CPU_PERIOD_US}"),
        }
    }

    /// The CPU time per period, in microseconds, when capped.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        // At least 1 ms per period: the kernel's floor.
        self.cpus
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000))
    }

    /// The CPU weight in effect.
    pub fn cpu_weight(&self) -> u64 {
        self.cpu_weight.unwrap_or(DEFAULT_WEIGHT)
    }

    /// The I/O weight in effect.
    pub fn io_weight(&self) -> u64 {
        self.io_weight.unwrap_or(DEFAULT_WEIGHT)
    }

    /// v1 `cpu.shares` for the weight (1024 is v1's default, as 100 is v2's).
    pub fn cpu_shares(&self) -> u64 {
        (self.cpu_weight() * 1024 / DEFAULT_WEIGHT).max(2)
    }

    /// v1 `blkio.weight` and BFQ's weight (both 1..1000 / 10..1000).
    pub fn io_weight_v1(&self) -> u64 {
        (self.io_weight() * 5).clamp(10, 1000)
    }
}

/// Parses a size: bytes, or a number with K, M, G, T (powers of 1024).
/// `require_unit`: a bare number is refused (`--disk 10` is almost
/// certainly not ten bytes).
pub fn parse_size(what: &str, s: &str, require_unit: bool) -> Result<u64> {
    let bad = |why: &str| Error::Invalid(format!("{what} {s:?}: {why}"));
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad("use a number with K, M, G or T (1024-based)")),
            };
            (&t[..i], mul)
        }
        _ if require_unit => {
            return Err(bad(
                "give a unit: K, M, G or T (1024-based), e.g. 100M; or `unlimited`",
            ))
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| bad("use bytes or a number with K, M, G or T"))?;
    n.checked_mul(mul)
        .filter(|v| *v > 0)
        .ok_or_else(|| bad("must be more than 0"))
}

/// Words that lift a limit.
fn unlimited(s: &str) -> bool {
    matches!(s.trim(), "unlimited" | "max" | "none")
}

/// `--disk SIZE|unlimited`.
pub fn parse_disk(s: &str) -> Result<Option<u64>> {
    if unlimited(s) {
        return Ok(None);
    }
    let v = parse_size("--disk", s, true)?;
    if v < 1 << 20 {
        return Err(Error::Invalid(format!(
            "--disk {s:?}: at least 1M (an instance's own files need some room)"
        )));
    }
    Ok(Some(v))
}

/// `--inodes N|unlimited`.
pub fn parse_inodes(s: &str) -> Result<Option<u64>> {
    if unlimited(s) {
        return Ok(None);
    }
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 16 => Ok(Some(n)),
        _ => Err(Error::Invalid(format!(
            "--inodes {s:?}: a number of files, at least 16, or `unlimited`"
        ))),
    }
}

/// `--memory SIZE|shared`.
pub fn parse_memory(s: &str) -> Result<Option<u64>> {
    if unlimited(s) || s.trim() == "shared" {
        return Ok(None);
    }
    parse_size("--memory", s, false).map(Some)
}

/// `--cpus X|max`: CPUs, more than 0 (0.5 is half a CPU).
pub fn parse_cpus(s: &str) -> Result<Option<f64>> {
    if unlimited(s) {
        return Ok(None);
    }
    match s.trim().parse::<f64>() {
        Ok(c) if c.is_finite() && (0.01..=4096.0).contains(&c) => Ok(Some(c)),
        Ok(c) if c.is_finite() && c > 0.0 => Err(Error::Invalid(format!(
            "--cpus {s:?}: at least 0.01 (1 ms of CPU time per 100 ms)"
        ))),
        _ => Err(Error::Invalid(format!(
            "--cpus {s:?}: a number of CPUs more than 0, such as 0.5 or 2, or `max`"
        ))),
    }
}

/// `--cpu-weight N` / `--io-weight N`: 1..=10000 (100 is everyone's).
pub fn parse_weight(what: &str, s: &str) -> Result<Option<u64>> {
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(Some(n)),
        _ => Err(Error::Invalid(format!(
            "{what} {s:?}: a weight from 1 to 10000 (every instance has 100 unless told otherwise)"
        ))),
    }
}

/// `--tasks N`: at least 1.
pub fn parse_tasks(s: &str) -> Result<u64> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(Error::Invalid(format!(
            "--tasks {s:?}: a number of tasks, at least 1"
        ))),
    }
}

/// A size for people: 1.5G, 512M, 4K.
pub fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 40 => format!("{:.1}T", b as f64 / (1u64 << 40) as f64),
        b if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        b => format!("{}K", b / 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("x", "4096", false).unwrap(), 4096);
        assert_eq!(parse_size("x", "256M", false).unwrap(), 256 << 20);
        assert_eq!(parse_size("x", "1g", false).unwrap(), 1 << 30);
        assert!(parse_size("x", "12X", false).is_err());
        assert!(parse_size("x", "", false).is_err());
        assert!(parse_size("x", "0", false).is_err());
        let e = parse_disk("10").unwrap_err().to_string();
        assert!(e.contains("give a unit"), "{e}");
        assert_eq!(parse_disk("100M").unwrap(), Some(100 << 20));
        assert_eq!(parse_disk("unlimited").unwrap(), None);
        assert!(parse_disk("10K").is_err());
        assert_eq!(parse_memory("shared").unwrap(), None);
    }

    #[test]
    fn cpus_and_weights() {
        assert_eq!(parse_cpus("0.5").unwrap(), Some(0.5));
        assert_eq!(parse_cpus("max").unwrap(), None);
        for bad in ["0", "-1", "nan", "inf", "x", "0.001"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
        assert!(parse_weight("--cpu-weight", "0").is_err());
        assert!(parse_weight("--cpu-weight", "10001").is_err());
        assert_eq!(parse_weight("--io-weight", "500").unwrap(), Some(500));
        assert!(parse_inodes("3").is_err());
        assert!(parse_tasks("0").is_err());
    }

    #[test]
    fn cgroup_values() {
        let mut l = Limits::default();
        assert_eq!(l.cpu_max(), "max 100000");
        assert_eq!(l.cpu_shares(), 1024);
        l.cpus = Some(0.5);
        l.cpu_weight = Some(200);
        l.io_weight = Some(10);
        assert_eq!(l.cpu_max(), "50000 100000");
        assert_eq!(l.cpu_shares(), 2048);
        assert_eq!(l.io_weight_v1(), 50);
        l.cpus = Some(0.001);
        assert_eq!(l.cpu_quota_us(), Some(1000));
    }

    #[test]
    fn old_records_read_without_the_new_fields() {
        let l: Limits = toml::from_str("tasks = 512\n").unwrap();
        assert_eq!(
            l.disk, None,
            "an instance from before disk limits is unlimited"
        );
        assert_eq!(l.cpu_weight(), 100);
    }
}
