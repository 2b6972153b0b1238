//! One cgroup per container, on a pure cgroup v2 host and on a hybrid one
//! (v1 controllers with an empty v2 hierarchy beside them, as on this
//! project's CI machines).
//!
//! Membership always lives in cgroup v2: the container is cloned straight
//! into it (`CLONE_INTO_CGROUP`), "running" means "its cgroup.procs is not
//! empty", and `cgroup.kill` ends everything in it. Limits go where the
//! controllers are: `pids.max`/`memory.max` in the same v2 cgroup on a pure
//! v2 host, or v1 `pids`/`memory` cgroups of the same name on a hybrid one.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::store::Limits;
use crate::{Error, Result};

/// The host's cgroup mounts.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    /// Mount point of cgroup v2.
    pub v2: PathBuf,
    /// v2 has the pids and memory controllers (pure v2 host).
    pub v2_controllers: bool,
    /// v1 mount points of the pids, memory, cpu and blkio controllers
    /// (hybrid host).
    pub v1_pids: Option<PathBuf>,
    pub v1_memory: Option<PathBuf>,
    pub v1_cpu: Option<PathBuf>,
    pub v1_blkio: Option<PathBuf>,
    /// PID 1 is systemd: the stores' groups live in scopes it delegated
    /// (see `delegate`), never beside its own.
    pub systemd: bool,
    /// The v2 mount's superblock flags (`nsdelegate`, ...; not `rw`), which
    /// a reconfiguration must give again to keep.
    pub v2_flags: Vec<String>,
    /// Some cgroup mount has `favordynmods` (Linux 6.0): the kernel's one
    /// lock for moving processes between cgroups (the threadgroup rwsem)
    /// is taken for writing without waiting for an RCU grace period.
    pub favordynmods: bool,
}

impl Hierarchy {
    /// Reads the cgroup mounts from /proc/self/mountinfo.
    pub fn detect() -> Result<Hierarchy> {
        let info = fs::read_to_string("/proc/self/mountinfo")
            .map_err(Error::io("read", "/proc/self/mountinfo"))?;
        let mut h = Self::parse(&info)?;
        h.systemd = super::dbus::booted();
        Ok(h)
    }

    /// Where the containers of the store whose cgroup name is `store` live,
    /// relative to each hierarchy's mount: `nifty.slice/<store>.scope` on
    /// a systemd host, `<store>` elsewhere.
    pub fn base(&self, store: &str) -> String {
        if self.systemd {
            super::delegate::base(store)
        } else {
            store.to_string()
        }
    }

