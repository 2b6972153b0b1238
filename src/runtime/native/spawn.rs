//! Booting one container: a child in new mount and PID namespaces that
//! shares nifty's memory until it execs (CLONE_VM|CLONE_VFORK, like
//! posix_spawn: no page tables copied, no copy-on-write faults in a
//! threaded parent), joins the container's cgroups first, then runs the
//! mount sequence written out step by step, `pivot_root`, joins the user
//! namespace, drops what it must, and execs BusyBox init as PID 1.
//!
//! Everything the child needs (paths, options, argv, envp, seccomp
//! programs) is prepared before the clone: the child only makes raw system
//! calls. A failed step is written to a shared word before the child exits;
//! when the parent resumes, a zero word means init is running.
//!
//! All mounts are made inside the container's own mount namespace: the host
//! never sees them, and they vanish with the container, even if nifty is
//! killed at any point.

use std::ffi::{c_char, CString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{Mode, OFlags, CWD};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::sys;

/// The steps of the child, for error reports (one variant per step, like
/// Firecracker's jailer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    JoinCgroup = 1,
    Setsid,
    MakePrivate,
    IdmapLower,
    MountOverlay,
    ChdirRoot,
    MountProc,
    MountDev,
    CreateDevice,
    BindDevice,
    MountDevpts,
    DevSymlink,
    MaskProc,
    MountSys,
    BindRo,
    RemountRo,
    PivotRoot,
    UmountOldRoot,
    JoinUserns,
    SetIds,
    UnshareUtsIpc,
    Hostname,
    DropCaps,
    Stdio,
    CloseFds,
    Seccomp,
    ExecInit,
}

impl Step {
    const ALL: [Step; 27] = [
        Step::JoinCgroup,
        Step::Setsid,
        Step::MakePrivate,
        Step::IdmapLower,
        Step::MountOverlay,
        Step::ChdirRoot,
        Step::MountProc,
        Step::MountDev,
        Step::CreateDevice,
        Step::BindDevice,
        Step::MountDevpts,
        Step::DevSymlink,
        Step::MaskProc,
        Step::MountSys,
        Step::BindRo,
        Step::RemountRo,
        Step::PivotRoot,
        Step::UmountOldRoot,
        Step::JoinUserns,
        Step::SetIds,
        Step::UnshareUtsIpc,
        Step::Hostname,
        Step::DropCaps,
        Step::Stdio,
        Step::CloseFds,
        Step::Seccomp,
        Step::ExecInit,
    ];

    fn from_u8(b: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u8 == b)
    }

    /// What the step does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Step::JoinCgroup => "joining the container's cgroups",
            Step::Setsid => "setsid()",
            Step::MakePrivate => "mount(/, MS_REC|MS_PRIVATE)",
            Step::IdmapLower => {
                "idmapped mount of the template (open_tree, mount_setattr, move_mount)"
            }
            Step::MountOverlay => "mount(overlay) of the root",
            Step::ChdirRoot => "chdir(new root)",
            Step::MountProc => "mount(proc)",
            Step::MountDev => "mount(tmpfs, /dev)",
            Step::CreateDevice => "creating a /dev entry",
            Step::BindDevice => "bind-mounting a device node",
            Step::MountDevpts => "mount(devpts, /dev/pts, newinstance)",
            Step::DevSymlink => "symlink in /dev",
            Step::MaskProc => "masking /proc paths",
            Step::MountSys => "mount(sysfs, /sys, MS_RDONLY)",
            Step::BindRo => "bind mount of a read-only directory",
            Step::RemountRo => "remount read-only of a bind",
            Step::PivotRoot => "pivot_root(., .)",
            Step::UmountOldRoot => "umount2(old root, MNT_DETACH)",
            Step::JoinUserns => "setns(user namespace)",
            Step::SetIds => "setgroups/setresgid/setresuid(0) in the user namespace",
            Step::UnshareUtsIpc => "unshare(CLONE_NEWUTS|CLONE_NEWIPC)",
            Step::Hostname => "sethostname()",
            Step::DropCaps => "dropping capabilities (PR_CAPBSET_DROP)",
            Step::Stdio => "redirecting stdio to the console log",
            Step::CloseFds => "close_range(3.., CLOEXEC)",
            Step::Seccomp => "installing the seccomp filter",
            Step::ExecInit => "execve(/sbin/init)",
        }
    }
}

