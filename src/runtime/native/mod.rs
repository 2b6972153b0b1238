//! The native launcher: nifty itself makes each container (namespaces,
//! overlayfs root, cgroup, BusyBox init as PID 1) with no helper process
//! left behind, like runc's detached containers. Containers outlive the
//! `nifty start` that made them; their state is read back from the kernel.

pub mod poweroff;
pub mod spawn;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, Signal};

use super::{check_backend, Done, Info, Results, StopOptions, Take, UnitStatus};
use crate::error::{StartError, SysError};
use crate::runtime::linux::cgroup::{Cgroup, Hierarchy};
use crate::runtime::linux::files::{self, User};
use crate::runtime::linux::proc::{find_init, find_init_held, find_init_state, lock};
use crate::runtime::linux::{cgroup, confine, delegate, features, overlay, pty, shift, userns};
use crate::store::{parse_bind, Instance, Store};
use crate::template::inittab::PORT_ENV;
use crate::{Error, Result};

/// The native launcher for one store.
pub struct Native {
    store: Store,
    hierarchy: Hierarchy,
    base: String,
    /// The store's group in the v2 hierarchy (on a systemd host, its
    /// delegated scope), whose `cgroup.events` a start reads.
    base_dir: std::path::PathBuf,
    /// The seccomp programs, compiled once per process.
    seccomp: std::sync::OnceLock<std::result::Result<Vec<seccompiler::BpfProgram>, String>>,
    /// The empty mount namespace the containers' namespaces are copies
    /// of, made once per process (see `spawn`).
    empty_root: std::sync::OnceLock<crate::error::Once<std::sync::Arc<OwnedFd>>>,
    /// On a systemd host: whether the store's delegated scope was found
    /// active (checked, or made; see `delegate`), or why it cannot be.
    delegated: std::sync::Mutex<Option<crate::error::Once<()>>>,
    /// What the kernel offers, checked once per process: without and with
    /// a user namespace (see `features::preflight`).
    preflight: [std::sync::OnceLock<crate::error::Once<()>>; 2],
}

impl Native {
    pub fn new(store: &Store, hierarchy: Hierarchy) -> Native {
        Native {
            store: store.clone(),
            base: hierarchy.base(&store.cgroup_name()),
            base_dir: hierarchy.v2.join(hierarchy.base(&store.cgroup_name())),
            hierarchy,
            delegated: std::sync::Mutex::new(None),
            preflight: Default::default(),
            seccomp: std::sync::OnceLock::new(),
            empty_root: std::sync::OnceLock::new(),
        }
    }

    /// The confinement of an instance: its user namespace (`userns`, made
    /// by the caller), the capabilities it keeps, its seccomp filters and
    /// network guard (the bind programs of kernels before 6.7, if any, are
    /// returned for its cgroup; none are made when `joining` a running
    /// container, whose cgroup has them).
    fn confinement(
        &self,
        inst: &Instance,
        userns: Option<OwnedFd>,
        joining: bool,
    ) -> Result<(spawn::Confine, Option<confine::BindPrograms>)> {
        let sec = &inst.security;
        let seccomp = if sec.seccomp {
            self.seccomp
                .get_or_init(confine::filters)
                .clone()
                .map_err(|e| Error::Host(format!("instance {:?}: {e}", inst.name)))?
        } else {
            Vec::new()
        };
        let net = confine::network(inst.port, joining).map_err(|e| Error::Sys {
            call: format!(
                "instance {:?}: its network guard (landlock_create_ruleset or bpf(BPF_PROG_LOAD))",
                inst.name
            ),
            err: e,
        })?;
        let c = spawn::Confine {
            userns,
            id_base: sec.uid_base.unwrap_or(0),
            caps_keep: sec.drop_caps.then(confine::keep_mask),
            landlock: net.landlock,
            seccomp,
            mask_proc: true,
            own_network: inst.network == crate::store::Network::None,
        };
        Ok((c, net.bind))
    }

    /// On a systemd host, makes sure the store's delegated scope is active.
    /// Asking systemd once per process is not enough for one that lives
    /// on (`serve`): the scope ends when its last container stops, and a
    /// start after that must make a new one, not a directory of the old
    /// one's name that no unit owns. A scope with a process in it has not
    /// ended, so systemd is asked again only when the scope is found empty
    /// (one read of `cgroup.events` per start).
    fn delegation(&self) -> Result<()> {
        if !self.hierarchy.systemd {
            return Ok(());
        }
        let mut known = self.delegated.lock().unwrap_or_else(|e| e.into_inner());
        match &*known {
            Some(Err(e)) => return Err(Error::Once(e.clone())),
            Some(Ok(())) if delegate::populated(&self.base_dir) == Some(true) => return Ok(()),
            _ => {}
        }
        let r = delegate::ensure(
            &self.hierarchy.v2,
            &self.store.cgroup_name(),
            self.store.root(),
            cgroup::fleet_memory_max(),
        )
        .map_err(std::sync::Arc::new);
        *known = Some(r.clone());
        r.map_err(Error::Once)
    }

    /// The empty mount namespace every container's is a copy of.
    fn empty_root(&self) -> Result<std::sync::Arc<OwnedFd>> {
        crate::error::once(&self.empty_root, || {
            let dir = self.store.mount_point();
            if !dir.is_dir() {
                self.store.ensure()?;
            }
            spawn::empty_root_ns(&dir)
                .map(std::sync::Arc::new)
                .map_err(|e| {
                    Error::Host(format!(
                        "cannot make the empty mount namespace containers start from: {e} \
                         (nifty needs root with CAP_SYS_ADMIN; `nifty doctor` checks mount namespaces)"
                    ))
                })
        })
    }

