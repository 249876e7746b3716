//! Steering without NAT: a BPF `sk_lookup` program hands new connections
//! for the guarded ports to the guard's listening sockets
//! (`intercept.mode = "sk_lookup"`).
//!
//! The kernel runs the program when a SYN finds no established socket and
//! looks for a listener (only then: the packets of an established
//! connection never meet it). It picks the guard's socket for the
//! guarded ports, so the accepted socket's local address is the address
//! and port the client asked for, as under TPROXY, and neither the guard's
//! connections nor anybody else's need connection tracking or a NAT rule.
//! With the bypass, a source address in the kernel's copy of the pass
//! cache is left to the kernel's own lookup: its connection reaches the MTA
//! listening on the port, without the guard.
//!
//! Not steered:
//! - other ports, other interfaces (when a list is given);
//! - a connection from this host to itself (source address = destination
//!   address): the guard's own connections to the MTA, and local
//!   submissions;
//! - a family the guard has no listener of.
//!
//! The program is generated at start from the ports and interfaces (a few
//! dozen instructions, checked by the kernel's verifier when loaded) and
//! loaded with the `bpf(2)` system call: the five commands used here are
//! all a loader library would add, and libbpf or aya would need a BPF
//! compiler or a C library for them. The link holds the program on the
//! network namespace while the [`Steer`] lives: when the guard exits (or
//! dies), connections go where the kernel would send them without it,
//! to the MTA's own socket.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

// bpf(2) commands.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;

const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

// Helpers.
const MAP_LOOKUP_ELEM: i32 = 1;
const KTIME_GET_NS: i32 = 5;
const SK_RELEASE: i32 = 86;
const SK_ASSIGN: i32 = 124;

const SK_PASS: i32 = 1;

// `struct bpf_sk_lookup` offsets (include/uapi/linux/bpf.h).
const CTX_FAMILY: i16 = 8;
const CTX_REMOTE_IP4: i16 = 16;
const CTX_REMOTE_IP6: i16 = 20;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_IP6: i16 = 44;
const CTX_LOCAL_PORT: i16 = 60;
const CTX_INGRESS_IFINDEX: i16 = 64;

/// The socket map's slots: the guard's listener of each family.
const SLOT_V4: u32 = 0;
const SLOT_V6: u32 = 1;

/// What to steer.
#[derive(Debug, Clone)]
pub struct SteerConfig {
    /// Destination ports whose new connections go to the guard.
    pub ports: Vec<u16>,
    /// Interfaces (by index) whose connections are steered; empty: all.
    pub interfaces: Vec<u32>,
    /// The size of the kernel's copy of the pass cache per family; 0: no
    /// bypass.
    pub passes: u32,
}

/// The attached program and its maps. Dropping it detaches the program.
#[derive(Debug)]
pub struct Steer {
    _link: OwnedFd,
    _prog: OwnedFd,
    _sockets: Map,
    passed4: Option<Map>,
    passed6: Option<Map>,
}

