//! What a container process may do once it runs: the capability bounding
//! set and the seccomp filter.
//!
//! BusyBox init, syslogd and Dropbear need few capabilities: changing
//! users and file owners (logins, ptys), overriding file permissions as
//! root, killing their own processes. Everything else is dropped from the
//! bounding set, so no process of the container can ever regain it.
//!
//! The seccomp filter allows, on x86_64, only a list of system calls (the
//! rest answer ENOSYS), and refuses (EPERM) among those what a BusyBox
//! system never needs and what would widen its reach: new mounts and namespaces, keyrings, kexec,
//! modules, bpf, perf, ptrace of other processes' memory, clock setting,
//! swap, raw I/O ports. `clone3` answers ENOSYS so that libc falls back to
//! `clone`, whose namespace flags the filter can inspect.

use std::collections::BTreeMap;

use seccompiler::BpfProgram;

use super::seccomp::{compile, Leaf};

/// Capabilities a container keeps (bit numbers of linux/capability.h).
pub const KEEP: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (10, "CAP_NET_BIND_SERVICE"),
    (18, "CAP_SYS_CHROOT"),
    (29, "CAP_AUDIT_WRITE"),
];

/// The bounding-set mask that keeps [`KEEP`].
pub fn keep_mask() -> u64 {
    KEEP.iter().fold(0, |m, (bit, _)| m | 1 << bit)
}

/// System calls refused with EPERM.
pub const DENIED: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "lookup_dcookie",
    "vhangup",
    "pidfd_getfd",
    "fanotify_init",
];

/// The system calls a container may make at all (x86_64): what BusyBox,
/// Dropbear and the programs users run in a shell container need, after
/// the default profiles of Docker and Podman, without what reaches parts of
/// the kernel a shell never needs (io_uring, AIO, fanotify, kcmp,
/// modify_ldt, statmount/listmount, open_tree_attr, quotactl_fd, and every
/// system call newer than this list). Anything else answers ENOSYS, so
/// that libc falls back to an older call where it has one. Within the
/// list, [`DENIED`] and the argument rules of `socket` and `clone` still
/// refuse with EPERM.
#[cfg(target_arch = "x86_64")]
pub const ALLOWED: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_chroot,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_creat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fork,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_futimesat,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_get_robust_list,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_get_mempolicy,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_ioctl,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lchown,
    libc::SYS_lgetxattr,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_lstat,
    libc::SYS_madvise,
    libc::SYS_mbind,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pause,
    libc::SYS_personality,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_reboot,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_select,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_mempolicy,
    libc::SYS_setdomainname,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_sethostname,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_set_robust_list,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_set_tid_address,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_stat,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_time,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_utime,
    libc::SYS_utimensat,
    libc::SYS_utimes,
    libc::SYS_vfork,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_clone,
    libc::SYS_clone3,
];

/// Socket families refused (EPERM): AF_VSOCK (the hypervisor's sockets).
const DENIED_FAMILIES: &[u32] = &[libc::AF_VSOCK as u32];

fn sysno(name: &str) -> Option<i64> {
    let n = match name {
        "mount" => libc::SYS_mount,
        "umount2" => libc::SYS_umount2,
        "pivot_root" => libc::SYS_pivot_root,
        "move_mount" => libc::SYS_move_mount,
        "open_tree" => libc::SYS_open_tree,
        "fsopen" => libc::SYS_fsopen,
        "fsconfig" => libc::SYS_fsconfig,
        "fsmount" => libc::SYS_fsmount,
        "fspick" => libc::SYS_fspick,
        "mount_setattr" => libc::SYS_mount_setattr,
        "unshare" => libc::SYS_unshare,
        "setns" => libc::SYS_setns,
        "keyctl" => libc::SYS_keyctl,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "kexec_load" => libc::SYS_kexec_load,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "init_module" => libc::SYS_init_module,
        "finit_module" => libc::SYS_finit_module,
        "delete_module" => libc::SYS_delete_module,
        "bpf" => libc::SYS_bpf,
        "perf_event_open" => libc::SYS_perf_event_open,
        "ptrace" => libc::SYS_ptrace,
        "process_vm_readv" => libc::SYS_process_vm_readv,
        "process_vm_writev" => libc::SYS_process_vm_writev,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "userfaultfd" => libc::SYS_userfaultfd,
        "swapon" => libc::SYS_swapon,
        "swapoff" => libc::SYS_swapoff,
        "acct" => libc::SYS_acct,
        "quotactl" => libc::SYS_quotactl,
        "syslog" => libc::SYS_syslog,
        #[cfg(target_arch = "x86_64")]
        "iopl" => libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        "ioperm" => libc::SYS_ioperm,
        "settimeofday" => libc::SYS_settimeofday,
        "clock_settime" => libc::SYS_clock_settime,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "adjtimex" => libc::SYS_adjtimex,
        "lookup_dcookie" => libc::SYS_lookup_dcookie,
        "vhangup" => libc::SYS_vhangup,
        "pidfd_getfd" => libc::SYS_pidfd_getfd,
        "fanotify_init" => libc::SYS_fanotify_init,
        _ => return None,
    };
    Some(n)
}

