//! Booting one container: a child in a new PID namespace that shares
//! nifty's memory until it execs (CLONE_VM|CLONE_VFORK, like posix_spawn:
//! no page tables copied, no copy-on-write faults in a threaded parent),
//! joins the container's cgroups first, then enters a copy of nifty's empty
//! mount namespace, attaches the container's mounts, chroots into its root,
//! joins the user namespace, drops what it must, and execs BusyBox init as
//! PID 1.
//!
//! The root is switched without `pivot_root`: that call walks every thread
//! on the host under the kernel's global namespace lock (to move the roots
//! of processes still in the old root), so each start cost more the more
//! containers ran (3.8 ms more per start at 10,000). Instead, every
//! container's mount namespace is a copy of one made once per nifty process
//! ([`empty_root_ns`]) whose only mount is an empty, read-only tmpfs: the
//! copy is one mount (not the host's table), and under the container's root
//! there is nothing of the host to climb back to, so `chroot` is as tight as
//! `pivot_root`: climbing ".." past the root reaches the tmpfs's root, on
//! which the container's root is mounted, and lands back in it (a test
//! plays the classic chroot escape).
//! It also means the setup never resolves a path on the host once it is in
//! the namespace: a symlink planted in the container's upper layer cannot
//! aim a setup mount at a host directory.
//!
//! Everything the child needs (the detached mounts, argv, envp, seccomp
//! programs) is prepared before the clone: the child only makes raw system
//! calls. A failed step is written to a shared word before the child exits;
//! when the parent resumes, a zero word means init is running.
//!
//! All mounts are detached trees until the child attaches them inside the
//! container's own mount namespace: the host never sees them, and they
//! vanish with the container, even if nifty is killed at any point.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags, CWD};
use rustix::mount::{MountAttrFlags, MountFlags, MoveMountFlags, OpenTreeFlags};

use crate::error::{StartError, SysError};
use crate::runtime::linux::netns;
use crate::runtime::linux::overlay::overlay;
use crate::sys;
use crate::template::dev::{DEVICES, DEV_LINKS};
use crate::template::procnet;

pub use crate::error::Step;

/// The name (comm) of a container's first process until it execs init:
/// such a process is PID 1 of its namespace but not yet a running container.
pub const STARTING: &std::ffi::CStr = c"nifty:starting";

/// Everything the child needs, made before the fork.
pub struct Plan {
    lower: PathBuf,
    /// Idmap `lower` through `confine.userns` (see `Spec::lower_idmap`).
    lower_idmap: bool,
    upper: PathBuf,
    work: PathBuf,
    /// (host device, path inside the container)
    devices: Vec<(CString, CString)>,
    /// (host directory, path inside the container)
    binds: Vec<(CString, CString)>,
    /// Directories to make (in order) for the bind targets.
    bind_dirs: Vec<CString>,
    hostname: Vec<u8>,
    devpts_opts: CString,
    dev_opts: CString,
    /// The template has /dev's files, links and pts directory.
    dev_in_template: bool,
    /// /proc/net is the template's view of it (`procnet`): on the host's
    /// network, with /proc masked, in a template that has it.
    proc_net_view: bool,
    confine: Confine,
    /// Shared with the first process while it is held (see [`Held`]).
    init: Arc<sys::Exec>,
    log_fd: OwnedFd,
    /// Connections to serve before init runs, if any.
    sessions: Option<SessionPlan>,
    lock_fd: Option<std::os::fd::RawFd>,
}

/// Connections a container's first process serves before it execs init
/// (`nifty serve`'s cold starts): each gets a process of its own, forked
/// from it in the container as it is by then (namespaces, root, cgroups,
/// IDs, capabilities, seccomp: all that init gets), which execs
/// `argv` (Dropbear in inetd mode) with the connection on stdin and
/// stdout and the console log on stderr. So a cold login's Dropbear runs
/// before init and its services, and costs no entry into the container
/// from outside (no `setns`, no cgroup migration, no second seccomp
/// filter). Init adopts them, as it adopts any orphan.
pub struct Sessions<'a> {
    pub conns: Vec<OwnedFd>,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    /// Its working directory (`/` if that is missing).
    pub home: &'a str,
}

struct SessionPlan {
    exec: sys::Exec,
    home: CString,
    conns: Vec<OwnedFd>,
    /// How many did not exec (written by the children).
    failed: AtomicU32,
}

fn path_c(p: &Path) -> std::io::Result<CString> {
    sys::cstring(p.as_os_str().as_encoded_bytes())
}

/// How a container is confined.
#[derive(Default)]
pub struct Confine {
    /// User namespace to join after the mounts are made (its mapping also
    /// idmaps the template's lower layer).
    pub userns: Option<OwnedFd>,
    /// First host ID of the namespace's range (for devpts' tty group).
    pub id_base: u32,
    /// Capabilities to keep in the bounding set; `None` keeps all.
    pub caps_keep: Option<u64>,
    /// Landlock ruleset to enter (see `confine::network`); `None` where
    /// the kernel has no Landlock network rules.
    pub landlock: Option<OwnedFd>,
    /// Seccomp programs to install; empty: none (no_new_privs still set).
    pub seccomp: Vec<seccompiler::BpfProgram>,
    /// Mask sensitive /proc paths and mount /sys read-only.
    pub mask_proc: bool,
    /// A network namespace of its own, loopback only (`--network none`).
    pub own_network: bool,
}

