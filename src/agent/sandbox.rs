//! The agent's sandbox on one machine: Linux Landlock (unprivileged, kernel 5.13+), applied in
//! the agent's process between fork and exec, so the agent and every tool it starts can write
//! only its workspace, its private HOME and TMPDIR (and the harmless devices: `/dev/null`,
//! `/dev/zero`, `/dev/full`, `/dev/random`, `/dev/urandom`), and read only system and
//! toolchain directories. Not the secrets dir, not the store, not the user's HOME, not
//! `/dev/shm`. Where the kernel has them: no ioctl on any device it opens (ABI 5: no `TIOCSTI`
//! into a terminal), TCP connect only to the ports it is given (the model gateway's, the
//! egress allowlist's; ABI 4), no bind, no signal to a process outside the sandbox and no
//! abstract unix socket outside it (ABI 6 scopes). The agent also starts in a session of its
//! own, without the user's controlling terminal. Where the kernel has no Landlock, the agent
//! runs unconfined and the runner says so; older kernels get what they support.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetError,
    Scope, path_beneath_rules,
};

/// The highest Landlock ABI asked for; older kernels get what they support (best effort).
const ABI_WANTED: ABI = ABI::V6;

/// Devices a shell and its tools write to; nothing else under `/dev` is writable.
const WRITABLE_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// Directories of the system everyone may read (and execute from).
const SYSTEM_DIRS: &[&str] =
    &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc", "/sys", "/nix"];

/// What the agent may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// Read, write, create, remove, execute beneath these.
    pub read_write: Vec<PathBuf>,
    /// Read and execute beneath these.
    pub read_only: Vec<PathBuf>,
    /// TCP ports the agent may connect to (the model gateway's, the egress allowlist's).
    pub tcp_connect: Vec<u16>,
    /// Whether UDP sockets may be made (DNS, when the run needs names resolved: see
    /// `needs_dns`). Landlock governs TCP only, so UDP is refused by the seccomp filter.
    pub udp: bool,
}

/// Whether a run whose agent reaches its model at `model_url` and may open `tcp_ports` needs
/// DNS: the gateway is named by a host name (a runner pod reaches the controller's Service by
/// name), or an egress rule opens port 53. Else UDP stays closed.
pub fn needs_dns(model_url: Option<&str>, tcp_ports: &[u16]) -> bool {
    let named = model_url
        .and_then(|u| url::Url::parse(u).ok())
        .is_some_and(|u| matches!(u.host(), Some(url::Host::Domain(d)) if d != "localhost"));
    named || tcp_ports.contains(&53)
}