/// The name (comm) of a container's first process until it execs init:
/// such a process is PID 1 of its namespace but not yet a running container.
pub const STARTING: &std::ffi::CStr = c"nifty:starting";

/// Symlinks of /dev: (target, link).
pub const DEV_LINKS: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
    (c"pts/ptmx", c"dev/ptmx"),
    (c"/proc/self/fd", c"dev/fd"),
    (c"/proc/self/fd/0", c"dev/stdin"),
    (c"/proc/self/fd/1", c"dev/stdout"),
    (c"/proc/self/fd/2", c"dev/stderr"),
];

/// Devices bound from the host into the container's private /dev.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Everything the child needs, as C strings made before the fork.
pub struct Plan {
    lower: CString,
    mount_point: CString,
    overlay_opts: CString,
    devices: Vec<(CString, CString)>,
    binds: Vec<(CString, CString)>,
    /// Directories to make (in order) for the bind targets.
    bind_dirs: Vec<CString>,
    hostname: Vec<u8>,
    devpts_opts: CString,
    dev_opts: CString,
    /// The template has /dev's files, links and pts directory.
    dev_in_template: bool,
    confine: Confine,
    init: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
    log_fd: OwnedFd,
}

fn cstr(s: impl Into<Vec<u8>>) -> std::io::Result<CString> {
    CString::new(s)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in a path"))
}

fn path_c(p: &Path) -> std::io::Result<CString> {
    cstr(p.as_os_str().as_encoded_bytes())
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
    /// Seccomp programs to install; empty: none (no_new_privs still set).
    pub seccomp: Vec<seccompiler::BpfProgram>,
    /// Mask sensitive /proc paths and mount /sys read-only.
    pub mask_proc: bool,
}

/// /proc files hidden behind /dev/null.
const PROC_NULL: [&std::ffi::CStr; 5] = [
    c"proc/kcore",
    c"proc/keys",
    c"proc/timer_list",
    c"proc/sched_debug",
    c"proc/latency_stats",
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
    pub mount_point: &'a Path,
    pub lower: &'a Path,
    pub upper: &'a Path,
    pub work: &'a Path,
    /// (host source, absolute path inside the container)
    pub binds: &'a [(std::path::PathBuf, std::path::PathBuf)],
    pub hostname: &'a str,
    pub env: &'a [(String, String)],
    pub log_fd: OwnedFd,
    pub confine: Confine,
}

impl Plan {
    pub fn new(spec: Spec<'_>) -> std::io::Result<Plan> {
        for p in [spec.lower, spec.upper, spec.work] {
            let s = p.as_os_str().as_encoded_bytes();
            if s.iter().any(|b| matches!(b, b',' | b':' | b'\\')) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{}: overlayfs cannot take paths with ',', ':' or '\\'; use another --root",
                        p.display()
                    ),
                ));
            }
        }
        let overlay_opts = cstr(format!(
            "lowerdir={},upperdir={},workdir={}",
            spec.lower.display(),
            spec.upper.display(),
            spec.work.display()
        ))?;
        let devices = DEVICES
            .iter()
            .map(|d| Ok((cstr(format!("/dev/{d}"))?, cstr(format!("dev/{d}"))?)))
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
        let argv = vec![cstr("/sbin/init")?];
        let envp: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstr(format!("{k}={v}")))
            .collect::<std::io::Result<_>>()?;
        let argv_ptrs = argv
            .iter()
            .map(|c| c.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let envp_ptrs = envp
            .iter()
            .map(|c| c.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        Ok(Plan {
            lower: path_c(spec.lower)?,
            devpts_opts: cstr(format!(
                "newinstance,ptmxmode=0666,mode=620,gid={}",
                spec.confine.id_base + 5
            ))?,
            // /dev belongs to the container's root (syslogd makes /dev/log).
            dev_opts: cstr(format!(
                "mode=755,size=64k,nr_inodes=64,uid={0},gid={0}",
                spec.confine.id_base
            ))?,
            dev_in_template: spec.lower.join("dev/null").is_file()
                && spec.lower.join("dev/pts").is_dir(),
            confine: spec.confine,
            mount_point: path_c(spec.mount_point)?,
            overlay_opts,
            devices,
            binds,
            bind_dirs,
            hostname: spec.hostname.as_bytes().to_vec(),
            init: cstr("/sbin/init")?,
            _argv: argv,
            _envp: envp,
            argv_ptrs,
            envp_ptrs,
            log_fd: spec.log_fd,
        })
    }
}

