//! A seccomp program in one piece: a table of what each system call number
//! gets, compiled into a balanced tree of ranges.
//!
//! Why not a filter per rule list, as `seccompiler` builds them: each
//! installed filter is verified, converted and JIT-compiled by the kernel
//! at every container start, and under the task's signal lock the kernel
//! then runs every filter once per system call number to fill its cache of
//! calls that are always allowed (`seccomp_cache_prepare`). With four
//! filters whose allow-list was a linear chain of about 280 comparisons,
//! that was 43% of the CPU of a container's setup process (perf, 1,000
//! starts). One program of ranges (consecutive numbers with the same
//! answer are one leaf: 87 on x86_64) is a quarter of the length (187
//! instructions), and a lookup walks seven comparisons instead of up to
//! 560, for the cache and for every call of the container the cache does
//! not cover.
//!
//! Leaves are a return (allow or an errno) or a short check of the
//! arguments (`clone` flags, `socket` families). Jumps of classic BPF
//! reach 255 instructions; a longer branch goes through a `JA`.

use seccompiler::sock_filter;

/// What one system call number gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// Allowed.
    Allow,
    /// Refused with this errno (0: answered with success, not run).
    Errno(u16),
    /// Refused with EPERM if the first argument has any of these bits, else
    /// allowed (`clone` and namespace flags: low 32 bits, as the kernel
    /// reads legacy `clone` flags).
    DenyIfArg0Bits(u32),
    /// `socket`: EPERM for any of these families (argument 0), and for
    /// family `.1.0` with protocol (argument 2) `.1.1`; else allowed.
    Socket(&'static [u32], (u32, u32)),
}

// Classic BPF opcodes (linux/bpf_common.h).
/// BPF_LD | BPF_W | BPF_ABS.
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x05 | 0x10;
const JMP_JGE_K: u16 = 0x05 | 0x30;
const JMP_JSET_K: u16 = 0x05 | 0x40;
const RET_K: u16 = 0x06;

// struct seccomp_data.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of argument `i`.
const fn off_arg_low(i: u32) -> u32 {
    if cfg!(target_endian = "little") {
        16 + 8 * i
    } else {
        20 + 8 * i
    }
}

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret(leaf: Leaf) -> u32 {
    match leaf {
        Leaf::Allow => RET_ALLOW,
        Leaf::Errno(e) => RET_ERRNO | u32::from(e),
        _ => unreachable!("only returns have a return value"),
    }
}

fn leaf_code(leaf: Leaf) -> Vec<sock_filter> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    match leaf {
        Leaf::Allow | Leaf::Errno(_) => vec![stmt(RET_K, ret(leaf))],
        Leaf::DenyIfArg0Bits(bits) => vec![
            stmt(LD_W_ABS, off_arg_low(0)),
            jump(JMP_JSET_K, bits, 0, 1),
            stmt(RET_K, eperm),
            stmt(RET_K, RET_ALLOW),
        ],
        Leaf::Socket(families, (family, protocol)) => {
            let mut code = vec![stmt(LD_W_ABS, off_arg_low(0))];
            for f in families {
                code.push(jump(JMP_JEQ_K, *f, 0, 1));
                code.push(stmt(RET_K, eperm));
            }
            code.extend([
                jump(JMP_JEQ_K, family, 0, 3),
                stmt(LD_W_ABS, off_arg_low(2)),
                jump(JMP_JEQ_K, protocol, 0, 1),
                stmt(RET_K, eperm),
                stmt(RET_K, RET_ALLOW),
            ]);
            code
        }
    }
}

/// A run of numbers `[start, next run's start)` with one answer.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u32,
    leaf: Leaf,
}

/// The runs of `table` (sorted by number, no duplicates), every number
/// from 0 up covered, `default` between and after the table's entries.
fn runs(table: &[(u32, Leaf)], default: Leaf) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut push = |start: u32, leaf: Leaf| {
        let same = matches!(leaf, Leaf::Allow | Leaf::Errno(_))
            && out.last().is_some_and(|r| r.leaf == leaf);
        if !same {
            out.push(Run { start, leaf });
        }
    };
    let mut next = 0;
    for &(nr, leaf) in table {
        if nr > next {
            push(next, default);
        }
        push(nr, leaf);
        next = nr + 1;
    }
    push(next, default);
    out
}

fn tree(runs: &[Run]) -> Vec<sock_filter> {
    if let [one] = runs {
        return leaf_code(one.leaf);
    }
    let mid = runs.len() / 2;
    let (left, right) = (tree(&runs[..mid]), tree(&runs[mid..]));
    let k = runs[mid].start;
    let mut code = Vec::with_capacity(left.len() + right.len() + 2);
    match u8::try_from(left.len()) {
        Ok(skip) => code.push(jump(JMP_JGE_K, k, skip, 0)),
        Err(_) => {
            code.push(jump(JMP_JGE_K, k, 0, 1));
            code.push(stmt(JMP_JA, left.len() as u32));
        }
    }
    code.extend(left);
    code.extend(right);
    code
}