    /// Parses mountinfo text (separate for unit tests).
    pub fn parse(info: &str) -> Result<Hierarchy> {
        let mut v2 = None;
        let mut v2_flags = Vec::new();
        let mut favordynmods = false;
        let (mut v1_pids, mut v1_memory, mut v1_cpu, mut v1_blkio) = (None, None, None, None);
        for line in info.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split(' ').nth(4).unwrap_or("");
            let mut r = right.split(' ');
            let fstype = r.next().unwrap_or("");
            let opts = r.nth(1).unwrap_or("");
            if fstype == "cgroup2" || fstype == "cgroup" {
                favordynmods |= opts.split(',').any(|o| o == "favordynmods");
            }
            match fstype {
                "cgroup2" if v2.is_none() => {
                    v2 = Some(PathBuf::from(mount_point));
                    v2_flags = opts
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro" | ""))
                        .map(String::from)
                        .collect();
                }
                "cgroup" => {
                    for o in opts.split(',') {
                        match o {
                            "pids" => v1_pids = Some(PathBuf::from(mount_point)),
                            "memory" => v1_memory = Some(PathBuf::from(mount_point)),
                            "cpu" => v1_cpu = Some(PathBuf::from(mount_point)),
                            "blkio" => v1_blkio = Some(PathBuf::from(mount_point)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let v2 = v2.ok_or_else(|| {
            Error::Host(
                "no cgroup v2 hierarchy is mounted; nifty needs one \
                 (mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with systemd.unified_cgroup_hierarchy=1)"
                    .into(),
            )
        })?;
        Ok(Hierarchy {
            v2_controllers: v1_pids.is_none() && v1_memory.is_none(),
            v2,
            v1_pids,
            v1_memory,
            v1_cpu,
            v1_blkio,
            systemd: false,
            v2_flags,
            favordynmods,
        })
    }

    /// A container's start joins v1 cgroups (a hybrid host): it writes its
    /// PID to their `cgroup.procs`, where on a pure v2 host it is cloned
    /// into its one cgroup (`CLONE_INTO_CGROUP`) and moves nowhere. Each
    /// such move takes the threadgroup rwsem for writing, which, without
    /// `favordynmods`, first waits for an RCU grace period (10-20 ms on a
    /// 2-core VM), holding `cgroup_mutex` meanwhile: every other start's
    /// cgroup work waits too.
    pub fn joins_v1(&self) -> bool {
        !self.v2_controllers
    }

    /// Sets or clears `favordynmods` on the v2 mount (Linux 6.0), keeping
    /// its other superblock flags (a cgroup2 reconfiguration sets exactly
    /// the flags it is given) and its mount flags (`nosuid`, ...: `fspick`
    /// reconfigures the superblock only). The setting is the kernel's, for
    /// every hierarchy; it lasts until the next boot.
    pub fn set_favordynmods(&self, on: bool) -> Result<()> {
        use rustix::mount::{fsconfig_reconfigure, fsconfig_set_flag, fspick, FsPickFlags};
        let call = |what: &str| format!("{what} ({})", self.v2.display());
        let fs = fspick(
            rustix::fs::CWD,
            &self.v2,
            FsPickFlags::FSPICK_CLOEXEC | FsPickFlags::FSPICK_NO_AUTOMOUNT,
        )
        .map_err(Error::sys(call("fspick")))?;
        let flags = self.v2_flags.iter().map(String::as_str);
        for flag in flags
            .filter(|f| *f != "favordynmods")
            .chain(on.then_some("favordynmods"))
        {
            fsconfig_set_flag(fs.as_fd(), flag).map_err(Error::sys(call(&format!(
                "fsconfig(FSCONFIG_SET_FLAG, {flag:?})"
            ))))?;
        }
        fsconfig_reconfigure(fs.as_fd())
            .map_err(Error::sys(call("fsconfig(FSCONFIG_CMD_RECONFIGURE)")))
    }

    /// The cgroup of instance `name` under the store's group `base`.
    pub fn instance(&self, base: &str, name: &str) -> Cgroup {
        let sub = |root: &Path| root.join(base).join(name);
        Cgroup {
            v2: sub(&self.v2),
            v2_controllers: self.v2_controllers,
            delegated: self.systemd,
            pids: self.v1_pids.as_deref().map(sub),
            memory: self.v1_memory.as_deref().map(sub),
            cpu: self.v1_cpu.as_deref().map(sub),
            blkio: self.v1_blkio.as_deref().map(sub),
        }
    }

    /// Names of the instance cgroups that exist under `base`.
    /// Flushes the statistics of the store's v2 cgroup and everything under
    /// it (a read of its `cpu.stat` does it). The kernel keeps the children
    /// with unflushed statistics on a singly linked list of their parent,
    /// and releasing a removed cgroup walks it to unlink itself: removing
    /// ten thousand containers one by one after they all ran costs N² (7 s
    /// of a 10,000 stop) unless the list is emptied first.
    pub fn flush_stats(&self, base: &str) {
        let _ = fs::read_to_string(self.v2.join(base).join("cpu.stat"));
    }

    /// Removes the store's groups if no instance has one left (best
    /// effort: a sibling may be created right now). Once per command, not
    /// per container: the kernel answers an rmdir by walking the group's
    /// children, so trying after each of N removals costs N².
    pub fn remove_base(&self, base: &str) {
        if self.systemd {
            // systemd ends the scope, and removes it, once it is empty.
            return;
        }
        for root in std::iter::once(&self.v2)
            .chain(&self.v1_pids)
            .chain(&self.v1_memory)
            .chain(&self.v1_cpu)
            .chain(&self.v1_blkio)
        {
            let _ = fs::remove_dir(root.join(base));
        }
    }

    pub fn existing(&self, base: &str) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.v2.join(base)) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            // Not an instance: the delegated scope's own leaf.
            .filter(|n| !n.starts_with('.'))
            .collect()
    }
}

/// One container's cgroup(s).
///
/// On a hybrid host a container has a v1 memory cgroup of its own only
/// when it has a memory limit of its own; otherwise it is charged to its
/// store's memory cgroup (`memory/<base>`), shared by the fleet and
/// limited as a whole. A memory cgroup per container is what makes a
/// fleet's kernel memory grow as N²: each one carries a map sized by the
/// number of memcg-aware shrinkers, and every container's superblocks
/// (overlay, proc, devpts, mqueue) add shrinkers. On a pure v2 host the
/// controller is enabled per level, so every container has one.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub v2: PathBuf,
    v2_controllers: bool,
    /// The store's group is a scope systemd delegated: its own attributes
    /// (memory limit) and everything above it are systemd's.
    delegated: bool,
    /// v1 pids cgroup of the container (hybrid host).
    pids: Option<PathBuf>,
    /// v1 memory cgroup of the container, used when it has a limit.
    memory: Option<PathBuf>,
    /// v1 cpu cgroup of the container: every container has one, so that
    /// CPU is shared per container, not per process.
    cpu: Option<PathBuf>,
    /// v1 blkio cgroup of the container, used when it has an I/O weight.
    blkio: Option<PathBuf>,
}

/// Share of the host's memory that a store's fleet may use as a whole
/// (its shared memory cgroup's limit), in percent.
pub const FLEET_MEMORY_PERCENT: u64 = 90;

/// The limit of a store's fleet as a whole, in bytes.
pub fn fleet_memory_max() -> Option<u64> {
    mem_total().map(|t| t / 100 * FLEET_MEMORY_PERCENT)
}

fn mem_total() -> Option<u64> {
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(read_mem_total)
}

fn read_mem_total() -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::Sys {
        call: format!("write({}, {value:?})", path.display()),
        err: e,
    })
}