/// /proc files hidden behind /dev/null.
///
/// `interrupts`: the host's interrupt counts, per CPU and device, change
/// with every other tenant's keystroke and packet (an interrupt-timing
/// side channel); and Dropbear reads the whole file for entropy each time
/// it starts, on top of getrandom(2): its size grows with CPUs times
/// devices (55 us a read on this 2-CPU machine; a multiple of that on a
/// many-core host), on the path of every login.
const PROC_NULL: [&std::ffi::CStr; 6] = [
    c"proc/kcore",
    c"proc/keys",
    c"proc/timer_list",
    c"proc/sched_debug",
    c"proc/latency_stats",
    c"proc/interrupts",
];
/// /proc paths made read-only.
const PROC_RO: [&std::ffi::CStr; 5] = [
    c"proc/sys",
    c"proc/sysrq-trigger",
    c"proc/irq",
    c"proc/bus",
    c"proc/fs",
];

/// What to boot.
pub struct Spec<'a> {
    pub lower: &'a Path,
    /// `lower` is the shared template, idmapped through the container's
    /// user namespace; else it is used as it is (`linux::shift`).
    pub lower_idmap: bool,
    pub upper: &'a Path,
    pub work: &'a Path,
    /// (host source, absolute path inside the container)
    pub binds: &'a [(std::path::PathBuf, std::path::PathBuf)],
    pub hostname: &'a str,
    pub env: &'a [(String, String)],
    pub log_fd: OwnedFd,
    pub confine: Confine,
    pub sessions: Option<Sessions<'a>>,
    /// The instance's lock, held by the caller while it starts it: a held
    /// first process closes its copy.
    pub lock_fd: Option<std::os::fd::RawFd>,
}

impl Plan {
    pub fn new(spec: Spec<'_>) -> std::io::Result<Plan> {
        let devices = DEVICES
            .iter()
            .map(|d| {
                Ok((
                    sys::cstring(format!("/dev/{d}"))?,
                    sys::cstring(format!("dev/{d}"))?,
                ))
            })
            .collect::<std::io::Result<_>>()?;
        let binds = spec
            .binds
            .iter()
            .map(|(src, dst)| {
                let rel = dst.strip_prefix("/").unwrap_or(dst);
                Ok((path_c(src)?, path_c(rel)?))
            })
            .collect::<std::io::Result<_>>()?;
        let mut bind_dirs = Vec::new();
        for (_, dst) in spec.binds {
            let rel = dst.strip_prefix("/").unwrap_or(dst);
            let mut prefix = std::path::PathBuf::new();
            for c in rel.components() {
                prefix.push(c);
                bind_dirs.push(path_c(&prefix)?);
            }
        }
        let sessions = match spec.sessions {
            Some(s) if !s.conns.is_empty() => Some(SessionPlan {
                exec: sys::Exec::new(s.argv, s.env)?,
                home: sys::cstring(s.home)?,
                conns: s.conns,
                failed: AtomicU32::new(0),
            }),
            _ => None,
        };
        Ok(Plan {
            lower: spec.lower.to_path_buf(),
            lower_idmap: spec.lower_idmap,
            upper: spec.upper.to_path_buf(),
            work: spec.work.to_path_buf(),
            devpts_opts: sys::cstring(format!(
                "newinstance,ptmxmode=0666,mode=620,gid={}",
                spec.confine.id_base + 5
            ))?,
            // /dev belongs to the container's root (syslogd makes /dev/log).
            dev_opts: sys::cstring(format!(
                "mode=755,size=64k,nr_inodes=64,uid={0},gid={0}",
                spec.confine.id_base
            ))?,
            dev_in_template: spec.lower.join("dev/null").is_file()
                && spec.lower.join("dev/pts").is_dir(),
            proc_net_view: spec.confine.mask_proc
                && !spec.confine.own_network
                && spec.lower.join(procnet::DIR).is_dir(),
            confine: spec.confine,
            devices,
            binds,
            bind_dirs,
            hostname: spec.hostname.as_bytes().to_vec(),
            init: Arc::new(sys::Exec::new(&["/sbin/init".to_string()], spec.env)?),
            log_fd: spec.log_fd,
            sessions,
            lock_fd: spec.lock_fd,
        })
    }

    /// How many of the connections given in [`Spec::sessions`] got no
    /// process (after [`spawn`]; they were closed).
    pub fn sessions_failed(&self) -> u32 {
        (self.sessions.as_ref()).map_or(0, |s| s.failed.load(Ordering::SeqCst))
    }
}

/// A container whose init is running.
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// The link in the empty tmpfs that covers a container's /proc/net.
const PROC_NET_LINK: &std::ffi::CStr = c"proc-net";

/// Whether the running container whose init is `pid` still shows the
/// kernel's /proc/net where the template's view belongs (see `procnet`): a
/// systemd one, whose /proc systemd-nspawn mounts (the native launcher
/// covers it before init runs). The link is read through init's root, not
/// followed.
pub fn proc_net_uncovered(pid: i32) -> bool {
    let path = format!("/proc/{pid}/root/proc/net");
    rustix::fs::readlink(path.as_str(), Vec::new())
        .is_ok_and(|l| l.as_bytes() != procnet::TARGET.to_bytes())
}

/// Whether `mnt` is the calling thread's own mount namespace (then it is no
/// container's: the PID it was opened by was reused, or is no container's
/// init), which nothing may cover.
pub fn is_own_mount_ns(mnt: BorrowedFd<'_>) -> bool {
    match (
        rustix::fs::stat("/proc/thread-self/ns/mnt"),
        rustix::fs::fstat(mnt),
    ) {
        (Ok(own), Ok(its)) => (own.st_dev, own.st_ino) == (its.st_dev, its.st_ino),
        _ => true,
    }
}

