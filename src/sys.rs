//! The only module with `unsafe`: thin wrappers over the few system calls
//! that rustix does not offer safely, each with its SAFETY note.
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// In a forked child: waits for one byte on `go` unless the parent process
/// (`parent`, a pidfd opened before the fork) exits first. EOF on `go` is
/// not enough to notice the parent's death: children forked meanwhile by
/// the parent's other threads hold copies of its write end.
pub fn wait_for_parent(go: BorrowedFd<'_>, parent: BorrowedFd<'_>) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [
            PollFd::new(&go, PollFlags::IN),
            PollFd::new(&parent, PollFlags::IN),
        ];
        match poll(&mut fds, -1) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
            Ok(_) => {}
        }
        if fds[0].revents().contains(PollFlags::IN) {
            let mut b = [0u8; 1];
            return matches!(rustix::io::read(go, &mut b), Ok(1));
        }
        return false;
    }
}

/// dup2(2) for the child's standard streams.
pub fn dup2(old: RawFd, new: RawFd) -> std::io::Result<()> {
    // SAFETY: dup2 only manipulates the fd table; `new` is one of 0..=2,
    // which the caller means to replace.
    if unsafe { libc::dup2(old, new) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface of the calling thread's network namespace
/// up (ioctl SIOCSIFFLAGS on "lo"), as `ip link set lo up` does; a new
/// network namespace has it down. Allocation-free: it runs in a vfork
/// child.
pub fn loopback_up() -> std::io::Result<()> {
    use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
    let sock = socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
    // SAFETY: an all-zero ifreq is a valid value of this plain C struct.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: `sock` is an open socket and `req` a valid, initialised
    // ifreq that outlives the call; SIOCSIFFLAGS only reads it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct clone_args` of clone3(2) (Linux 5.3; `cgroup` from 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Why [`spawn_into_cgroup`] did not start a program.
#[derive(Debug)]
pub enum SpawnError {
    /// clone3 itself failed (ENOSYS before 5.3, E2BIG or EINVAL before
    /// CLONE_INTO_CGROUP in 5.7): the caller may fall back.
    Clone(std::io::Error),
    /// The child failed before its exec (its error).
    Child(std::io::Error),
}

/// Starts a child that is born in the cgroup v2 directory `cgroup`
/// (clone3 with CLONE_INTO_CGROUP, Linux 5.7), sharing this process's
/// memory until its exec (see [`clone_into`]): no migration after the
/// fact, whose write to `cgroup.procs` waits for an RCU grace period (15 ms
/// in a trace) when no other migration ran just before.
/// The child runs `child`, which makes system calls only (on memory
/// prepared before) and ends in an exec; if it returns, its error reaches
/// the caller through a close-on-exec pipe and the child exits. Returns the
/// child's PID once it has exec'd; the caller reaps it.
pub fn spawn_into_cgroup(
    cgroup: BorrowedFd<'_>,
    child: &mut dyn FnMut() -> std::io::Error,
) -> Result<i32, SpawnError> {
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| SpawnError::Clone(std::io::Error::from_raw_os_error(e.raw_os_error())))?;
    let pid = clone_into(cgroup, child, wr.as_raw_fd())?;
    drop(wr);
    let mut buf = [0u8; 4];
    let n = loop {
        match rustix::io::read(&rd, &mut buf) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.unwrap_or(0),
        }
    };
    if n == 4 {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
        }
        return Err(SpawnError::Child(std::io::Error::from_raw_os_error(
            i32::from_ne_bytes(buf),
        )));
    }
    Ok(pid)
}

/// What the child of [`clone_into`] runs: the caller's closure, then its
/// error (as an errno) to the pipe `wr` and `_exit`.
fn child_job(run: &mut dyn FnMut() -> std::io::Error, wr: RawFd) -> ! {
    let e = run();
    let code = e.raw_os_error().unwrap_or(libc::EIO);
    // The pipe's write end, open in this child (its copy of the fd table).
    let _ = rustix::io::write(borrow_fd(wr), &code.to_ne_bytes());
    exit_child(127)
}

/// clone3 with CLONE_INTO_CGROUP (5.7) through [`clone3_vfork`]: the
/// child shares this process's memory until it execs, on a stack of its
/// own, so no page table is copied and no page faults copy-on-write after
/// (in `nifty serve`, with tens of MiB mapped and other threads running, a
/// fork cost about 1 ms of CPU and TLB shootdowns on every CPU). Returns
/// when the child has exec'd or exited.
#[cfg(target_arch = "x86_64")]
fn clone_into(
    cgroup: BorrowedFd<'_>,
    run: &mut dyn FnMut() -> std::io::Error,
    wr: RawFd,
) -> Result<i32, SpawnError> {
    // The child's stack: system calls and a few frames of Rust.
    let mut stack = Stack::new(64 << 10);
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    clone3_vfork(
        &mut args,
        &mut stack,
        &mut || -> i32 { child_job(&mut *run, wr) },
        None,
    )
    .map_err(SpawnError::Clone)
}