impl Steer {
    /// Loads the program and attaches it to this thread's network
    /// namespace, steering to `v4` and `v6` (a listener of that family,
    /// or one socket of a `SO_REUSEPORT` group: the kernel then picks in
    /// the group as for any connection). Needs `CAP_BPF` and
    /// `CAP_NET_ADMIN` (root).
    pub fn attach(
        config: &SteerConfig,
        v4: Option<&impl AsFd>,
        v6: Option<&impl AsFd>,
    ) -> io::Result<Steer> {
        if config.ports.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sk_lookup: no port to steer",
            ));
        }
        let sockets = Map::create(BPF_MAP_TYPE_SOCKMAP, 4, 8, 2)?;
        for (slot, socket) in [
            (SLOT_V4, v4.map(AsFd::as_fd)),
            (SLOT_V6, v6.map(AsFd::as_fd)),
        ] {
            if let Some(socket) = socket {
                let fd = u64::try_from(socket.as_raw_fd()).map_err(|_| bad_fd())?;
                sockets.update(&slot.to_ne_bytes(), &fd.to_ne_bytes())?;
            }
        }
        let (passed4, passed6) = if config.passes > 0 {
            (
                Some(Map::create(BPF_MAP_TYPE_LRU_HASH, 4, 8, config.passes)?),
                Some(Map::create(BPF_MAP_TYPE_LRU_HASH, 16, 8, config.passes)?),
            )
        } else {
            (None, None)
        };
        let code = program(
            config,
            sockets.fd.as_raw_fd(),
            passed4
                .as_ref()
                .zip(passed6.as_ref())
                .map(|(a, b)| (a.fd.as_raw_fd(), b.fd.as_raw_fd())),
        )?;
        let prog = prog_load(&code)?;
        let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
        let link = link_create(&prog, &netns)?;
        Ok(Steer {
            _link: link,
            _prog: prog,
            _sockets: sockets,
            passed4,
            passed6,
        })
    }

    /// Whether the program leaves passed addresses to the kernel.
    pub fn bypasses(&self) -> bool {
        self.passed4.is_some()
    }

    /// `ip` passed: its new connections skip the guard for `ttl`.
    pub fn pass(&self, ip: IpAddr, ttl: Duration) -> io::Result<()> {
        let until =
            monotonic_ns()?.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
        match (ip, &self.passed4, &self.passed6) {
            (IpAddr::V4(v4), Some(map), _) => map.update(&v4.octets(), &until.to_ne_bytes()),
            (IpAddr::V6(v6), _, Some(map)) => match v6.to_ipv4_mapped() {
                Some(v4) => self.pass(IpAddr::V4(v4), ttl),
                None => map.update(&v6.octets(), &until.to_ne_bytes()),
            },
            _ => Ok(()),
        }
    }

    /// `ip` meets the guard again from its next connection on.
    pub fn unpass(&self, ip: IpAddr) -> io::Result<()> {
        let done = match (ip, &self.passed4, &self.passed6) {
            (IpAddr::V4(v4), Some(map), _) => map.delete(&v4.octets()),
            (IpAddr::V6(v6), _, Some(map)) => match v6.to_ipv4_mapped() {
                Some(v4) => return self.unpass(IpAddr::V4(v4)),
                None => map.delete(&v6.octets()),
            },
            _ => Ok(()),
        };
        match done {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

/// The index of the interface `name`.
pub fn ifindex(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
}

/// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
fn monotonic_ns() -> io::Result<u64> {
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
    let secs = u64::try_from(now.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

fn bad_fd() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "sk_lookup: not a descriptor")
}

// --- the program ------------------------------------------------------

/// One BPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `dst_reg:4, src_reg:4` are bit-fields: their order in the byte is the
/// target's.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    #[cfg(target_endian = "little")]
    let regs = (src << 4) | (dst & 0x0f);
    #[cfg(target_endian = "big")]
    let regs = (dst << 4) | (src & 0x0f);
    Insn {
        code,
        regs,
        off,
        imm,
    }
}

// Opcodes.
const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const LDX_DW: u8 = 0x79; // dst = *(u64 *)(src + off)
const STX_W: u8 = 0x63; // *(u32 *)(dst + off) = src
const ST_W: u8 = 0x62; // *(u32 *)(dst + off) = imm
const MOV_X: u8 = 0xbf;
const MOV_K: u8 = 0xb7;
const ADD_K: u8 = 0x07;
const JA: u8 = 0x05;
const JEQ_K: u8 = 0x15;
const JEQ_X: u8 = 0x1d;
const JNE_X: u8 = 0x5d;
const JLT_X: u8 = 0xad; // unsigned <
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R6: u8 = 6;
const R7: u8 = 7;
const R10: u8 = 10;

/// Jump targets, resolved when the program is done.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Label {
    Pass,
    PortOk,
    IfaceOk,
    V4,
    V6,
    Foreign6,
    Steer4,
    Steer6,
    Assign,
}

#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    labels: Vec<(Label, usize)>,
    jumps: Vec<(usize, Label)>,
}

impl Asm {
    fn op(&mut self, i: Insn) {
        self.code.push(i);
    }

    fn label(&mut self, l: Label) {
        self.labels.push((l, self.code.len()));
    }