/// A container whose init is running.
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// Starts the container: a child sharing nifty's memory (CLONE_VM, so no
/// page tables are copied; CLONE_VFORK, so this thread waits until the child
/// has exec'd init or failed) in new mount and PID namespaces. The child
/// first joins the container's cgroups through `cgroup_procs` (v2 and v1
/// `cgroup.procs` files, opened for writing), then builds and enters the
/// container. Returns once init is exec'd, or with the step that failed.
pub fn spawn(plan: &Plan, cgroup_procs: &[OwnedFd]) -> Result<Spawned, (String, std::io::Error)> {
    // With a user namespace, UTS and IPC namespaces are made after joining
    // it, so that they belong to the container's root; the mount and PID
    // namespaces stay owned by the host's, so that container root can
    // never mount, unmount or remount anything.
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
    if plan.confine.userns.is_none() {
        flags |= libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    }
    let failure = AtomicU64::new(0);
    let mut stack = vec![0u8; CHILD_STACK];
    let spawned = sys::spawn_vfork(flags, &mut stack, &mut || {
        child(plan, cgroup_procs, &failure)
    })
    .map_err(|e| ("clone(CLONE_VM|CLONE_VFORK)".to_string(), e))?;
    let f = failure.load(Ordering::SeqCst);
    if f == 0 {
        return Ok(Spawned {
            pid: spawned.0,
            pidfd: spawned.1,
        });
    }
    let _ = rustix::process::waitpid(
        rustix::process::Pid::from_raw(spawned.0),
        rustix::process::WaitOptions::empty(),
    );
    let step = Step::from_u8((f >> 32) as u8).map_or("an unknown step", Step::describe);
    Err((
        step.to_string(),
        std::io::Error::from_raw_os_error(f as u32 as i32),
    ))
}

/// Stack of the container's first process until it execs init.
const CHILD_STACK: usize = 256 << 10;

