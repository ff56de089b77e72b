//! The syscall filter installed last before `execve`.
//!
//! A deny list, answered with `EPERM` (a hostile call fails like any unprivileged one;
//! killing would only make crashes harder to tell from attacks): mounting and
//! namespace changes, tracing other processes, kernel modules, kexec, keyrings, BPF and
//! perf, clocks, swap, reboot, file handles, quotas, accounting, the kernel log, I/O
//! ports, `userfaultfd`, dangerous `personality` values, and `clone` with any
//! `CLONE_NEW*` flag, `socket`/`socketpair` of any family but `AF_UNIX`, `AF_INET`,
//! `AF_INET6` and `AF_NETLINK` with `NETLINK_ROUTE` (network namespaces do not cover
//! vsock, and most other families are kernel surface a function never needs), and
//! io_uring (whose `IORING_OP_SOCKET` would create sockets this filter never sees).
//! `clone3` answers `ENOSYS` so libc falls back to `clone`, whose
//! flags a classic BPF filter can inspect (`clone3` passes them in memory).
//!
//! Layout: seccompiler compiles the deny list (one match action for all rules); its
//! program starts with an architecture check that *kills* on mismatch, so we prepend
//! our own instructions that answer `EPERM` first for any foreign architecture (i386
//! via `int 0x80`) and for the x32 ABI (syscall numbers with bit 30 set), and
//! `ENOSYS` for `clone3`. Building on seccompiler keeps the argument comparisons (the
//! fiddly part) in a well-tested crate; the prefix is eight instructions, checked by
//! the interpreter in this module's tests.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000; // AUDIT_ARCH_AARCH64

#[cfg(target_arch = "x86_64")]
const TARGET: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET: TargetArch = TargetArch::aarch64;

/// `__X32_SYSCALL_BIT`: x32 calls enter the x86_64 table with this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;

/// Every `CLONE_NEW*` flag `clone(2)` accepts (`CLONE_NEWTIME` only exists for
/// `unshare`/`clone3`; in `clone` its bit is part of the exit signal).
const CLONE_NEW_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// `personality(2)` values that are harmless (Docker's list): Linux, query, and the
/// 32-bit/uname26 flavours. Anything else (e.g. `ADDR_NO_RANDOMIZE`,
/// `READ_IMPLIES_EXEC`) weakens the address-space hardening.
const PERSONALITY_OK: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The socket families a function may create: local sockets, IP inside its own
/// network namespace, and netlink for `NETLINK_ROUTE` only (glibc's `getaddrinfo` with
/// `AI_ADDRCONFIG` and `getifaddrs`, so Node's `os.networkInterfaces`, read addresses
/// through it).
const SOCKET_FAMILIES_OK: [u64; 4] = [
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_NETLINK as u64,
];

/// Denied without looking at arguments: `(name, number)`.
pub(crate) fn denied_syscalls() -> Vec<(&'static str, i64)> {
    let mut v = vec![
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("pivot_root", libc::SYS_pivot_root),
        ("chroot", libc::SYS_chroot),
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("kcmp", libc::SYS_kcmp),
        ("pidfd_getfd", libc::SYS_pidfd_getfd),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("reboot", libc::SYS_reboot),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("name_to_handle_at", libc::SYS_name_to_handle_at),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("acct", libc::SYS_acct),
        ("quotactl", libc::SYS_quotactl),
        ("quotactl_fd", libc::SYS_quotactl_fd),
        ("syslog", libc::SYS_syslog),
        ("settimeofday", libc::SYS_settimeofday),
        ("clock_settime", libc::SYS_clock_settime),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("adjtimex", libc::SYS_adjtimex),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ("fanotify_init", libc::SYS_fanotify_init),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("move_mount", libc::SYS_move_mount),
        ("open_tree", libc::SYS_open_tree),
        ("fsopen", libc::SYS_fsopen),
        ("fsmount", libc::SYS_fsmount),
        ("fsconfig", libc::SYS_fsconfig),
        ("fspick", libc::SYS_fspick),
        ("vhangup", libc::SYS_vhangup),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        ("iopl", libc::SYS_iopl),
        ("ioperm", libc::SYS_ioperm),
        ("uselib", libc::SYS_uselib),
        ("nfsservctl", libc::SYS_nfsservctl),
    ]);
    v
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

