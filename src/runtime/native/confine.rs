//! What a container process may do once it runs: the capability bounding
//! set and the seccomp filter.
//!
//! BusyBox init, syslogd and Dropbear need few capabilities: changing
//! users and file owners (logins, ptys), overriding file permissions as
//! root, killing their own processes. Everything else is dropped from the
//! bounding set, so no process of the container can ever regain it.
//!
//! The seccomp filter refuses (EPERM) what a BusyBox system never needs and
//! what would widen its reach: new mounts and namespaces, keyrings, kexec,
//! modules, bpf, perf, ptrace of other processes' memory, clock setting,
//! swap, raw I/O ports. `clone3` answers ENOSYS so that libc falls back to
//! `clone`, whose namespace flags the filter can inspect.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e:?}"))
}

/// The container's seccomp programs, in the order to install them: the
/// ENOSYS filter for clone3, the EPERM deny-list, and `sync` answered with
/// success without syncing: a global sync() from a container would flush
/// every filesystem of the host (one tenant slowing all), and BusyBox init
/// calls it at every poweroff, which at thousands of containers makes a
/// fleet stop quadratic. fsync, fdatasync and syncfs still work.
pub fn filters() -> Result<Vec<BpfProgram>, String> {
    let arch = arch()?;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter_map(|n| sysno(n))
        .map(|n| (n, vec![]))
        .collect();
    let rules = NS_FLAGS
        .iter()
        .map(|flag| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )
            .map_err(|e| format!("seccomp: {e:?}"))?])
            .map_err(|e| format!("seccomp: {e:?}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    deny.insert(libc::SYS_clone, rules);
    let program = |rules: BTreeMap<i64, Vec<SeccompRule>>,
                   action: SeccompAction|
     -> Result<BpfProgram, String> {
        SeccompFilter::new(rules, SeccompAction::Allow, action, arch)
            .map_err(|e| format!("seccomp: {e:?}"))?
            .try_into()
            .map_err(|e| format!("seccomp: {e:?}"))
    };
    let only = |sysno: i64| BTreeMap::from([(sysno, vec![])]);
    Ok(vec![
        program(
            only(libc::SYS_clone3),
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?,
        program(deny, SeccompAction::Errno(libc::EPERM as u32))?,
        program(only(libc::SYS_sync), SeccompAction::Errno(0))?,
    ])
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
    fn filters_compile() {
        let f = filters().unwrap();
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|p| !p.is_empty()));
        assert!(
            DENIED.iter().all(|n| sysno(n).is_some()),
            "unknown syscall in DENIED"
        );
    }
}
