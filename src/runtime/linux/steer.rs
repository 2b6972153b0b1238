//! One listening socket for many ports: a BPF `sk_lookup` program (Linux
//! 5.9) attached to the host's network namespace steers every new TCP
//! connection to a port in its set to one listening socket of nifty's
//! (one for IPv4, one for IPv6), before the kernel looks for a socket
//! bound to that port. `nifty serve` holds tens of thousands of idle
//! on-demand instances' ports this way with no socket per port: an idle
//! instance costs one byte of a fixed 64 Ki-entry array, where a listening
//! socket each costs about 2.3 KiB of kernel memory. The accepted
//! connection's local address is the one the client dialled, so its port
//! names the instance.
//!
//! A running instance's own listening Dropbear can take its port's
//! connections straight from the kernel: its listening sockets go in a
//! second map (`direct`), which the program looks in first. The kernel
//! takes a socket out of the map when it is closed, so when that Dropbear
//! ends (or its instance stops) the port's connections come back to
//! nifty's listeners at once: the port is never left unowned.
//!
//! The program lives while the link's fd is open: when `serve` ends,
//! steering ends with it; ports an instance listens on itself stay
//! reachable, the others are closed again.
//!
//! On a systemd host, systemd's socket units hold the ports and no nifty
//! process stays: the same program and maps, with no listeners of nifty's,
//! are pinned in the bpffs at /sys/fs/bpf ([`Steer::pinned`]), where each
//! per-connection `nifty systemd session` finds them. A running instance's
//! own listener (on an ephemeral loopback port: the port is systemd's)
//! then takes its port's connections before the kernel's lookup finds
//! systemd's socket; without one, the lookup falls through to it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::net::{AddressFamily, SocketAddrV4, SocketAddrV6, SocketFlags, SocketType};

use super::confine::insn;

/// `BPF_PROG_TYPE_SK_LOOKUP`.
const PROG_TYPE_SK_LOOKUP: u32 = 30;
/// `BPF_SK_LOOKUP` (attach type).
const ATTACH_SK_LOOKUP: u32 = 36;
/// `BPF_MAP_TYPE_ARRAY`, `BPF_MAP_TYPE_SOCKMAP`, `BPF_MAP_TYPE_SOCKHASH`.
const MAP_ARRAY: u32 = 2;
const MAP_SOCKMAP: u32 = 15;
const MAP_SOCKHASH: u32 = 18;
/// Every TCP port: the array's index.
const PORTS: u32 = 65536;
/// Instances' own listening sockets at once (two per instance: IPv4 and
/// IPv6); the hash's buckets take 16 bytes each.
const DIRECT: u32 = 65536;

/// The steering of a set of ports to nifty's two listening sockets.
#[derive(Debug)]
pub struct Steer {
    /// port -> 1 (steered) or 0.
    ports: OwnedFd,
    /// (port << 1 | IPv6) -> an instance's own listening socket.
    direct: OwnedFd,
    /// The program's link, which keeps it attached (where this process
    /// made it: `None` when opened from pins).
    link: Option<OwnedFd>,
    /// The map of nifty's listeners and the program, kept with the link.
    _keep: Vec<OwnedFd>,
    /// Where steered connections wait: IPv4 and, where the host has it,
    /// IPv6 (nonblocking, close-on-exec). None in a pinned steering.
    pub listeners: Vec<OwnedFd>,
}

/// `BPF_FS_MAGIC`: a bpffs, where BPF objects are pinned.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The objects of a pinned steering, in its directory; the link last (a
/// directory without it is an unfinished one).
const PINS: [&str; 3] = ["ports", "direct", "link"];

/// Where the pinned steering named `name` lives: under the bpffs that
/// systemd mounts at /sys/fs/bpf (`None` where there is none).
pub fn pin_dir(name: &str) -> Option<std::path::PathBuf> {
    let base = std::path::Path::new("/sys/fs/bpf");
    let st = rustix::fs::statfs(base).ok()?;
    (st.f_type as i64 == BPF_FS_MAGIC).then(|| base.join("nifty").join(name))
}

