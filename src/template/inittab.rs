//! The template's `etc/inittab`, read by BusyBox init as PID 1.
//!
//! The template's inittab takes the SSH port from init's environment
//! (`NIFTY_PORT`, which every launcher sets). Each instance also gets the
//! same inittab with its port written in (a 4 KiB file in its upper layer,
//! made at create, like the article's `sed` per clone): BusyBox init runs a
//! command through `sh -c` when it holds `$`, and skipping that shell saves
//! one exec per container boot, which counts at thousands of boots.
//!
//! There is no `sysinit` action: both launchers mount /proc, /dev, devpts
//! and /sys and set the hostname before init runs, and each sysinit line
//! would cost a process, run before anything else, at every boot.
//!
//! There is no `shutdown` action either: without one, `nifty stop` powers
//! the container off from the host (SIGTERM to the services, then
//! `cgroup.kill`), which stays cheap at ten thousand containers where
//! init's own poweroff does not (see `runtime::native::poweroff`). A line
//! added here makes `stop` leave the poweroff to init, so that it runs.

/// Path of each instance's Dropbear host key inside the container.
pub const HOST_KEY: &str = "/etc/dropbear/dropbear_ed25519_host_key";

/// The environment variable that carries the instance's SSH port.
pub const PORT_ENV: &str = "NIFTY_PORT";

/// The shutdown line of the inittabs nifty wrote before it powered off
/// containers itself (templates and instances made then still have it):
/// it only printed a message, so it does not need init.
const LEGACY_SHUTDOWN: &str = "/bin/echo nifty: shutting down";

/// The `shutdown` actions of an inittab (BusyBox
/// `id:runlevels:action:process`): with any, a stop leaves the poweroff to
/// init, so that they run.
pub fn shutdown_actions(inittab: &str) -> Vec<&str> {
    inittab
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.splitn(4, ':');
            let (_, _, action, process) = (f.next()?, f.next()?, f.next()?, f.next()?);
            (action.trim() == "shutdown").then_some(process.trim())
        })
        .filter(|p| *p != LEGACY_SHUTDOWN)
        .collect()
}

/// Renders the inittab; `port` writes the port in, `None` takes it from
/// `NIFTY_PORT`.
///
/// An instance's inittab (`Some(port)`) serves only the host key nifty
/// made for it. The template's own (`None`), which nifty's instances never
/// run but an exported OCI image does, adds `-R`: with no key at the path,
/// Dropbear makes one at the first connection, so each container of the
/// image has its own (a key given to the container, by a volume or a
/// Secret, is used as it is).
pub fn render(port: Option<u16>) -> String {
    let generate = if port.is_none() { " -R" } else { "" };
    let port = port.map_or_else(|| format!("${{{PORT_ENV}:-22}}"), |p| p.to_string());
    format!(
        "# nifty: BusyBox init reads this as PID 1 of every instance.\n\
         # <id>::<action>:<process>; see BusyBox's examples/inittab.\n\
         ::respawn:/sbin/syslogd -n -O -\n\
         # syslogd and Dropbear (-E) log to the console log: `nifty logs`.\n\
         # -F foreground (init supervises it),\n\
         # -w no root login, -r this instance's own host key.\n\
         ::respawn:{}{generate} -p {port}\n\
         ::ctrlaltdel:/sbin/reboot\n",
        dropbear_command()
    )
}

/// Dropbear as every instance runs it, without its listening options:
/// `-E` logs to stderr (the console log), `-w` no root login, `-r` the
/// instance's own host key; `-F` stays in the foreground.
fn dropbear_command() -> String {
    format!("/usr/sbin/dropbear -F -E -w -r {HOST_KEY}")
}

/// The inittab of an on-demand instance (`create --on-demand`): no
/// Dropbear of its own. `nifty serve` holds its port and starts one
/// `dropbear -i` per connection inside it (the article's inetd and socket
/// activation, `Accept=yes`), so nothing in the container listens.
pub fn render_on_demand() -> String {
    "# nifty: BusyBox init reads this as PID 1 of every instance.\n\
     # An on-demand instance: `nifty serve` holds its SSH port and runs one\n\
     # `dropbear -i` in it per connection; nothing here listens.\n\
     ::respawn:/sbin/syslogd -n -O -\n\
     ::ctrlaltdel:/sbin/reboot\n"
        .to_string()
}

/// Where an on-demand instance's own listener writes its PID (in the
/// container's PID namespace): the tenant's file, which `serve` reads
/// only as a question to the kernel (`serve::direct::start`).
pub const LISTENER_PIDFILE: &str = "/var/run/nifty-listener.pid";