/// CPU time used by the v2 cgroup at `dir` and below, in microseconds
/// (`usage_usec` of its `cpu.stat`, which every v2 cgroup has, with or
/// without the cpu controller).
pub fn cpu_usage_usec(dir: &Path) -> Option<u64> {
    super::proc::read_kernel_file(&dir.join("cpu.stat"))?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()
}

/// A cgroup v2 directory, opened for a child to be born in (clone3 with
/// CLONE_INTO_CGROUP); `None` if it cannot be (the child then joins it).
pub fn open_dir(dir: &Path) -> Option<OwnedFd> {
    rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()
}

/// The PIDs in the cgroup at `dir` (its `cgroup.procs`); empty if it
/// does not exist.
pub fn procs_of(dir: &Path) -> Vec<i32> {
    super::proc::read_kernel_file(&dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.parse().ok()).collect())
        .unwrap_or_default()
}

/// The PIDs in the cgroup at `dir` and in every cgroup below it (a
/// launcher such as systemd-nspawn makes sub-cgroups).
pub fn procs_under(dir: &Path) -> Vec<i32> {
    let mut out = procs_of(dir);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(procs_under(&e.path()));
            }
        }
    }
    out
}

impl Cgroup {
    /// The file that holds the container's CPU share: its v2 `cpu.weight`
    /// (1..10000, 100 by default) or, on a hybrid host, its v1
    /// `cpu.shares` (2.., 1024 by default).
    pub fn cpu_share_file(&self) -> Option<PathBuf> {
        match (self.v2_controllers, &self.cpu) {
            (true, _) => Some(self.v2.join("cpu.weight")),
            (false, Some(d)) => Some(d.join("cpu.shares")),
            (false, None) => None,
        }
    }