/// Removes a pinned steering (its program detaches once no fd of its link
/// is open); nothing if there is none.
pub fn unpin(dir: &std::path::Path) -> std::io::Result<()> {
    for name in PINS.iter().rev() {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Steer {
    /// Sets up steering in the caller's network namespace, with no port
    /// steered yet. Fails on kernels before 5.9 (no `sk_lookup`), which
    /// the caller answers with a socket per port.
    pub fn new() -> std::io::Result<Steer> {
        let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
        // SO_REUSEADDR is inherited by the accepted connections: their
        // TIME-WAIT must not keep the instance's own Dropbear (after
        // `on-demand disable`) or a new instance from binding the port.
        let v4 = rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, flags, None)?;
        rustix::net::sockopt::set_socket_reuseaddr(&v4, true)?;
        rustix::net::bind_v4(&v4, &SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0))?;
        rustix::net::listen(&v4, 4096)?;
        let mut listeners = vec![v4];
        if let Ok(v6) =
            rustix::net::socket_with(AddressFamily::INET6, SocketType::STREAM, flags, None)
        {
            rustix::net::sockopt::set_ipv6_v6only(&v6, true)?;
            rustix::net::sockopt::set_socket_reuseaddr(&v6, true)?;
            if rustix::net::bind_v6(
                &v6,
                &SocketAddrV6::new(std::net::Ipv6Addr::LOCALHOST, 0, 0, 0),
            )
            .is_ok()
            {
                rustix::net::listen(&v6, 4096)?;
                listeners.push(v6);
            }
        }
        Steer::attach(listeners)
    }

    /// The maps and the program, attached to the caller's network
    /// namespace, with `listeners` as nifty's.
    fn attach(listeners: Vec<OwnedFd>) -> std::io::Result<Steer> {
        let ports = crate::sys::bpf_map_create(MAP_ARRAY, 4, 1, PORTS, "nifty_ports")?;
        let socks = crate::sys::bpf_map_create(MAP_SOCKMAP, 4, 8, 2, "nifty_socks")?;
        let direct = crate::sys::bpf_map_create(MAP_SOCKHASH, 4, 8, DIRECT, "nifty_direct")?;
        for (i, l) in listeners.iter().enumerate() {
            let fd = l.as_raw_fd() as u64;
            crate::sys::bpf_map_update(
                socks.as_fd(),
                &(i as u32).to_ne_bytes(),
                &fd.to_ne_bytes(),
            )?;
        }
        let insns = program(ports.as_raw_fd(), direct.as_raw_fd(), socks.as_raw_fd());
        let prog = crate::sys::bpf_prog_load(
            PROG_TYPE_SK_LOOKUP,
            ATTACH_SK_LOOKUP,
            &insns,
            "nifty_steer",
        )?;
        let netns = std::fs::File::open("/proc/self/ns/net")?;
        let link = crate::sys::bpf_link_create(prog.as_fd(), netns.as_fd(), ATTACH_SK_LOOKUP)?;
        Ok(Steer {
            ports,
            direct,
            link: Some(link),
            _keep: vec![socks, prog],
            listeners,
        })
    }

    /// The steering of a systemd host, pinned in `dir` (a bpffs directory:
    /// [`pin_dir`]) so that it outlives the process that made it: opened
    /// if it is there, else made. It has no listeners of nifty's (the
    /// ports are systemd's sockets'); only running instances' own
    /// listening sockets, in `direct`, take their ports' connections
    /// before the kernel's lookup finds systemd's. The caller serialises
    /// the making (a lock of its own). Fails before Linux 5.9, or where
    /// BPF objects cannot be pinned.
    pub fn pinned(dir: &std::path::Path) -> std::io::Result<Steer> {
        if let Ok(steer) = Steer::open_pinned(dir) {
            return Ok(steer);
        }
        // None, or an unfinished one (its maker died): made again.
        unpin(dir)?;
        let steer = Steer::attach(Vec::new())?;
        let pin = || -> std::io::Result<()> {
            let link = steer.link.as_ref().ok_or_else(|| {
                std::io::Error::other("the steering made has no link (a bug of nifty's)")
            })?;
            std::fs::create_dir_all(dir)?;
            for (name, fd) in PINS.iter().zip([&steer.ports, &steer.direct, link]) {
                crate::sys::bpf_obj_pin(fd.as_fd(), &dir.join(name))?;
            }
            Ok(())
        };
        if let Err(e) = pin() {
            let _ = unpin(dir);
            return Err(e);
        }
        Ok(steer)
    }

    /// Steers `port`'s new connections to the listeners (`on`), or no
    /// longer.
    pub fn set(&self, port: u16, on: bool) -> std::io::Result<()> {
        crate::sys::bpf_map_update(
            self.ports.as_fd(),
            &u32::from(port).to_ne_bytes(),
            &[u8::from(on)],
        )
    }

    /// Sends the new connections to `port` of `sock`'s family (IPv4 or
    /// IPv6) straight to `sock`, a listening TCP socket of a running
    /// instance in this network namespace, for as long as it is open (the
    /// kernel takes a closed socket out of the map). The port must be
    /// steered (`set`).
    pub fn direct(&self, port: u16, sock: BorrowedFd<'_>) -> std::io::Result<()> {
        let v6 = match rustix::net::getsockname(sock)? {
            rustix::net::SocketAddrAny::V4(_) => 0,
            rustix::net::SocketAddrAny::V6(_) => 1,
            _ => return Err(std::io::Error::other("not an IP socket")),
        };
        let fd = sock.as_raw_fd() as u64;
        crate::sys::bpf_map_update(
            self.direct.as_fd(),
            &direct_key(port, v6).to_ne_bytes(),
            &fd.to_ne_bytes(),
        )
    }

    /// The steering pinned in `dir`, if it is there, whole.
    pub fn open_pinned(dir: &std::path::Path) -> std::io::Result<Steer> {
        let get = |name: &str| crate::sys::bpf_obj_get(&dir.join(name));
        let (ports, direct) = (get("ports")?, get("direct")?);
        get("link")?;
        Ok(Steer {
            ports,
            direct,
            link: None,
            _keep: Vec::new(),
            listeners: Vec::new(),
        })
    }

    /// Whether nifty's own listeners hold the steered ports (`serve`'s
    /// steering), or systemd's sockets do (a pinned one).
    pub fn holds_ports(&self) -> bool {
        !self.listeners.is_empty()
    }

    /// `port`'s new connections come to nifty's listeners again (to the
    /// kernel's own lookup, on a pinned steering).
    pub fn undirect(&self, port: u16) -> std::io::Result<()> {
        for v6 in [0, 1] {
            crate::sys::bpf_map_delete(self.direct.as_fd(), &direct_key(port, v6).to_ne_bytes())?;
        }
        Ok(())
    }
}