    /// The cgroup of an instance.
    pub fn cgroup(&self, name: &str) -> Cgroup {
        self.hierarchy.instance(&self.base, name)
    }

    /// The cgroup path, relative to the v2 mount, for display.
    pub fn cgroup_path(&self, name: &str) -> String {
        format!("/{}/{}", self.base, name)
    }

    /// Names of instances whose cgroup exists (running or left over).
    pub fn cgroup_names(&self) -> Vec<String> {
        self.hierarchy.existing(&self.base)
    }

    /// State, init PID, uptime and memory of an instance, from the kernel.
    pub fn info(&self, inst: &Instance) -> Info {
        let (state, pid) = self.state(inst);
        let memory = pid.and_then(|_| self.cgroup(&inst.name).memory());
        let mut info = Info::new(inst, pid, memory);
        info.state = state;
        info
    }

    /// Whether an instance runs (its cgroup holds an init that has
    /// exec'd), and that init's PID.
    pub fn state(&self, inst: &Instance) -> (super::State, Option<i32>) {
        match find_init_state(&self.cgroup(&inst.name).procs()) {
            None => (super::State::Stopped, None),
            Some((pid, true)) => (super::State::Stopping, Some(pid)),
            Some((pid, false)) => (super::State::Running, Some(pid)),
        }
    }

    /// Where a running native instance lives: its init and its cgroups.
    pub fn target(&self, inst: &Instance) -> Result<super::Target> {
        check_backend(inst)?;
        let cg = self.cgroup(&inst.name);
        let pid = find_init(&cg.procs()).ok_or_else(|| Error::NotRunning(inst.name.clone()))?;
        Ok(super::Target {
            pid,
            procs_files: cg.procs_files(),
        })
    }

    /// Boots an instance. Fails if it runs already.
    pub fn start(&self, inst: &Instance) -> Result<i32> {
        self.start_serving(inst, None)
    }

    /// [`Native::start`], whose first process also serves the connections
    /// `take` gives for it, if any (see `spawn::Sessions`), each as
    /// [`Native::session`] would, before it execs init. Taken once the
    /// start is planned: connections that come after stay the caller's.
    fn start_serving(&self, inst: &Instance, take: Option<Take<'_>>) -> Result<i32> {
        check_backend(inst)?;
        let dir = self.store.instance_dir(&inst.name);
        let locked = lock(&dir)?;
        let cg = self.cgroup(&inst.name);
        let procs = cg.procs();
        if !procs.is_empty() {
            if let Some((_, stopped)) = find_init_state(&procs) {
                return Err(Error::Running(
                    inst.name.clone(),
                    if stopped {
                        " (its init is stopped: a `nifty stop` was interrupted, which that finishes)"
                    } else {
                        ""
                    },
                ));
            }
            // Leftovers of a container whose init is gone: clear them.
            cg.kill()?;
            cg.wait_empty(Duration::from_secs(5));
        }
        let userns = inst.security.uid_base.is_some();
        crate::error::once(&self.preflight[usize::from(userns)], || {
            features::preflight(userns)
        })?;
        let lower = shift::lower(&self.store, inst)?;
        let binds = inst
            .bind_ro
            .iter()
            .map(|b| parse_bind(b))
            .collect::<Result<Vec<_>>>()?;
        // (The layers first: they mount the disk store, where the log is.)
        let (upper, work) = self.store.instance_layers(inst)?;
        let log = files::open_console_log(&self.store.console_log(inst), &inst.name)?;
        let env = init_env(inst);
        let userns = inst.security.uid_base.map(userns::create).transpose()?;
        let (confine, bind_guard) = self.confinement(inst, userns, false)?;
        let conns = take.map(|t| t(&inst.name)).unwrap_or_default();
        // Only a start with connections pays for their plan (a fleet's
        // `start` has none).
        let session = (!conns.is_empty()).then(|| {
            let root = User::root();
            let env = session_env(&root);
            (crate::template::inittab::dropbear_inetd(), env, root.home)
        });
        // Its Dropbear logs through syslogd, which does not run yet when
        // a session comes before init: its first line ("Child connection
        // from ...") would be lost. The console log says where each came
        // from instead.
        for conn in &conns {
            let _ = rustix::io::write(&log, login_line(&inst.name, conn.as_fd()).as_bytes());
        }
        if session.is_some() {
            // A session's process runs the container's Dropbear while this
            // process's memory is still shared with the container's first
            // one: none of the container's may read or trace it.
            crate::sys::not_dumpable().map_err(Error::sys("prctl(PR_SET_DUMPABLE, 0)"))?;
        }
        let plan = spawn::Plan::new(spawn::Spec {
            lower: &lower.path,
            lower_idmap: lower.idmap,
            upper: &upper,
            work: &work,
            binds: &binds,
            hostname: &format!("nifty{}", inst.name),
            env: &env,
            log_fd: log,
            confine,
            sessions: session.as_ref().map(|(argv, env, home)| spawn::Sessions {
                conns,
                argv,
                env,
                home,
            }),
            lock_fd: Some(locked.as_raw_fd()),
        })
        .map_err(|e| Error::Start {
            name: inst.name.clone(),
            failure: StartError::Prepare(e),
        })?;
        let empty_root = self.empty_root()?;
        self.delegation()?;
        let procs = cg.create(&inst.limits)?;
        // Its v2 directory, for the container's init to be born in.
        let v2_dir = cgroup::open_dir(&cg.v2);
        let started = match &bind_guard {
            Some(g) => g.attach(&cg.v2).map_err(|e| {
                StartError::Setup(SysError::io(
                    format!(
                        "bpf(BPF_PROG_ATTACH) of its bind programs to {}",
                        cg.v2.display()
                    ),
                    &e,
                ))
            }),
            None => Ok(()),
        }
        .and_then(|()| {
            // A full disk: overlayfs could not make its work directory.
            crate::volume::mount_overlay(
                &self.store,
                inst,
                |e| match e {
                    StartError::Setup(e) => Some(e.errno.raw_os_error()),
                    _ => None,
                },
                || {
                    spawn::spawn(
                        &plan,
                        v2_dir.as_ref().map(|d| d.as_fd()),
                        &procs,
                        empty_root.as_fd(),
                    )
                },
            )
        });
        match started {
            Ok(s) => {
                // Its logins have their banners (the first process waited
                // for them); the rest of its boot (init, its services)
                // runs with the least CPU share until `nifty serve` gives
                // it its own back once a burst of cold starts is over
                // ([`Launcher::foreground`]): the logins of the burst's
                // other instances come first (a fifth off the p50 of 50
                // cold banners here: README, "On demand, measured").
                if session.is_some() {
                    if let Err(e) = cg.set_background(&inst.limits, true) {
                        tracing::warn!("instance {}: {e}", inst.name);
                    }
                }
                tracing::debug!(instance = %inst.name, pid = s.pid, "started");
                let failed = plan.sessions_failed();
                if failed > 0 {
                    tracing::warn!(
                        "instance {}: {failed} connection(s) closed unserved: \
                         its /usr/sbin/dropbear did not start (see its console log)",
                        inst.name
                    );
                }
                Ok(s.pid)
            }
            Err(failure) => {
                let _ = cg.remove();
                self.hierarchy.remove_base(&self.base);
                Err(Error::Start {
                    name: inst.name.clone(),
                    failure,
                })
            }
        }
    }