/// The entry of a [`clone3_vfork`] child, on its own stack: runs the
/// closure and exits with what it returns (if it returns: it should exec).
#[cfg(target_arch = "x86_64")]
extern "C" fn vfork_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` points to the `&mut dyn FnMut` on the frame of
    // `clone3_vfork`, which waits (CLONE_VFORK) until this child has
    // exec'd or exited, or (`until`) until it says it no longer uses it or
    // them, so it and its captures are alive and unchanged here.
    let f = unsafe { &mut *arg.cast::<&mut dyn FnMut() -> i32>() };
    exit_child(f())
}

/// clone3(2) with `args` plus CLONE_VM|CLONE_VFORK, the child on `stack`,
/// as posix_spawn does with clone: the child shares this process's memory
/// until it execs (no page table copied), and this thread sleeps until it
/// has exec'd or exited. The child runs `f` and exits with what it
/// returns. clone3 is what takes CLONE_INTO_CGROUP (5.7), which glibc's
/// clone() cannot pass: hence the few instructions here that put the
/// child on its stack (x86_64; elsewhere nifty forks, or clones without
/// CLONE_INTO_CGROUP). Returns the child's PID.
///
/// With `until` (see [`spawn_vm_until`]), no CLONE_VFORK: the kernel
/// clears that word when the child execs or exits (CLONE_CHILD_CLEARTID),
/// and this thread sleeps, before it returns, until the word is no longer
/// [`HELD_ARMED`]: the child read `f` at its start, long before.
///
/// Contract (as for [`clone_vm`]): `f` makes system calls only, on memory
/// prepared before, no allocation or lock, and ends by exec or exit.
#[cfg(target_arch = "x86_64")]
fn clone3_vfork(
    args: &mut CloneArgs,
    stack: &mut [u8],
    mut f: &mut dyn FnMut() -> i32,
    until: Option<&AtomicU32>,
) -> std::io::Result<i32> {
    let low = stack.as_mut_ptr() as u64;
    // The kernel starts the child at stack + stack_size: 16-byte aligned,
    // as the ABI wants before a call.
    let size = ((low + stack.len() as u64) & !15) - low;
    if size < 4096 {
        return Err(std::io::Error::other("clone3_vfork: stack too small"));
    }
    args.flags |= libc::CLONE_VM as u64;
    match until {
        Some(word) => {
            word.store(HELD_ARMED, Ordering::SeqCst);
            args.flags |= libc::CLONE_CHILD_CLEARTID as u64;
            args.child_tid = word.as_ptr() as u64;
        }
        None => args.flags |= libc::CLONE_VFORK as u64,
    }
    args.stack = low;
    args.stack_size = size;
    let arg = &mut f as *mut &mut dyn FnMut() -> i32 as *mut libc::c_void;
    let ret: i64;
    // SAFETY: clone3 makes a child that shares this memory (CLONE_VM) and
    // starts on `stack` (its top, aligned), while this thread sleeps until
    // the child has exec'd or exited (CLONE_VFORK), or, with `until`, in
    // the wait below, before this frame ends, so `stack`, `args` and `f`
    // (on this frame) stay valid and unchanged for it. In the parent
    // the syscall returns the PID or -errno in rax and clobbers only rcx
    // and r11; r12 and r13 hold `f`'s address and the entry for the child,
    // which calls `vfork_entry(arg)` with a zeroed frame pointer and never
    // returns (exec or `_exit`; `ud2` traps if it did). The child keeps the
    // contract above.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") vfork_entry as extern "C" fn(*mut libc::c_void) -> !,
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        return Err(std::io::Error::from_raw_os_error(-ret as i32));
    }
    if let Some(word) = until {
        // Woken by the child's store, or by the kernel's clear at its exec
        // or exit (a shared futex wake: so this wait is not a private one).
        while word.load(Ordering::SeqCst) == HELD_ARMED {
            let _ = rustix::thread::futex::wait(
                word,
                rustix::thread::futex::Flags::empty(),
                HELD_ARMED,
                None,
            );
        }
    }
    Ok(ret as i32)
}

/// Elsewhere: not available (the callers fall back).
#[cfg(not(target_arch = "x86_64"))]
fn clone3_vfork(
    _: &mut CloneArgs,
    _: &mut [u8],
    _: &mut dyn FnMut() -> i32,
    _: Option<&AtomicU32>,
) -> std::io::Result<i32> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// [`spawn_vfork`] through clone3, the child born in the cgroup v2
/// directory `cgroup` (CLONE_INTO_CGROUP, 5.7): no migration, whose write
/// to `cgroup.procs` can wait for an RCU grace period. An error is
/// clone3's (before 5.7, or not x86_64): the caller may fall back to
/// [`spawn_vfork`] and a write to `cgroup.procs`.
pub fn spawn_vfork_into(
    flags: i32,
    cgroup: BorrowedFd<'_>,
    stack: &mut [u8],
    f: &mut dyn FnMut() -> i32,
) -> std::io::Result<(i32, OwnedFd)> {
    clone3_pidfd(flags, Some(cgroup), stack, f, None)
}

/// [`clone3_vfork`] with a pidfd (CLONE_PIDFD), SIGCHLD at its end, and
/// born in `cgroup` if given (CLONE_INTO_CGROUP).
fn clone3_pidfd(
    flags: i32,
    cgroup: Option<BorrowedFd<'_>>,
    stack: &mut [u8],
    f: &mut dyn FnMut() -> i32,
    until: Option<&AtomicU32>,
) -> std::io::Result<(i32, OwnedFd)> {
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: flags as u32 as u64 | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    let pid = clone3_vfork(&mut args, stack, f, until)?;
    // SAFETY: with CLONE_PIDFD the kernel stored a new, owned fd.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

/// What `word` of [`spawn_vm_until`] holds until its child says it is
/// [`HELD_READY`] (or is gone: 0).
pub const HELD_ARMED: u32 = 1;
/// What the child of [`spawn_vm_until`] stores in `word` once it no longer
/// uses its caller's frames; see [`held_ready`].
pub const HELD_READY: u32 = 2;

/// [`spawn_vfork_into`] (in `cgroup`, if given) whose caller goes on before
/// the child execs: this thread sleeps until the child has stored
/// [`HELD_READY`] in `word` ([`held_ready`]), or has exec'd or exited
/// (then the kernel stores 0 there: CLONE_CHILD_CLEARTID, and wakes it).
/// clone3 on x86_64 only (5.3; CLONE_INTO_CGROUP 5.7): elsewhere, or if the
/// kernel refuses, an error, and the caller spawns otherwise.
///
/// Contract: as [`spawn_vfork`]'s until the child says it is ready; from
/// then on, until `word` reads 0, the child uses only `stack`, `word` and
/// memory the caller keeps alive and unchanged as long (never the frames
/// that `f` borrowed from).
pub fn spawn_vm_until(
    flags: i32,
    cgroup: Option<BorrowedFd<'_>>,
    stack: &mut [u8],
    word: &AtomicU32,
    f: &mut dyn FnMut() -> i32,
) -> std::io::Result<(i32, OwnedFd)> {
    clone3_pidfd(flags, cgroup, stack, f, Some(word))
}

/// write(2) to fd 2, without the lock of `std::io::stderr` (for a child
/// that shares this process's memory); what does not go is lost.
pub fn write_stderr(msg: &[u8]) {
    // SAFETY: write(2) reads `msg.len()` bytes of a valid slice; fd 2 is
    // not owned by anything here that could close it meanwhile.
    let _ = unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// In the child of [`spawn_vm_until`]: tells its caller to go on. After
/// this, the caller's frames may be gone.
pub fn held_ready(word: &AtomicU32) {
    word.store(HELD_READY, Ordering::SeqCst);
    let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), 1);
}

/// Elsewhere: clone3 with CLONE_INTO_CGROUP as fork(2) (a copy of this
/// address space).
#[cfg(not(target_arch = "x86_64"))]
fn clone_into(
    cgroup: BorrowedFd<'_>,
    run: &mut dyn FnMut() -> std::io::Error,
    wr: RawFd,
) -> Result<i32, SpawnError> {
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM is fork(2): the child gets a copy of
    // this address space and returns 0 on its copy of this stack. There it
    // runs only `run` (system calls on memory prepared before the call,
    // no allocation or lock) and leaves by exec or _exit, never returning
    // into the caller's frames. `args` is valid for the call.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(SpawnError::Clone(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        child_job(run, wr);
    }
    Ok(pid as i32)
}

/// Installs a seccomp filter on the calling thread; an error is its errno
/// (nothing allocated: safe in a child that shares its parent's memory).
pub fn apply_seccomp(prog: &seccompiler::BpfProgram) -> std::io::Result<()> {
    seccompiler::apply_filter(prog).map_err(|e| match e {
        seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => io,
        _ => std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// A program to exec, its argv and envp made C arrays before the fork.
pub struct Exec {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
}

impl Exec {
    /// `argv[0]` is the path.
    pub fn new(argv: &[String], env: &[(String, String)]) -> std::io::Result<Exec> {
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| cstring(a.as_str()))
            .collect::<Result<_, _>>()?;
        let path = argv
            .first()
            .cloned()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no program"))?;
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}")))
            .collect::<std::io::Result<_>>()?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        Ok(Exec {
            path,
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            argv,
            envp,
        })
    }

    /// The program's path (`argv[0]`).
    pub fn path(&self) -> &std::ffi::CStr {
        &self.path
    }

    /// Its arguments, `argv[0]` first.
    pub fn argv(&self) -> &[CString] {
        &self.argv
    }

    /// Its environment, as `KEY=VALUE`.
    pub fn envp(&self) -> &[CString] {
        &self.envp
    }

    /// Execs it; returns only on failure.
    pub fn run(&self) -> std::io::Error {
        execve(&self.path, &self.argv_ptrs, &self.envp_ptrs)
    }
}

/// A C string of `s` (a path, an argument, a setting); a NUL byte in it is
/// an `InvalidInput` error.
pub fn cstring(s: impl Into<Vec<u8>>) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a NUL byte in a path, argument or setting",
        )
    })
}

// SAFETY: the pointers of an `Exec` point into the C strings it owns, on
// the heap (they do not move with it), and nothing changes any of them
// after `Exec::new`: sharing it or sending it to another thread shares
// only memory that is read.
unsafe impl Send for Exec {}
// SAFETY: as for `Send` above: an `Exec` is never written after it is made.
unsafe impl Sync for Exec {}

/// execve(2) with NULL-terminated argument and environment arrays prepared
/// before a fork. Returns only on failure.
pub fn execve(path: &CStr, argv: &[*const c_char], envp: &[*const c_char]) -> std::io::Error {
    debug_assert!(argv.last().is_some_and(|p| p.is_null()));
    debug_assert!(envp.last().is_some_and(|p| p.is_null()));
    // SAFETY: `path` is a valid C string; `argv` and `envp` are
    // NULL-terminated arrays of pointers to C strings that the caller keeps
    // alive (they live in the parent's prepared plan, copied by the fork).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    std::io::Error::last_os_error()
}

/// Sets every signal's action to the default and unblocks all, as a
/// new process starts (exec resets handlers but keeps ignored signals
/// ignored, and the mask). Allocation-free: it runs in a vfork child.
pub fn default_signals() {
    // The kernel's `struct sigaction` (libc's wrapper refuses the signals
    // it keeps for itself, which the caller's parent may still ignore).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let none: u64 = 0;
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction with SIG_DFL and an empty mask installs
            // no handler; it reads only `dfl` (the kernel's layout, mask
            // size 8), which lives on this frame.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
    // SAFETY: rt_sigprocmask(SIG_SETMASK) reads only `none` (size 8).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
}

/// Whether a TCP connection can still send and has sent no data yet
/// (TCP_INFO: `tcpi_state` established or half-closed by the peer, and
/// `tcpi_bytes_sent`, Linux 4.19, 0). False when the kernel cannot say, for
/// a socket that is not TCP, and for a connection reset or closed.
/// Allocation-free: it runs in a vfork child.
pub fn tcp_awaits_first_bytes(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which
    // lives on this frame, and the length it wrote into `len`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // An older kernel fills a shorter struct: the field must be in it.
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_sent) + 8;
    // The kernel's TCP_ESTABLISHED and TCP_CLOSE_WAIT (net/tcp_states.h).
    let open = matches!(info.tcpi_state, 1 | 8);
    r == 0 && len as usize >= end && open && info.tcpi_bytes_sent == 0
}

/// A timeout for poll(2) or epoll_wait(2), in whole milliseconds rounded
/// up (at most `i32::MAX`): rounded down, the last fraction of a
/// millisecond before a deadline is a busy loop of zero-timeout waits.
pub fn poll_timeout_ms(wait: std::time::Duration) -> i32 {
    i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
}

/// _exit(2): leave a forked child without running the parent's atexit
/// handlers or flushing its buffers.
pub fn exit_child(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// Marks every fd from `first` on close-on-exec (close_range(2)).
pub fn cloexec_from(first: u32) -> std::io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on fds.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Closes the calling process's `fd`: for a child that shares this
/// process's memory but not its fd table (its copy of a parent's fd, which
/// stays open in the parent), and then only execs or exits.
pub fn close_copy(fd: RawFd) {
    // SAFETY: close(2) on the calling child's own fd table (no
    // CLONE_FILES): the parent's fd stays open, and the child never uses
    // the object of this memory that owns it again (exec or _exit).
    let _ = unsafe { libc::close(fd) };
}

/// Borrows a raw fd that stays open for the rest of the process (the
/// forked child's pipe ends, which it never closes before exec or exit).
pub fn borrow_fd(fd: RawFd) -> BorrowedFd<'static> {
    assert!(fd >= 0);
    // SAFETY: the caller passes an fd that is open and is not closed for the
    // rest of the process's life (the child exits or execs, which ends it).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Runs `command` with `hook` executed in the child between fork and exec,
/// and returns it running.
///
/// The hook must restrict itself to system calls: the child of a fork may
/// not take locks that another thread of the parent held.
pub fn spawn_with_hook(
    command: &mut std::process::Command,
    hook: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook only makes raw system calls (setsid, ioctl, setns,
    // write, chdir, setgroups/setgid/setuid) on fds and C strings it owns;
    // it does not allocate or lock.
    unsafe { command.pre_exec(hook) };
    command.spawn()
}

/// rustix's Uid/Gid from raw numbers (read from a container's passwd).
pub fn ids(uid: u32, gid: u32) -> (rustix::process::Uid, rustix::process::Gid) {
    assert!(
        uid != u32::MAX && gid != u32::MAX,
        "uid/gid -1 is not an ID"
    );
    // SAFETY: from_raw is unsafe only because -1 means "no change" to some
    // calls; passwd IDs that are u32::MAX are rejected above.
    unsafe {
        (
            rustix::process::Uid::from_raw(uid),
            rustix::process::Gid::from_raw(gid),
        )
    }
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Turns the detached mount `fd` (from `open_tree(OPEN_TREE_CLONE)`) into
/// an idmapped mount that shows files through the mapping of the user
/// namespace `userns` (mount_setattr(2) with MOUNT_ATTR_IDMAP).
pub fn mount_setattr_idmap(fd: BorrowedFd<'_>, userns: BorrowedFd<'_>) -> std::io::Result<()> {
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    mount_setattr(
        fd,
        &MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        },
    )
}

/// Sets mount attributes (`MOUNT_ATTR_RDONLY`, `_NOSUID`, ...) on the mount
/// `fd` refers to, e.g. a detached bind made by `open_tree`.
pub fn mount_setattr_flags(
    fd: BorrowedFd<'_>,
    set: rustix::mount::MountAttrFlags,
) -> std::io::Result<()> {
    mount_setattr(
        fd,
        &MountAttr {
            attr_set: u64::from(set.bits()),
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        },
    )
}

fn mount_setattr(fd: BorrowedFd<'_>, attr: &MountAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid mount_attr that outlives the call, its size
    // is passed, and the path is an empty C string used with AT_EMPTY_PATH.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops every capability whose bit is not set in `keep` from the bounding
/// set (PR_CAPBSET_DROP), so that no process of the container can ever gain
/// it, and empties the ambient set.
pub fn drop_bounding_caps(keep: u64) -> std::io::Result<()> {
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with PR_CAPBSET_DROP takes an integer; EINVAL
        // means the kernel has no such capability, which ends the list.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointer.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The stack of a child that shares this process's memory ([`clone_vm`],
/// [`spawn_vfork`], [`spawn_vfork_into`]), taken from those kept from
/// earlier children when one of the same size is free. In `nifty serve`
/// every start took a fresh 256 KiB one, which the allocator zeroed byte
/// by byte (a chunk of its heap, once freed mmap'd chunks of that size had
/// raised its threshold): 5% of `serve`'s CPU in a burst of cold starts
/// (README, "On demand, measured"). A kept stack is
/// only ever written by children, whose frames are dead once they have
/// exec'd or exited; its pages stay mapped.
pub struct Stack(Box<[u8]>);

/// Stacks kept for reuse, at most [`STACKS_KEPT`].
static SPARE_STACKS: std::sync::Mutex<Vec<Box<[u8]>>> = std::sync::Mutex::new(Vec::new());
/// As many as starts run at once (`fleet::workers` on a small host), and
/// their sessions'.
const STACKS_KEPT: usize = 16;

impl Stack {
    /// A stack of `size` bytes.
    pub fn new(size: usize) -> Stack {
        let kept = SPARE_STACKS.lock().ok().and_then(|mut spare| {
            let i = spare.iter().position(|s| s.len() == size)?;
            Some(spare.swap_remove(i))
        });
        Stack(kept.unwrap_or_else(|| vec![0u8; size].into_boxed_slice()))
    }
}

impl std::ops::Deref for Stack {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for Stack {
    /// Keeps it for the next child. Dropped only once its child is gone or
    /// exec'd, as [`clone_vm`]'s contract wants of its owner.
    fn drop(&mut self) {
        let stack = std::mem::take(&mut self.0);
        if let Ok(mut spare) = SPARE_STACKS.lock() {
            if spare.len() < STACKS_KEPT {
                spare.push(stack);
            }
        }
    }
}

extern "C" fn trampoline(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `&mut dyn FnMut` that `clone_vm` stored
    // at the top of the child's stack, which the caller keeps alive (and
    // `f`'s captures with it) until the child has exited or exec'd.
    let f = unsafe { &mut *(arg as *mut &mut dyn FnMut() -> i32) };
    f()
}

/// Runs `f` in a child process that shares this process's memory
/// (CLONE_VM: no page tables copied, no copy-on-write faults), on `stack`,
/// with extra clone `flags` (namespaces, CLONE_VFORK). Returns the child's
/// PID and a pidfd.
///
/// Contract: `f` makes raw system calls only, on memory that stays valid and
/// unchanged while the child runs; without CLONE_VFORK the caller must keep
/// `stack` and `f`'s captures alive until the child has exited (waitpid).
pub fn clone_vm(
    flags: i32,
    stack: &mut [u8],
    f: &mut dyn FnMut() -> i32,
) -> std::io::Result<(i32, OwnedFd)> {
    type Slot<'a> = &'a mut dyn FnMut() -> i32;
    let mut pidfd: RawFd = -1;
    // `f` itself (a fat pointer) is kept at the top of `stack`, not on this
    // frame: without CLONE_VFORK this function returns, and its frame is
    // reused, before the child may have read it. The child's stack grows
    // down from just below it, 16-byte aligned.
    let end = stack.as_mut_ptr() as usize + stack.len();
    let slot = (end - std::mem::size_of::<Slot<'_>>()) & !15;
    if slot < stack.as_mut_ptr() as usize + 1024 {
        return Err(std::io::Error::other("clone_vm: stack too small"));
    }
    // SAFETY: `slot` lies inside `stack` (checked above), is aligned for a
    // pointer, and nothing else uses those bytes: the child's stack starts
    // below them.
    unsafe { std::ptr::write(slot as *mut Slot<'_>, f) };
    let top = slot;
    // SAFETY: the child runs `trampoline` on `stack`, which the caller
    // keeps alive as the contract says, with `arg` pointing to `f` inside
    // it (see above). CLONE_PIDFD stores an fd in `pidfd`.
    let pid = unsafe {
        libc::clone(
            trampoline,
            top as *mut libc::c_void,
            flags | libc::CLONE_VM | libc::CLONE_PIDFD | libc::SIGCHLD,
            slot as *mut libc::c_void,
            &mut pidfd as *mut RawFd,
        )
    };
    if pid == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new, owned fd.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

/// Makes the calling process not dumpable (prctl PR_SET_DUMPABLE 0, a
/// flag of its memory, so of every process that shares it): no process
/// without CAP_SYS_PTRACE over the host's user namespace may trace it or
/// open its /proc/<pid>/mem, maps, environ, fds or exe, even with its UID.
/// The kernel sets the flag anew from the `fs.suid_dumpable` sysctl at
/// every change of IDs, so a process that changes them calls this after.
pub fn not_dumpable() -> rustix::io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
}

/// Takes the IDs `uid`/`gid` (of a container's user namespace the caller
/// has joined) for the calling thread, with no supplementary group, and
/// makes it not dumpable again right after (see `not_dumpable`): at
/// `fs.suid_dumpable` 1 the change would leave it traceable by a tenant's
/// process of the same IDs, while its memory is still nifty's. For a
/// forked child between fork and exec (system calls only).
pub fn take_ids(uid: rustix::process::Uid, gid: rustix::process::Gid) -> rustix::io::Result<()> {
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    rustix::thread::set_thread_res_uid(uid, uid, uid)?;
    not_dumpable()
}

/// Powers off the PID namespace `pidns` (an open `/proc/<pid>/ns/pid`) as
/// a poweroff inside it would (Linux 3.4): a child made in it calls
/// reboot(2), and the kernel kills the namespace's init, whose parent sees
/// it end by SIGINT (a poweroff), and with it every process of the
/// namespace. Needs CAP_SYS_BOOT over the namespace's user namespace and
/// CAP_SYS_ADMIN to join it (host root has both); the child does nothing
/// else, and the calling thread's next children are made in its own PID
/// namespace again. The calling process is made non-dumpable first: the
/// child shares its memory, and while it lives in the container's PID
/// namespace nothing there may read or write that memory through ptrace
/// or /proc/<pid>/mem, even with the same UID (`--no-userns`).
pub fn power_off_pid_ns(pidns: BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
    not_dumpable()?;
    let own = rustix::fs::open(
        "/proc/thread-self/ns/pid",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    move_into_link_name_space(pidns, Some(LinkNameSpaceType::ProcessID))?;
    let mut stack = Stack::new(16 << 10);
    let made = spawn_vfork(0, &mut stack, &mut || {
        // SAFETY: reboot(2) with its magic numbers and no argument: in a
        // PID namespace other than the host's it ends that namespace, this
        // child with it; it returns only on failure.
        unsafe {
            libc::syscall(
                libc::SYS_reboot,
                libc::LINUX_REBOOT_MAGIC1,
                libc::LINUX_REBOOT_MAGIC2,
                libc::LINUX_REBOOT_CMD_POWER_OFF,
                0usize,
            )
        };
        std::io::Error::last_os_error().raw_os_error().unwrap_or(1)
    });
    let back = move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&own),
        Some(LinkNameSpaceType::ProcessID),
    );
    let (pid, _pidfd) = made?;
    back?;
    let status = rustix::process::waitpid(
        rustix::process::Pid::from_raw(pid),
        rustix::process::WaitOptions::empty(),
    )?;
    match status.and_then(|s| s.exit_status()) {
        Some(0) => Ok(()),
        Some(e) => Err(std::io::Error::from_raw_os_error(e as i32)),
        None => Err(std::io::Error::other("the reboot(2) child was killed")),
    }
}

/// [`clone_vm`] with CLONE_VFORK: returns when the child has exec'd or
/// exited, so `f` may borrow anything of the caller's.
pub fn spawn_vfork(
    flags: i32,
    stack: &mut [u8],
    f: &mut dyn FnMut() -> i32,
) -> std::io::Result<(i32, OwnedFd)> {
    clone_vm(flags | libc::CLONE_VFORK, stack, f)
}

/// Re-executes this process from a sealed in-memory copy of its own
/// binary, unless it already runs from one; returns only on error.
///
/// A process that enters a container runs nifty's binary until it execs
/// the container's program, and a program of the tenant's can make the
/// kernel run that binary again from inside (a script whose interpreter is
/// `/proc/self/exe`), then write to it through `/proc/<pid>/exe` (the
/// CVE-2019-5736 class). From a memfd with every seal set, there is no
/// host file to reach and nothing to write: the copy cannot change.
/// `NIFTY_EXE` keeps the binary's real path for those who need it (the
/// systemd unit's ExecStart).
pub fn reexec_sealed() -> std::io::Error {
    use rustix::fs::{MemfdFlags, SealFlags};
    use std::os::unix::ffi::OsStrExt;
    // Each error names its call.
    let at = |call: &'static str| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{call}: {e}"))
    };
    let run = || -> std::io::Result<std::convert::Infallible> {
        let path = std::fs::read_link("/proc/self/exe").map_err(at("readlink(/proc/self/exe)"))?;
        let mut src = std::fs::File::open("/proc/self/exe").map_err(at("open(/proc/self/exe)"))?;
        let mfd =
            rustix::fs::memfd_create("nifty", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .map_err(|e| at("memfd_create")(e.into()))?;
        let mut dst = std::fs::File::from(mfd);
        // Plain reads and writes, not `io::copy` (which splices): pages a
        // splice still holds make F_SEAL_WRITE fail with EBUSY.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut src, &mut buf).map_err(at("read(/proc/self/exe)"))?;
            if n == 0 {
                break;
            }
            std::io::Write::write_all(&mut dst, &buf[..n]).map_err(at("write(memfd)"))?;
        }
        // The kernel refuses F_SEAL_WRITE with EBUSY while any page of the
        // file has an extra reference (memfd_wait_for_pins, which waits
        // only briefly): under memory pressure a page can still be held by
        // reclaim or an LRU batch. Ask again for a while.
        let seals = SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE;
        let mut tries = 0;
        loop {
            match rustix::fs::fcntl_add_seals(&dst, seals) {
                Ok(()) => break,
                Err(rustix::io::Errno::BUSY) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => return Err(at("fcntl(F_ADD_SEALS)")(e.into())),
            }
        }
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in an argument")
            })
        };
        let argv = std::env::args_os()
            .map(|a| cstr(a.as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut envp = std::env::vars_os()
            .filter(|(k, _)| k != "NIFTY_EXE")
            .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<std::io::Result<Vec<_>>>()?;
        envp.push(cstr(
            &[b"NIFTY_EXE=", path.as_os_str().as_bytes()].concat(),
        )?);
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain([std::ptr::null()])
                .collect::<Vec<_>>()
        };
        let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
        // SAFETY: `dst` is an open memfd; argv and envp are NULL-terminated
        // arrays of pointers to C strings that outlive the call (it returns
        // only on failure).
        unsafe { libc::fexecve(dst.as_raw_fd(), argv_p.as_ptr(), envp_p.as_ptr()) };
        Err(at("fexecve")(std::io::Error::last_os_error()))
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Does this process run from a memfd (see [`reexec_sealed`])?
pub fn running_sealed() -> bool {
    std::fs::read_link("/proc/self/exe")
        .is_ok_and(|p| p.as_os_str().as_encoded_bytes().starts_with(b"/memfd:"))
}

/// The path of nifty's binary on the host, also when running sealed.
pub fn exe_path() -> std::io::Result<std::path::PathBuf> {
    if running_sealed() {
        if let Some(p) = std::env::var_os("NIFTY_EXE") {
            return Ok(p.into());
        }
    }
    std::env::current_exe()
}

/// Landlock (landlock(7)): the ABI version the kernel offers (0: none).
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a NULL attribute and size 0, the call only returns the
    // ABI version (or an error); no memory is read or written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(r).unwrap_or(0)
}

/// `struct landlock_ruleset_attr` (ABI 6 layout; the size passed tells
/// the kernel which fields it may read).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_net_port_attr`.
#[repr(C, packed)]
struct NetPortAttr {
    allowed_access: u64,
    port: u64,
}