    /// `code` is a jump opcode: `if dst OP (src or imm) goto l`.
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, l: Label) {
        self.jumps.push((self.code.len(), l));
        self.op(insn(code, dst, src, 0, imm));
    }

    fn map(&mut self, dst: u8, fd: i32) {
        self.op(insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd));
        self.op(insn(0, 0, 0, 0, 0));
    }

    fn call(&mut self, helper: i32) {
        self.op(insn(CALL, 0, 0, 0, helper));
    }

    fn finish(mut self) -> io::Result<Vec<Insn>> {
        for (at, l) in std::mem::take(&mut self.jumps) {
            let target = self
                .labels
                .iter()
                .find(|(name, _)| *name == l)
                .map(|(_, pos)| *pos)
                .ok_or_else(|| too_long(format!("no label {l:?}")))?;
            // Relative to the next instruction.
            let off = target as i64 - at as i64 - 1;
            self.code[at].off = i16::try_from(off)
                .map_err(|_| too_long(format!("a jump of {off} instructions")))?;
        }
        Ok(self.code)
    }
}

fn too_long(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("sk_lookup: cannot build the program: {what}"),
    )
}

/// The program (see the module's doc). `passed`: the maps of the bypass.
fn program(
    config: &SteerConfig,
    sockets: i32,
    passed: Option<(i32, i32)>,
) -> io::Result<Vec<Insn>> {
    let mut a = Asm::default();
    a.op(insn(MOV_X, R6, R1, 0, 0));
    // The port asked for (host order).
    a.op(insn(LDX_W, R2, R6, CTX_LOCAL_PORT, 0));
    for port in &config.ports {
        a.jump(JEQ_K, R2, 0, i32::from(*port), Label::PortOk);
    }
    a.jump(JA, 0, 0, 0, Label::Pass);
    a.label(Label::PortOk);
    if !config.interfaces.is_empty() {
        a.op(insn(LDX_W, R2, R6, CTX_INGRESS_IFINDEX, 0));
        for ifindex in &config.interfaces {
            a.jump(JEQ_K, R2, 0, *ifindex as i32, Label::IfaceOk);
        }
        a.jump(JA, 0, 0, 0, Label::Pass);
    }
    a.label(Label::IfaceOk);
    a.op(insn(LDX_W, R2, R6, CTX_FAMILY, 0));
    a.jump(JEQ_K, R2, 0, libc::AF_INET, Label::V4);
    a.jump(JEQ_K, R2, 0, libc::AF_INET6, Label::V6);
    a.jump(JA, 0, 0, 0, Label::Pass);

    // IPv4: from this host to itself is not steered.
    a.label(Label::V4);
    a.op(insn(LDX_W, R2, R6, CTX_REMOTE_IP4, 0));
    a.op(insn(LDX_W, R3, R6, CTX_LOCAL_IP4, 0));
    a.jump(JEQ_X, R2, R3, 0, Label::Pass);
    if let Some((passed4, _)) = passed {
        a.op(insn(STX_W, R10, R2, -16, 0));
        passed_lookup(&mut a, passed4, Label::Steer4);
    }
    a.label(Label::Steer4);
    a.op(insn(ST_W, R10, 0, -4, SLOT_V4 as i32));
    a.jump(JA, 0, 0, 0, Label::Assign);

    // IPv6: the same, word by word.
    a.label(Label::V6);
    for word in 0..4i16 {
        a.op(insn(LDX_W, R2, R6, CTX_REMOTE_IP6 + 4 * word, 0));
        a.op(insn(LDX_W, R3, R6, CTX_LOCAL_IP6 + 4 * word, 0));
        a.jump(JNE_X, R2, R3, 0, Label::Foreign6);
    }
    a.jump(JA, 0, 0, 0, Label::Pass);
    a.label(Label::Foreign6);
    if let Some((_, passed6)) = passed {
        for word in 0..4i16 {
            a.op(insn(LDX_W, R2, R6, CTX_REMOTE_IP6 + 4 * word, 0));
            a.op(insn(STX_W, R10, R2, -16 + 4 * word, 0));
        }
        passed_lookup(&mut a, passed6, Label::Steer6);
    }
    a.label(Label::Steer6);
    a.op(insn(ST_W, R10, 0, -4, SLOT_V6 as i32));

    // The family's listener, if the guard has one: assign it.
    a.label(Label::Assign);
    a.map(R1, sockets);
    a.op(insn(MOV_X, R2, R10, 0, 0));
    a.op(insn(ADD_K, R2, 0, 0, -4));
    a.call(MAP_LOOKUP_ELEM);
    a.jump(JEQ_K, R0, 0, 0, Label::Pass);
    a.op(insn(MOV_X, R7, R0, 0, 0));
    a.op(insn(MOV_X, R1, R6, 0, 0));
    a.op(insn(MOV_X, R2, R7, 0, 0));
    a.op(insn(MOV_K, R3, 0, 0, 0));
    a.call(SK_ASSIGN);
    a.op(insn(MOV_X, R1, R7, 0, 0));
    a.call(SK_RELEASE);
    // Assigned or not (the socket closed meanwhile), the lookup goes on.
    a.label(Label::Pass);
    a.op(insn(MOV_K, R0, 0, 0, SK_PASS));
    a.op(insn(EXIT, 0, 0, 0, 0));
    a.finish()
}

