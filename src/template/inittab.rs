//! The template's `etc/inittab`, read by BusyBox init as PID 1.
//!
//! One inittab serves every instance: the SSH port comes from the
//! environment that the launcher gives init (`NIFTY_PORT`), so cloning
//! never rewrites a file (the article `sed`-ed a copy per clone).

/// Path of each instance's Dropbear host key inside the container.
pub const HOST_KEY: &str = "/etc/dropbear/dropbear_ed25519_host_key";

/// The environment variable that carries the instance's SSH port.
pub const PORT_ENV: &str = "NIFTY_PORT";

/// Renders the inittab.
pub fn render() -> String {
    format!(
        "# nifty: BusyBox init reads this as PID 1 of every instance.\n\
         # <id>::<action>:<process>; see BusyBox's examples/inittab.\n\
         ::sysinit:/bin/hostname -F /etc/hostname\n\
         ::respawn:/sbin/syslogd -n -O -\n\
         # syslogd and Dropbear (-E) log to the console log: `nifty logs`.\n\
         # -F foreground (init supervises it),\n\
         # -w no root login, -r this instance's own host key.\n\
         ::respawn:/usr/sbin/dropbear -F -E -w -r {HOST_KEY} -p ${{{PORT_ENV}:-22}}\n\
         ::ctrlaltdel:/sbin/reboot\n\
         ::shutdown:/bin/echo nifty: shutting down\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inittab_lines_parse() {
        let t = render();
        let entries: Vec<Vec<&str>> = t
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.splitn(4, ':').collect())
            .collect();
        assert!(entries.iter().all(|e| e.len() == 4), "{t}");
        let actions: Vec<&str> = entries.iter().map(|e| e[2]).collect();
        assert!(actions.contains(&"sysinit"));
        assert!(actions.contains(&"shutdown"));
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
    }
}