/// A Landlock ruleset that, with `ports` (ABI >= 4), handles TCP binds,
/// `ports` being the only TCP ports a process under it may bind, and, if
/// `scope_abstract` (ABI >= 6), scopes abstract unix sockets.
pub fn landlock_ruleset(ports: Option<&[u16]>, scope_abstract: bool) -> std::io::Result<OwnedFd> {
    const ACCESS_NET_BIND_TCP: u64 = 1;
    const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
    const RULE_NET_PORT: u32 = 2;
    let attr = RulesetAttr {
        handled_access_fs: 0,
        handled_access_net: if ports.is_some() {
            ACCESS_NET_BIND_TCP
        } else {
            0
        },
        scoped: if scope_abstract {
            SCOPE_ABSTRACT_UNIX_SOCKET
        } else {
            0
        },
    };
    let size = if scope_abstract {
        std::mem::size_of::<RulesetAttr>()
    } else {
        // ABI 4/5 know only the first two fields.
        2 * std::mem::size_of::<u64>()
    };
    // SAFETY: `attr` is a valid landlock_ruleset_attr of at least `size`
    // bytes that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size,
            0u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    for &port in ports.unwrap_or_default() {
        let rule = NetPortAttr {
            allowed_access: ACCESS_NET_BIND_TCP,
            port: u64::from(port),
        };
        // SAFETY: `rule` is a valid landlock_net_port_attr that outlives
        // the call; `fd` is a ruleset fd.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                fd.as_raw_fd(),
                RULE_NET_PORT,
                &rule as *const NetPortAttr,
                0u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// Puts the calling thread under the Landlock ruleset `fd` (no_new_privs
/// must be set). Raw system call only: safe in a vfork'd child.
pub fn landlock_restrict_self(fd: BorrowedFd<'_>) -> rustix::io::Result<()> {
    // SAFETY: plain system call on an fd; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) };
    if r < 0 {
        return Err(rustix::io::Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    Ok(())
}

/// Makes system call `nr` with every argument 0 and returns its errno (0
/// if it succeeded): a probe of what a seccomp filter answers, for tests.
/// Only for calls that do nothing with zero arguments (they fail on the
/// missing pointers or sizes, or are refused first).
#[doc(hidden)]
pub fn probe_syscall(nr: i64) -> i32 {
    // SAFETY: all arguments are 0, so no memory of this process is passed
    // to the kernel; callers name calls that change nothing with them.
    let r = unsafe { libc::syscall(nr, 0usize, 0usize, 0usize, 0usize, 0usize, 0usize) };
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

/// The head of `union bpf_attr` for BPF_PROG_LOAD (fields up to
/// `expected_attach_type`, Linux 4.17; the size passed tells the kernel
/// which fields it may read, the rest it takes as zero).
#[repr(C)]
#[derive(Default)]
struct BpfProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
struct BpfProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// bpf(2) with `attr`, a `union bpf_attr` head the kernel reads (of its
/// own size); the caller makes sure what it points to outlives the call.
/// Returns what the call returned (an fd for loads).
fn bpf<T>(cmd: i32, attr: &T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, initialized value of its size for the
    // duration of the call; the kernel reads at most that many bytes, and
    // every pointer in it is the caller's to keep valid (see above).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

const BPF_MAP_CREATE: i32 = 0;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_PROG_LOAD: i32 = 5;
const BPF_OBJ_PIN: i32 = 6;
const BPF_OBJ_GET: i32 = 7;
const BPF_PROG_ATTACH: i32 = 8;
const BPF_LINK_CREATE: i32 = 28;

/// `union bpf_attr` for BPF_MAP_CREATE (through `map_name`, Linux 4.15).
#[repr(C)]
#[derive(Default)]
struct BpfMapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct BpfMapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_LINK_CREATE (its head).
#[repr(C)]
struct BpfLinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET.
#[repr(C)]
struct BpfObj {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Pins the BPF object `fd` (a map, program or link: links from Linux 5.7)
/// at `path` in a bpffs (bpf(2), BPF_OBJ_PIN): it lives on, without an
/// open fd, until the path is removed.
pub fn bpf_obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let attr = BpfObj {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &attr).map(|_| ())
}

/// Opens the BPF object pinned at `path` (bpf(2), BPF_OBJ_GET).
pub fn bpf_obj_get(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let attr = BpfObj {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes a BPF map (bpf(2), BPF_MAP_CREATE).
pub fn bpf_map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> std::io::Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let attr = BpfMapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_name,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets `key` to `value` in a BPF map (bpf(2), BPF_MAP_UPDATE_ELEM, any
/// flag: BPF_ANY). The slices must be the map's key and value sizes.
pub fn bpf_map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    let attr = BpfMapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    // `key` and `value` outlive the call; the kernel reads the map's sizes.
    bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
}

/// Gives the heap's free memory back to the kernel (glibc's
/// `malloc_trim`; elsewhere nothing): after a burst of short-lived
/// allocations, such as reading every record of a state root once.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and only walks glibc's own
    // arenas, under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Removes `key` from a BPF map (bpf(2), BPF_MAP_DELETE_ELEM); a key
/// that is not there is not an error.
pub fn bpf_map_delete(map: BorrowedFd<'_>, key: &[u8]) -> std::io::Result<()> {
    let attr = BpfMapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    // `key` outlives the call; the kernel reads the map's key size.
    match bpf(BPF_MAP_DELETE_ELEM, &attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// The cookie of the network namespace a socket was made in
/// (SO_NETNS_COOKIE, Linux 5.14). Unlike SIOCGSKNS it needs no
/// CAP_NET_ADMIN, which a systemd service may lack.
pub fn socket_netns_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`, a live
    // u64 of that size, and `len` back.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The network namespace a socket was made in (ioctl SIOCGSKNS, Linux
/// 4.9), as a new fd.
pub fn socket_netns(sock: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd (or -1).
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS as _) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Links the BPF program `prog` to `target` (a network namespace fd for
/// BPF_SK_LOOKUP) at `attach_type` (bpf(2), BPF_LINK_CREATE, Linux 5.7);
/// the program stays attached while the returned link fd is open.
pub fn bpf_link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    let attr = BpfLinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Loads a BPF program of `prog_type` for `attach_type` (bpf(2),
/// BPF_PROG_LOAD). On a verifier refusal the error carries the
/// verifier's log.
pub fn bpf_prog_load(
    prog_type: u32,
    attach_type: u32,
    insns: &[u64],
    name: &str,
) -> std::io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let load = |log: Option<&mut [u8]>| {
        let mut attr = BpfProgLoad {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: attach_type,
            ..Default::default()
        };
        if let Some(buf) = log {
            attr.log_level = 1;
            attr.log_size = buf.len() as u32;
            attr.log_buf = buf.as_mut_ptr() as u64;
        }
        // The instructions, the license and the log buffer `attr` points
        // to outlive the call, and the log's size is the buffer's.
        let fd = bpf(BPF_PROG_LOAD, &attr)?;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    };
    load(None).or_else(|e: std::io::Error| {
        if e.raw_os_error() != Some(libc::EACCES) && e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        let mut log = vec![0u8; 8192];
        load(Some(&mut log)).map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            std::io::Error::new(e.kind(), format!("{e}; verifier: {}", text.trim()))
        })
    })
}

/// Attaches the BPF program `prog` to the cgroup `cgroup` (a cgroup v2
/// directory fd) at `attach_type`, with `flags` (bpf(2),
/// BPF_PROG_ATTACH).
pub fn bpf_prog_attach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> std::io::Result<()> {
    let attr = BpfProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: flags,
    };
    // Both fds are borrowed open fds.
    bpf(BPF_PROG_ATTACH, &attr).map(drop)
}

/// Dies quietly of SIGPIPE like other Unix filters when the reader of
/// stdout goes away (`nifty list | head`), instead of failing a write.
/// Only for verbs that print and touch no container.
pub fn default_sigpipe() {
    // SAFETY: resetting a signal's disposition to SIG_DFL installs no
    // handler and has no memory effects; called before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Btrfs ioctls (linux/btrfs.h), for the disk store of `volume`.
const BTRFS_IOCTL_MAGIC: u64 = 0x94;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct BtrfsVolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_qgroup_limit_args` (with its `btrfs_qgroup_limit`).
#[repr(C)]
#[derive(Default)]
struct BtrfsQgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct BtrfsInoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
#[derive(Default)]
struct BtrfsQuotaCtlArgs {
    cmd: u64,
    status: u64,
}

const BTRFS_IOC_SUBVOL_CREATE: u64 = ioc(1, 14, std::mem::size_of::<BtrfsVolArgs>());
const BTRFS_IOC_SNAP_DESTROY: u64 = ioc(1, 15, std::mem::size_of::<BtrfsVolArgs>());
const BTRFS_IOC_INO_LOOKUP: u64 = ioc(3, 18, std::mem::size_of::<BtrfsInoLookupArgs>());
const BTRFS_IOC_FS_INFO: u64 = ioc(2, 31, 1024);
const BTRFS_IOC_QUOTA_CTL: u64 = ioc(3, 40, std::mem::size_of::<BtrfsQuotaCtlArgs>());
const BTRFS_IOC_QGROUP_LIMIT: u64 = ioc(2, 43, std::mem::size_of::<BtrfsQgroupLimitArgs>());
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

fn vol_args(name: &str) -> std::io::Result<Box<BtrfsVolArgs>> {
    let mut a = Box::new(BtrfsVolArgs {
        fd: 0,
        name: [0; 4088],
    });
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= a.name.len() || b.contains(&0) || b.contains(&b'/') {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    a.name[..b.len()].copy_from_slice(b);
    Ok(a)
}

/// Creates subvolume `name` in the btrfs directory `dir`.
pub fn btrfs_subvol_create(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    let mut a = vol_args(name)?;
    // SAFETY: `a` is a valid, NUL-terminated btrfs_ioctl_vol_args that
    // lives across the call; the kernel reads only it.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SUBVOL_CREATE as _, &mut *a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes subvolume `name` of the btrfs directory `dir`, contents and all.
pub fn btrfs_subvol_destroy(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    let mut a = vol_args(name)?;
    // SAFETY: as in btrfs_subvol_create.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SNAP_DESTROY as _, &mut *a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The ID of the subvolume whose root `subvol` is.
pub fn btrfs_subvol_id(subvol: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut a = Box::new(BtrfsInoLookupArgs {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; 4080],
    });
    // SAFETY: `a` is a valid btrfs_ioctl_ino_lookup_args that lives across
    // the call; the kernel fills in treeid and name within it.
    let r = unsafe { libc::ioctl(subvol.as_raw_fd(), BTRFS_IOC_INO_LOOKUP as _, &mut *a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(a.treeid)
}

/// The filesystem UUID of the btrfs that `fd` is on.
pub fn btrfs_fsid(fd: BorrowedFd<'_>) -> std::io::Result<[u8; 16]> {
    let mut buf = Box::new([0u8; 1024]);
    // SAFETY: `buf` is 1024 bytes, the size of btrfs_ioctl_fs_info_args
    // encoded in the request; it lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_FS_INFO as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut id = [0u8; 16];
    // fsid follows max_id and num_devices (two u64).
    id.copy_from_slice(&buf[16..32]);
    Ok(id)
}

/// Turns quota groups on for the btrfs that `fd` is on.
pub fn btrfs_quota_enable(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut a = BtrfsQuotaCtlArgs {
        cmd: 1, // BTRFS_QUOTA_CTL_ENABLE
        status: 0,
    };
    // SAFETY: `a` is a valid btrfs_ioctl_quota_ctl_args living across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_QUOTA_CTL as _, &mut a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Limits what the subvolume `subvol` refers to, in bytes (`None`: no limit).
pub fn btrfs_qgroup_limit(subvol: BorrowedFd<'_>, max_rfer: Option<u64>) -> std::io::Result<()> {
    let mut a = BtrfsQgroupLimitArgs {
        // 0: the qgroup of the subvolume the fd is in.
        qgroupid: 0,
        flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
        // All ones clears the limit.
        max_rfer: max_rfer.unwrap_or(u64::MAX),
        ..Default::default()
    };
    // SAFETY: `a` is a valid btrfs_ioctl_qgroup_limit_args living across the call.
    let r = unsafe { libc::ioctl(subvol.as_raw_fd(), BTRFS_IOC_QGROUP_LIMIT as _, &mut a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct fsxattr` (linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_FSGETXATTR: u64 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u64 = 0x401c_5820;
const FS_XFLAG_PROJINHERIT: u32 = 0x200;

/// Puts the directory `dir` in project `projid`, inherited by everything
/// made in it (XFS and ext4 project quotas).
pub fn set_project(dir: BorrowedFd<'_>, projid: u32) -> std::io::Result<()> {
    let mut a = FsXattr::default();
    // SAFETY: `a` is a valid struct fsxattr (28 bytes, the size in the
    // request) living across both calls.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    a.projid = projid;
    a.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: as above.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_FSSETXATTR as _, &a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const Q_GETQUOTA: i32 = 0x80_0007;
const Q_SETQUOTA: i32 = 0x80_0008;
const PRJQUOTA: i32 = 2;
const QIF_BLIMITS: u32 = 1;
const QIF_ILIMITS: u32 = 4;

const fn qcmd(cmd: i32, kind: i32) -> i32 {
    (cmd << 8) | (kind & 0xff)
}

/// `quotactl(cmd, special, projid, q)` for project quotas: the one place
/// that calls it.
fn project_quotactl(
    cmd: i32,
    special: &std::path::Path,
    projid: u32,
    q: &mut libc::dqblk,
) -> std::io::Result<()> {
    let dev = CString::new(special.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `dev` is NUL-terminated and `q` a valid, exclusively borrowed
    // struct if_dqblk; both live across the call, which reads or fills it.
    let r = unsafe {
        libc::quotactl(
            qcmd(cmd, PRJQUOTA),
            dev.as_ptr(),
            projid as i32,
            (q as *mut libc::dqblk).cast(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the hard limits of project `projid` on the filesystem of block
/// device `special`: bytes (rounded up to KiB) and inodes; `None`: none.
pub fn set_project_quota(
    special: &std::path::Path,
    projid: u32,
    bytes: Option<u64>,
    inodes: Option<u64>,
) -> std::io::Result<()> {
    let kib = bytes.map_or(0, |b| b.div_ceil(1024));
    let mut q = libc::dqblk {
        dqb_bhardlimit: kib,
        dqb_bsoftlimit: kib,
        dqb_curspace: 0,
        dqb_ihardlimit: inodes.unwrap_or(0),
        dqb_isoftlimit: inodes.unwrap_or(0),
        dqb_curinodes: 0,
        dqb_btime: 0,
        dqb_itime: 0,
        dqb_valid: QIF_BLIMITS | QIF_ILIMITS,
    };
    project_quotactl(Q_SETQUOTA, special, projid, &mut q)
}

/// Bytes and inodes project `projid` uses on the filesystem of `special`.
pub fn project_usage(special: &std::path::Path, projid: u32) -> std::io::Result<(u64, u64)> {
    // SAFETY: zeroed is a valid dqblk (integers only).
    let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
    project_quotactl(Q_GETQUOTA, special, projid, &mut q)?;
    Ok((q.dqb_curspace, q.dqb_curinodes))
}

/// The project a file or directory is in.
pub fn get_project(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    let mut a = FsXattr::default();
    // SAFETY: `a` is a valid struct fsxattr living across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut a) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(a.projid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_arrays_end_in_null() {
        let e = Exec::new(
            &["/sbin/init".into(), "-x".into()],
            &[("PATH".into(), "/bin".into())],
        )
        .unwrap();
        assert_eq!(e.path().to_str(), Ok("/sbin/init"));
        assert_eq!(e.argv_ptrs.len(), 3);
        assert_eq!(e.argv_ptrs[1], e.argv()[1].as_ptr());
        assert!(e.argv_ptrs[2].is_null() && e.envp_ptrs[1].is_null());
        assert_eq!(e.envp()[0].to_str(), Ok("PATH=/bin"));
        let nul = Exec::new(&["/bin/a\0b".into()], &[]).err().unwrap();
        assert_eq!(nul.kind(), std::io::ErrorKind::InvalidInput);
        assert!(Exec::new(&[], &[]).is_err());
    }

    /// Starts a child without CLONE_VFORK from a frame that is gone when
    /// the child runs.
    #[inline(never)]
    fn start(stack: &mut [u8], f: &mut dyn FnMut() -> i32) -> i32 {
        clone_vm(0, stack, f).map(|(pid, _)| pid).unwrap()
    }

    /// Writes over the stack where `start`'s frame was.
    #[inline(never)]
    fn scribble() -> u8 {
        let mut junk = [0xA5u8; 8192];
        std::hint::black_box(&mut junk);
        junk[100]
    }

    #[test]
    fn a_poll_timeout_rounds_up_to_whole_milliseconds() {
        use std::time::Duration;
        assert_eq!(poll_timeout_ms(Duration::ZERO), 0);
        assert_eq!(poll_timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_micros(999)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_micros(1000)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_micros(1001)), 2);
        assert_eq!(poll_timeout_ms(Duration::from_secs(1 << 40)), i32::MAX);
    }

    #[test]
    fn a_clone_vm_child_finds_its_function_after_the_caller_returned() {
        // Its function used to be read from clone_vm's frame, which the
        // caller reuses at once: the child jumped to garbage.
        for i in 0..200 {
            let mut stack = vec![0u8; 16 << 10];
            let code = i % 100;
            let mut f = || code;
            let pid = start(&mut stack, &mut f);
            std::hint::black_box(scribble());
            let st = rustix::process::waitpid(
                rustix::process::Pid::from_raw(pid),
                rustix::process::WaitOptions::empty(),
            )
            .unwrap()
            .unwrap();
            assert_eq!(
                st.exit_status(),
                Some((i % 100) as u32),
                "child {i}: {st:?}"
            );
        }
    }

    /// A held child: runs on after its caller went on (whose frame is
    /// gone and written over), until it is let go; then the kernel clears
    /// its word at its exec.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_held_child_runs_on_after_its_caller_and_clears_its_word_at_exec() {
        static GO: AtomicU32 = AtomicU32::new(0);
        let mut stack = vec![0u8; 64 << 10];
        let word = Box::new(AtomicU32::new(0));
        let exec = Exec::new(&["/bin/true".to_string()], &[]).unwrap();
        let w: &AtomicU32 = &word;
        let e = &exec;
        /// What the child does once held: with its arguments only, as
        /// the contract of `spawn_vm_until` wants.
        #[inline(never)]
        fn held(w: &AtomicU32, e: &Exec) -> i32 {
            held_ready(w);
            while GO.load(Ordering::SeqCst) == 0 {
                let _ = rustix::thread::futex::wait(
                    &GO,
                    rustix::thread::futex::Flags::PRIVATE,
                    0,
                    None,
                );
            }
            let _ = e.run();
            2
        }
        #[inline(never)]
        fn start(stack: &mut [u8], w: &AtomicU32, e: &Exec) -> i32 {
            // Captures on this frame: read before the child says it is held.
            let code = 7;
            let mut f = || match code {
                7 => held(w, e),
                _ => 1,
            };
            spawn_vm_until(0, None, stack, w, &mut f).unwrap().0
        }
        let pid = start(&mut stack, w, e);
        std::hint::black_box(scribble());
        assert_eq!(w.load(Ordering::SeqCst), HELD_READY, "it says it is held");
        // Held: it has not exec'd.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(w.load(Ordering::SeqCst), HELD_READY);
        GO.store(1, Ordering::SeqCst);
        let _ = rustix::thread::futex::wake(&GO, rustix::thread::futex::Flags::PRIVATE, 1);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while w.load(Ordering::SeqCst) != 0 {
            assert!(
                std::time::Instant::now() < end,
                "its word was never cleared"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let st = rustix::process::waitpid(
            rustix::process::Pid::from_raw(pid),
            rustix::process::WaitOptions::empty(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(st.exit_status(), Some(0), "it exec'd /bin/true: {st:?}");
        drop(stack);
    }

    #[test]
    fn a_connection_awaits_its_first_bytes_until_it_sends_or_closes() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert!(tcp_awaits_first_bytes(server.as_fd()));
        server.write_all(b"SSH-2.0-test\r\n").unwrap();
        assert!(!tcp_awaits_first_bytes(server.as_fd()));
        drop(client);
        // Half-closed by the peer: it can still send.
        let other = std::net::TcpStream::connect(addr).unwrap();
        let (third, _) = listener.accept().unwrap();
        other.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(tcp_awaits_first_bytes(third.as_fd()));
        // Reset by the peer (SO_LINGER 0): nothing more to wait for.
        let late = std::net::TcpStream::connect(addr).unwrap();
        let (fourth, _) = listener.accept().unwrap();
        rustix::net::sockopt::set_socket_linger(&late, Some(std::time::Duration::ZERO)).unwrap();
        drop(late);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tcp_awaits_first_bytes(fourth.as_fd()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the reset never arrived"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Not a TCP socket: the kernel cannot say.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!tcp_awaits_first_bytes(a.as_fd()));
    }
}