/// The key is at r10 - 16: a live entry (its deadline, CLOCK_MONOTONIC
/// ns, still ahead) ends in `Pass`, anything else in `miss`.
fn passed_lookup(a: &mut Asm, map: i32, miss: Label) {
    a.map(R1, map);
    a.op(insn(MOV_X, R2, R10, 0, 0));
    a.op(insn(ADD_K, R2, 0, 0, -16));
    a.call(MAP_LOOKUP_ELEM);
    a.jump(JEQ_K, R0, 0, 0, miss);
    a.op(insn(LDX_DW, R7, R0, 0, 0));
    a.call(KTIME_GET_NS);
    a.jump(JLT_X, R0, R7, 0, Label::Pass);
}

// --- bpf(2) -------------------------------------------------------------

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct ProgLoadAttr {
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

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
///
/// `T` must be the layout the kernel expects for `cmd` (a prefix of
/// `union bpf_attr`; the kernel takes the bytes it does not get as zero),
/// and every address inside `attr` must point to memory that is valid for
/// the size the kernel reads or writes there, for the whole call.
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `repr(C)` value; the rest is the caller's
    // promise (above).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// # Safety
///
/// `fd` must be a descriptor the kernel has just returned to us, owned by
/// nothing else.
unsafe fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| bad_fd())?;
    // SAFETY: the caller's promise (above); BPF objects are created
    // close-on-exec.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_u32(fd: &impl AsRawFd) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| bad_fd())
}

/// A BPF map and the sizes of its keys and values, which every access is
/// checked against (the kernel reads that many bytes at the addresses it
/// is given).
#[derive(Debug)]
struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    fn create(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> io::Result<Map> {
        let mut attr = MapCreateAttr {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
        };
        // SAFETY: the layout of BPF_MAP_CREATE; no addresses in it.
        let created = unsafe { bpf(BPF_MAP_CREATE, &mut attr) };
        // SAFETY: a descriptor BPF_MAP_CREATE just returned.
        let fd = created.and_then(|fd| unsafe { owned(fd) }).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "sk_lookup: cannot create a BPF map (needs CAP_BPF and CAP_NET_ADMIN, \
                     and before Linux 5.11 a locked-memory limit above the maps' size): {e}"
                ),
            )
        })?;
        Ok(Map {
            fd,
            key_size: key_size as usize,
            value_size: value_size as usize,
        })
    }

    fn check(&self, key: &[u8], value: Option<&[u8]>) -> io::Result<()> {
        if key.len() != self.key_size || value.is_some_and(|v| v.len() != self.value_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sk_lookup: a key or value of the wrong size for its map",
            ));
        }
        Ok(())
    }

    fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.check(key, Some(value))?;
        let mut attr = MapElemAttr {
            map_fd: fd_u32(&self.fd)?,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: 0, // BPF_ANY
        };
        // SAFETY: the layout of BPF_MAP_UPDATE_ELEM; `key` and `value` are
        // borrowed for the call and as long as the map's sizes (checked).
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
    }

    fn delete(&self, key: &[u8]) -> io::Result<()> {
        self.check(key, None)?;
        let mut attr = MapElemAttr {
            map_fd: fd_u32(&self.fd)?,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: 0,
            flags: 0,
        };
        // SAFETY: the layout of BPF_MAP_DELETE_ELEM; `key` is borrowed for
        // the call and as long as the map's keys (checked).
        unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) }.map(drop)
    }
}

