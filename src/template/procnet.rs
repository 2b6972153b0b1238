//! The /proc/net of a container on the host's network namespace.
//!
//! There /proc/net is the host's: its socket tables (`tcp`, `tcp6`, `udp`,
//! `udp6`, `unix`, ...) list every connection of the host and of every
//! other container, and reading `tcp` walks the kernel's whole TCP hash
//! table, empty buckets too (sized by RAM: 262,144 buckets here, 3.3 ms per
//! read on this 24 GiB host). Dropbear reads `/proc/net/tcp` for entropy
//! each time it starts: a login costs two reads (the listening Dropbear at
//! accept, and the re-executed session), and an on-demand start one.
//!
//! A template carries a directory of its own for it, [`DIR`]: links to
//! init's `/proc/1/net/<entry>` for what describes the host's interfaces
//! and routes (what `ifconfig`, `route` and `arp` read), and links to
//! `/dev/null` for the socket tables. The native launcher mounts a link to
//! it over the `/proc/net` link of a container on the host's network
//! (Linux 5.2, `move_mount` onto a symlink). Not a boundary: sock_diag
//! netlink (`ss`) and `/proc/PID/net` still list the host's sockets; a
//! network namespace of its own (`--network none`) is.

/// Where the template holds it (relative to its root).
pub const DIR: &str = "usr/lib/nifty/net";

/// What `/proc/net` links to in a container that has it.
pub const TARGET: &std::ffi::CStr = c"/usr/lib/nifty/net";

/// Entries shown as they are (init's, which is the host's network
/// namespace): interfaces, addresses, routes, neighbours, counters.
const KEPT: [&str; 20] = [
    "arp",
    "dev",
    "dev_mcast",
    "fib_trie",
    "fib_triestat",
    "if_inet6",
    "igmp",
    "igmp6",
    "ipv6_route",
    "netstat",
    "protocols",
    "psched",
    "route",
    "rt6_stats",
    "rt_cache",
    "snmp",
    "snmp6",
    "sockstat",
    "sockstat6",
    "softnet_stat",
];

/// Socket tables, shown empty.
const EMPTY: [&str; 11] = [
    "tcp", "tcp6", "udp", "udp6", "udplite", "udplite6", "raw", "raw6", "unix", "packet", "netlink",
];

/// The directory's links: (name, target).
pub fn links() -> impl Iterator<Item = (&'static str, String)> {
    KEPT.iter()
        .map(|e| (*e, format!("/proc/1/net/{e}")))
        .chain(EMPTY.iter().map(|e| (*e, "/dev/null".to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_tables_are_empty_and_the_rest_is_inits() {
        let l: std::collections::HashMap<_, _> = links().collect();
        assert_eq!(l.len(), KEPT.len() + EMPTY.len(), "a name is listed twice");
        for t in ["tcp", "tcp6", "udp", "udp6", "unix"] {
            assert_eq!(l[t], "/dev/null");
        }
        assert_eq!(l["dev"], "/proc/1/net/dev");
        assert_eq!(l["route"], "/proc/1/net/route");
        assert_eq!(TARGET.to_str().unwrap(), format!("/{DIR}"));
    }
}
