//! The process that runs an execution, as the store records it: enough for another process to
//! tell later that it is gone (killed, out of memory, the machine restarted) rather than still
//! at work. Linux only: where `/proc` does not say, nothing is recorded and nothing is judged.

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// A process: the boot it runs in, its PID namespace, its pid and its start time (a pid alone
/// is reused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Owner {
    pub boot_id: String,
    pub pid_ns: String,
    pub pid: i64,
    /// Clock ticks from boot to the process's start (`/proc/<pid>/stat`, field 22).
    pub start: i64,
}

impl Owner {
    /// This process.
    pub fn current() -> Option<Self> {
        Some(Self {
            boot_id: boot_id()?,
            pid_ns: pid_ns()?,
            pid: i64::from(std::process::id()),
            start: proc_stat(&std::process::id().to_string())?.1,
        })
    }

    /// Whether this process has certainly ended, as seen from the current one. False when that
    /// cannot be known: it ran in another PID namespace (a container, a pod's other step),
    /// whose pids are not ours to look up.
    pub fn is_gone(&self) -> bool {
        let Some(boot) = boot_id() else { return false };
        if boot != self.boot_id {
            // The machine restarted since: every process of that boot is gone.
            return true;
        }
        if pid_ns().as_deref() != Some(self.pid_ns.as_str()) {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else { return false };
        // kill(0) sees processes of every user (`/proc` may hide them: hidepid).
        if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
            return true;
        }
        match proc_stat(&pid.to_string()) {
            // Another process got the pid, or it ended and waits for its parent to reap it.
            Some((state, start)) => start != self.start || matches!(state, 'Z' | 'X'),
            None => false,
        }
    }
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string()).filter(|id| !id.is_empty())
}

/// This process's PID namespace, e.g. `pid:[4026531836]`. An id another namespace can get only
/// once this one is gone, and with it every process it had.
fn pid_ns() -> Option<String> {
    Some(std::fs::read_link("/proc/self/ns/pid").ok()?.to_string_lossy().into_owned())
}

/// The state and start time of process `pid` (as this process's namespace numbers it).
fn proc_stat(pid: &str) -> Option<(char, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command, in parentheses, may hold spaces and parentheses: the fields follow the last.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 (state) is the first here; field 22 (starttime) the 20th.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_not_gone_and_another_boot_or_start_is() {
        let me = Owner::current().expect("Linux with /proc");
        assert!(!me.is_gone());
        assert!(Owner { start: me.start + 1, ..me.clone() }.is_gone(), "the pid now names another process");
        assert!(Owner { boot_id: "another-boot".into(), ..me.clone() }.is_gone(), "the machine restarted");
        assert!(!Owner { pid_ns: "pid:[1]".into(), ..me.clone() }.is_gone(), "another namespace: unknown");
        // A child that ended: a zombie until reaped, then no process at all.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i64::from(child.id());
        let start = proc_stat(&pid.to_string()).map(|s| s.1).unwrap();
        let theirs = Owner { pid, start, ..me.clone() };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(theirs.is_gone(), "a zombie has ended");
        child.wait().unwrap();
        assert!(theirs.is_gone());
    }
}