/// Namespace flags `clone` may not use.
const NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// The audit architecture of this build (linux/audit.h).
const AUDIT_ARCH: Option<u32> = if cfg!(target_arch = "x86_64") {
    Some(0xc000_003e)
} else if cfg!(target_arch = "aarch64") {
    Some(0xc000_00b7)
} else if cfg!(target_arch = "riscv64") {
    Some(0xc000_00f3)
} else {
    None
};

/// What each system call gets, as one table: on x86_64 the allow-list
/// (anything else answers ENOSYS), elsewhere everything is allowed but:
/// - the deny-list, refused with EPERM;
/// - `clone` with a namespace flag, `socket` of AF_VSOCK or a netlink
///   uevent socket: EPERM;
/// - `clone3`: ENOSYS, so that libc falls back to `clone`, whose flags
///   the filter can read;
/// - `sync`: answered with success without syncing. A global sync() from a
///   container would flush every filesystem of the host (one tenant
///   slowing all), and BusyBox init calls it at every poweroff, which at
///   thousands of containers makes a fleet stop quadratic. fsync,
///   fdatasync and syncfs still work.
pub fn table() -> (Vec<(u32, Leaf)>, Leaf) {
    let nr = |n: i64| n as u32;
    let mut t: BTreeMap<u32, Leaf> = BTreeMap::new();
    #[cfg(target_arch = "x86_64")]
    t.extend(ALLOWED.iter().map(|n| (nr(*n), Leaf::Allow)));
    let default = if cfg!(target_arch = "x86_64") {
        Leaf::Errno(libc::ENOSYS as u16)
    } else {
        Leaf::Allow
    };
    t.extend(
        DENIED
            .iter()
            .filter_map(|n| sysno(n))
            .map(|n| (nr(n), Leaf::Errno(libc::EPERM as u16))),
    );
    let ns = NS_FLAGS.iter().fold(0u64, |m, f| m | f);
    t.insert(nr(libc::SYS_clone), Leaf::DenyIfArg0Bits(ns as u32));
    t.insert(
        nr(libc::SYS_socket),
        Leaf::Socket(
            DENIED_FAMILIES,
            (libc::AF_NETLINK as u32, libc::NETLINK_KOBJECT_UEVENT as u32),
        ),
    );
    t.insert(nr(libc::SYS_clone3), Leaf::Errno(libc::ENOSYS as u16));
    t.insert(nr(libc::SYS_sync), Leaf::Errno(0));
    (t.into_iter().collect(), default)
}