/// The Dropbear that listens in a running on-demand instance (see
/// `serve::direct`), on its port (`Bound::Port`), with the options of
/// `dropbear -i` (below): not in
/// the foreground, so that it leaves serve for the container's init (which
/// reaps it, as it reaps every orphan there), logging to syslog.
/// `Bound::Loopback`: on an ephemeral port of each loopback address
/// instead, where the port is a systemd socket's (the steering hands the
/// listener the port's connections all the same). It writes its PID to
/// [`LISTENER_PIDFILE`] once in the background, after it listens.
pub fn dropbear_listening(bound: crate::runtime::linux::proc::Bound) -> Vec<String> {
    use crate::runtime::linux::proc::Bound;
    let mut cmd = dropbear_inetd();
    cmd.retain(|a| a != "-i");
    cmd.extend(["-P".to_string(), LISTENER_PIDFILE.to_string()]);
    match bound {
        Bound::Port(port) => cmd.extend(["-p".to_string(), port.to_string()]),
        Bound::Loopback => {
            for at in ["127.0.0.1:0", "[::1]:0"] {
                cmd.extend(["-p".to_string(), at.to_string()]);
            }
        }
    }
    cmd
}

/// The command `nifty serve` runs in an on-demand instance for one
/// accepted connection (its socket on stdin and stdout): Dropbear in
/// inetd mode, with the options every instance's Dropbear has but `-E`
/// (Dropbear refuses stderr logging in inetd mode: it logs to syslog,
/// whose syslogd writes to the console log all the same).
pub fn dropbear_inetd() -> Vec<String> {
    ["/usr/sbin/dropbear", "-i", "-w", "-r", HOST_KEY]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_shutdown_actions() {
        let t = "# comment\n::respawn:/sbin/syslogd -n\n\
                 ::shutdown:/bin/umount -a -r\n  ::shutdown: /sbin/swapoff -a\n\
                 ::ctrlaltdel:/sbin/reboot\nbroken line\n";
        assert_eq!(
            shutdown_actions(t),
            ["/bin/umount -a -r", "/sbin/swapoff -a"]
        );
        assert!(shutdown_actions("::respawn:/usr/sbin/dropbear -F\n").is_empty());
        // A process may hold colons.
        assert_eq!(
            shutdown_actions("::shutdown:/bin/sh -c 'echo a:b'\n"),
            ["/bin/sh -c 'echo a:b'"]
        );
    }

    #[test]
    fn nifty_s_old_message_line_needs_no_init() {
        let old = render(Some(2201)) + "::shutdown:/bin/echo nifty: shutting down\n";
        assert!(shutdown_actions(&old).is_empty());
        assert!(shutdown_actions(&render(None)).is_empty());
    }
    use crate::runtime::linux::proc::Bound;

    #[test]
    fn a_listener_binds_its_port_or_an_ephemeral_one_on_loopback() {
        let on_port = dropbear_listening(Bound::Port(2201));
        assert!(!on_port.contains(&"-i".to_string()), "{on_port:?}");
        assert!(on_port.ends_with(&["-p".to_string(), "2201".to_string()]));
        assert!(
            on_port
                .join(" ")
                .contains(&format!(" -P {LISTENER_PIDFILE} ")),
            "{on_port:?}"
        );
        let loopback = dropbear_listening(Bound::Loopback).join(" ");
        assert!(
            loopback.ends_with("-p 127.0.0.1:0 -p [::1]:0"),
            "never every address: {loopback}"
        );
        assert!(
            loopback.starts_with("/usr/sbin/dropbear -w -r "),
            "{loopback}"
        );
    }

    #[test]
    fn inittab_lines_parse() {
        let t = render(None);
        let entries: Vec<Vec<&str>> = t
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.splitn(4, ':').collect())
            .collect();
        assert!(entries.iter().all(|e| e.len() == 4), "{t}");
        let actions: Vec<&str> = entries.iter().map(|e| e[2]).collect();
        assert!(
            !actions.contains(&"sysinit"),
            "a sysinit costs a process per boot"
        );
        assert!(
            !actions.contains(&"shutdown"),
            "a shutdown action makes stop wait for init's poweroff"
        );
        let dropbear = entries.iter().find(|e| e[3].contains("dropbear")).unwrap();
        assert_eq!(dropbear[2], "respawn");
        for flag in ["-F", "-w", "-p ${NIFTY_PORT:-22}"] {
            assert!(
                dropbear[3].contains(flag),
                "{flag} missing: {}",
                dropbear[3]
            );
        }
        assert!(entries
            .iter()
            .any(|e| e[2] == "respawn" && e[3].contains("syslogd")));
        // The template's (an exported image's) makes its host key; an
        // instance's serves only the one nifty made for it.
        assert!(dropbear[3].contains(" -R "), "{}", dropbear[3]);
        assert!(!render(Some(2201)).contains(" -R "));
    }

    #[test]
    fn an_on_demand_inittab_has_no_dropbear_and_inetd_mode_has_the_same_options() {
        let t = render_on_demand();
        assert!(
            !t.lines()
                .any(|l| !l.starts_with('#') && l.contains("dropbear")),
            "{t}"
        );
        assert!(t.contains("::respawn:/sbin/syslogd"), "{t}");
        let i = dropbear_inetd();
        assert_eq!(i[0], "/usr/sbin/dropbear");
        assert!(i.contains(&"-i".to_string()) && !i.contains(&"-F".to_string()));
        let always = render(Some(2201));
        assert!(!i.contains(&"-E".to_string()), "dropbear -i refuses -E");
        for opt in ["-w", HOST_KEY] {
            assert!(
                i.contains(&opt.to_string()) && always.contains(opt),
                "{opt}"
            );
        }
    }
}
