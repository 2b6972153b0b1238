//! The ExecStart side of `nifty@.service`: `nifty systemd exec NAME --
//! systemd-nspawn ...` runs in the unit, mounts the instance's root in a
//! mount namespace of its own, holds itself and what it starts to the
//! instance's port, and execs systemd-nspawn in place with the instance's
//! own arguments.

use std::os::fd::AsFd;
use std::path::PathBuf;

use super::check_machine_name;
use crate::store::{parse_bind, Backend, Instance, Store};
use crate::{Error, Result};

/// The ExecStart of `nifty@.service`: mounts the instance's root in a mount
/// namespace of this process's own and execs systemd-nspawn with `args`
/// plus the instance's own (user namespace range, binds, capabilities).
/// Returns only on failure.
pub fn exec_nspawn(store: &Store, name: &str, args: &[String]) -> Error {
    let e = prepare_and_exec(store, name, args);
    // Also in the console log, where `nifty logs` shows it (the unit's own
    // output goes to the log's old place: see `unit`).
    if let Ok(inst) = store.instance(name) {
        if let Ok(fd) = crate::runtime::linux::files::append_console_log(&store.console_log(&inst))
        {
            let _ = rustix::io::write(&fd, format!("nifty: {e}\n").as_bytes());
        }
    }
    e
}

fn prepare_and_exec(store: &Store, name: &str, args: &[String]) -> Error {
    match prepare_root(store, name) {
        Ok(extra) => {
            let Some((prog, rest)) = args.split_first() else {
                return Error::Invalid("systemd exec: no systemd-nspawn command after --".into());
            };
            use std::os::unix::process::CommandExt;
            // nspawn and everything it starts own only the instance's port
            // (and keep off abstract sockets of others), as native ones do.
            let inst = match store.instance(name) {
                Ok(i) => i,
                Err(e) => return e,
            };
            if let Err(e) = guard_network(&inst) {
                return e;
            }
            // The console log, rotated and opened as a native start does
            // (the unit appends nifty's own messages to it before this).
            let path = store.console_log(&inst);
            let log = match crate::runtime::linux::files::open_console_log(&path, name) {
                Ok(fd) => fd,
                Err(e) => return e,
            };
            let err = match log.try_clone() {
                Ok(fd) => fd,
                Err(e) => return Error::io("dup", &path)(e),
            };
            // Its stdin (init's, with --console=pipe): an empty pipe, no
            // file of the host's.
            let stdin = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
                Ok((r, _)) => r,
                Err(e) => return Error::sys("pipe")(e),
            };
            let e = std::process::Command::new(prog)
                .args(rest)
                .args(extra)
                .stdin(stdin)
                .stdout(log)
                .stderr(err)
                .exec();
            Error::Sys {
                call: format!("instance {name:?}: execve({prog})"),
                err: e,
            }
        }
        Err(e) => e,
    }
}

/// Holds this ExecStart process, nspawn and the container it starts to
/// the instance's own port: a Landlock ruleset entered here, or, before
/// Linux 6.7, bind programs on the unit's own cgroup (nspawn's payload
/// cgroup is below it, so they hold the container too; systemd frees them
/// with the cgroup).
fn guard_network(inst: &Instance) -> Result<()> {
    let name = &inst.name;
    let net =
        crate::runtime::linux::confine::network(inst.port, false).map_err(|e| Error::Sys {
            call: format!(
            "instance {name:?}: its network guard (landlock_create_ruleset or bpf(BPF_PROG_LOAD))"
        ),
            err: e,
        })?;
    if let Some(progs) = &net.bind {
        let own = own_cgroup()?;
        progs.attach(&own).map_err(|e| Error::Sys {
            call: format!(
                "instance {name:?}: bpf(BPF_PROG_ATTACH) of its bind programs to {}",
                own.display()
            ),
            err: e,
        })?;
    }
    if let Some(fd) = &net.landlock {
        crate::sys::landlock_restrict_self(fd.as_fd()).map_err(|e| Error::Sys {
            call: format!("instance {name:?}: landlock_restrict_self"),
            err: std::io::Error::from_raw_os_error(e.raw_os_error()),
        })?;
    }
    Ok(())
}