/// The complete program: our prefix, then seccompiler's deny list.
pub(crate) fn program() -> Result<BpfProgram, String> {
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|(_, nr)| (nr, Vec::new()))
        .collect();
    // Rules of one syscall are OR'ed: any CLONE_NEW* bit set means deny.
    let clone_rules = CLONE_NEW_FLAGS
        .iter()
        .map(|&flag| {
            SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(flag), flag)?])
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // Conditions of one rule are AND'ed: deny when the value is none of the safe ones.
    let personality = PERSONALITY_OK
        .iter()
        .map(|&ok| cond(0, SeccompCmpOp::Ne, ok))
        .collect::<Result<Vec<_>, String>>()?;
    rules.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(personality).map_err(|e| e.to_string())?],
    );
    for nr in [libc::SYS_socket, libc::SYS_socketpair] {
        rules.insert(nr, socket_rules()?);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TARGET,
    )
    .map_err(|e| e.to_string())?;
    let body: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let mut prog = prefix();
    prog.extend(body);
    Ok(prog)
}

/// `socket(domain, type, protocol)` and `socketpair` (same first three arguments):
/// denied when the domain is none of [`SOCKET_FAMILIES_OK`], or is netlink with any
/// protocol but `NETLINK_ROUTE`. The kernel reads both as `int`, which is what a
/// `Dword` comparison sees.
fn socket_rules() -> Result<Vec<SeccompRule>, String> {
    let other_family = SOCKET_FAMILIES_OK
        .iter()
        .map(|&ok| cond(0, SeccompCmpOp::Ne, ok))
        .collect::<Result<Vec<_>, String>>()?;
    let netlink_not_route = vec![
        cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?,
        cond(2, SeccompCmpOp::Ne, libc::NETLINK_ROUTE as u64)?,
    ];
    [other_family, netlink_not_route]
        .into_iter()
        .map(|c| SeccompRule::new(c).map_err(|e| e.to_string()))
        .collect()
}

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

fn errno(e: i32) -> u32 {
    SECCOMP_RET_ERRNO | (e as u32 & 0xffff)
}

/// Foreign arch -> EPERM; x32 -> EPERM; clone3 -> ENOSYS; else fall through.
fn prefix() -> Vec<sock_filter> {
    vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, NATIVE_ARCH, 1, 0),
        stmt(BPF_RET_K, errno(libc::EPERM)),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, errno(libc::EPERM)),
        jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, errno(libc::ENOSYS)),
    ]
}