/// The container's seccomp program (one: see [`super::seccomp`] for why),
/// compiled from [`table`].
pub fn filters() -> Result<Vec<BpfProgram>, String> {
    let arch = AUDIT_ARCH.ok_or_else(|| {
        format!(
            "seccomp: nifty has no filter for {}; create the instance with --no-seccomp",
            std::env::consts::ARCH
        )
    })?;
    let (table, default) = table();
    Ok(vec![compile(arch, &table, default)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_no_dangerous_capability() {
        let m = keep_mask();
        // CAP_SYS_ADMIN 21, SYS_MODULE 16, SYS_RAWIO 17, SYS_PTRACE 19,
        // SYS_TIME 25, NET_ADMIN 12, MKNOD 27, SYS_BOOT 22, BPF 39.
        for bad in [21, 16, 17, 19, 25, 12, 27, 22, 39] {
            assert_eq!(m & (1 << bad), 0, "capability {bad} kept");
        }
        assert_ne!(m & (1 << 6), 0, "CAP_SETGID is needed by Dropbear");
    }

    #[test]
    fn the_bind_program_allows_its_port_and_zero_and_jumps_to_allow() {
        let p = bind_program(2222);
        let field = |i: usize, range: std::ops::Range<usize>| {
            let b = p[i].to_ne_bytes();
            b[range].to_vec()
        };
        let imm = |i: usize| i32::from_ne_bytes(field(i, 4..8).try_into().unwrap());
        let off = |i: usize| i16::from_ne_bytes(field(i, 2..4).try_into().unwrap());
        // Loads of `type` (32) and `user_port` (24) from the context in r1.
        assert_eq!((field(0, 0..1)[0], off(0)), (0x61, 32));
        assert_eq!((field(2, 0..1)[0], off(2)), (0x61, 24));
        // Every conditional jump lands on "allow" (r0 = 1, exit).
        for i in [1, 3, 4] {
            assert_eq!(i as i16 + 1 + off(i), 7, "jump of insn {i}");
        }
        assert_eq!((field(7, 0..1)[0], imm(7)), (0xb7, 1));
        assert_eq!((field(5, 0..1)[0], imm(5)), (0xb7, 0));
        // The port as the kernel keeps it: network byte order.
        assert_eq!(imm(4).to_ne_bytes()[..2], 2222u16.to_be_bytes());
        assert_eq!((imm(1), imm(3)), (1, 0));
        assert!([6, 8].iter().all(|&i| field(i, 0..1)[0] == 0x95));
    }

    #[test]
    fn filters_compile() {
        let f = filters().unwrap();
        assert_eq!(f.len(), 1);
        assert!(
            DENIED.iter().all(|n| sysno(n).is_some()),
            "unknown syscall in DENIED"
        );
        #[cfg(target_arch = "x86_64")]
        {
            for n in DENIED.iter().filter_map(|n| sysno(n)) {
                assert!(!ALLOWED.contains(&n), "{n} is both denied and allowed");
            }
            for n in [libc::SYS_clone, libc::SYS_socket, libc::SYS_sync] {
                assert!(ALLOWED.contains(&n), "{n} has argument rules: allow it");
            }
            // Far shorter than the allow-list itself.
            assert!(f[0].len() < ALLOWED.len(), "{} instructions", f[0].len());
        }
    }

    /// The program answers every number as the lists say (on x86_64 the
    /// allow-list; elsewhere the deny-list only), and checks arguments.
    #[test]
    fn the_program_answers_as_the_lists_say() {
        use super::super::seccomp::run;
        let arch = AUDIT_ARCH.unwrap();
        let p = &filters().unwrap()[0];
        let (allow, eperm, enosys) = (0x7fff_0000, 0x0005_0001, 0x0005_0026);
        let denied: Vec<i64> = DENIED.iter().filter_map(|n| sysno(n)).collect();
        for nr in 0..1024i64 {
            let want = if nr == libc::SYS_clone3 {
                enosys
            } else if nr == libc::SYS_sync {
                0x0005_0000
            } else if denied.contains(&nr) {
                eperm
            } else if !cfg!(target_arch = "x86_64") {
                allow
            } else {
                #[cfg(target_arch = "x86_64")]
                let allowed = ALLOWED.contains(&nr);
                #[cfg(not(target_arch = "x86_64"))]
                let allowed = true;
                if allowed {
                    allow
                } else {
                    enosys
                }
            };
            assert_eq!(run(p, nr as u32, arch, [0; 6]), want, "nr {nr}");
        }
        let call = |nr: i64, a0: u64, a2: u64| run(p, nr as u32, arch, [a0, 0, a2, 0, 0, 0]);
        for flag in NS_FLAGS {
            let f = flag | libc::SIGCHLD as u64;
            assert_eq!(call(libc::SYS_clone, f, 0), eperm, "clone {flag:#x}");
        }
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(call(libc::SYS_clone, thread, 0), allow);
        let (vsock, netlink) = (libc::AF_VSOCK as u64, libc::AF_NETLINK as u64);
        let uevent = libc::NETLINK_KOBJECT_UEVENT as u64;
        assert_eq!(call(libc::SYS_socket, vsock, 0), eperm);
        assert_eq!(call(libc::SYS_socket, netlink, uevent), eperm);
        assert_eq!(call(libc::SYS_socket, netlink, 0), allow);
        assert_eq!(call(libc::SYS_socket, libc::AF_INET as u64, 0), allow);
        // A 32-bit call on a 64-bit kernel is killed.
        assert_eq!(run(p, 0, 0x4000_0003, [0; 6]), 0x8000_0000);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(run(p, 0x4000_0000, arch, [0; 6]), enosys, "x32");
    }
}

/// How a container is held to its own TCP port on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOwnership {
    /// Landlock network rules (ABI 4, Linux 6.7).
    Landlock,
    /// The fallback of older kernels: a cgroup bind program per container
    /// (`BPF_CGROUP_INET4_BIND`/`INET6_BIND`, Linux 4.17).
    CgroupBpf,
    /// Neither works (no Landlock network rules and no cgroup BPF).
    None,
}

/// What this kernel offers to keep containers off each other's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfinement {
    /// How TCP binds are limited to the instance's own port.
    pub ports: PortOwnership,
    /// Abstract unix sockets of the host and of other containers out of
    /// reach (Landlock ABI 6, Linux 6.12).
    pub abstract_unix: bool,
}

