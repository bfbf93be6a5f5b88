//! Hooks: commands run in the workspace with the context JSON on stdin, or webhooks that
//! receive it as a POST. Their output goes to the log (redacted).
//!
//! A command hook is the user's code, but it runs over a checkout the agent wrote: a
//! `core.fsmonitor` in `.git/config`, a `.pth` file in a HOME, a Makefile are the agent's code
//! once the hook runs git, python or make there. So a command hook runs in the agent's sandbox
//! (its files, its network, its system calls; namespaces of its own where the kernel allows),
//! with a HOME the runner made fresh for it: whatever it ends up running reaches nothing the
//! agent could not. Webhooks are sent by the runner itself and run nothing of the agent's.

use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::api::{HookAction, ResolvedHook};

/// Why a hook failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    #[error("hook {name} exited with status {code}")]
    Exit { name: String, code: String },
    #[error("hook {name} answered HTTP {status}")]
    Status { name: String, status: u16 },
    #[error("hook {name} took longer than {secs}s")]
    Timeout { name: String, secs: u64 },
    #[error("hook {name} could not run: {message}")]
    Start { name: String, message: String },
}

/// Output kept from a hook (each stream, or a webhook's answer); the rest is read and dropped.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// Reads a stream to its end, keeping the first `MAX_OUTPUT` bytes.
async fn read_capped(stream: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let Some(mut stream) = stream else { return Vec::new() };
    let (mut kept, mut chunk) = (Vec::new(), vec![0u8; 8192]);
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = MAX_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
    kept
}

/// Where the hook runs and what it may see.
pub struct HookEnv<'a> {
    /// The checkout (the agent's, after the agent ran).
    pub cwd: &'a Path,
    /// A HOME made fresh by the runner for the hooks (never the agent's), TMPDIR inside.
    pub home: &'a Path,
    pub phase: &'a str,
    pub execution_id: &'a str,
    /// The agent's sandbox, around the hook's HOME instead of the agent's (None: unconfined,
    /// `--no-sandbox`).
    pub sandbox: Option<&'a crate::agent::Sandbox>,
}

/// A shared HTTP client for webhooks (rustls with the ring provider, installed once).
pub fn http_client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .user_agent(concat!("agentops/", env!("CARGO_PKG_VERSION")))
                .build()
                .unwrap_or_default()
        })
        .clone()
}

/// Runs one hook; `log` receives its output lines. Ok(()) only for exit 0 / HTTP 2xx.
pub async fn run_hook(
    hook: &ResolvedHook,
    context: &serde_json::Value,
    env: &HookEnv<'_>,
    mut log: impl FnMut(String),
) -> Result<(), HookError> {
    let name = hook.name.clone();
    let body = serde_json::to_vec(context).unwrap_or_default();
    let timeout = hook.timeout;
    let timed_out = || HookError::Timeout { name: name.clone(), secs: timeout.as_secs() };
    match &hook.action {
        HookAction::Command(argv) => {
            let mut command = Command::new(&argv[0]);
            // The checkout's `.git/config` (fsmonitor, hooksPath, filters) and anything else the
            // agent planted there runs no further than the agent itself could go.
            if let Some(sandbox) = env.sandbox {
                sandbox.confine(&mut command).map_err(|e| HookError::Start {
                    name: name.clone(),
                    message: format!("cannot confine the hook: {e}"),
                })?;
            }
            let mut child = command
                .args(&argv[1..])
                .current_dir(env.cwd)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
                .env("HOME", env.home)
                .env("TMPDIR", env.home.join("tmp"))
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_TERMINAL_PROMPT", "0")
                .env("AGENTOPS_HOOK_PHASE", env.phase)
                .env("AGENTOPS_EXECUTION_ID", env.execution_id)
                .env("AGENTOPS_WORKSPACE", env.cwd)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| HookError::Start { name: name.clone(), message: format!("{}: {e}", argv[0]) })?;
            if let Some(mut stdin) = child.stdin.take() {
                tokio::spawn(async move {
                    let _ = stdin.write_all(&body).await;
                });
            }
            let group = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
            let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
            let run = async {
                // Both streams at once (a full pipe would block the hook), each read with a cap.
                let (out, err) = tokio::join!(read_capped(stdout), read_capped(stderr));
                (child.wait().await, out, err)
            };
            let (status, out, err) = match tokio::time::timeout(timeout, run).await {
                Ok(done) => done,
                Err(_) => {
                    // The whole group: a hook's children (a shell's pipeline) go with it.
                    if let Some(pg) = group {
                        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
                    }
                    return Err(timed_out());
                }
            };
            if let Some(pg) = group {
                let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
            }
            let status = status.map_err(|e| HookError::Start { name: name.clone(), message: e.to_string() })?;
            for stream in [&out, &err] {
                for line in String::from_utf8_lossy(stream).lines() {
                    log(line.to_string());
                }
            }
            if status.success() {
                Ok(())
            } else {
                let code = status.code().map_or_else(|| "killed".to_string(), |c| c.to_string());
                Err(HookError::Exit { name, code })
            }
        }
        HookAction::Webhook(url) => {
            let send = http_client()
                .post(url)
                .header("content-type", "application/json")
                .header("x-agentops-hook-phase", env.phase)
                .body(body)
                .timeout(timeout)
                .send();
            let resp = send.await.map_err(|e| {
                if e.is_timeout() {
                    timed_out()
                } else {
                    HookError::Start { name: name.clone(), message: e.to_string() }
                }
            })?;
            let status = resp.status();
            let mut resp = resp;
            let mut text = Vec::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                let room = MAX_OUTPUT.saturating_sub(text.len());
                text.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if room <= chunk.len() {
                    break;
                }
            }
            for line in String::from_utf8_lossy(&text).lines().take(200) {
                log(line.to_string());
            }
            log(format!("HTTP {}", status.as_u16()));
            if status.is_success() { Ok(()) } else { Err(HookError::Status { name, status: status.as_u16() }) }
        }
    }
}