impl Sandbox {
    /// The sandbox of one agent run: `workspace` (its checkout) and `home` (its private HOME,
    /// TMPDIR inside) writable; system directories, the agent's own installation (`claude_bin`,
    /// and node's when it is a script), the directories on `path` and the toolchains named in
    /// `extra_read` readable. A directory holding any of `protected` (the secrets dir, the
    /// store, the user's HOME) is never granted as a whole: only its harmless parts would be,
    /// and here none are.
    pub fn for_agent(
        workspace: &Path,
        home: &Path,
        claude_bin: &Path,
        path: Option<&str>,
        extra_read: &[PathBuf],
        protected: &[PathBuf],
        tcp_connect: &[u16],
    ) -> Self {
        let mut read_only: Vec<PathBuf> = SYSTEM_DIRS.iter().map(PathBuf::from).collect();
        // The agent's installation: the resolved binary's package (for the npm package, its
        // node_modules, which holds the vendored ripgrep too).
        let found = if claude_bin.components().count() > 1 {
            Some(claude_bin.to_path_buf())
        } else {
            path.unwrap_or_default().split(':').map(|d| Path::new(d).join(claude_bin)).find(|p| p.exists())
        };
        if let Some(real) = found.and_then(|f| std::fs::canonicalize(f).ok()) {
            // Else the program file alone (a native binary; never the directory it sits in).
            let package = real.ancestors().find(|a| a.file_name().is_some_and(|n| n == "node_modules"));
            read_only.push(package.unwrap_or(&real).to_path_buf());
        }
        for dir in path.unwrap_or_default().split(':').filter(|d| d.starts_with('/')) {
            read_only.push(PathBuf::from(dir));
            // node installed outside the system (nvm, a tarball): its lib/ next to bin/.
            let dir = Path::new(dir);
            if dir.join("node").exists()
                && let Some(root) = dir.parent()
            {
                read_only.push(root.join("lib"));
            }
        }
        read_only.extend(extra_read.iter().cloned());
        if nix::unistd::geteuid().is_root() {
            // Root reads every file; the agent reads only what any user could (no
            // /etc/shadow, /etc/sudoers, /etc/ssl/private): /etc's world-readable entries.
            read_only.retain(|d| d != Path::new("/etc"));
            read_only.extend(world_readable_entries(Path::new("/etc")));
        }
        let covers = |granted: &Path| {
            let g = canon(granted);
            protected.iter().any(|p| {
                let p = canon(p);
                p.starts_with(&g)
            })
        };
        read_only.retain(|d| d.as_os_str() != "/" && !covers(d));
        read_only.sort();
        read_only.dedup();
        read_only.push(PathBuf::from("/dev"));
        let read_write = vec![workspace.to_path_buf(), home.to_path_buf()];
        let mut tcp_connect = tcp_connect.to_vec();
        tcp_connect.sort_unstable();
        tcp_connect.dedup();
        Self { read_write, read_only, tcp_connect, udp: false }
    }

    /// The same, with UDP sockets allowed or not (see `needs_dns`).
    pub fn with_udp(mut self, udp: bool) -> Self {
        self.udp = udp;
        self
    }

    /// Confines what `command` starts: namespaces of its own where this user can make them,
    /// Landlock, then the seccomp filter, all between fork and exec. Returns whether the
    /// namespaces are in force.
    pub fn confine(&self, command: &mut tokio::process::Command) -> std::io::Result<bool> {
        let isolated = isolation_supported();
        if isolated {
            let isolation = Isolation::new();
            // SAFETY: `enter` makes system calls only; the process that stays outside waits
            // and exits without returning.
            unsafe {
                command.pre_exec(move || isolation.enter());
            }
        }
        let filter = seccomp_filter(self.udp)?;
        let ruleset = self.prepare(isolated).map_err(std::io::Error::other)?;
        let ruleset = std::sync::Mutex::new(Some(ruleset));
        // SAFETY: between fork and exec the closure only takes the prepared ruleset (a mutex no
        // other thread of the child can hold) and makes the landlock/prctl system calls.
        unsafe {
            command.pre_exec(move || match ruleset.lock().ok().and_then(|mut r| r.take()) {
                Some(r) => restrict(r, isolated),
                None => Ok(()),
            });
        }
        // SAFETY: the filter was built in the parent; the child only makes the prctl and
        // seccomp system calls. Last: the namespaces and Landlock need no unix socket.
        unsafe {
            command.pre_exec(move || apply_seccomp(&filter));
        }
        Ok(isolated)
    }

    /// The Landlock ruleset, ready to be applied by `restrict` in the child. Built in the
    /// parent: after fork, only the `restrict_self` system calls run.
    /// With `isolated` (the agent mounts a `/proc` of its own), `/proc` is granted by
    /// `restrict`, after that mount: a rule made here would name the outer one.
    pub fn prepare(&self, isolated: bool) -> Result<RulesetCreated, RulesetError> {
        let abi = ABI_WANTED;
        // No ioctl on devices, even beneath the writable directories (a device node there is
        // not the agent's to drive).
        let files = AccessFs::from_all(abi) & !AccessFs::IoctlDev;
        let devices: Vec<&str> = WRITABLE_DEVICES.iter().copied().filter(|d| Path::new(d).exists()).collect();
        let ports = self.tcp_connect.iter().map(|p| NetPort::new(*p, AccessNet::ConnectTcp));
        Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::from_all(abi))?
            .create()?
            .add_rules(path_beneath_rules(
                self.read_only.iter().filter(|d| !(isolated && d.as_path() == Path::new("/proc"))),
                AccessFs::from_read(abi),
            ))?
            .add_rules(path_beneath_rules(&self.read_write, files))?
            .add_rules(path_beneath_rules(&devices, device_rights()))?
            .add_rules(ports.map(Ok::<_, RulesetError>))
    }
}