/// The key of a port's own listener in `direct`.
fn direct_key(port: u16, v6: u32) -> u32 {
    u32::from(port) << 1 | v6
}

/// The port a steered connection came in on (its local address).
pub fn local_port(conn: &OwnedFd) -> std::io::Result<u16> {
    match rustix::net::getsockname(conn)? {
        rustix::net::SocketAddrAny::V4(a) => Ok(a.port()),
        rustix::net::SocketAddrAny::V6(a) => Ok(a.port()),
        _ => Err(std::io::Error::other("not an IP socket")),
    }
}

/// The `sk_lookup` program. Reads `struct bpf_sk_lookup`: `family` at 8,
/// `protocol` at 12, `local_port` (host byte order) at 60. A TCP
/// connection to a port whose byte in `ports` is set goes, by
/// `bpf_sk_assign`, to the instance's own listening socket of its family
/// in `direct` if there is one (and it takes it), else to socket 0 of
/// `socks` (IPv4) or 1 (IPv6); anything else passes untouched to the
/// kernel's own lookup.
fn program(ports: i32, direct: i32, socks: i32) -> Vec<u64> {
    const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const ADD_X: u8 = 0x0f; // BPF_ALU64 | BPF_ADD | BPF_X
    const LSH_K: u8 = 0x67; // BPF_ALU64 | BPF_LSH | BPF_K
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const LDX_B: u8 = 0x71; // BPF_LDX | BPF_MEM | BPF_B
    const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
    const LD_DW: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
    const JEQ_K: u8 = 0x15;
    const JNE_K: u8 = 0x55;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const PSEUDO_MAP_FD: u8 = 1;
    const MAP_LOOKUP_ELEM: i32 = 1;
    const SK_RELEASE: i32 = 86;
    const SK_ASSIGN: i32 = 124;
    const IPPROTO_TCP: i32 = 6;
    const AF_INET6: i32 = 10;
    const SK_PASS: i32 = 1;
    let (r0, r1, r2, r3, r6, r7, r8, r10) = (0, 1, 2, 3, 6, 7, 8, 10);
    // Where the jumps land; a jump's offset counts from the next insn.
    const NIFTYS: i16 = 37;
    const PASS: i16 = 50;
    let to = |at: i16, target: i16| target - (at + 1);
    vec![
        insn(MOV_X, r6, r1, 0, 0),                    // 0: r6 = ctx
        insn(LDX_W, r2, r6, 12, 0),                   // 1: r2 = ctx->protocol
        insn(JNE_K, r2, 0, to(2, PASS), IPPROTO_TCP), // 2: not TCP: pass
        insn(LDX_W, r2, r6, 60, 0),                   // 3: r2 = ctx->local_port
        insn(STX_W, r10, r2, -4, 0),                  // 4: fp[-4] = port
        insn(LD_DW, r1, PSEUDO_MAP_FD, 0, ports),     // 5-6: r1 = &ports
        insn(0, 0, 0, 0, 0),
        insn(MOV_X, r2, r10, 0, 0),                // 7: r2 = &fp[-4]
        insn(ADD_K, r2, 0, 0, -4),                 // 8
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),      // 9: r0 = &ports[port]
        insn(JEQ_K, r0, 0, to(10, PASS), 0),       // 10: none: pass
        insn(LDX_B, r2, r0, 0, 0),                 // 11: r2 = ports[port]
        insn(JEQ_K, r2, 0, to(12, PASS), 0),       // 12: not ours: pass
        insn(LDX_W, r2, r6, 8, 0),                 // 13: r2 = ctx->family
        insn(MOV_K, r3, 0, 0, 0),                  // 14: r3 = 0 (IPv4)
        insn(JNE_K, r2, 0, 1, AF_INET6),           // 15
        insn(MOV_K, r3, 0, 0, 1),                  // 16: r3 = 1 (IPv6)
        insn(STX_W, r10, r3, -8, 0),               // 17: fp[-8] = r3
        insn(LDX_W, r2, r10, -4, 0),               // 18: r2 = port
        insn(LSH_K, r2, 0, 0, 1),                  // 19: r2 <<= 1
        insn(ADD_X, r2, r3, 0, 0),                 // 20: r2 += r3
        insn(STX_W, r10, r2, -12, 0),              // 21: fp[-12] = r2
        insn(LD_DW, r1, PSEUDO_MAP_FD, 0, direct), // 22-23: r1 = &direct
        insn(0, 0, 0, 0, 0),
        insn(MOV_X, r2, r10, 0, 0),               // 24: r2 = &fp[-12]
        insn(ADD_K, r2, 0, 0, -12),               // 25
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),     // 26: r0 = direct[key] (a reference)
        insn(JEQ_K, r0, 0, to(27, NIFTYS), 0),    // 27: none: nifty's
        insn(MOV_X, r7, r0, 0, 0),                // 28: r7 = sk
        insn(MOV_X, r1, r6, 0, 0),                // 29: r1 = ctx
        insn(MOV_X, r2, r7, 0, 0),                // 30: r2 = sk
        insn(MOV_K, r3, 0, 0, 0),                 // 31: flags 0
        insn(CALL, 0, 0, 0, SK_ASSIGN),           // 32
        insn(MOV_X, r8, r0, 0, 0),                // 33: r8 = its result
        insn(MOV_X, r1, r7, 0, 0),                // 34: r1 = sk
        insn(CALL, 0, 0, 0, SK_RELEASE),          // 35
        insn(JEQ_K, r8, 0, to(36, PASS), 0),      // 36: assigned: pass
        insn(LD_DW, r1, PSEUDO_MAP_FD, 0, socks), // 37-38: r1 = &socks
        insn(0, 0, 0, 0, 0),
        insn(MOV_X, r2, r10, 0, 0),           // 39: r2 = &fp[-8]
        insn(ADD_K, r2, 0, 0, -8),            // 40
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM), // 41: r0 = socks[key] (a reference)
        insn(JEQ_K, r0, 0, to(42, PASS), 0),  // 42: none: pass
        insn(MOV_X, r7, r0, 0, 0),            // 43: r7 = sk
        insn(MOV_X, r1, r6, 0, 0),            // 44: r1 = ctx
        insn(MOV_X, r2, r7, 0, 0),            // 45: r2 = sk
        insn(MOV_K, r3, 0, 0, 0),             // 46: flags 0
        insn(CALL, 0, 0, 0, SK_ASSIGN),       // 47
        insn(MOV_X, r1, r7, 0, 0),            // 48: r1 = sk
        insn(CALL, 0, 0, 0, SK_RELEASE),      // 49
        insn(MOV_K, r0, 0, 0, SK_PASS),       // 50: pass
        insn(EXIT, 0, 0, 0, 0),               // 51
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_of_the_program_lands_where_it_should() {
        let p = program(3, 4, 5);
        assert_eq!(p.len(), 52);
        let code = |i: usize| p[i].to_ne_bytes()[0];
        let off = |i: usize| i16::from_ne_bytes([p[i].to_ne_bytes()[2], p[i].to_ne_bytes()[3]]);
        let lands = |i: usize| i as i16 + 1 + off(i);
        for i in [2, 10, 12, 36, 42] {
            assert!(matches!(code(i), 0x15 | 0x55), "insn {i} is a jump");
            assert_eq!(lands(i), 50, "jump of insn {i}");
        }
        // No own listener, or one that would not take it: nifty's.
        assert_eq!(lands(27), 37);
        assert_eq!(code(37), 0x18);
        assert_eq!(code(50), 0xb7);
        assert_eq!(code(51), 0x95);
        // The three maps, in order.
        let imm = |i: usize| i32::from_ne_bytes(p[i].to_ne_bytes()[4..8].try_into().unwrap());
        assert_eq!([imm(5), imm(22), imm(37)], [3, 4, 5]);
    }

    #[test]
    fn each_family_of_a_port_has_its_own_key() {
        assert_eq!(direct_key(2201, 0), 4402);
        assert_eq!(direct_key(2201, 1), 4403);
        assert_ne!(direct_key(65535, 1), direct_key(65534, 1));
    }
}