    /// The CPU share of a running container: the least there is while it
    /// is `background` (the rest of the boot of a start that served
    /// connections: see `Native::start_serving`), else its own (`limits`)
    /// again. Nothing where the cpu controller does not reach its cgroup,
    /// nor once the container is gone.
    pub fn set_background(&self, limits: &Limits, background: bool) -> Result<()> {
        let Some(file) = self.cpu_share_file() else {
            return Ok(());
        };
        let value = match background {
            true => self.background_share(),
            false if self.v2_controllers => limits.cpu_weight(),
            false => limits.cpu_shares(),
        };
        match write(&file, &value.to_string()) {
            // Gone with its container: nothing to give a share to.
            Err(Error::Sys { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Whether a running container has the background share
    /// (`set_background`); false where the cpu controller does not reach
    /// its cgroup or it is gone. One small read.
    pub fn in_background(&self) -> bool {
        self.cpu_share_file()
            .and_then(|f| fs::read_to_string(f).ok())
            .is_some_and(|v| v.trim().parse() == Ok(self.background_share()))
    }

    /// The least CPU share there is: cpu.weight 1 (v2), cpu.shares 2 (v1).
    fn background_share(&self) -> u64 {
        if self.v2_controllers {
            1
        } else {
            2
        }
    }

    /// Creates the cgroup(s), applies the limits, and returns their
    /// `cgroup.procs` files open for writing.
    pub fn create(&self, limits: &Limits) -> Result<Vec<OwnedFd>> {
        let parent = self.v2.parent().expect("instance cgroup has a parent");
        let made_parent = if self.v2_controllers && !self.delegated {
            mkdir_new(parent)?
        } else {
            false
        };
        if self.v2_controllers {
            // Controllers must be enabled top-down to reach our cgroups;
            // in a delegated scope systemd enabled them down to it.
            let root = parent.parent().expect("base cgroup has a parent");
            let dirs = if self.delegated {
                vec![parent]
            } else {
                vec![root, parent]
            };
            for dir in dirs {
                // All at once; one at a time only if that fails, so that
                // a controller the host lacks (io) keeps no other off.
                let file = dir.join("cgroup.subtree_control");
                if fs::write(&file, "+pids +memory +cpu +io").is_err() {
                    for c in ["+pids", "+memory", "+cpu", "+io"] {
                        let _ = fs::write(&file, c);
                    }
                }
            }
        }
        // create_dir_all also remakes the store's group if the last
        // instance of a parallel stop just removed it.
        mkdir_p(&self.v2)?;
        let tasks = limits.tasks.to_string();
        if self.v2_controllers {
            if made_parent {
                self.limit_fleet(parent, "memory.max")?;
            }
            write(&self.v2.join("pids.max"), &tasks)?;
            let memory = limits.memory.map_or("max".to_string(), |m| m.to_string());
            write(&self.v2.join("memory.max"), &memory)?;
            self.set_cpu_io(limits, false)?;
        } else {
            if let Some(d) = &self.pids {
                mkdir_p(d)?;
                write(&d.join("pids.max"), &tasks)?;
            }
            if let Some(d) = &self.memory {
                let base = d.parent().expect("instance cgroup has a parent");
                // The group gets its limit when it is made (by whichever
                // start makes it), not at every start; a delegated scope
                // gets it from systemd (MemoryMax=).
                if mkdir_new(base)? && !self.delegated {
                    self.limit_fleet(base, "memory.limit_in_bytes")?;
                }
                if let Some(m) = limits.memory {
                    mkdir_p(d)?;
                    write(&d.join("memory.limit_in_bytes"), &m.to_string())?;
                }
            }
            if let Some(d) = &self.cpu {
                mkdir_p(d)?;
            }
            if let (Some(d), Some(_)) = (&self.blkio, limits.io_weight) {
                mkdir_p(d)?;
            }
            self.set_cpu_io(limits, false)?;
        }
        // The files through which the container's first process joins.
        self.procs_files()
            .iter()
            .map(|p| {
                rustix::fs::open(
                    p,
                    rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(Error::sys(format!("open({})", p.display())))
            })
            .collect()
    }

    /// Writes the CPU and I/O shares and caps where the controllers are:
    /// at start only what differs from a new cgroup's defaults (nothing,
    /// for most containers), and by `nifty set` while the container runs
    /// (`lift`) defaults too, so that a lifted limit is lifted. An I/O
    /// weight is written only when one was given.
    fn set_cpu_io(&self, limits: &Limits, lift: bool) -> Result<()> {
        let cpu = lift || limits.cpu_weight.is_some() || limits.cpus.is_some();
        if self.v2_controllers {
            let (weight, max) = (self.v2.join("cpu.weight"), self.v2.join("cpu.max"));
            if cpu && weight.exists() {
                write(&weight, &limits.cpu_weight().to_string())?;
                write(&max, &limits.cpu_max())?;
            } else if limits.cpu_weight.is_some() || limits.cpus.is_some() {
                return Err(Error::Host(format!(
                    "{} has no cpu controller: CPU limits need it enabled above nifty's cgroups",
                    self.v2.display()
                )));
            }
            set_io_weight(&self.v2, "io.weight", "io.bfq.weight", limits)?;
            return Ok(());
        }
        if let Some(d) = self.cpu.as_ref().filter(|d| cpu && d.is_dir()) {
            write(&d.join("cpu.shares"), &limits.cpu_shares().to_string())?;
            write(
                &d.join("cpu.cfs_period_us"),
                &crate::limits::CPU_PERIOD_US.to_string(),
            )?;
            let quota = limits
                .cpu_quota_us()
                .map_or("-1".to_string(), |q| q.to_string());
            write(&d.join("cpu.cfs_quota_us"), &quota)?;
        }
        if let Some(d) = self.blkio.as_ref().filter(|d| d.is_dir()) {
            set_io_weight(d, "blkio.weight", "blkio.bfq.weight", limits)?;
        }
        Ok(())
    }

    /// Applies changed limits to the running container (`nifty set`).
    /// What needs a cgroup it does not have yet (a memory or I/O cgroup of
    /// its own on a hybrid host) takes effect at its next start; the
    /// return value says so.
    pub fn update(&self, limits: &Limits) -> Result<Vec<&'static str>> {
        let mut later = Vec::new();
        let tasks = limits.tasks.to_string();
        if self.v2_controllers {
            write(&self.v2.join("pids.max"), &tasks)?;
            let memory = limits.memory.map_or("max".to_string(), |m| m.to_string());
            write(&self.v2.join("memory.max"), &memory)?;
        } else {
            if let Some(d) = &self.pids {
                write(&d.join("pids.max"), &tasks)?;
            }
            match (&self.memory, limits.memory) {
                (Some(d), Some(m)) if d.is_dir() => {
                    write(&d.join("memory.limit_in_bytes"), &m.to_string())?
                }
                (Some(d), None) if d.is_dir() => write(&d.join("memory.limit_in_bytes"), "-1")?,
                (Some(_), Some(_)) => later.push("memory"),
                _ => {}
            }
            if limits.io_weight.is_some() && self.blkio.as_ref().is_some_and(|d| !d.is_dir()) {
                later.push("io-weight");
            }
        }
        self.set_cpu_io(limits, true)?;
        Ok(later)
    }

    /// CPU time the container has used, in microseconds.
    pub fn cpu_usage_us(&self) -> Option<u64> {
        cpu_usage_usec(&self.v2)
    }

    /// Sets the limit of the store's shared memory cgroup (`dir`) to
    /// [`FLEET_MEMORY_PERCENT`] of the host's memory, unless a lower one
    /// is set already (by the administrator, say).
    fn limit_fleet(&self, dir: &Path, file: &str) -> Result<()> {
        let Some(total) = mem_total() else {
            return Ok(());
        };
        let want = total / 100 * FLEET_MEMORY_PERCENT;
        let current = fs::read_to_string(dir.join(file)).unwrap_or_default();
        let current: u64 = current.trim().parse().unwrap_or(u64::MAX);
        if current > want {
            write(&dir.join(file), &want.to_string())?;
        }
        Ok(())
    }

    /// The memory cgroup the container is charged to: its own, if it
    /// exists, or its store's shared one.
    fn memory_dir(&self) -> Option<PathBuf> {
        let own = self.memory.as_ref()?;
        if own.is_dir() {
            Some(own.clone())
        } else {
            own.parent().map(Path::to_path_buf)
        }
    }

    /// Files through which a process joins every cgroup of this container
    /// (written with "0" from the joining process itself).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        std::iter::once(self.v2.clone())
            .chain(self.pids.clone())
            .chain(self.memory_dir())
            .chain(self.cpu.clone())
            .chain(self.blkio.clone().filter(|d| d.is_dir()))
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// PIDs in the container's cgroup; empty if it does not exist.
    pub fn procs(&self) -> Vec<i32> {
        procs_of(&self.v2)
    }

    /// Does the cgroup directory exist?
    pub fn exists(&self) -> bool {
        self.own_dirs().iter().any(|d| d.exists())
    }

    /// The container's own directories (not the store's shared ones).
    fn own_dirs(&self) -> Vec<&PathBuf> {
        std::iter::once(&self.v2)
            .chain(&self.pids)
            .chain(&self.memory)
            .chain(&self.cpu)
            .chain(&self.blkio)
            .collect()
    }

    /// Memory of the container, in bytes: what its own memory cgroup is
    /// charged, or, when it shares its store's, the private memory of its
    /// processes (resident minus shared pages).
    pub fn memory(&self) -> Option<u64> {
        let file = if self.v2_controllers {
            self.v2.join("memory.current")
        } else {
            match &self.memory {
                Some(d) if d.is_dir() => d.join("memory.usage_in_bytes"),
                _ => {
                    let page = rustix::param::page_size() as u64;
                    let pages: u64 = self
                        .procs()
                        .iter()
                        .filter_map(|p| {
                            let s = super::proc::read_kernel_file(Path::new(&format!(
                                "/proc/{p}/statm"
                            )))?;
                            let mut f = s.split_whitespace().skip(1);
                            let rss: u64 = f.next()?.parse().ok()?;
                            let shared: u64 = f.next()?.parse().ok()?;
                            Some(rss.saturating_sub(shared))
                        })
                        .sum();
                    return Some(pages * page);
                }
            }
        };
        super::proc::read_kernel_file(&file)?.trim().parse().ok()
    }

    /// SIGKILLs everything in the cgroup: `cgroup.kill` (Linux 5.14+),
    /// else each process in turn until none is left.
    pub fn kill(&self) -> Result<()> {
        if write(&self.v2.join("cgroup.kill"), "1").is_ok() {
            return Ok(());
        }
        for pid in self.procs() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid).expect("cgroup pids are positive"),
                rustix::process::Signal::Kill,
            );
        }
        Ok(())
    }

    /// On a systemd host, whether the delegated scope that holds this
    /// group has no process left in its whole tree: systemd then ends the
    /// scope and removes its tree itself (see `delegate`), and nifty must
    /// not remove groups in it at the same moment. systemd 252 walks the
    /// tree with nftw(3), which gives up when a directory it listed is gone
    /// before it opens it; the rest of the tree, the scope's own directory
    /// with it, is then left behind (seen on Debian 12: the scope and its
    /// `.nifty` leaf after `stop --all`).
    fn scope_ending(&self) -> bool {
        self.delegated
            && self
                .v2
                .parent()
                .is_some_and(|scope| super::delegate::populated(scope) == Some(false))
    }

    /// Waits until the cgroup has no process, up to `timeout`.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.procs().is_empty() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the (empty) cgroup directories; on a systemd host, unless
    /// systemd is about to remove them with the scope (`scope_ending`).
    pub fn remove(&self) -> Result<()> {
        if self.scope_ending() {
            return Ok(());
        }
        for d in self.own_dirs() {
            let mut tries = 0;
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // The kernel may still be tearing down the last task.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 200 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(Error::Sys {
                            call: format!("rmdir({})", d.display()),
                            err: e,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes an I/O weight where the host has one: the generic file
/// (`io.weight`, io.cost), and BFQ's where BFQ schedules. Default weights
/// are not written (a new cgroup has them).
fn set_io_weight(dir: &Path, generic: &str, bfq: &str, limits: &Limits) -> Result<()> {
    if limits.io_weight.is_none() {
        return Ok(());
    }
    let (g, b) = (dir.join(generic), dir.join(bfq));
    let v2 = generic == "io.weight";
    if g.exists() {
        let v = if v2 {
            format!("default {}", limits.io_weight())
        } else {
            limits.io_weight_v1().to_string()
        };
        write(&g, &v)?;
    }
    if b.exists() {
        let v = limits.io_weight_v1().to_string();
        write(&b, &if v2 { format!("default {v}") } else { v })?;
    }
    Ok(())
}

/// Makes a directory (and its parents); tells whether this call made it.
fn mkdir_new(p: &Path) -> Result<bool> {
    match fs::create_dir(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            mkdir_p(p)?;
            Ok(true)
        }
        Err(e) => Err(Error::Sys {
            call: format!("mkdir({})", p.display()),
            err: e,
        }),
    }
}

fn mkdir_p(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(|e| Error::Sys {
        call: format!("mkdir({})", p.display()),
        err: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
29 22 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
30 29 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
31 29 0:28 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
32 29 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";
    const PURE: &str = "30 22 0:27 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n";

    /// The v2 mount's flags are kept for a reconfiguration (not `rw`);
    /// `favordynmods` on any cgroup mount is the kernel's, for all.
    #[test]
    fn mount_flags_and_favordynmods() {
        let h = Hierarchy::parse(PURE).unwrap();
        assert_eq!(h.v2_flags, ["nsdelegate"]);
        assert!(!h.favordynmods && !h.joins_v1());
        let h = Hierarchy::parse(HYBRID).unwrap();
        assert!(h.v2_flags.is_empty() && !h.favordynmods && h.joins_v1());
        let on = HYBRID.replace(
            "cgroup2 rw\n",
            "cgroup2 rw,favordynmods,memory_recursiveprot\n",
        );
        let h = Hierarchy::parse(&on).unwrap();
        assert_eq!(h.v2_flags, ["favordynmods", "memory_recursiveprot"]);
        assert!(h.favordynmods);
        // Set on a v1 root (the kernel's command line sets it on all).
        let v1 = HYBRID.replace("rw,pids", "rw,pids,favordynmods");
        assert!(Hierarchy::parse(&v1).unwrap().favordynmods);
    }

    #[test]
    fn hybrid_layout() {
        let h = Hierarchy::parse(HYBRID).unwrap();
        assert_eq!(h.v2, Path::new("/sys/fs/cgroup/unified"));
        assert!(!h.v2_controllers);
        let c = h.instance("nifty", "7");
        assert_eq!(c.v2, Path::new("/sys/fs/cgroup/unified/nifty/7"));
        assert_eq!(
            c.procs_files(),
            [
                "/sys/fs/cgroup/unified/nifty/7/cgroup.procs",
                "/sys/fs/cgroup/pids/nifty/7/cgroup.procs",
                // No memory cgroup of its own (none exists here): the
                // store's shared one.
                "/sys/fs/cgroup/memory/nifty/cgroup.procs"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn pure_v2_layout() {
        let h = Hierarchy::parse(PURE).unwrap();
        assert!(h.v2_controllers);
        assert_eq!(h.instance("nifty", "a").procs_files().len(), 1);
        assert!(Hierarchy::parse("1 2 0:1 / / rw - ext4 /dev/vda rw\n").is_err());
    }

    /// On a systemd host, a group in a scope that has no process left is
    /// systemd's to remove (with the scope); in a scope still in use, or
    /// on a host without systemd, nifty removes it. Plain directories
    /// stand in for cgroupfs: `cgroup.events` is what is read.
    #[test]
    fn a_group_in_an_ending_scope_is_left_to_systemd() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Hierarchy::parse(PURE).unwrap();
        h.v2 = dir.path().to_path_buf();
        let scope = dir.path().join(super::super::delegate::base("s"));
        let events = scope.join("cgroup.events");
        for (systemd, populated, removed) in
            [(true, "0", false), (true, "1", true), (false, "0", true)]
        {
            h.systemd = systemd;
            let base = h.base("s");
            let cg = h.instance(&base, "7");
            fs::create_dir_all(&cg.v2).unwrap();
            if systemd {
                fs::write(&events, format!("populated {populated}\nfrozen 0\n")).unwrap();
            } else {
                // Without systemd, the store's group is `s` at the top.
                fs::write(
                    cg.v2.parent().unwrap().join("cgroup.events"),
                    "populated 0\n",
                )
                .unwrap();
            }
            cg.remove().unwrap();
            assert_eq!(
                !cg.v2.exists(),
                removed,
                "systemd {systemd}, populated {populated}"
            );
            let _ = fs::remove_dir(&cg.v2);
        }
        // The scope gone already (systemd removed it): no error.
        h.systemd = true;
        fs::remove_file(&events).unwrap();
        fs::remove_dir(&scope).unwrap();
        h.instance(&h.base("s"), "7").remove().unwrap();
    }
}