/// Applies a prepared ruleset to the calling process (the agent's child, before exec).
/// Async-signal-safe on success; a kernel without Landlock leaves the child unconfined.
pub fn restrict(ruleset: RulesetCreated, isolated: bool) -> std::io::Result<()> {
    let ruleset = if isolated {
        // The agent's own /proc, mounted by `Isolation::enter` (it shows only its processes).
        let proc = landlock::PathBeneath::new(
            landlock::PathFd::new("/proc").map_err(std::io::Error::other)?,
            AccessFs::from_read(ABI_WANTED),
        );
        ruleset.add_rule(proc).map_err(std::io::Error::other)?
    } else {
        ruleset
    };
    match ruleset.restrict_self() {
        Ok(_) => Ok(()),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// The seccomp filter of the agent. Landlock governs neither `connect()` to a pathname unix
/// socket nor which sockets exist, and its TCP rules cover only `IPPROTO_TCP` sockets (an
/// MPTCP socket, which falls back to plain TCP with any server, reached every port). So the
/// sockets the agent may make are an allowlist, everything else failing with EACCES:
/// - `AF_INET`/`AF_INET6` stream sockets of protocol 0 or TCP (Landlock then limits their
///   ports); datagram sockets of protocol 0 or UDP only when `udp` (DNS; see `needs_dns`);
///   no raw, packet, SCTP, DCCP or MPTCP socket;
/// - `AF_NETLINK` of `NETLINK_ROUTE` only (what `getaddrinfo` and `os.networkInterfaces()` read;
///   changing routes needs a capability the agent does not have in the host's network);
/// - no other family: not `AF_UNIX` (the Docker daemon's socket, your ssh-agent, any socket
///   left in `/tmp` or `/run`), not `AF_PACKET`, not `AF_VSOCK` (a VM's host), not `AF_BLUETOOTH`.
///
/// Also refused (EPERM): io_uring (`io_uring_setup`, `_enter`, `_register`), which makes sockets
/// and opens files without the system calls above (`IORING_OP_SOCKET`), as container runtimes'
/// default profiles refuse it; `prlimit64` on another process (pid ≠ 0), so a hook sharing the
/// runner's PID namespace in a pod cannot take away its descriptors; and on x86_64 the x32 ABI's
/// numbers for all of these, where a kernel enables x32.
///
/// `socketpair` (how runtimes wire their own children) stays allowed: its two ends reach
/// nothing else. Built in the parent; `apply_seccomp` runs in the child.
pub fn seccomp_filter(udp: bool) -> std::io::Result<Vec<seccompiler::BpfProgram>> {
    use nix::libc;
    use seccompiler::{SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond};
    use seccompiler::{SeccompFilter, SeccompRule};
    let err = |e: seccompiler::Error| std::io::Error::other(e.to_string());
    let cond = |arg: u8, op: Op, value: u64| Cond::new(arg, Len::Dword, op, value).map_err(|e| err(e.into()));
    let rule = |conds: Vec<Cond>| SeccompRule::new(conds).map_err(|e| err(e.into()));
    // Each rule is a socket() that is refused (its conditions all hold).
    let family = |f: i32| cond(0, Op::Eq, f as u64);
    // The socket's type without SOCK_NONBLOCK / SOCK_CLOEXEC (the low four bits).
    let kind = |t: i32| cond(1, Op::MaskedEq(0xf), t as u64);
    let not_proto = |p: i32| cond(2, Op::Ne, p as u64);
    let mut socket = vec![
        // Any family but these three.
        rule(vec![
            cond(0, Op::Ne, libc::AF_INET as u64)?,
            cond(0, Op::Ne, libc::AF_INET6 as u64)?,
            cond(0, Op::Ne, libc::AF_NETLINK as u64)?,
        ])?,
        rule(vec![family(libc::AF_NETLINK)?, not_proto(libc::NETLINK_ROUTE)?])?,
    ];
    for f in [libc::AF_INET, libc::AF_INET6] {
        // Stream sockets of another protocol than TCP (MPTCP, SCTP).
        socket.push(rule(vec![family(f)?, kind(libc::SOCK_STREAM)?, not_proto(0)?, not_proto(libc::IPPROTO_TCP)?])?);
        if udp {
            socket.push(rule(vec![family(f)?, kind(libc::SOCK_DGRAM)?, not_proto(0)?, not_proto(libc::IPPROTO_UDP)?])?);
        } else {
            socket.push(rule(vec![family(f)?, kind(libc::SOCK_DGRAM)?])?);
        }
        // Every other type: raw, RDM, seqpacket (SCTP), DCCP (6), packet (10).
        for t in [libc::SOCK_RAW, libc::SOCK_RDM, libc::SOCK_SEQPACKET, 6, 10] {
            socket.push(rule(vec![family(f)?, kind(t)?])?);
        }
    }
    // One filter per errno: what its rules match fails with it, everything else is allowed.
    let filter = |rules: Vec<(i64, Vec<SeccompRule>)>, errno: i32| -> std::io::Result<seccompiler::BpfProgram> {
        let arch = std::env::consts::ARCH.try_into().map_err(|e: seccompiler::BackendError| err(e.into()))?;
        let filter = SeccompFilter::new(
            rules.into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .map_err(|e| err(e.into()))?;
        filter.try_into().map_err(|e: seccompiler::BackendError| err(e.into()))
    };
    let sockets = filter(vec![(libc::SYS_socket, socket)], libc::EACCES)?;
    let mut refused = vec![
        (libc::SYS_io_uring_setup, vec![]),
        (libc::SYS_io_uring_enter, vec![]),
        (libc::SYS_io_uring_register, vec![]),
        (libc::SYS_prlimit64, vec![rule(vec![cond(0, Op::Ne, 0)?])?]),
    ];
    if cfg!(target_arch = "x86_64") {
        // The x32 ABI's numbers (bit 30) of what is refused above, refused whole.
        const X32: i64 = 0x4000_0000;
        for nr in [
            libc::SYS_socket,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_prlimit64,
        ] {
            refused.push((X32 | nr, vec![]));
        }
    }
    let others = filter(refused, libc::EPERM)?;
    // Two filters (one errno each), stacked: the kernel runs both, and a refusal wins.
    Ok(vec![sockets, others])
}

/// Applies the filters to the calling process (the agent's child, before exec).
pub fn apply_seccomp(filters: &[seccompiler::BpfProgram]) -> std::io::Result<()> {
    for filter in filters {
        seccompiler::apply_filter(filter).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// The entries of `dir` any user may read (files readable by others, directories readable
/// and searchable by others), for a root agent that must read only those.
fn world_readable_entries(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            // Through symlinks (/etc/mtab, /etc/localtime): what they name is what is read.
            let meta = std::fs::metadata(e.path()).ok()?;
            let mode = meta.permissions().mode();
            let open = if meta.is_dir() { mode & 0o005 == 0o005 } else { mode & 0o004 != 0 };
            open.then(|| e.path())
        })
        .collect()
}

/// Whether this kernel enforces Landlock (for the runner's warning).
pub fn supported() -> bool {
    kernel_abi().is_some()
}

/// The Landlock ABI this kernel enforces (as far as this build knows them), None when it
/// enforces none: a throwaway thread restricts itself (Landlock binds the calling thread only)
/// and reports what the kernel did.
pub fn kernel_abi() -> Option<u8> {
    static ABI_SEEN: std::sync::OnceLock<Option<u8>> = std::sync::OnceLock::new();
    *ABI_SEEN.get_or_init(|| {
        std::thread::spawn(|| {
            let ruleset = Ruleset::default().handle_access(AccessFs::from_all(ABI_WANTED)).and_then(|r| r.create());
            let status = ruleset.and_then(|r| r.restrict_self()).ok()?;
            if status.ruleset == landlock::RulesetStatus::NotEnforced {
                return None;
            }
            match status.landlock {
                landlock::LandlockStatus::Available { effective_abi, .. } => Some(effective_abi as u8),
                _ => None,
            }
        })
        .join()
        .ok()
        .flatten()
    })
}

/// The lowest Landlock ABI with every protection the sandbox asks for (ABI 6: scopes).
pub const FULL_ABI: u8 = 6;

/// What the sandbox enforces on a kernel with Landlock ABI `abi`, and what it cannot, for the
/// run's log: (in force, missing).
pub fn protections(abi: Option<u8>, isolated: bool) -> (Vec<&'static str>, Vec<&'static str>) {
    let all: [(u8, &str); 5] = [
        (1, "files (write only the workspace and HOME, read only system and toolchain directories)"),
        (3, "truncate"),
        (4, "TCP connect only to the model gateway's and spec.egress ports"),
        (5, "no device ioctls (no TIOCSTI)"),
        (6, "signals and abstract unix sockets only within the sandbox"),
    ];
    // Not Landlock's: the seccomp filter, on every kernel the agent runs on.
    let seccomp = "no unix, raw or (unless DNS is needed) UDP sockets, no io_uring (no Docker socket, ssh-agent or other socket of the user)";
    let abi = abi.unwrap_or(0);
    let pick = |on: bool| all.iter().filter(move |(need, _)| (abi >= *need) == on).map(|(_, what)| *what);
    let own = "namespaces of its own (no other process in /proc, empty /dev/shm, nothing outlives the run)";
    let (mut on, mut off): (Vec<_>, Vec<_>) = (pick(true).collect(), pick(false).collect());
    on.push(seccomp);
    if isolated {
        on.push(own)
    } else {
        off.push(own)
    }
    (on, off)
}

/// The agent's own user, mount and PID namespaces (unprivileged where the kernel allows): it
/// becomes PID 1 of a namespace of its own with a `/proc` of its own (no other process, so no
/// other process's `environ`) and an empty `/dev/shm`; when it ends, the kernel kills everything
/// it left behind (`setsid`, `nohup`, double forks). Prepared in the parent; `enter` runs in
/// the child between fork and exec.
pub struct Isolation {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl Isolation {
    /// The maps that keep the agent's user and group ids what they are outside.
    pub fn new() -> Self {
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        Self { uid_map: format!("{uid} {uid} 1\n").into_bytes(), gid_map: format!("{gid} {gid} 1\n").into_bytes() }
    }

    /// In the child: new namespaces, then a fork. This process stays outside as the
    /// namespace's parent: it waits for the agent and exits with its status (never returning);
    /// the agent, PID 1 inside, mounts its `/proc` and `/dev/shm` and returns to exec.
    pub fn enter(&self) -> std::io::Result<()> {
        use nix::mount::{MsFlags, mount};
        use nix::sched::{CloneFlags, unshare};
        use nix::unistd::{ForkResult, fork};
        // The runner is not dumpable (main); its child must be to write its own uid_map (a
        // non-dumpable process's /proc/self is root's). Exec would reset it anyway.
        nix::sys::prctl::set_dumpable(true)?;
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)?;
        write_file(c"/proc/self/setgroups", b"deny")?;
        write_file(c"/proc/self/uid_map", &self.uid_map)?;
        write_file(c"/proc/self/gid_map", &self.gid_map)?;
        // SAFETY: this process is the single-threaded child of a fork; what follows in either
        // branch is system calls (the waiting parent allocates nothing).
        match unsafe { fork() }? {
            ForkResult::Parent { child } => wait_and_exit(child),
            ForkResult::Child => {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                let none: Option<&str> = None;
                mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
                let quiet = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
                mount(Some("proc"), "/proc", Some("proc"), quiet, none)?;
                if Path::new("/dev/shm").is_dir() {
                    mount(Some("tmpfs"), "/dev/shm", Some("tmpfs"), quiet, Some("size=1m,mode=1777"))?;
                }
                Ok(())
            }
        }
    }
}

impl Default for Isolation {
    fn default() -> Self {
        Self::new()
    }
}

fn write_file(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let written = nix::unistd::write(&fd, data);
    written.map(|_| ()).map_err(std::io::Error::from)
}

/// The namespace's parent: closes every descriptor but the standard ones (the spawner's
/// exec-status pipe among them: it must see the agent's exec, not wait for this process), waits
/// for the agent and exits as it did.
fn wait_and_exit(child: nix::unistd::Pid) -> ! {
    use nix::sys::wait::{WaitStatus, waitpid};
    // SAFETY: raw descriptors nothing in this process uses any more (it only waits).
    // close_range (Linux 5.9) closes them all at once; on older kernels, the first 64k.
    let closed = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed != 0 {
        for fd in 3..65_536 {
            let _ = nix::unistd::close(fd);
        }
    }
    let code = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => break 127,
        }
    };
    // SAFETY: _exit ends this forked process without running the parent's atexit handlers.
    unsafe { nix::libc::_exit(code) }
}

/// Whether this kernel lets this user make the agent's namespaces (probed once: `true` run
/// inside them, in a throwaway child).
pub fn isolation_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        use std::os::unix::process::CommandExt;
        let iso = Isolation::new();
        let mut probe = std::process::Command::new("true");
        probe
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: `enter` makes system calls only (see above).
        unsafe {
            probe.pre_exec(move || iso.enter());
        }
        probe.status().is_ok_and(|s| s.success())
    })
}