    /// Starts many instances at once (on a pool), each serving what
    /// `take` gives for it (see [`Native::start_serving`]).
    fn start_all(&self, insts: &[&Instance], take: Option<Take<'_>>, done: Done<'_>) -> Results {
        let pool = crate::fleet::Pool::Work;
        let results = crate::fleet::par_map(pool, insts.to_vec(), |i| {
            let r = self.start_serving(i, take).map(|_| ());
            done(&i.name);
            (i.name.clone(), r)
        });
        // The pool's threads outlive the batch (see `overlay::leave_staging`).
        if features::overlay_fd_layers() == Some(false) {
            pool.on_every_thread(overlay::leave_staging);
        }
        results
    }

    /// Stops many instances at once: signal every init, then watch them all
    /// from one loop (so a thousand stops take as long as one), kill what
    /// outlives the timeout, and remove the cgroups. A stopped instance is
    /// not an error (its leftover cgroup, if any, is removed).
    fn stop_all(
        &self,
        insts: &[&Instance],
        opts: StopOptions,
        done: &(dyn Fn(&str) + Sync),
    ) -> Vec<(String, Result<()>)> {
        use rayon::prelude::*;
        let phase = Instant::now();
        let budget = poweroff::FdBudget::new(insts.len());
        // Phase 1: signal (or kill) every container, in parallel.
        let signalled: Vec<(String, Result<Option<poweroff::Stopping>>)> = insts
            .par_iter()
            .map(|inst| {
                let cg = self.cgroup(&inst.name);
                let r = (|| {
                    check_backend(inst)?;
                    let procs = cg.procs();
                    let Some(init) = find_init_held(&procs) else {
                        if !procs.is_empty() {
                            cg.kill()?;
                        }
                        return Ok(None);
                    };
                    let pid = init.pid;
                    // A held first process has run nothing of the
                    // container's but its logins: it is ended, not
                    // powered off (it takes no signal before init runs).
                    let kill = opts.kill || init.held;
                    let pidfd = rustix::process::pidfd_open(
                        Pid::from_raw(pid).expect("pid > 0"),
                        rustix::process::PidfdFlags::empty(),
                    )
                    .ok();
                    let mut services = None;
                    if kill {
                        cg.kill()?;
                    } else if let Some(fd) = &pidfd {
                        // See `poweroff`: without shutdown actions, nifty
                        // powers off from the host.
                        let signal = if opts.signal == Signal::Usr2
                            && !files::init_has_shutdown_actions(&inst.name, pid)
                        {
                            Signal::Stop
                        } else {
                            opts.signal
                        };
                        rustix::process::pidfd_send_signal(fd, signal)
                            .map_err(Error::sys(format!("pidfd_send_signal({pid}, {signal:?})")))?;
                        if signal == Signal::Stop {
                            files::console_note(&self.store, inst, files::POWERING_OFF);
                            let mut signalled = Vec::new();
                            let fds =
                                poweroff::term_services(&cg, procs, pid, &mut signalled, &budget);
                            services = Some((signalled, fds));
                        }
                    }
                    Ok(Some(poweroff::Stopping {
                        name: inst.name.clone(),
                        cg: cg.clone(),
                        pid,
                        pidfd,
                        deadline: Instant::now() + opts.timeout,
                        services,
                        killed: kill,
                    }))
                })();
                (inst.name.clone(), r)
            })
            .collect();
        let mut results: Vec<(String, Result<()>)> = Vec::new();
        let mut pending = Vec::new();
        for (name, r) in signalled {
            match r {
                Ok(Some(p)) => pending.push(p),
                Ok(None) => results.push((name, Ok(()))),
                Err(e) => results.push((name, Err(e))),
            }
        }
        tracing::debug!(elapsed = ?phase.elapsed(), count = pending.len(), "signalled");
        // Phase 2: one epoll set watches them all until every init is gone.
        let timed_out = poweroff::watch(&mut pending, &budget);
        if timed_out > 0 {
            tracing::warn!(
                "{timed_out} container(s) did not power off within {:?} and were killed",
                opts.timeout
            );
        }
        tracing::debug!(elapsed = ?phase.elapsed(), "all inits gone");
        // Phase 3: wait for every cgroup to empty, then remove them. All
        // empty first: on a systemd host, the last process to go may end
        // the scope, and systemd then removes the groups itself (see
        // `Cgroup::remove`), which it must not find nifty doing as well.
        let emptied: Vec<Result<()>> = pending
            .par_iter()
            .map(|p| {
                if p.cg.wait_empty(Duration::from_secs(1)) {
                    return Ok(());
                }
                let _ = p.cg.kill();
                if p.cg.wait_empty(Duration::from_secs(5)) {
                    Ok(())
                } else {
                    Err(Error::Host(format!(
                        "instance {:?}: processes {:?} survive SIGKILL in {}",
                        p.name,
                        p.cg.procs(),
                        p.cg.v2.display()
                    )))
                }
            })
            .collect();
        self.hierarchy.flush_stats(&self.base);
        let cleaned: Vec<(String, Result<()>)> = pending
            .par_iter()
            .zip(emptied)
            .map(|(p, r)| {
                let r = r.and_then(|()| p.cg.remove());
                done(&p.name);
                (p.name.clone(), r)
            })
            .collect();
        tracing::debug!(elapsed = ?phase.elapsed(), "cgroups removed");
        for (name, r) in &results {
            if r.is_ok() {
                let _ = self.cgroup(name).remove();
            }
            done(name);
        }
        results.extend(cleaned);
        self.hierarchy.remove_base(&self.base);
        results
    }