/// The cgroup v2 directory of this process (the unit's).
fn own_cgroup() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(Error::io("read", "/proc/self/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Host("no cgroup v2 entry in /proc/self/cgroup".into()))?;
    let v2 = crate::runtime::linux::cgroup::Hierarchy::detect()?.v2;
    Ok(v2.join(rel.trim_start_matches('/')))
}

/// Mounts the overlay root of `name` on `<instance>/root` in a new mount
/// namespace (no propagation back to the host) and returns the
/// systemd-nspawn arguments of the instance.
fn prepare_root(store: &Store, name: &str) -> Result<Vec<String>> {
    use rustix::mount::*;
    let inst = store.instance(name)?;
    if inst.backend != Backend::Systemd {
        return Err(Error::Invalid(format!(
            "instance {name:?} uses the {} backend; start it with `nifty start {name}`",
            inst.backend
        )));
    }
    check_machine_name(&inst.name)?;
    // The disk store is mounted in the host's namespace (after a boot,
    // by the first unit that needs it), before this one is made private.
    store.instance_layers(&inst)?;
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)
        .map_err(Error::sys("unshare(CLONE_NEWNS)"))?;
    mount_change(
        "/",
        MountPropagationFlags::SLAVE | MountPropagationFlags::REC,
    )
    .map_err(Error::sys("mount(/, MS_SLAVE|MS_REC)"))?;
    let target = store.instance_dir(name).join("root");
    match std::fs::create_dir(&target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("create", &target)(e)),
    }
    let fd = crate::volume::mount_overlay(
        store,
        &inst,
        |e| match e {
            Error::Sys { err, .. } => err.raw_os_error(),
            _ => None,
        },
        || crate::runtime::linux::files::detached_overlay(store, &inst),
    )?;
    move_mount(
        fd.as_fd(),
        "",
        rustix::fs::CWD,
        &target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(Error::sys(format!(
        "move_mount(overlay, {})",
        target.display()
    )))?;
    let mut args = Vec::new();
    if inst.network == crate::store::Network::None {
        // Loopback only, as native ones (`--network none`).
        args.push("--private-network".into());
    }
    match inst.security.uid_base {
        Some(base) => {
            args.push(format!("--private-users={base}:65536"));
            args.push("--private-users-ownership=off".into());
        }
        None => args.push("--private-users=no".into()),
    }
    for b in &inst.bind_ro {
        let (src, dst) = parse_bind(b)?;
        let idmap = if inst.security.uid_base.is_some() {
            ":idmap"
        } else {
            ""
        };
        args.push(format!(
            "--bind-ro={}:{}{idmap}",
            src.display(),
            dst.display()
        ));
    }
    if inst.security.drop_caps {
        args.push(format!(
            "--drop-capability={}",
            NSPAWN_DEFAULT_CAPS
                .iter()
                .filter(|c| !crate::runtime::linux::confine::KEEP
                    .iter()
                    .any(|(_, k)| k == *c))
                .copied()
                .collect::<Vec<_>>()
                .join(",")
        ));
        args.push("--no-new-privileges=yes".into());
    }
    Ok(args)
}

/// The capabilities systemd-nspawn gives a container by default
/// (systemd-nspawn(1), --capability=).
const NSPAWN_DEFAULT_CAPS: &[&str] = &[
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_NICE",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TTY_CONFIG",
];

#[cfg(test)]
mod tests {
    use super::NSPAWN_DEFAULT_CAPS;

    #[test]
    fn kept_caps_are_nspawn_defaults() {
        // Every capability nifty keeps exists in nspawn's default set, so
        // dropping the rest leaves exactly nifty's set.
        for (_, c) in crate::runtime::linux::confine::KEEP {
            assert!(NSPAWN_DEFAULT_CAPS.contains(c), "{c}");
        }
    }
}