/// Compiles `table` (system call number, answer; any order) into one
/// program for `audit_arch`: another architecture (a 32-bit call on a
/// 64-bit kernel) kills the process, a number not in the table gets
/// `default`.
pub fn compile(audit_arch: u32, table: &[(u32, Leaf)], default: Leaf) -> Vec<sock_filter> {
    let mut table = table.to_vec();
    table.sort_by_key(|(nr, _)| *nr);
    table.dedup_by_key(|(nr, _)| *nr);
    let mut code = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JMP_JEQ_K, audit_arch, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
    ];
    code.extend(tree(&runs(&table, default)));
    code
}

/// Runs `prog` on a `struct seccomp_data` of (nr, arch, args), as the
/// kernel would, for the instructions [`compile`] emits. For tests.
#[doc(hidden)]
pub fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let load = |off: u32| -> u32 {
        match off {
            OFF_NR => nr,
            OFF_ARCH => arch,
            o if (16..64).contains(&o) && o % 4 == 0 => {
                let a = args[((o - 16) / 8) as usize];
                let low_first = cfg!(target_endian = "little");
                if (o % 8 == 0) == low_first {
                    a as u32
                } else {
                    (a >> 32) as u32
                }
            }
            o => panic!("load of offset {o}"),
        }
    };
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let i = &prog[pc];
        pc += 1;
        let cond = |hit: bool| if hit { i.jt } else { i.jf } as usize;
        match i.code {
            LD_W_ABS => acc = load(i.k),
            RET_K => return i.k,
            JMP_JA => pc += i.k as usize,
            JMP_JEQ_K => pc += cond(acc == i.k),
            JMP_JGE_K => pc += cond(acc >= i.k),
            JMP_JSET_K => pc += cond(acc & i.k != 0),
            c => panic!("opcode {c:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARCH: u32 = 0xc000_003e;

    fn answer(prog: &[sock_filter], nr: u32) -> u32 {
        run(prog, nr, ARCH, [0; 6])
    }

    #[test]
    fn every_number_gets_its_table_answer_and_others_the_default() {
        let table = [
            (0, Leaf::Allow),
            (1, Leaf::Allow),
            (2, Leaf::Errno(1)),
            (7, Leaf::Allow),
            (8, Leaf::Errno(0)),
            (9, Leaf::Allow),
            (300, Leaf::Allow),
        ];
        let p = compile(ARCH, &table, Leaf::Errno(38));
        for nr in 0..1000 {
            let want = table
                .iter()
                .find(|(n, _)| *n == nr)
                .map_or(RET_ERRNO | 38, |(_, l)| ret(*l));
            assert_eq!(answer(&p, nr), want, "nr {nr}");
        }
        assert_eq!(answer(&p, 0x4000_0000), RET_ERRNO | 38, "x32 bit");
        assert_eq!(answer(&p, u32::MAX), RET_ERRNO | 38);
        assert_eq!(run(&p, 0, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
    }

    #[test]
    fn long_branches_go_through_a_ja() {
        // Alternating answers: one run per number, a tree of 2,000 leaves,
        // whose top left branch is far longer than 255 instructions.
        let table: Vec<(u32, Leaf)> = (0..2000)
            .map(|n| {
                (
                    n,
                    if n % 2 == 0 {
                        Leaf::Allow
                    } else {
                        Leaf::Errno(13)
                    },
                )
            })
            .collect();
        let p = compile(ARCH, &table, Leaf::Errno(38));
        assert!(p.iter().any(|i| i.code == JMP_JA));
        for nr in 0..2100 {
            let want = match nr {
                n if n >= 2000 => RET_ERRNO | 38,
                n if n % 2 == 0 => RET_ALLOW,
                _ => RET_ERRNO | 13,
            };
            assert_eq!(answer(&p, nr), want, "nr {nr}");
        }
    }

    #[test]
    fn argument_checks() {
        let table = [
            (56, Leaf::DenyIfArg0Bits(0x1000_0000 | 0x80)),
            (41, Leaf::Socket(&[40], (16, 15))),
        ];
        let p = compile(ARCH, &table, Leaf::Allow);
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let call = |nr, a0: u64, a2: u64| run(&p, nr, ARCH, [a0, 0, a2, 0, 0, 0]);
        assert_eq!(call(56, 0x11, 0), RET_ALLOW);
        assert_eq!(call(56, 0x1000_0011, 0), eperm);
        assert_eq!(call(56, 0x80, 0), eperm);
        // High bits of a legacy clone's flags are not the kernel's.
        assert_eq!(call(56, 0x1_0000_0000, 0), RET_ALLOW);
        assert_eq!(call(41, 2, 0), RET_ALLOW);
        assert_eq!(call(41, 40, 0), eperm);
        assert_eq!(call(41, 16, 0), RET_ALLOW);
        assert_eq!(call(41, 16, 15), eperm);
        assert_eq!(call(41, 2, 15), RET_ALLOW);
        assert_eq!(call(40, 40, 0), RET_ALLOW);
    }
}