    /// Runs a command inside a running container: its namespaces, its
    /// root, its cgroup, as `user` (default root of the container).
    /// Returns the command's exit code. Call it from a single-threaded
    /// process: it joins the container's PID namespace.
    pub fn exec(
        &self,
        inst: &Instance,
        target: &super::Target,
        user: Option<&str>,
        cmd: &[String],
        env: &[(String, String)],
    ) -> Result<i32> {
        let Started {
            proc: Spawned::Child(mut child),
            term,
            relays,
        } = self.spawn_in(inst, target, user, cmd, env, Io::Caller)?
        else {
            return Err(Error::Host(
                "exec: the command was not started as a child".into(),
            ));
        };
        if term.is_some() || relays.any() {
            let pid = rustix::process::Pid::from_raw(child.id() as i32)
                .ok_or_else(|| Error::Host("exec: the command has no PID".into()))?;
            let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .map_err(Error::sys("pidfd_open(command)"))?;
            let term = term.map(|(p, ttys)| {
                drop(p.slave);
                (p.master, ttys)
            });
            pty::proxy(term.as_ref().map(|(m, t)| (m, *t)), relays, &pidfd);
        }
        let status = child
            .wait()
            .map_err(|e| Error::Host(format!("instance {:?}: wait: {e}", inst.name)))?;
        use std::os::unix::process::ExitStatusExt;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }

    /// Starts one SSH session in a running on-demand instance: Dropbear
    /// in inetd mode as the container's root, `conn` (an accepted
    /// connection) its stdin and stdout, `log` (its console log) its
    /// stderr. Not waited for: the session's parent is the caller, and
    /// the container's init adopts it if the caller goes first.
    pub fn session(
        &self,
        inst: &Instance,
        target: &super::Target,
        conn: OwnedFd,
        log: OwnedFd,
    ) -> Result<super::SessionProc> {
        let cmd = crate::template::inittab::dropbear_inetd();
        self.dropbear_in(inst, target, &cmd, Some(conn), log)
    }

    /// Starts a Dropbear listening in a running on-demand instance, bound
    /// as `bound` says (see `serve::direct`), as the container's root: stdin and stdout the
    /// container's own /dev/null (opened inside it: no fd of the host but
    /// the log), `log` its stderr. It goes to the background (the
    /// container's init adopts the listening one); the caller waits for
    /// the one it started.
    pub fn listener(
        &self,
        inst: &Instance,
        target: &super::Target,
        log: OwnedFd,
        bound: crate::runtime::linux::proc::Bound,
    ) -> Result<super::SessionProc> {
        let cmd = crate::template::inittab::dropbear_listening(bound);
        self.dropbear_in(inst, target, &cmd, None, log)
    }