fn prog_load(code: &[Insn]) -> io::Result<OwnedFd> {
    const LICENSE: &[u8] = b"GPL\0";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"mxguard_sk");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SK_LOOKUP,
        insn_cnt: u32::try_from(code.len()).map_err(|_| bad_fd())?,
        insns: code.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_SK_LOOKUP,
    };
    // SAFETY: the layout of BPF_PROG_LOAD; `code` (insn_cnt instructions)
    // and the NUL-terminated LICENSE are borrowed for the call (and `log`,
    // log_size bytes, in the second call below).
    let loaded = unsafe { bpf(BPF_PROG_LOAD, &mut attr) };
    match loaded {
        // SAFETY: a descriptor BPF_PROG_LOAD just returned.
        Ok(fd) => unsafe { owned(fd) },
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Again with the verifier's log, for the error.
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = u32::try_from(log.len()).unwrap_or(0);
            attr.log_buf = log.as_mut_ptr() as u64;
            // SAFETY: as above.
            let again = unsafe { bpf(BPF_PROG_LOAD, &mut attr) };
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            match again {
                // SAFETY: a descriptor BPF_PROG_LOAD just returned.
                Ok(fd) => unsafe { owned(fd) },
                Err(_) => Err(io::Error::new(
                    e.kind(),
                    format!(
                        "sk_lookup: the kernel refused the program: {e}; verifier: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                )),
            }
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("sk_lookup: cannot load the program (needs CAP_BPF and CAP_NET_ADMIN): {e}"),
        )),
    }
}

fn link_create(prog: &OwnedFd, netns: &std::fs::File) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: fd_u32(prog)?,
        target_fd: fd_u32(netns)?,
        attach_type: BPF_SK_LOOKUP,
        flags: 0,
    };
    // SAFETY: the layout of BPF_LINK_CREATE; no addresses in it.
    let created = unsafe { bpf(BPF_LINK_CREATE, &mut attr) };
    // SAFETY: a descriptor BPF_LINK_CREATE just returned.
    created.and_then(|fd| unsafe { owned(fd) }).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("sk_lookup: cannot attach to the network namespace: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ports: &[u16], interfaces: &[u32]) -> SteerConfig {
        SteerConfig {
            ports: ports.to_vec(),
            interfaces: interfaces.to_vec(),
            passes: 16,
        }
    }

    #[test]
    fn every_jump_lands_inside_the_program_and_on_the_pass_at_the_end() {
        for passed in [None, Some((7, 8))] {
            for c in [config(&[25], &[]), config(&[25, 587, 465], &[2, 3])] {
                let code = program(&c, 5, passed).unwrap();
                let n = code.len() as i64;
                assert_eq!(code[code.len() - 1].code, EXIT);
                assert_eq!(code[code.len() - 2], insn(MOV_K, R0, 0, 0, SK_PASS));
                for (at, i) in code.iter().enumerate() {
                    let is_jump = i.code & 0x07 == 0x05 && i.code != CALL && i.code != EXIT;
                    if is_jump {
                        let target = at as i64 + 1 + i64::from(i.off);
                        assert!(target > at as i64 && target < n, "insn {at}: {i:?}");
                    }
                }
                // Each port and interface is compared once.
                let compares = code.iter().filter(|i| i.code == JEQ_K).count();
                assert_eq!(
                    compares,
                    c.ports.len() + c.interfaces.len() + 2 + 1 + usize::from(passed.is_some()) * 2
                );
            }
        }
    }
}