impl NetConfinement {
    /// Asked of the kernel once per process (not at every start): the
    /// Landlock ABI, and whether a cgroup bind program loads where
    /// Landlock has no network rules. `NIFTY_FALLBACKS=bind` takes the
    /// cgroup programs on a kernel with Landlock too (to test and measure
    /// the fallback).
    pub fn of_kernel() -> NetConfinement {
        static K: std::sync::OnceLock<NetConfinement> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            let k = Self::of_landlock();
            if k.ports == PortOwnership::None && BindPrograms::load(22).is_ok() {
                NetConfinement {
                    ports: PortOwnership::CgroupBpf,
                    ..k
                }
            } else {
                k
            }
        })
    }

    /// What Landlock alone offers, without the probe of cgroup BPF (a
    /// load of two programs): all that a process joining a running
    /// container needs, whose cgroup holds the bind programs already. A
    /// one-shot process such as `nifty systemd session` would otherwise
    /// pay the probe at every connection.
    fn of_landlock() -> NetConfinement {
        let abi = crate::sys::landlock_abi();
        NetConfinement {
            ports: if abi >= 4 && !super::features::forced("bind") {
                PortOwnership::Landlock
            } else {
                PortOwnership::None
            },
            abstract_unix: abi >= 6,
        }
    }

    /// Containers bind only their own TCP port.
    pub fn owns_port(&self) -> bool {
        self.ports != PortOwnership::None
    }
}

/// What holds one instance to its own network share: a Landlock ruleset
/// its processes enter, and/or bind programs for its cgroup.
#[derive(Debug, Default)]
pub struct NetGuard {
    /// Landlock ruleset to enter (own port only with `PortOwnership::
    /// Landlock`; abstract unix sockets scoped with ABI 6).
    pub landlock: Option<std::os::fd::OwnedFd>,
    /// Bind programs to attach to the instance's cgroup (the fallback
    /// before 6.7). Everything that joins the cgroup is held by them,
    /// `nifty exec` included.
    pub bind: Option<BindPrograms>,
}

