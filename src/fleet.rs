//! Selections (`1`, `1..1000`, `web-*`, `--all`) and the parallel executor
//! every fleet verb uses.

use std::time::Instant;

use rayon::prelude::*;

use crate::names::check_name;
use crate::printer::Printer;
use crate::store::sort_names;
use crate::{Error, Result};

/// Largest range accepted in one selection.
pub const MAX_RANGE: u64 = 100_000;

/// Expands names and ranges (`A..B`, inclusive) for `create`: every name
/// must be valid; globs are not allowed (there is nothing to match yet).
pub fn expand_new(args: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for a in args {
        if let Some(r) = parse_range(a)? {
            out.extend(r);
        } else {
            check_name("instance", a)?;
            out.push(a.clone());
        }
    }
    dedup(&mut out);
    Ok(out)
}

/// Resolves a selection against the existing instances: names (which must
/// exist), ranges (whose members must exist), globs (which must match one
/// at least), or all of them.
pub fn select(args: &[String], all: bool, existing: &[String]) -> Result<Vec<String>> {
    if all {
        if !args.is_empty() {
            return Err(Error::Invalid(
                "give instance names or --all, not both".into(),
            ));
        }
        return Ok(existing.to_vec());
    }
    if args.is_empty() {
        return Err(Error::Invalid(
            "no instances given: name some (1 2, 1..10, 'web-*') or use --all".into(),
        ));
    }
    let set: std::collections::HashSet<&str> = existing.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for a in args {
        if is_glob(a) {
            let pat = glob::Pattern::new(a)
                .map_err(|e| Error::Invalid(format!("bad pattern {a:?}: {e}")))?;
            let matched: Vec<String> = existing
                .iter()
                .filter(|n| pat.matches(n))
                .cloned()
                .collect();
            if matched.is_empty() {
                return Err(Error::Invalid(format!("no instance matches {a:?}")));
            }
            out.extend(matched);
        } else {
            let names = match parse_range(a)? {
                Some(r) => r,
                None => {
                    check_name("instance", a)?;
                    vec![a.clone()]
                }
            };
            for n in names {
                if !set.contains(n.as_str()) {
                    return Err(Error::NoInstance(n));
                }
                out.push(n);
            }
        }
    }
    dedup(&mut out);
    Ok(out)
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|n| seen.insert(n.clone()));
}

/// Parses `A..B` (inclusive, A <= B, both numbers). `None` if `s` is not a
/// range at all.
pub fn parse_range(s: &str) -> Result<Option<Vec<String>>> {
    let Some((a, b)) = s.split_once("..") else {
        return Ok(None);
    };
    let bad = |why: &str| Err(Error::Invalid(format!("invalid range {s:?}: {why}")));
    let (Ok(lo), Ok(hi)) = (a.parse::<u64>(), b.parse::<u64>()) else {
        return bad("use FIRST..LAST with numbers, e.g. 1..100");
    };
    if lo > hi {
        return bad(&format!("{lo} is greater than {hi}"));
    }
    if hi - lo >= MAX_RANGE {
        return bad(&format!("more than {MAX_RANGE} instances"));
    }
    Ok(Some((lo..=hi).map(|n| n.to_string()).collect()))
}

/// The lowest `count` numbers that are not instance names yet.
pub fn next_free(count: usize, existing: &[String]) -> Vec<String> {
    let used: std::collections::HashSet<&str> = existing.iter().map(String::as_str).collect();
    (1u64..)
        .map(|n| n.to_string())
        .filter(|n| !used.contains(n.as_str()))
        .take(count)
        .collect()
}

/// Number of worker threads for fleet work: a few per core (the work is
/// mostly system calls that wait on the kernel), not one per instance;
/// `NIFTY_JOBS` overrides it.
///
/// Asked once per process: `available_parallelism` reads the process's
/// cgroup files each time, and `serve` asks at each batch of cold starts.
pub fn workers() -> usize {
    static WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WORKERS.get_or_init(|| {
        if let Some(n) = std::env::var("NIFTY_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return n;
        }
        std::thread::available_parallelism().map_or(2, |n| n.get()) * 4
    })
}

/// What a fleet verb did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ok: Vec<String>,
    pub failed: Vec<(String, Error)>,
    pub seconds: f64,
}

impl Outcome {
    /// Prints one line per failure (stderr) and a summary (stdout), and
    /// tells whether everything worked.
    pub fn report(mut self, printer: &Printer, verb: &str) -> bool {
        let mut names: Vec<String> = self.failed.iter().map(|(n, _)| n.clone()).collect();
        sort_names(&mut names);
        self.failed
            .sort_by_key(|(n, _)| names.iter().position(|m| m == n));
        for (_, e) in &self.failed {
            eprintln!("nifty: {verb}: {e}");
        }
        let total = self.ok.len() + self.failed.len();
        if total > 1 || !self.failed.is_empty() {
            printer.info(format!(
                "{verb}: {} of {total} done in {:.2}s{}",
                self.ok.len(),
                self.seconds,
                if self.failed.is_empty() {
                    String::new()
                } else {
                    format!(", {} failed", self.failed.len())
                }
            ));
        }
        self.failed.is_empty()
    }
}

/// The worker pools of this process (see [`workers`]).
///
/// Each is made at its first use and kept: `nifty serve` starts batch
/// after batch of instances, and a pool made for each batch spawned its
/// threads at the head of every burst of cold logins, before the first
/// start could begin. Sessions of running instances have a pool of their
/// own, so that they never wait behind a batch of starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Starts, and the fleet verbs of [`run`].
    Work,
    /// `nifty serve`'s sessions in running instances.
    Sessions,
}

