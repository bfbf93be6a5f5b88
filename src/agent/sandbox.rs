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
        Self { read_write, read_only, tcp_connect }
    }

    /// The Landlock ruleset, ready to be applied by `restrict` in the child. Built in the
    /// parent: after fork, only the `restrict_self` system calls run.
    pub fn prepare(&self) -> Result<RulesetCreated, RulesetError> {
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
            .add_rules(path_beneath_rules(&self.read_only, AccessFs::from_read(abi)))?
            .add_rules(path_beneath_rules(&self.read_write, files))?
            .add_rules(path_beneath_rules(&devices, device_rights()))?
            .add_rules(ports.map(Ok::<_, RulesetError>))
    }
}

/// Applies a prepared ruleset to the calling process (the agent's child, before exec).
/// Async-signal-safe on success; a kernel without Landlock leaves the child unconfined.
pub fn restrict(ruleset: RulesetCreated) -> std::io::Result<()> {
    match ruleset.restrict_self() {
        Ok(_) => Ok(()),
        Err(e) => Err(std::io::Error::other(e)),
    }
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
pub fn protections(abi: Option<u8>) -> (Vec<&'static str>, Vec<&'static str>) {
    let all: [(u8, &str); 5] = [
        (1, "files (write only the workspace and HOME, read only system and toolchain directories)"),
        (3, "truncate"),
        (4, "TCP connect only to the model gateway's and spec.egress ports"),
        (5, "no device ioctls (no TIOCSTI)"),
        (6, "signals and abstract unix sockets only within the sandbox"),
    ];
    let abi = abi.unwrap_or(0);
    let pick = |on: bool| all.iter().filter(|(need, _)| (abi >= *need) == on).map(|(_, what)| *what).collect();
    (pick(true), pick(false))
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
        let (_, missing) = protections(kernel_abi());
        assert!(missing.is_empty(), "ABI {:?} lacks {missing:?}", kernel_abi());
        let (on, off) = protections(Some(4));
        assert_eq!((on.len(), off.len()), (3, 2));
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