    /// Whether the running container whose init is `pid` should show the
    /// template's view of /proc/net and does not (see `procnet`): one on
    /// the host's network, of a template that has the view, whose /proc
    /// systemd-nspawn mounted.
    /// `mnt` is its mount namespace: never the caller's own.
    fn proc_net_uncovered(&self, inst: &Instance, pid: i32, mnt: &OwnedFd) -> bool {
        // The readlink first: a native container is covered from its start,
        // and each of its sessions pays only that.
        inst.network == crate::store::Network::Host
            && spawn::proc_net_uncovered(pid)
            && !spawn::is_own_mount_ns(mnt.as_fd())
            && self
                .store
                .instance_lower(inst)
                .join(crate::template::procnet::DIR)
                .is_dir()
    }

    /// Covers a running container's /proc/net with the template's view if
    /// it should show it and does not (a systemd one, right after its
    /// start: `nifty systemd post`); whether it did.
    pub fn cover_proc_net(&self, inst: &Instance, target: &super::Target) -> Result<bool> {
        let path = format!("/proc/{}/ns/mnt", target.pid);
        let mnt = rustix::fs::open(
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(Error::sys(format!("open({path})")))?;
        if !self.proc_net_uncovered(inst, target.pid, &mnt) {
            return Ok(false);
        }
        let empty = self.empty_root()?;
        spawn::cover_proc_net_in(empty.as_fd(), mnt.as_fd()).map_err(|e| Error::Sys {
            call: format!(
                "instance {:?}: move_mount of the /proc/net view in its mount namespace",
                inst.name
            ),
            err: e,
        })?;
        Ok(true)
    }

    /// `cmd` (a Dropbear) in a running container, `io` its stdin and
    /// stdout (none: the container's /dev/null), `log` its stderr; not
    /// waited for.
    fn dropbear_in(
        &self,
        inst: &Instance,
        target: &super::Target,
        cmd: &[String],
        io: Option<OwnedFd>,
        log: OwnedFd,
    ) -> Result<super::SessionProc> {
        let io = Io::Socket { conn: io, log };
        let Started { proc, .. } = self.spawn_in(inst, target, None, cmd, &[], io)?;
        Ok(match proc {
            Spawned::Child(c) => super::SessionProc::new(c.id() as i32),
            Spawned::Pid(pid) => super::SessionProc::new(pid),
        })
    }

    /// Starts `cmd` in a running container: its namespaces, its root, its
    /// cgroup, as `user` (default root of the container), confined as its
    /// init is; with `io`. Joins the container's PID namespace for the
    /// calling thread's children.
    fn spawn_in(
        &self,
        inst: &Instance,
        target: &super::Target,
        user: Option<&str>,
        cmd: &[String],
        env: &[(String, String)],
        io: Io,
    ) -> Result<Started> {
        let pid = target.pid;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let open_ns = |ns: &str| {
            let p = proc_dir.join("ns").join(ns);
            rustix::fs::open(&p, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                .map_err(Error::sys(format!("open({})", p.display())))
        };
        let (mnt, uts, ipc, net, pidns) = (
            open_ns("mnt")?,
            open_ns("uts")?,
            open_ns("ipc")?,
            open_ns("net")?,
            open_ns("pid")?,
        );
        let account = match user {
            None | Some("root") => User::root(),
            // Read as every tenant file is (no link followed, a regular
            // file of bounded size), through init's root.
            Some(u) => {
                files::Root::of_running(&inst.name, pid, inst.security.uid_base.unwrap_or(0))?
                    .user(u)?
            }
        };
        // Each cgroup.procs file, and whether it is the v2 one (a session
        // is born there instead, where the kernel can: see below).
        let cgroup_files: Vec<(OwnedFd, bool)> = target
            .procs_files
            .iter()
            .map(|p| {
                rustix::fs::open(p, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
                    .map(|fd| (fd, p.starts_with(&self.hierarchy.v2)))
                    .map_err(Error::sys(format!("open({})", p.display())))
            })
            .collect::<Result<_>>()?;
        let born_in = match &io {
            Io::Socket { .. } if features::forced("into-cgroup") => None,
            Io::Socket { .. } => target
                .procs_files
                .iter()
                .find(|p| p.starts_with(&self.hierarchy.v2))
                .and_then(|p| p.parent())
                .and_then(cgroup::open_dir),
            Io::Caller => None,
        };
        // A container on the host's network whose /proc/net is still the
        // kernel's (a systemd one: systemd-nspawn mounts its /proc) gets the
        // template's view now, as a native one has it from its start:
        // Dropbear reads /proc/net/tcp at each start, which on the host's
        // network walks the kernel's whole table (`procnet`).
        let proc_net_from = match self.proc_net_uncovered(inst, pid, &mnt) {
            true => Some(self.empty_root()?),
            false => None,
        };
        let skip_v2 = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let skip = skip_v2.clone();
        use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
        // The child is born in the container's PID namespace with a copy of
        // this memory: not dumpable from its first instruction (the flag is
        // inherited at fork), not only from its ID change on.
        crate::sys::not_dumpable().map_err(Error::sys("prctl(PR_SET_DUMPABLE, 0)"))?;
        move_into_link_name_space(pidns.as_fd(), Some(LinkNameSpaceType::ProcessID))
            .map_err(Error::sys(format!("setns(/proc/{pid}/ns/pid)")))?;
        let mut command = std::process::Command::new(&cmd[0]);
        command
            .args(&cmd[1..])
            .env_clear()
            .envs(session_env(&account))
            .envs(env.iter().map(|(k, v)| (k, v)));
        let home = std::ffi::CString::new(account.home.as_bytes()).unwrap_or_default();
        let userns = match inst.security.uid_base {
            Some(_) => Some(open_ns("user")?),
            None => None,
        };
        // The command joins the container's user namespace (above), so
        // none is made; the bind programs are on its cgroup already.
        let (confine, _) = self.confinement(inst, None, true)?;
        if account.uid == u32::MAX || account.gid == u32::MAX {
            return Err(Error::Invalid(format!(
                "instance {:?}: user has an invalid uid/gid",
                inst.name
            )));
        }
        let (uid, gid) = crate::sys::ids(account.uid, account.gid);
        // Never the caller's terminal (see `pty`): a session of its own,
        // and a pty of nifty's for those of stdin/stdout/stderr that are
        // terminals.
        let ttys = match &io {
            Io::Caller => pty::Ttys::of_caller(),
            Io::Socket { .. } => pty::Ttys::default(),
        };
        let socket_io = match io {
            Io::Socket { conn, log } => Some((conn, log)),
            Io::Caller => None,
        };
        if let Some((conn, log)) = &socket_io {
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map(std::process::Stdio::from)
                    .map_err(Error::io("dup", "connection"))
            };
            // Without a connection, /dev/null until the hook puts the
            // container's own in its place (below).
            let io = || match conn {
                Some(c) => dup(c),
                None => Ok(std::process::Stdio::null()),
            };
            command.stdin(io()?).stdout(io()?).stderr(dup(log)?);
        }
        // Of the caller's stdio that is no terminal, all but pipes and
        // sockets go through pipes of nifty's (see `pty::Relayed`).
        let mut relays = pty::Relays::default();
        if socket_io.is_none() {
            let relayed = pty::Relayed::of_caller(ttys);
            let pipe = || {
                rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                    .map_err(Error::sys("pipe2"))
            };
            if relayed.stdin {
                let (r, w) = pipe()?;
                command.stdin(std::process::Stdio::from(r));
                relays.stdin = Some(w);
            }
            if relayed.stdout {
                let (r, w) = pipe()?;
                command.stdout(std::process::Stdio::from(w));
                relays.stdout = Some(r);
            }
            if relayed.stderr {
                let (r, w) = pipe()?;
                command.stderr(std::process::Stdio::from(w));
                relays.stderr = Some(r);
            }
        }
        let term = if ttys.any() {
            let p = pty::open(ttys)?;
            let end = || {
                p.slave
                    .try_clone()
                    .map(std::process::Stdio::from)
                    .map_err(Error::io("dup", "pty"))
            };
            if ttys.stdin {
                command.stdin(end()?);
            }
            if ttys.stdout {
                command.stdout(end()?);
            }
            if ttys.stderr {
                command.stderr(end()?);
            }
            Some(p)
        } else {
            None
        };
        let ctty = match (ttys.stdin, ttys.stdout, ttys.stderr) {
            (true, _, _) => Some(0),
            (_, true, _) => Some(1),
            (_, _, true) => Some(2),
            _ => None,
        };
        // A daemon (no connection) gets the container's /dev/null, opened
        // in its namespaces and root: no fd of the host.
        let null_io = matches!(&socket_io, Some((None, _)));
        let hook = move || -> std::io::Result<()> {
            let err = |e: rustix::io::Errno| std::io::Error::from_raw_os_error(e.raw_os_error());
            // As init's (see `spawn`): nothing of the caller's ignored
            // signals (a background `serve` ignores SIGINT and SIGQUIT).
            crate::sys::default_signals();
            rustix::process::setsid().map_err(err)?;
            if let Some(fd) = ctty {
                rustix::process::ioctl_tiocsctty(crate::sys::borrow_fd(fd)).map_err(err)?;
            }
            let proc_net = proc_net_from
                .as_ref()
                .and_then(|empty| spawn::clone_proc_net_link(empty.as_fd()).ok());
            move_into_link_name_space(mnt.as_fd(), Some(LinkNameSpaceType::Mount)).map_err(err)?;
            if let Some(link) = &proc_net {
                // Not a boundary (SECURITY.md): a session goes on without.
                let _ = spawn::cover_proc_net(link.as_fd());
            }
            move_into_link_name_space(
                uts.as_fd(),
                Some(LinkNameSpaceType::HostNameAndNISDomainName),
            )
            .map_err(err)?;
            move_into_link_name_space(
                ipc.as_fd(),
                Some(LinkNameSpaceType::InterProcessCommunication),
            )
            .map_err(err)?;
            move_into_link_name_space(net.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(err)?;
            for (f, v2) in &cgroup_files {
                if *v2 && skip.load(std::sync::atomic::Ordering::Relaxed) {
                    continue; // born there
                }
                rustix::io::write(f, b"0").map_err(err)?;
            }
            if let Some(u) = &userns {
                move_into_link_name_space(u.as_fd(), Some(LinkNameSpaceType::User)).map_err(err)?;
            }
            if rustix::process::chdir(home.as_c_str()).is_err() {
                rustix::process::chdir(c"/").map_err(err)?;
            }
            if null_io {
                let null =
                    rustix::fs::open(c"/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
                        .map_err(err)?;
                for to in [0, 1] {
                    crate::sys::dup2(null.as_raw_fd(), to)?;
                }
            }
            crate::sys::take_ids(uid, gid).map_err(err)?;
            if let Some(keep) = confine.caps_keep {
                crate::sys::drop_bounding_caps(keep)?;
            }
            crate::sys::cloexec_from(3)?;
            rustix::thread::set_no_new_privs(true).map_err(err)?;
            if let Some(fd) = &confine.landlock {
                crate::sys::landlock_restrict_self(fd.as_fd()).map_err(err)?;
            }
            for prog in &confine.seccomp {
                crate::sys::apply_seccomp(prog)?;
            }
            Ok(())
        };
        let cannot = |e: std::io::Error| {
            Error::Host(format!(
                "instance {:?}: cannot run {:?}: {e}",
                inst.name, cmd[0]
            ))
        };
        // A session is born in the container's v2 cgroup (clone3 with
        // CLONE_INTO_CGROUP, 5.7), which spares the migration's wait for an
        // RCU grace period at each login; the environment is the command's.
        if let (Some((conn, log)), Some(dir)) = (&socket_io, &born_in) {
            let cstr = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
            let path = cstr(&cmd[0]);
            let argv: Vec<std::ffi::CString> = cmd.iter().map(|a| cstr(a)).collect();
            let envp: Vec<std::ffi::CString> = command
                .get_envs()
                .filter_map(|(k, v)| {
                    let v = v?;
                    let mut kv = k.to_os_string();
                    kv.push("=");
                    kv.push(v);
                    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(kv.as_os_str()))
                        .ok()
                })
                .collect();
            let ptrs = |v: &[std::ffi::CString]| -> Vec<*const std::ffi::c_char> {
                v.iter()
                    .map(|c| c.as_ptr())
                    .chain(std::iter::once(std::ptr::null()))
                    .collect()
            };
            let (argv_ptrs, envp_ptrs) = (ptrs(&argv), ptrs(&envp));
            let (c, l) = (conn.as_ref().map(|c| c.as_raw_fd()), log.as_raw_fd());
            skip_v2.store(true, std::sync::atomic::Ordering::Relaxed);
            let r = crate::sys::spawn_into_cgroup(dir.as_fd(), &mut || {
                let io = c.map(|c| [(c, 0), (c, 1)]);
                for (fd, to) in io.into_iter().flatten().chain([(l, 2)]) {
                    if let Err(e) = crate::sys::dup2(fd, to) {
                        return e;
                    }
                }
                if let Err(e) = hook() {
                    return e;
                }
                crate::sys::execve(&path, &argv_ptrs, &envp_ptrs)
            });
            match r {
                Ok(pid) => {
                    return Ok(Started {
                        proc: Spawned::Pid(pid),
                        term: None,
                        relays,
                    })
                }
                Err(crate::sys::SpawnError::Child(e)) => return Err(cannot(e)),
                Err(crate::sys::SpawnError::Clone(e)) => {
                    tracing::debug!("clone3(CLONE_INTO_CGROUP): {e}; the session migrates");
                    skip_v2.store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        let child = crate::sys::spawn_with_hook(&mut command, hook).map_err(cannot)?;
        drop(command); // its copies of the pty's far end and of the connection
        Ok(Started {
            proc: Spawned::Child(child),
            term: term.map(|p| (p, ttys)),
            relays,
        })
    }
}

/// What `spawn_in` started, with nifty's ends of its stdio.
struct Started {
    proc: Spawned,
    /// A pty of nifty's, for those of the caller's stdio that are terminals.
    term: Option<(pty::Pty, pty::Ttys)>,
    /// Pipes of nifty's, for the others that are no pipe or socket.
    relays: pty::Relays,
}

/// A process `spawn_in` started: a `Command`'s child, or one born in the
/// container's cgroup by clone3 (a PID the caller reaps).
enum Spawned {
    Child(std::process::Child),
    Pid(i32),
}

/// What a command started in a container gets as its stdin, stdout and
/// stderr.
enum Io {
    /// The caller's: a pty of nifty's for those that are terminals.
    Caller,
    /// An accepted connection (stdin and stdout; none for a daemon, which
    /// gets the container's /dev/null) and the console log (stderr).
    Socket { conn: Option<OwnedFd>, log: OwnedFd },
}

/// Reads the container's /etc/passwd without following any symlink out of
/// its root (openat2 with RESOLVE_IN_ROOT).
/// nifty's own launcher behind the runtime's door.
impl super::Launcher for Native {
    fn infos(&self, insts: &[&Instance]) -> Vec<Info> {
        // Read from /proc and cgroupfs: in parallel.
        use rayon::prelude::*;
        insts.par_iter().map(|i| self.info(i)).collect()
    }

    fn states(&self, insts: &[&Instance]) -> Vec<(super::State, Option<i32>)> {
        use rayon::prelude::*;
        insts.par_iter().map(|i| self.state(i)).collect()
    }

    fn start_many(&self, insts: &[&Instance], done: Done<'_>) -> Results {
        self.start_all(insts, None, done)
    }

    fn start_many_serving(&self, insts: &[&Instance], take: Take<'_>, done: Done<'_>) -> Results {
        self.start_all(insts, Some(take), done)
    }

    /// The held first processes of its cold starts exec their inits (see
    /// `spawn::spawn`); what they kept is freed once they have.
    fn starts_settled(&self) {
        spawn::release_held();
        spawn::reap_held(Duration::from_secs(1));
    }

    fn stop_many(&self, insts: &[&Instance], opts: StopOptions, done: Done<'_>) -> Results {
        self.stop_all(insts, opts, done)
    }

    fn target(&self, inst: &Instance) -> Result<super::Target> {
        Native::target(self, inst)
    }

    fn processes(&self, inst: &Instance) -> (String, Vec<i32>) {
        (
            self.cgroup_path(&inst.name),
            self.cgroup(&inst.name).procs(),
        )
    }

    fn unit(&self, _: &Instance) -> Option<UnitStatus> {
        None
    }

    fn check_create(&self, _: &[String], _: &[String]) -> Result<()> {
        Ok(())
    }

    fn register(&self, _: &[&Instance]) -> Result<()> {
        Ok(())
    }

    fn release(&self, inst: &Instance) -> Result<()> {
        // Whatever runs in its cgroup, init or not, keeps its port and ID
        // range: never release them under a live process.
        let name = &inst.name;
        let cg = self.cgroup(name);
        let left = cg.procs();
        if !left.is_empty() {
            return Err(Error::Invalid(format!(
                "instance {name:?}: its cgroup still holds {} process(es) (PID {}); \
                 `nifty stop {name}` or `nifty kill {name}` first, or `nifty rm -f {name}`",
                left.len(),
                left[0]
            )));
        }
        let _ = cg.remove();
        Ok(())
    }

    fn forget(&self, _: &[String]) -> Result<()> {
        Ok(())
    }

    fn launched_as(&self, _: &Instance) -> String {
        String::new()
    }

    fn enable(&self, insts: &[&Instance], on: bool) -> Result<Vec<super::dbus::Change>> {
        Err(Error::Invalid(format!(
            "instance {:?} uses the native launcher, which has no boot-time start; \
             only systemd instances (create --backend systemd) can be {}d",
            insts.first().map_or("", |i| i.name.as_str()),
            if on { "enable" } else { "disable" }
        )))
    }

    fn set_limits(&self, inst: &Instance) -> Result<Vec<&'static str>> {
        let cg = self.cgroup(&inst.name);
        if cg.procs().is_empty() {
            return Ok(Vec::new());
        }
        cg.update(&inst.limits)
    }

    fn cpu_usage_us(&self, inst: &Instance) -> Option<u64> {
        self.cgroup(&inst.name).cpu_usage_us()
    }

    fn foreground(&self, inst: &Instance) -> Result<()> {
        self.cgroup(&inst.name).set_background(&inst.limits, false)
    }

    fn in_background(&self, inst: &Instance) -> bool {
        self.cgroup(&inst.name).in_background()
    }

    fn served_by_serve(&self) -> bool {
        true
    }

    fn hold_ports_hint(&self, _: &Instance) -> String {
        format!("run `nifty{} serve`", self.store.root_flag())
    }

    fn hold_ports(&self, _: &[&Instance], _: bool) -> Result<()> {
        // `nifty serve` holds them, as the records say: see
        // `records_saved`.
        Ok(())
    }

    fn records_saved(&self) -> Result<()> {
        // `nifty serve` rescans when the instances directory's time
        // changes, which this makes it do.
        let dir = self.store.instances_dir();
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
        };
        rustix::fs::utimensat(rustix::fs::CWD, &dir, &now, rustix::fs::AtFlags::empty())
            .map_err(Error::sys(format!("utimensat({})", dir.display())))
    }

    fn running_names(&self) -> Vec<String> {
        self.cgroup_names()
    }

    fn reap_orphans(&self, known: &[String]) -> Results {
        let mut out = Results::new();
        for n in self.cgroup_names() {
            if known.contains(&n) {
                continue;
            }
            let cg = self.cgroup(&n);
            let _ = cg.kill();
            cg.wait_empty(Duration::from_secs(5));
            out.push((n, cg.remove()));
        }
        out
    }
}

/// The environment of a process nifty starts in a running container as
/// `account` (`exec`, a session's Dropbear): the caller's TERM, nothing
/// else of the caller's.
fn session_env(account: &User) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/bin:/sbin:/usr/bin:/usr/sbin".into()),
        ("HOME".into(), account.home.clone()),
        ("USER".into(), account.name.clone()),
        ("LOGNAME".into(), account.name.clone()),
        (
            "TERM".into(),
            std::env::var("TERM").unwrap_or_else(|_| "vt100".into()),
        ),
    ]
}

/// The console log's line for a connection a start serves before init
/// (and so before syslogd, which would have its Dropbear's "Child
/// connection from" line): where it came from.
fn login_line(name: &str, conn: std::os::fd::BorrowedFd<'_>) -> String {
    use rustix::net::SocketAddrAny;
    let from = match rustix::net::getpeername(conn) {
        Ok(Some(SocketAddrAny::V4(a))) => a.to_string(),
        Ok(Some(SocketAddrAny::V6(a))) => match a.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddrV4::new(v4, a.port()).to_string(),
            None => a.to_string(),
        },
        _ => "an unknown address".to_string(),
    };
    format!("nifty: instance {name} starts for an SSH connection from {from}\n")
}

/// The environment init starts with.
fn init_env(inst: &Instance) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/sbin:/bin:/usr/sbin:/usr/bin".into()),
        ("HOME".into(), "/root".into()),
        ("TERM".into(), "vt102".into()),
        ("container".into(), "nifty".into()),
        (PORT_ENV.into(), inst.port.to_string()),
    ]
}