/// The network guard of an instance listening on `port`: it may bind that
/// TCP port only (and port 0, an ephemeral one, for clients), so no
/// container can answer on a stopped neighbour's SSH port; with Landlock
/// ABI 6 its processes reach only abstract unix sockets made inside it.
/// Empty where the kernel offers neither (`doctor` and SECURITY.md say
/// what is then not defended).
///
/// `joining`: for a process that joins a running container, whose cgroup
/// holds the bind programs already: none are loaded, nor probed for (each
/// load runs the verifier; an on-demand session would pay it at every
/// connection).
pub fn network(port: u16, joining: bool) -> std::io::Result<NetGuard> {
    let k = if joining {
        NetConfinement::of_landlock()
    } else {
        NetConfinement::of_kernel()
    };
    let landlock_ports = [port, 0];
    let ports = (k.ports == PortOwnership::Landlock).then_some(&landlock_ports[..]);
    Ok(NetGuard {
        landlock: if ports.is_some() || k.abstract_unix {
            Some(crate::sys::landlock_ruleset(ports, k.abstract_unix)?)
        } else {
            None
        },
        bind: if k.ports == PortOwnership::CgroupBpf && !joining {
            Some(BindPrograms::load(port)?)
        } else {
            None
        },
    })
}

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_CGROUP_INET4_BIND`, `BPF_CGROUP_INET6_BIND`.
const ATTACH_INET4_BIND: u32 = 8;
const ATTACH_INET6_BIND: u32 = 9;
/// `BPF_F_ALLOW_MULTI`: other programs on the cgroup (systemd's) stay.
const F_ALLOW_MULTI: u32 = 2;

/// The two bind programs of one instance (IPv4 and IPv6; a program serves
/// one attach type). Attached to the instance's cgroup, they are freed
/// with it.
#[derive(Debug)]
pub struct BindPrograms {
    v4: std::os::fd::OwnedFd,
    v6: std::os::fd::OwnedFd,
}

impl BindPrograms {
    /// Loads the programs that let a stream socket bind `port` or 0 only.
    pub fn load(port: u16) -> std::io::Result<BindPrograms> {
        let insns = bind_program(port);
        let load = |attach| {
            crate::sys::bpf_prog_load(PROG_TYPE_CGROUP_SOCK_ADDR, attach, &insns, "nifty_bind")
        };
        Ok(BindPrograms {
            v4: load(ATTACH_INET4_BIND)?,
            v6: load(ATTACH_INET6_BIND)?,
        })
    }

    /// Attaches both to the cgroup v2 directory `cgroup`.
    pub fn attach(&self, cgroup: &std::path::Path) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let dir = rustix::fs::open(
            cgroup,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        for (prog, attach) in [(&self.v4, ATTACH_INET4_BIND), (&self.v6, ATTACH_INET6_BIND)] {
            crate::sys::bpf_prog_attach(dir.as_fd(), prog.as_fd(), attach, F_ALLOW_MULTI)?;
        }
        Ok(())
    }
}

/// One BPF instruction (`struct bpf_insn`).
pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let regs = if cfg!(target_endian = "little") {
        (src << 4) | dst
    } else {
        (dst << 4) | src
    };
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = regs;
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    u64::from_ne_bytes(b)
}

/// The bind program: a stream socket may bind `port` or 0 (an ephemeral
/// port); anything else is refused (EPERM). Other socket types pass, as
/// under Landlock, which limits TCP only. Reads `struct bpf_sock_addr`:
/// `type` at 32, `user_port` (network byte order) at 24.
fn bind_program(port: u16) -> [u64; 9] {
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    const SOCK_STREAM: i32 = 1;
    let (r0, r1, r2) = (0, 1, 2);
    [
        insn(LDX_W, r2, r1, 32, 0),                     // r2 = ctx->type
        insn(JNE_K, r2, 0, 5, SOCK_STREAM),             // not a stream: allow
        insn(LDX_W, r2, r1, 24, 0),                     // r2 = ctx->user_port
        insn(JEQ_K, r2, 0, 3, 0),                       // port 0: allow
        insn(JEQ_K, r2, 0, 2, i32::from(port.to_be())), // own port: allow
        insn(MOV_K, r0, 0, 0, 0),                       // refuse
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV_K, r0, 0, 0, 1), // allow
        insn(EXIT, 0, 0, 0, 0),
    ]
}