static POOLS: [std::sync::OnceLock<Option<rayon::ThreadPool>>; 2] =
    [std::sync::OnceLock::new(), std::sync::OnceLock::new()];

impl Pool {
    /// Makes the pool now, not at its first use: a long-running `serve`
    /// has its threads ready before the first burst of logins.
    pub fn prepare(self) {
        self.get();
    }

    /// Runs `f` once on each of the pool's threads (if it was made), and
    /// returns when all have: for what a thread must not carry from one
    /// batch of work to the next.
    pub fn on_every_thread(self, f: impl Fn() + Sync) {
        if let Some(p) = POOLS[self as usize].get().and_then(Option::as_ref) {
            p.broadcast(|_| f());
        }
    }

    fn get(self) -> Option<&'static rayon::ThreadPool> {
        POOLS[self as usize]
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(workers())
                    .thread_name(move |i| match self {
                        Pool::Work => format!("nifty-work-{i}"),
                        Pool::Sessions => format!("nifty-sess-{i}"),
                    })
                    .build()
                    .map_err(|e| tracing::debug!("worker pool: {e}"))
                    .ok()
            })
            .as_ref()
    }
}

/// `f` of every item, in their order, at once on `pool` (a single item
/// too: what `f` leaves on its thread stays off the caller's), or on this
/// thread when no pool could be made.
pub fn par_map<T: Send, R: Send>(
    pool: Pool,
    items: Vec<T>,
    f: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    match (!items.is_empty()).then(|| pool.get()).flatten() {
        Some(p) => p.install(|| items.into_par_iter().map(f).collect()),
        None => items.into_iter().map(f).collect(),
    }
}

/// Turns per-instance results into an [`Outcome`].
pub fn outcome(results: Vec<(String, Result<()>)>, seconds: f64) -> Outcome {
    let mut out = Outcome {
        seconds,
        ..Outcome::default()
    };
    for (n, r) in results {
        match r {
            Ok(()) => out.ok.push(n),
            Err(e) => out.failed.push((n, e)),
        }
    }
    out
}

/// Runs a fleet operation over `n` instances behind a progress bar
/// titled `verb`: `op` gets the callback it calls as each instance is
/// done, and returns the results, gathered into an [`Outcome`] with the
/// time it took.
pub fn tracked(
    printer: &crate::printer::Printer,
    verb: &str,
    n: usize,
    op: impl FnOnce(&(dyn Fn(&str) + Sync)) -> Vec<(String, Result<()>)>,
) -> Outcome {
    let start = std::time::Instant::now();
    let bar = printer.progress(verb, n as u64);
    let results = op(&|_| bar.inc(1));
    bar.finish_and_clear();
    outcome(results, start.elapsed().as_secs_f64())
}

/// Runs `f` on every name in parallel with a progress bar.
pub fn run<T: Send>(
    printer: &Printer,
    verb: &str,
    names: &[String],
    f: impl Fn(&str) -> Result<T> + Sync + Send,
) -> Outcome {
    let start = Instant::now();
    let bar = printer.progress(verb, names.len() as u64);
    let results = par_map(Pool::Work, names.iter().collect(), |n: &String| {
        let r = f(n);
        bar.inc(1);
        (n.clone(), r)
    });
    bar.finish_and_clear();
    let mut out = Outcome {
        seconds: start.elapsed().as_secs_f64(),
        ..Outcome::default()
    };
    for (n, r) in results {
        match r {
            Ok(_) => out.ok.push(n),
            Err(e) => out.failed.push((n, e)),
        }
    }
    out
}

/// Names for a message: the first five, then how many more.
pub fn name_list(names: &[String]) -> String {
    match names.len() {
        0..=5 => names.join(", "),
        n => format!("{}, and {} more", names[..5].join(", "), n - 5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("1..3").unwrap().unwrap(), v(&["1", "2", "3"]));
        assert_eq!(parse_range("7..7").unwrap().unwrap(), v(&["7"]));
        assert!(parse_range("slick").unwrap().is_none());
        for bad in ["5..1", "a..b", "1..", "..3", "1..x", "0..999999"] {
            let e = parse_range(bad).unwrap_err().to_string();
            assert!(e.contains("invalid range"), "{bad}: {e}");
        }
    }

    #[test]
    fn new_names() {
        assert_eq!(
            expand_new(&v(&["1..3", "slick", "2"])).unwrap(),
            v(&["1", "2", "3", "slick"])
        );
        assert!(expand_new(&v(&["a/b"])).is_err());
        assert!(expand_new(&v(&["web-*"])).is_err());
    }

    #[test]
    fn selections() {
        let have = v(&["1", "2", "3", "web-a", "web-b", "slick"]);
        assert_eq!(
            select(&v(&["web-*"]), false, &have).unwrap(),
            v(&["web-a", "web-b"])
        );
        assert_eq!(
            select(&v(&["2..3", "slick"]), false, &have).unwrap(),
            v(&["2", "3", "slick"])
        );
        assert_eq!(select(&[], true, &have).unwrap(), have);
        let e = select(&v(&["4"]), false, &have).unwrap_err().to_string();
        assert!(e.contains("\"4\" does not exist"), "{e}");
        assert!(select(&v(&["x*"]), false, &have).is_err());
        assert!(select(&[], false, &have).is_err());
        assert!(select(&v(&["1"]), true, &have).is_err());
    }

    #[test]
    fn next_free_numbers() {
        assert_eq!(next_free(3, &v(&["1", "3", "slick"])), v(&["2", "4", "5"]));
    }
}