/// The container side. Raw system calls only, on memory prepared in `plan`.
fn child(plan: &Plan, cgroup_procs: &[OwnedFd], failure: &AtomicU64) -> i32 {
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

    // Until exec, this process is marked as not yet a container's init.
    let _ = rustix::thread::set_name(STARTING);
    // Join the container's cgroups first: from here on, everything this
    // process does is accounted, limited, and seen by `nifty list`/`stop`.
    for f in cgroup_procs {
        if let Err(e) = rustix::io::write(f, b"0") {
            fail(Step::JoinCgroup, e.raw_os_error());
        }
    }
    check(Step::Setsid, rustix::process::setsid().map(drop));
    // Detach from the host's mount propagation, then build the root.
    check(
        Step::MakePrivate,
        rustix::mount::mount_change(
            c"/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        ),
    );
    if let Some(userns) = &plan.confine.userns {
        // Show the shared template through the container's ID mapping:
        // host root's files become the container root's.
        use rustix::mount::{MoveMountFlags, OpenTreeFlags};
        let tree = match rustix::mount::open_tree(
            CWD,
            plan.lower.as_c_str(),
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(e) => fail(Step::IdmapLower, e.raw_os_error()),
        };
        if let Err(e) = sys::mount_setattr_idmap(tree.as_fd(), userns.as_fd()) {
            fail(Step::IdmapLower, e.raw_os_error().unwrap_or(0));
        }
        check(
            Step::IdmapLower,
            rustix::mount::move_mount(
                tree.as_fd(),
                c"",
                CWD,
                plan.lower.as_c_str(),
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            ),
        );
    }
    check(
        Step::MountOverlay,
        rustix::mount::mount(
            c"overlay",
            plan.mount_point.as_c_str(),
            c"overlay",
            MountFlags::NOSUID | MountFlags::NODEV,
            plan.overlay_opts.as_c_str(),
        ),
    );
    check(
        Step::ChdirRoot,
        rustix::process::chdir(plan.mount_point.as_c_str()),
    );
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
        check(
            Step::MountDev,
            rustix::mount::mount(
                c"tmpfs",
                c"dev",
                c"tmpfs",
                MountFlags::NOSUID | MountFlags::NOEXEC,
                plan.dev_opts.as_c_str(),
            ),
        );
    }
    for (host, inside) in &plan.devices {
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
        check(
            Step::BindDevice,
            rustix::mount::mount_bind(host.as_c_str(), inside.as_c_str()),
        );
    }
    if !plan.dev_in_template {
        check(
            Step::CreateDevice,
            rustix::fs::mkdirat(CWD, c"dev/pts", Mode::from_raw_mode(0o755)),
        );
    }
    check(
        Step::MountDevpts,
        rustix::mount::mount(
            c"devpts",
            c"dev/pts",
            c"devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            plan.devpts_opts.as_c_str(),
        ),
    );
    if !plan.dev_in_template {
        for (target, link) in DEV_LINKS {
            check(Step::DevSymlink, rustix::fs::symlinkat(target, CWD, link));
        }
    }
    if plan.confine.mask_proc {
        for p in PROC_NULL {
            match rustix::mount::mount_bind(c"/dev/null", p) {
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
    for (host, inside) in &plan.binds {
        check(
            Step::BindRo,
            rustix::mount::mount_bind(host.as_c_str(), inside.as_c_str()),
        );
        check(
            Step::RemountRo,
            rustix::mount::mount_remount(
                inside.as_c_str(),
                MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                c"",
            ),
        );
    }
    check(Step::PivotRoot, rustix::process::pivot_root(c".", c"."));
    check(
        Step::UmountOldRoot,
        rustix::mount::unmount(c".", UnmountFlags::DETACH),
    );
    check(Step::ChdirRoot, rustix::process::chdir(c"/"));
    if let Some(userns) = &plan.confine.userns {
        use rustix::thread::{move_into_link_name_space, LinkNameSpaceType, UnshareFlags};
        check(
            Step::JoinUserns,
            move_into_link_name_space(userns.as_fd(), Some(LinkNameSpaceType::User)),
        );
        let (uid, gid) = sys::ids(0, 0);
        check(Step::SetIds, rustix::thread::set_thread_groups(&[]));
        check(
            Step::SetIds,
            rustix::thread::set_thread_res_gid(gid, gid, gid),
        );
        check(
            Step::SetIds,
            rustix::thread::set_thread_res_uid(uid, uid, uid),
        );
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
    for prog in &plan.confine.seccomp {
        if let Err(e) = seccompiler::apply_filter(prog) {
            let errno = match e {
                seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => {
                    io.raw_os_error().unwrap_or(0)
                }
                _ => libc::EINVAL,
            };
            fail(Step::Seccomp, errno);
        }
    }
    let e = sys::execve(&plan.init, &plan.argv_ptrs, &plan.envp_ptrs);
    fail(Step::ExecInit, e.raw_os_error().unwrap_or(0))
}