/// For a process about to join a running container's mount namespace (a
/// spawn hook: nothing allocated): enters `empty_root` (from
/// [`empty_root_ns`]) and clones its /proc/net link, to be attached by
/// [`cover_proc_net`] once in the container's.
pub fn clone_proc_net_link(empty_root: BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
    move_into_link_name_space(empty_root, Some(LinkNameSpaceType::Mount))?;
    rustix::mount::open_tree(
        CWD,
        PROC_NET_LINK,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// In a running container's mount namespace (a spawn hook, before it
/// joins the user namespace): covers /proc/net with `link` (from
/// [`clone_proc_net_link`]), unless it is covered already (by another
/// session meanwhile). What a native start does, for a container the
/// native launcher did not start.
pub fn cover_proc_net(link: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    if let Ok((got, _)) = rustix::fs::readlinkat_raw(CWD, c"/proc/net", &mut buf) {
        if *got == *procnet::TARGET.to_bytes() {
            return Ok(());
        }
    }
    rustix::mount::move_mount(
        link,
        c"",
        CWD,
        c"/proc/net",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

/// Covers the /proc/net of the running container whose mount namespace is
/// `mnt` (see [`cover_proc_net`]), from a thread of its own: a thread that
/// gives up sharing the process's root and cwd (`unshare(CLONE_FS)`) may
/// enter other mount namespaces, and it ends there.
pub fn cover_proc_net_in(empty_root: BorrowedFd<'_>, mnt: BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType, UnshareFlags};
    std::thread::scope(|s| {
        s.spawn(|| -> rustix::io::Result<()> {
            rustix::thread::unshare(UnshareFlags::FS)?;
            let link = clone_proc_net_link(empty_root)?;
            move_into_link_name_space(mnt, Some(LinkNameSpaceType::Mount))?;
            cover_proc_net(link.as_fd())
        })
        .join()
        .map_err(|_| std::io::Error::other("the thread covering /proc/net panicked"))?
        .map_err(std::io::Error::from)
    })
}

/// Makes a mount namespace whose only mount is an empty, read-only tmpfs
/// (mounted on `dir` and pivoted into), and returns it as an fd. Every
/// container's mount namespace is a copy of it. Done on a thread of its own
/// (`unshare(CLONE_NEWNS)` gives the thread its own root and mount table),
/// once per nifty process: `pivot_root` is paid here, not per container.
pub fn empty_root_ns(dir: &Path) -> Result<OwnedFd, SysError> {
    use rustix::mount::*;
    let make = || -> Result<OwnedFd, SysError> {
        let at = |call: &str| SysError::at(call.to_string());
        rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)
            .map_err(at("unshare(CLONE_NEWNS)"))?;
        mount_change(
            c"/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(at("mount(/, MS_REC|MS_PRIVATE)"))?;
        let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(at("fsopen(tmpfs)"))?;
        for (k, v) in [("mode", "0555"), ("size", "4k"), ("nr_inodes", "16")] {
            fsconfig_set_string(fs.as_fd(), k, v).map_err(at("fsconfig(tmpfs)"))?;
        }
        fsconfig_create(fs.as_fd()).map_err(at("fsconfig(FSCONFIG_CMD_CREATE)"))?;
        let empty = fsmount(
            fs.as_fd(),
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NODEV
                | MountAttrFlags::MOUNT_ATTR_NOEXEC,
        )
        .map_err(at("fsmount(tmpfs)"))?;
        // Its one file: the link a container's /proc/net is covered with
        // (see `procnet`), which a child clones before it attaches the
        // container's root over this tmpfs.
        rustix::fs::symlinkat(procnet::TARGET, &empty, PROC_NET_LINK)
            .map_err(at("symlink(/proc-net) in the empty tmpfs"))?;
        sys::mount_setattr_flags(empty.as_fd(), MountAttrFlags::MOUNT_ATTR_RDONLY)
            .map_err(|e| SysError::io("mount_setattr(tmpfs, MOUNT_ATTR_RDONLY)", &e))?;
        move_mount(
            empty.as_fd(),
            c"",
            CWD,
            dir,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(at(&format!("move_mount(tmpfs, {})", dir.display())))?;
        rustix::process::fchdir(&empty).map_err(at("fchdir(tmpfs)"))?;
        let ns = rustix::fs::open(
            c"/proc/thread-self/ns/mnt",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(at("open(/proc/thread-self/ns/mnt)"))?;
        rustix::process::pivot_root(c".", c".").map_err(at("pivot_root(., .)"))?;
        unmount(c".", UnmountFlags::DETACH).map_err(at("umount2(old root, MNT_DETACH)"))?;
        Ok(ns)
    };
    std::thread::scope(|s| s.spawn(make).join()).unwrap_or_else(|_| {
        Err(SysError::new(
            "a thread that panicked",
            rustix::io::Errno::FAULT,
        ))
    })
}

/// The container's mounts, made by the parent as detached trees (outside
/// any namespace the host uses) for the child to attach.
struct Mounts {
    root: OwnedFd,
    /// One per `Plan::devices`.
    devices: Vec<OwnedFd>,
    /// One per `Plan::binds`, read-only already.
    binds: Vec<OwnedFd>,
}

impl Mounts {
    fn new(plan: &Plan) -> Result<Mounts, SysError> {
        let clone = |p: &std::ffi::CStr| {
            rustix::mount::open_tree(
                CWD,
                p,
                OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
            )
            .map_err(SysError::at(format!(
                "open_tree({}, OPEN_TREE_CLONE)",
                p.to_string_lossy()
            )))
        };
        let root = overlay(
            &plan.lower,
            &plan.upper,
            &plan.work,
            plan.confine
                .userns
                .as_ref()
                .filter(|_| plan.lower_idmap)
                .map(|u| u.as_fd()),
        )?;
        let devices = plan
            .devices
            .iter()
            .map(|(host, _)| clone(host))
            .collect::<Result<_, _>>()?;
        let binds = plan
            .binds
            .iter()
            .map(|(host, _)| {
                let fd = clone(host)?;
                sys::mount_setattr_flags(
                    fd.as_fd(),
                    MountAttrFlags::MOUNT_ATTR_RDONLY
                        | MountAttrFlags::MOUNT_ATTR_NOSUID
                        | MountAttrFlags::MOUNT_ATTR_NODEV,
                )
                .map_err(|e| {
                    SysError::io(
                        format!(
                            "mount_setattr({}, MOUNT_ATTR_RDONLY)",
                            host.to_string_lossy()
                        ),
                        &e,
                    )
                })?;
                Ok(fd)
            })
            .collect::<Result<_, _>>()?;
        Ok(Mounts {
            root,
            devices,
            binds,
        })
    }
}

/// Starts the container: a child sharing nifty's memory (CLONE_VM, so no
/// page tables are copied; CLONE_VFORK, so this thread waits until the child
/// has exec'd init or failed) in a new PID namespace. It is born in the
/// container's v2 cgroup `cgroup_dir` where the kernel can (clone3 with
/// CLONE_INTO_CGROUP, Linux 5.7, x86_64: no migration), else it joins it by
/// `cgroup_procs[0]`; then it joins the v1 ones (the rest of
/// `cgroup_procs`: `cgroup.procs` files opened for writing), enters a copy
/// of `empty_root` (from [`empty_root_ns`]) and builds the container there.
/// Returns once init is exec'd, or with the step that failed.
///
/// A start that serves connections returns earlier, once their banners are
/// out: its first process is then *held* (named `proc::HELD`) until
/// [`release_held`] (the burst of cold starts is over) or for
/// [`crate::runtime::HOLD_MAX`] at most, and only then execs init. Init
/// and its services would take about a seventh of the CPU of a burst of
/// 50 cold logins before the burst's last banner (their cgroups' least
/// weight does not keep them from it: weights compete level by level, and
/// the containers' parent group competes with `serve`'s threads at its
/// full weight).
pub fn spawn(
    plan: &Plan,
    cgroup_dir: Option<BorrowedFd<'_>>,
    cgroup_procs: &[OwnedFd],
    empty_root: BorrowedFd<'_>,
) -> Result<Spawned, StartError> {
    let mounts = Mounts::new(plan)?;
    // With a user namespace, UTS and IPC namespaces are made after joining
    // it, so that they belong to the container's root; the mount and PID
    // namespaces stay owned by the host's, so that container root can
    // never mount, unmount or remount anything.
    let mut flags = libc::CLONE_NEWPID;
    if plan.confine.userns.is_none() {
        flags |= libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    }
    // A network of its own is made here, owned by the host's user
    // namespace like the mount and PID ones: the container's root cannot
    // reconfigure it, and the /sys mounted below shows its interfaces.
    if plan.confine.own_network {
        flags |= libc::CLONE_NEWNET;
    }
    let failure = AtomicU64::new(0);
    let mut stack = sys::Stack::new(CHILD_STACK);
    // What a held first process keeps using after this returns.
    let held = plan.sessions.as_ref().map(|_| {
        Arc::new(Held {
            word: AtomicU32::new(sys::HELD_ARMED),
            init: Arc::clone(&plan.init),
            lock_fd: plan.lock_fd,
        })
    });
    // Whether the child is to be held (read by the child).
    let holding = AtomicBool::new(false);
    // The stack of the sessions' children, one at a time.
    let mut session_stack = plan
        .sessions
        .as_ref()
        .map(|_| sys::Stack::new(SESSION_STACK));
    // Whether the child is born in its v2 cgroup (read by the child).
    let born = AtomicBool::new(cgroup_dir.is_some());
    let mut run = || {
        let procs = match born.load(Ordering::SeqCst) {
            true => cgroup_procs.get(1..).unwrap_or_default(),
            false => cgroup_procs,
        };
        child(
            plan,
            &mounts,
            procs,
            empty_root,
            &failure,
            session_stack.as_deref_mut(),
            held.as_deref().filter(|_| holding.load(Ordering::SeqCst)),
        )
    };
    let mut clone = || {
        if let Some(h) = &held {
            holding.store(true, Ordering::SeqCst);
            match sys::spawn_vm_until(flags, cgroup_dir, &mut stack, &h.word, &mut run) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::debug!("clone3 (held first process): {e}; init is not held");
                    holding.store(false, Ordering::SeqCst);
                }
            }
        }
        let into = cgroup_dir.map(|dir| sys::spawn_vfork_into(flags, dir, &mut stack, &mut run));
        match into {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => {
                tracing::debug!("clone3(CLONE_INTO_CGROUP): {e}; the container's init migrates");
                born.store(false, Ordering::SeqCst);
                sys::spawn_vfork(flags, &mut stack, &mut run)
            }
            None => sys::spawn_vfork(flags, &mut stack, &mut run),
        }
    };
    // Its network gets a TCP table of its own where the kernel can (see
    // `netns`): made from the nursery.
    let cloned = match plan.confine.own_network.then(netns::nursery).flatten() {
        Some(nursery) => nursery.within(&mut clone).unwrap_or_else(|e| {
            tracing::debug!("setns(the network nursery): {e}; the host's TCP table");
            clone()
        }),
        None => clone(),
    };
    let spawned = cloned.map_err(|e| {
        SysError::new(
            "clone(CLONE_VM|CLONE_VFORK)",
            rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(0)),
        )
    })?;
    let f = failure.load(Ordering::SeqCst);
    let is_held = holding.load(Ordering::SeqCst)
        && held
            .as_ref()
            .is_some_and(|h| h.word.load(Ordering::SeqCst) == sys::HELD_READY);
    if let (0, true, Some(h)) = (f, is_held, held) {
        // It runs on, on `stack`, with `h`: both kept until it has exec'd.
        keep_held(h, stack);
        return Ok(Spawned {
            pid: spawned.0,
            pidfd: spawned.1,
        });
    }
    if f == 0 {
        // The vfork wake-up comes before the kernel shows the exec: until
        // it does, the container's init would not be found.
        if !crate::runtime::linux::proc::wait_exec(spawned.0, std::time::Duration::from_secs(5)) {
            tracing::warn!(pid = spawned.0, "init not seen exec'd after 5 s");
        }
        return Ok(Spawned {
            pid: spawned.0,
            pidfd: spawned.1,
        });
    }
    let _ = rustix::process::waitpid(
        rustix::process::Pid::from_raw(spawned.0),
        rustix::process::WaitOptions::empty(),
    );
    Err(StartError::Child {
        step: Step::from_u8((f >> 32) as u8),
        errno: rustix::io::Errno::from_raw_os_error(f as u32 as i32),
    })
}

/// What a held first process (see [`spawn`]) uses once its caller has
/// gone on: nothing of the caller's frames, only this and its stack.
struct Held {
    /// [`sys::HELD_ARMED`], then [`sys::HELD_READY`] once it is held; the
    /// kernel clears it when the process execs or exits
    /// ([`sys::spawn_vm_until`]).
    word: AtomicU32,
    init: Arc<sys::Exec>,
    /// Its instance's lock (see [`Spec::lock_fd`]).
    lock_fd: Option<std::os::fd::RawFd>,
}

/// [`crate::runtime::HOLD_MAX`] in nanoseconds.
const HOLD_MAX_NS: i64 = crate::runtime::HOLD_MAX.as_nanos() as i64;

/// The monotonic clock (a raw system call: safe in the container's first
/// process and the sessions' children, which share their starter's memory).
fn now() -> rustix::time::Timespec {
    rustix::time::clock_gettime(rustix::time::ClockId::Monotonic)
}

/// Nanoseconds since `start`, a reading of [`now`].
fn ns_since(start: &rustix::time::Timespec) -> i64 {
    let t = now();
    (t.tv_sec - start.tv_sec) * 1_000_000_000 + (t.tv_nsec - start.tv_nsec)
}

/// `ns` nanoseconds as a timeout for the futex calls.
fn timespec(ns: i64) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    }
}

/// Bumped by [`release_held`]: a held process waits until it changes.
static RELEASES: AtomicU32 = AtomicU32::new(0);

/// The held first processes, with their stacks, kept until they have
/// exec'd (or exited).
static KEPT: Mutex<Vec<(Arc<Held>, sys::Stack)>> = Mutex::new(Vec::new());

fn gone(h: &Held) -> bool {
    h.word.load(Ordering::SeqCst) == 0
}

/// Keeps what a held first process uses until it has exec'd.
fn keep_held(h: Arc<Held>, stack: sys::Stack) {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    kept.retain(|(h, _)| !gone(h));
    kept.push((h, stack));
}

/// Lets every held first process exec its init now.
pub fn release_held() {
    RELEASES.fetch_add(1, Ordering::SeqCst);
    let _ = rustix::thread::futex::wake(&RELEASES, rustix::thread::futex::Flags::PRIVATE, u32::MAX);
}

/// Frees what the held first processes kept once they have exec'd,
/// waiting up to `within` for them (after [`release_held`]).
pub fn reap_held(within: std::time::Duration) {
    let end = std::time::Instant::now() + within;
    let mut waiting = std::mem::take(&mut *KEPT.lock().unwrap_or_else(|e| e.into_inner()));
    for (h, _) in &waiting {
        while !gone(h) {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = rustix::thread::futex::wait(
                &h.word,
                rustix::thread::futex::Flags::empty(),
                sys::HELD_READY,
                Some(timespec(i64::try_from(left.as_nanos()).unwrap_or(i64::MAX))),
            );
        }
    }
    waiting.retain(|(h, _)| !gone(h));
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .append(&mut waiting);
}

/// The held first process: tells its caller to go on, waits for
/// [`release_held`] or [`crate::runtime::HOLD_MAX`], and execs init. Uses
/// only `h` and its own stack (the caller's frames may be gone): a function
/// of its own, never inlined, so that nothing it uses is read from them.
#[inline(never)]
fn hold(h: &Held) -> ! {
    let _ = rustix::thread::set_name(crate::runtime::linux::proc::HELD);
    // Read before the caller goes on: a release that comes after counts.
    let seen = RELEASES.load(Ordering::SeqCst);
    sys::held_ready(&h.word);
    // Its copy of its instance's lock would keep the instance locked.
    // (The other fds it has of its starter's stay open until init's exec:
    // closing them here, some the last copy of another start's detached
    // mounts, costs the burst a fifth on its p50.)
    if let Some(fd) = h.lock_fd {
        sys::close_copy(fd);
    }
    let start = now();
    while RELEASES.load(Ordering::SeqCst) == seen {
        let left = HOLD_MAX_NS - ns_since(&start);
        if left <= 0 {
            break;
        }
        let _ = rustix::thread::futex::wait(
            &RELEASES,
            rustix::thread::futex::Flags::PRIVATE,
            seen,
            Some(timespec(left)),
        );
    }
    let _ = h.init.run();
    // Nobody waits for a word from it any more: the console log says it.
    sys::write_stderr(b"nifty: the container's /sbin/init could not be executed\n");
    sys::exit_child(127)
}

/// Stack of the container's first process until it execs init.
const CHILD_STACK: usize = 256 << 10;
/// Stack of a session's process until it execs.
const SESSION_STACK: usize = 16 << 10;

/// The container side. Raw system calls only, on memory prepared in `plan`
/// and `mounts`.
fn child(
    plan: &Plan,
    mounts: &Mounts,
    cgroup_procs: &[OwnedFd],
    empty_root: BorrowedFd<'_>,
    failure: &AtomicU64,
    session_stack: Option<&mut [u8]>,
    held: Option<&Held>,
) -> i32 {
    let fail = |step: Step, errno: i32| -> ! {
        failure.store(
            (step as u64) << 32 | u64::from(errno as u32),
            Ordering::SeqCst,
        );
        sys::exit_child(1)
    };
    let check = |step: Step, r: rustix::io::Result<()>| {
        if let Err(e) = r {
            fail(step, e.raw_os_error());
        }
    };
    // A new filesystem of type `fs` (its source named alike) at `at`.
    let mount_fs = |step: Step, fs: &std::ffi::CStr, at: &std::ffi::CStr, opts: &CString| {
        check(
            step,
            rustix::mount::mount(
                fs,
                at,
                fs,
                MountFlags::NOSUID | MountFlags::NOEXEC,
                opts.as_c_str(),
            ),
        )
    };
    let attach = |step: Step, fd: &OwnedFd, at: &std::ffi::CStr| {
        check(
            step,
            rustix::mount::move_mount(
                fd.as_fd(),
                c"",
                CWD,
                at,
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            ),
        )
    };

    // Until exec, this process is marked as not yet a container's init.
    let _ = rustix::thread::set_name(STARTING);
    // Every signal as a new process has it (nifty's handlers and ignored
    // SIGPIPE are not the container's): exec would keep ignored ones, and
    // a session's program runs beside this process before its exec.
    sys::default_signals();
    // Join the container's cgroups first (those it was not born in): from
    // here on, everything this process does is accounted, limited, and
    // seen by `nifty list`/`stop`.
    for f in cgroup_procs {
        if let Err(e) = rustix::io::write(f, b"0") {
            fail(Step::JoinCgroup, e.raw_os_error());
        }
    }
    check(Step::Setsid, rustix::process::setsid().map(drop));
    // A mount namespace of its own, copied from the empty one (private
    // propagation, one mount); root and cwd are now its empty tmpfs.
    {
        use rustix::thread::{move_into_link_name_space, LinkNameSpaceType, UnshareFlags};
        check(
            Step::EnterEmptyRoot,
            move_into_link_name_space(empty_root, Some(LinkNameSpaceType::Mount)),
        );
        check(
            Step::EnterEmptyRoot,
            rustix::thread::unshare(UnshareFlags::NEWNS),
        );
    }
    // The /proc/net link, cloned while the empty tmpfs is the root.
    let proc_net = plan.proc_net_view.then(|| {
        match rustix::mount::open_tree(
            CWD,
            PROC_NET_LINK,
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(fd) => fd,
            Err(e) => fail(Step::ProcNet, e.raw_os_error()),
        }
    });
    attach(Step::AttachRoot, &mounts.root, c"/");
    check(Step::ChdirRoot, rustix::process::fchdir(&mounts.root));
    check(
        Step::MountProc,
        rustix::mount::mount(
            c"proc",
            c"proc",
            c"proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            c"",
        ),
    );
    // A template built by this version carries /dev's files and links, so
    // /dev needs no tmpfs of its own (a superblock less per container, which
    // the kernel's per-memcg shrinker bookkeeping makes count at 10,000).
    if !plan.dev_in_template {
        mount_fs(Step::MountDev, c"tmpfs", c"dev", &plan.dev_opts);
    }
    for ((_, inside), fd) in plan.devices.iter().zip(&mounts.devices) {
        if !plan.dev_in_template {
            match rustix::fs::openat(
                CWD,
                inside.as_c_str(),
                OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o666),
            ) {
                Ok(fd) => drop(fd),
                Err(e) => fail(Step::CreateDevice, e.raw_os_error()),
            }
        }
        attach(Step::BindDevice, fd, inside);
    }
    if !plan.dev_in_template {
        check(
            Step::CreateDevice,
            rustix::fs::mkdirat(CWD, c"dev/pts", Mode::from_raw_mode(0o755)),
        );
    }
    mount_fs(Step::MountDevpts, c"devpts", c"dev/pts", &plan.devpts_opts);
    if !plan.dev_in_template {
        for (target, link) in DEV_LINKS {
            check(Step::DevSymlink, rustix::fs::symlinkat(target, CWD, link));
        }
    }
    if plan.confine.mask_proc {
        for p in PROC_NULL {
            match rustix::mount::mount_bind(c"dev/null", p) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => fail(Step::MaskProc, e.raw_os_error()),
            }
        }
        for p in PROC_RO {
            match rustix::mount::mount_bind(p, p) {
                Ok(()) => check(
                    Step::MaskProc,
                    rustix::mount::mount_remount(
                        p,
                        MountFlags::BIND
                            | MountFlags::RDONLY
                            | MountFlags::NOSUID
                            | MountFlags::NODEV
                            | MountFlags::NOEXEC,
                        c"",
                    ),
                ),
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => fail(Step::MaskProc, e.raw_os_error()),
            }
        }
        // Onto the link itself (move_mount follows no last symlink).
        if let Some(fd) = &proc_net {
            attach(Step::ProcNet, fd, c"proc/net");
        }
        check(
            Step::MountSys,
            rustix::mount::mount(
                c"sysfs",
                c"sys",
                c"sysfs",
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                c"",
            ),
        );
    }
    for dir in &plan.bind_dirs {
        match rustix::fs::mkdirat(CWD, dir.as_c_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => fail(Step::BindRo, e.raw_os_error()),
        }
    }
    for ((_, inside), fd) in plan.binds.iter().zip(&mounts.binds) {
        attach(Step::BindRo, fd, inside);
    }
    if plan.confine.own_network {
        if let Err(e) = sys::loopback_up() {
            fail(Step::Loopback, e.raw_os_error().unwrap_or(0));
        }
    }
    // Into the root: under it is only the empty tmpfs.
    check(Step::Chroot, rustix::process::chroot(c"."));
    check(Step::ChdirRoot, rustix::process::chdir(c"/"));
    if let Some(userns) = &plan.confine.userns {
        use rustix::thread::{move_into_link_name_space, LinkNameSpaceType, UnshareFlags};
        check(
            Step::JoinUserns,
            move_into_link_name_space(userns.as_fd(), Some(LinkNameSpaceType::User)),
        );
        // Not dumpable again right after (`take_ids`): this memory is
        // nifty's until exec (a held one's is `serve`'s, while the tenant's
        // first logins run). The steps below change no ID and widen no
        // capability, so the flag stays; init's exec gives it one of its
        // own.
        let (uid, gid) = sys::ids(0, 0);
        check(Step::SetIds, sys::take_ids(uid, gid));
        check(
            Step::UnshareUtsIpc,
            rustix::thread::unshare(UnshareFlags::NEWUTS | UnshareFlags::NEWIPC),
        );
    }
    check(Step::Hostname, rustix::system::sethostname(&plan.hostname));
    if let Some(keep) = plan.confine.caps_keep {
        if let Err(e) = sys::drop_bounding_caps(keep) {
            fail(Step::DropCaps, e.raw_os_error().unwrap_or(0));
        }
    }
    match rustix::fs::open(
        c"/dev/null",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(null) => {
            let r = sys::dup2(null.as_raw_fd(), 0)
                .and_then(|()| sys::dup2(plan.log_fd.as_raw_fd(), 1))
                .and_then(|()| sys::dup2(plan.log_fd.as_raw_fd(), 2));
            if let Err(e) = r {
                fail(Step::Stdio, e.raw_os_error().unwrap_or(0));
            }
        }
        Err(e) => fail(Step::Stdio, e.raw_os_error()),
    }
    // No host fd leaks into the container: all but 0-2 close on exec
    // (the error pipe among them, which tells the parent the exec worked).
    if let Err(e) = sys::cloexec_from(3) {
        fail(Step::CloseFds, e.raw_os_error().unwrap_or(0));
    }
    // Last: no_new_privs and the seccomp filters (after which the calls
    // above would be refused).
    check(Step::Seccomp, rustix::thread::set_no_new_privs(true));
    if let Some(fd) = &plan.confine.landlock {
        check(Step::Landlock, sys::landlock_restrict_self(fd.as_fd()));
    }
    for prog in &plan.confine.seccomp {
        if let Err(e) = sys::apply_seccomp(prog) {
            fail(Step::Seccomp, e.raw_os_error().unwrap_or(libc::EINVAL));
        }
    }
    if let (Some(s), Some(stack)) = (&plan.sessions, session_stack) {
        serve_sessions(s, stack);
        wait_for_banners(s);
    }
    if let Some(h) = held {
        hold(h)
    }
    let e = plan.init.run();
    fail(Step::ExecInit, e.raw_os_error().unwrap_or(0))
}