/// What the agent may do to the devices it writes to: read, write, truncate (`> /dev/null`).
fn device_rights() -> landlock::BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_enforces_landlock() {
        // The machines this project runs on have kernel 6.x; if this fails, the sandbox tests
        // below prove nothing here.
        assert!(supported(), "Landlock is not enforced on this kernel");
        // This project's machines (and CI) have ABI 7: every protection is in force.
        let (_, missing) = protections(kernel_abi(), isolation_supported());
        assert!(missing.is_empty(), "ABI {:?} lacks {missing:?}", kernel_abi());
        let (on, off) = protections(Some(4), false);
        assert_eq!((on.len(), off.len()), (4, 3), "ABI 4: files, truncate, TCP, and seccomp's unix sockets");
    }

    #[test]
    fn never_grants_a_directory_that_holds_a_protected_one() {
        let home = PathBuf::from("/home/alice");
        let s = Sandbox::for_agent(
            Path::new("/tmp/ws/repo"),
            Path::new("/tmp/ws/home"),
            Path::new("/nonexistent/claude"),
            Some("/usr/bin:/home/alice/bin:/:/home/alice"),
            &[],
            &[home.join(".config/agentops/secrets"), home.clone()],
            &[8080],
        );
        assert!(s.read_only.contains(&PathBuf::from("/usr/bin")));
        assert!(!s.read_only.iter().any(|d| d == Path::new("/") || d == home.as_path()), "{s:?}");
        assert!(
            s.read_only.contains(&PathBuf::from("/home/alice/bin")),
            "a dir inside HOME that holds nothing protected"
        );
        assert_eq!(s.read_write[0], PathBuf::from("/tmp/ws/repo"));
    }
}