/// Installs `prog` on every thread (TSYNC; init has one anyway). Also sets
/// `PR_SET_NO_NEW_PRIVS`, which seccomp needs and init has already set.
pub(crate) fn install(prog: &BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter_all_threads(prog).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RET_ALLOW: u32 = 0x7fff_0000;
    const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;

    /// A classic-BPF interpreter for the instructions seccompiler and our prefix emit,
    /// run over a `seccomp_data` (nr, arch, args). Panics on anything else so a new
    /// instruction kind cannot silently pass.
    fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes()); // instruction pointer
        for a in args {
            data.extend_from_slice(&a.to_ne_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let ins = &prog[pc];
            pc += 1;
            match ins.code {
                0x20 => {
                    let k = ins.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().expect("4 bytes"));
                }
                0x54 => acc &= ins.k,         // ALU AND K
                0x05 => pc += ins.k as usize, // JA
                0x15 | 0x35 | 0x25 => {
                    let hit = match ins.code {
                        0x15 => acc == ins.k,
                        0x35 => acc >= ins.k,
                        _ => acc > ins.k,
                    };
                    pc += usize::from(if hit { ins.jt } else { ins.jf });
                }
                0x06 => return ins.k,
                other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    fn verdict(nr: i64, args: [u64; 6]) -> u32 {
        run(&program().expect("program"), nr as u32, NATIVE_ARCH, args)
    }

    #[test]
    fn every_denied_syscall_gets_eperm() {
        for (name, nr) in denied_syscalls() {
            assert_eq!(verdict(nr, [0; 6]), errno(libc::EPERM), "{name}");
            assert_eq!(verdict(nr, [u64::MAX; 6]), errno(libc::EPERM), "{name}");
        }
        for name in [
            "mount", "ptrace", "bpf", "unshare", "setns", "keyctl", "fsopen",
        ] {
            assert!(denied_syscalls().iter().any(|(n, _)| *n == name), "{name}");
        }
    }

    #[test]
    fn ordinary_syscalls_are_allowed() {
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_mmap,
            libc::SYS_execve,
            libc::SYS_getpid,
            libc::SYS_connect,
            libc::SYS_futex,
            libc::SYS_exit_group,
        ] {
            assert_eq!(verdict(nr, [0; 6]), RET_ALLOW, "syscall {nr}");
        }
        let tcp = [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
        assert_eq!(verdict(libc::SYS_socket, tcp), RET_ALLOW);
    }

    #[test]
    fn clone_is_denied_only_with_namespace_flags() {
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        let fork = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
        assert_eq!(verdict(libc::SYS_clone, [thread, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(verdict(libc::SYS_clone, [fork, 0, 0, 0, 0, 0]), RET_ALLOW);
        for flag in CLONE_NEW_FLAGS {
            assert_eq!(
                verdict(libc::SYS_clone, [fork | flag, 0, 0, 0, 0, 0]),
                errno(libc::EPERM),
                "flag {flag:#x}"
            );
        }
        assert_eq!(verdict(libc::SYS_clone3, [0; 6]), errno(libc::ENOSYS));
    }

    #[test]
    fn sockets_only_of_the_allowed_families() {
        let stream = libc::SOCK_STREAM as u64 | libc::SOCK_CLOEXEC as u64;
        let dgram = libc::SOCK_DGRAM as u64;
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            let v = |family: i32, ty: u64, proto: i32| {
                verdict(nr, [family as u64, ty, proto as u64, 0, 0, 0])
            };
            assert_eq!(v(libc::AF_UNIX, stream, 0), RET_ALLOW);
            assert_eq!(v(libc::AF_INET, stream, libc::IPPROTO_TCP), RET_ALLOW);
            assert_eq!(v(libc::AF_INET6, dgram, 0), RET_ALLOW);
            assert_eq!(v(libc::AF_NETLINK, dgram, libc::NETLINK_ROUTE), RET_ALLOW);
            for proto in [
                libc::NETLINK_SOCK_DIAG,
                libc::NETLINK_AUDIT,
                libc::NETLINK_KOBJECT_UEVENT,
                libc::NETLINK_GENERIC,
                libc::NETLINK_NETFILTER,
                libc::NETLINK_XFRM,
            ] {
                assert_eq!(
                    v(libc::AF_NETLINK, dgram, proto),
                    errno(libc::EPERM),
                    "{proto}"
                );
            }
            for family in [
                libc::AF_VSOCK,
                libc::AF_PACKET,
                libc::AF_BLUETOOTH,
                libc::AF_ALG,
                libc::AF_KEY,
                libc::AF_CAN,
                libc::AF_TIPC,
                libc::AF_RDS,
                libc::AF_XDP,
                libc::AF_UNSPEC,
                0xffff,
            ] {
                assert_eq!(v(family, stream, 0), errno(libc::EPERM), "family {family}");
            }
            // The kernel reads the domain as an int: high bits do not smuggle one in.
            assert_eq!(
                verdict(nr, [(1 << 32) | libc::AF_VSOCK as u64, stream, 0, 0, 0, 0]),
                errno(libc::EPERM)
            );
        }
        assert_eq!(
            verdict(libc::SYS_io_uring_setup, [8, 0, 0, 0, 0, 0]),
            errno(libc::EPERM)
        );
    }

    #[test]
    fn personality_allows_only_safe_values() {
        for ok in PERSONALITY_OK {
            assert_eq!(
                verdict(libc::SYS_personality, [ok, 0, 0, 0, 0, 0]),
                RET_ALLOW
            );
        }
        for bad in [0x0040000u64, 0x0400000, 0x0200000] {
            assert_eq!(
                verdict(libc::SYS_personality, [bad, 0, 0, 0, 0, 0]),
                errno(libc::EPERM),
                "{bad:#x}"
            );
        }
    }

    #[test]
    fn foreign_arch_and_x32_get_eperm_not_kill() {
        let prog = program().expect("program");
        // i386 getpid (20) and i386 mount (21): both refused, nothing killed.
        assert_eq!(run(&prog, 20, AUDIT_ARCH_I386, [0; 6]), errno(libc::EPERM));
        assert_eq!(run(&prog, 21, AUDIT_ARCH_I386, [0; 6]), errno(libc::EPERM));
        let x32_getpid = libc::SYS_getpid as u32 | X32_SYSCALL_BIT;
        assert_eq!(
            run(&prog, x32_getpid, NATIVE_ARCH, [0; 6]),
            errno(libc::EPERM)
        );
        assert_eq!(
            run(&prog, u32::MAX, NATIVE_ARCH, [0; 6]),
            errno(libc::EPERM)
        );
    }

    #[test]
    fn program_fits_the_kernel_limit() {
        assert!(program().expect("program").len() < 4096);
    }
}