/// In the container's first process, right before it execs init: a
/// process for each connection of `s` (see [`Sessions`]), each exec'd
/// before the next is made (CLONE_VFORK, on `stack`). One that cannot be
/// made or exec'd is counted in `s.failed`; its connection closes when
/// init is exec'd.
fn serve_sessions(s: &SessionPlan, stack: &mut [u8]) {
    for conn in &s.conns {
        let fd = conn.as_raw_fd();
        let mut run = || {
            // A session of its own, in its home, the connection on stdin
            // and stdout (stderr is the console log already).
            let _ = rustix::process::setsid();
            if rustix::process::chdir(s.home.as_c_str()).is_err() {
                let _ = rustix::process::chdir(c"/");
            }
            if sys::dup2(fd, 0).and_then(|()| sys::dup2(fd, 1)).is_ok() {
                let _ = s.exec.run();
            }
            s.failed.fetch_add(1, Ordering::SeqCst);
            sys::exit_child(127)
        };
        match sys::spawn_vfork(0, stack, &mut run) {
            Ok((_, pidfd)) => drop(pidfd),
            Err(_) => {
                s.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// How long a cold start's init waits at most for its sessions' first
/// bytes (see [`wait_for_banners`]), in nanoseconds.
const BANNER_WAIT_NS: i64 = 100_000_000;

/// In the container's first process, after [`serve_sessions`]: waits
/// until each connection has had its first bytes (Dropbear's SSH banner),
/// or has closed, but at most [`BANNER_WAIT_NS`], before init is exec'd.
/// Init and its services need the CPU for a while, and in a burst of cold
/// logins they would share it with the logins' Dropbears (the scheduler
/// gives each container's cgroup an equal share): put off until the
/// banners are out, they delay no login's first answer (and a held first
/// process puts them off further: see [`spawn`]). The parent's worker
/// waits meanwhile (CLONE_VFORK, or until the process is held), so a
/// burst also boots no more containers at once than it has workers.
/// Skipped if a session did not start; a kernel that cannot tell (before
/// Linux 4.19) waits for none.
fn wait_for_banners(s: &SessionPlan) {
    if s.failed.load(Ordering::SeqCst) > 0 {
        return;
    }
    let start = now();
    let nap = timespec(200_000);
    while s
        .conns
        .iter()
        .any(|c| sys::tcp_awaits_first_bytes(c.as_fd()))
    {
        if ns_since(&start) >= BANNER_WAIT_NS {
            return;
        }
        // (A sleep refused would make this a busy loop: stop waiting.)
        if let rustix::thread::NanosleepRelativeResult::Err(_) = rustix::thread::nanosleep(&nap) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// A spec of a container on `lower`, with nothing else to it.
    fn spec(lower: &Path) -> Spec<'_> {
        Spec {
            lower,
            lower_idmap: false,
            upper: Path::new("/upper"),
            work: Path::new("/work"),
            binds: &[],
            hostname: "nifty7",
            env: &[],
            log_fd: null(),
            confine: Confine::default(),
            sessions: None,
            lock_fd: None,
        }
    }

    fn plan<'a>(
        lower: &'a Path,
        binds: &'a [(PathBuf, PathBuf)],
        env: &'a [(String, String)],
    ) -> std::io::Result<Plan> {
        Plan::new(Spec {
            binds,
            env,
            confine: Confine {
                id_base: 0x7000_0000,
                ..Confine::default()
            },
            ..spec(lower)
        })
    }

    #[test]
    fn the_callers_own_mount_namespace_is_never_a_container_s() {
        let own = std::fs::File::open("/proc/self/ns/mnt").unwrap();
        assert!(is_own_mount_ns(own.as_fd()));
        // Any other namespace passes this check (setns then checks its type).
        let other = std::fs::File::open("/proc/self/ns/net").unwrap();
        assert!(!is_own_mount_ns(other.as_fd()));
    }

    #[test]
    fn proc_net_is_covered_on_the_hosts_network_of_a_template_that_has_the_view() {
        let t = tempfile::tempdir().unwrap();
        let view = |mask_proc: bool, own_network: bool| {
            Plan::new(Spec {
                confine: Confine {
                    mask_proc,
                    own_network,
                    ..Confine::default()
                },
                ..spec(t.path())
            })
            .unwrap()
            .proc_net_view
        };
        // An older template: the kernel's /proc/net.
        assert!(!view(true, false));
        std::fs::create_dir_all(t.path().join(procnet::DIR)).unwrap();
        assert!(view(true, false));
        // Its own network's tables are its own; an unmasked /proc is as is.
        assert!(!view(true, true));
        assert!(!view(false, false));
    }

    #[test]
    fn the_plan_names_every_device_bind_and_option_of_the_child() {
        let t = tempfile::tempdir().unwrap();
        let binds = [(PathBuf::from("/srv/data"), PathBuf::from("/mnt/a/b"))];
        let env = [("PATH".to_string(), "/bin".to_string())];
        let p = plan(t.path(), &binds, &env).unwrap();
        // Every device of the private /dev, from the host's, by relative path.
        assert_eq!(p.devices.len(), DEVICES.len());
        assert!(p
            .devices
            .iter()
            .zip(DEVICES)
            .all(
                |((host, inside), d)| host.to_str() == Ok(&format!("/dev/{d}"))
                    && inside.to_str() == Ok(&format!("dev/{d}"))
            ));
        // Bind targets relative to the root, their directories parents first.
        assert_eq!(p.binds[0].1.to_str(), Ok("mnt/a/b"));
        let dirs: Vec<&str> = p.bind_dirs.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(dirs, ["mnt", "mnt/a", "mnt/a/b"]);
        // /dev and its ptys belong to the container's root (its ID base).
        let base = 0x7000_0000u32;
        assert!(p
            .dev_opts
            .to_str()
            .unwrap()
            .contains(&format!("uid={base},gid={base}")));
        assert!(p
            .devpts_opts
            .to_str()
            .unwrap()
            .contains(&format!("gid={}", base + 5)));
        // A template without /dev's files gets a tmpfs; with them, not.
        assert!(!p.dev_in_template);
        std::fs::create_dir_all(t.path().join("dev/pts")).unwrap();
        std::fs::write(t.path().join("dev/null"), "").unwrap();
        assert!(plan(t.path(), &[], &env).unwrap().dev_in_template);
        // execve's arrays end with NULL and hold what was asked.
        assert_eq!(p.init.path().to_str(), Ok("/sbin/init"));
        assert_eq!(p.init.argv().len(), 1);
        assert_eq!(p.init.envp().len(), 1);
        assert_eq!(p.init.envp()[0].to_str(), Ok("PATH=/bin"));
        assert_eq!(p.hostname, b"nifty7");
        assert!(p.sessions.is_none() && p.sessions_failed() == 0);
    }

    #[test]
    fn sessions_are_planned_only_with_connections() {
        let t = tempfile::tempdir().unwrap();
        let argv = ["/usr/sbin/dropbear".to_string(), "-i".to_string()];
        let env = [("HOME".to_string(), "/root".to_string())];
        let with = |conns: Vec<OwnedFd>| {
            Plan::new(Spec {
                sessions: Some(Sessions {
                    conns,
                    argv: &argv,
                    env: &env,
                    home: "/root",
                }),
                ..spec(t.path())
            })
            .unwrap()
        };
        assert!(with(Vec::new()).sessions.is_none());
        let p = with(vec![null(), null()]);
        let s = p.sessions.as_ref().expect("planned");
        assert_eq!(s.conns.len(), 2);
        assert_eq!(s.exec.path().to_str(), Ok("/usr/sbin/dropbear"));
        assert_eq!(s.exec.argv().len(), 2);
        assert_eq!(s.exec.envp().len(), 1);
        assert_eq!(s.exec.envp()[0].to_str(), Ok("HOME=/root"));
        assert_eq!(s.home.to_str(), Ok("/root"));
        assert_eq!(p.sessions_failed(), 0);
    }

    #[test]
    fn a_nul_byte_is_refused_before_anything_runs() {
        let t = tempfile::tempdir().unwrap();
        let env = [("X".to_string(), "a\0b".to_string())];
        assert!(plan(t.path(), &[], &env).is_err());
    }

    #[test]
    fn every_step_round_trips_through_the_failure_word() {
        for s in Step::ALL {
            assert_eq!(Step::from_u8(s as u8), Some(s));
            assert!(!s.describe().is_empty());
        }
        assert_eq!(Step::from_u8(200), None);
    }
}
