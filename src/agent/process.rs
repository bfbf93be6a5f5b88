//! Starting Claude Code headless in its own process group with a scrubbed environment, reading
//! its stream as it arrives, and stopping it on timeout, silence or cancel.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};
use tokio_util::sync::CancellationToken;

use super::stream::Tally;
use crate::api::Resolved;

/// Environment variables passed through to the agent when set (everything else is dropped).
const PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_MODEL",
    // Set by the controller under a policy's model list (the CLI's background requests).
    "ANTHROPIC_SMALL_FAST_MODEL",
    "ANTHROPIC_DEFAULT_HAIKU_MODEL",
    "CLAUDE_CODE_MAX_RETRIES",
    "API_TIMEOUT_MS",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    // curl reads only the lower-case `http_proxy` (an upper-case one could come from a CGI
    // request's `Proxy:` header); most tools read both.
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
];

/// How the agent process is started: program, arguments, environment, directory, stdin.
#[derive(Debug, Clone)]
pub struct AgentCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The prompt, written to stdin (not argv: prompts can be long, and argv is world-readable).
    pub stdin: String,
    /// Landlock confinement of the agent and everything it starts (None: unconfined).
    pub sandbox: Option<super::Sandbox>,
}

/// Builds the command line. `home` is a private directory for this execution.
pub fn build_command(
    r: &Resolved,
    claude_bin: &Path,
    workspace: &Path,
    home: &Path,
    api_key: Option<&str>,
    parent_env: impl Fn(&str) -> Option<String>,
) -> AgentCommand {
    let mut args: Vec<String> = ["-p", "--output-format", "stream-json", "--verbose"].map(String::from).into();
    // Permission mode, tools, setting sources and MCP config (`agent::config`).
    args.extend(super::config::flags(&r.agent_config, &r.allowed_tools, &r.disallowed_tools, home));
    // Sessions are not resumed; keep nothing in the private HOME beyond the run.
    args.push("--no-session-persistence".into());
    if let Some(m) = &r.model {
        args.extend(["--model".into(), m.clone()]);
    }
    if let Some(n) = r.max_turns {
        args.extend(["--max-turns".into(), n.to_string()]);
    }
    if let Some(b) = r.max_budget_usd {
        args.extend(["--max-budget-usd".into(), b.to_string()]);
    }
    if let Some(s) = &r.append_system_prompt {
        args.extend(["--append-system-prompt".into(), s.clone()]);
    }
    if let Some(schema) = &r.output_schema {
        // At most 16 KiB (resolve): well under the 128 KiB a single argument may be.
        args.extend(["--json-schema".into(), schema.to_string()]);
    }
    let mut env: Vec<(String, String)> =
        PASSTHROUGH_ENV.iter().filter_map(|k| parent_env(k).map(|v| (k.to_string(), v))).collect();
    // Under a policy's model list, the CLI's background requests use the run's model too (the
    // gateway refuses any other).
    if let (Some(m), Some(_)) = (&r.model, r.policy.as_ref().and_then(|p| p.models.as_ref())) {
        env.retain(|(k, _)| k != "ANTHROPIC_MODEL");
        for k in ["ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL"] {
            env.push((k.into(), m.clone()));
        }
    }
    let home_s = home.to_string_lossy().into_owned();
    env.extend([
        ("HOME".into(), home_s.clone()),
        ("CLAUDE_CONFIG_DIR".into(), super::config::claude_dir(home).to_string_lossy().into_owned()),
        // Claude Code needs a writable TMPDIR; with a read-only /tmp it exits silently.
        ("TMPDIR".into(), home.join("tmp").to_string_lossy().into_owned()),
        // The workspace is the sandbox: lets bypassPermissions run as root in containers.
        ("IS_SANDBOX".into(), "1".into()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(), "1".into()),
        ("DISABLE_TELEMETRY".into(), "1".into()),
        ("DISABLE_AUTOUPDATER".into(), "1".into()),
        ("DISABLE_ERROR_REPORTING".into(), "1".into()),
        // The operator owns git: keep the agent's git from reaching the user's config.
        ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
    ]);
    // The team's plain env (`spec.pod.env`, checked: no name of ours): the cluster default's by
    // the names the Job lists, then the template's and the execution's from the manifest.
    let reserved = |name: &str| {
        crate::api::pod::RESERVED_ENV_NAMES.contains(&name)
            || crate::api::pod::RESERVED_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
    };
    let mut own: Vec<(String, String)> = parent_env(crate::api::contract::AGENT_ENV)
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty() && !reserved(n))
        .filter_map(|n| parent_env(n).map(|v| (n.to_string(), v)))
        .collect();
    own.extend(
        r.pod
            .env
            .iter()
            .flatten()
            .filter(|e| !reserved(&e.name))
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())),
    );
    for (k, v) in own {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    }
    if let Some(k) = api_key {
        env.push(("ANTHROPIC_API_KEY".into(), k.to_string()));
    }
    AgentCommand {
        program: claude_bin.to_path_buf(),
        args,
        env,
        cwd: workspace.to_path_buf(),
        stdin: r.prompt.clone(),
        sandbox: None,
    }
}

/// Why the agent stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStop {
    /// The process exited by itself with this code (None: killed by a signal).
    Exited(Option<i32>),
    /// The wall-clock deadline passed.
    TimedOut,
    /// Nothing was printed for the idle limit.
    Idle,
    /// Cancel was requested.
    Cancelled,
}

/// What one agent run produced.
#[derive(Debug, Clone)]
pub struct AgentOutcome {
    pub tally: Tally,
    pub stop: AgentStop,
    /// Last part of stderr (for error messages).
    pub stderr_tail: String,
    pub duration: Duration,
}

/// How long a stopped agent gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
const STDERR_TAIL: usize = 4096;
/// Longest stream-json line read from the agent (a tool result with a large file fits).
const MAX_STDOUT_LINE: usize = 16 * 1024 * 1024;

/// Runs the agent to the end, a deadline, silence or cancel. `on_line` sees every stdout line
/// and the totals after it (the caller persists progress and logs).
pub async fn run_agent(
    cmd: &AgentCommand,
    deadline: Instant,
    idle: Duration,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(&str, &Tally, bool),
) -> std::io::Result<AgentOutcome> {
    let started = Instant::now();
    let mut command = Command::new(&cmd.program);
    // A session of its own: no controlling terminal (nothing it starts can open the user's
    // `/dev/tty`, let alone push keystrokes into it), and its own process group, so that
    // stopping it stops the tools it started too.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    if let Some(sandbox) = &cmd.sandbox {
        sandbox.confine(&mut command)?;
    }
    let mut child = command
        .args(&cmd.args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cmd.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    if let Some(mut stdin) = child.stdin.take() {
        let prompt = cmd.stdin.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(prompt.as_bytes()).await;
        });
    }
    let stderr_task = child.stderr.take().map(|mut e| {
        tokio::spawn(async move {
            // Only the tail is kept: an agent that floods stderr costs no memory.
            let (mut buf, mut chunk) = (Vec::with_capacity(2 * STDERR_TAIL), vec![0u8; 8192]);
            while let Ok(n) = e.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 2 * STDERR_TAIL {
                    buf.drain(..buf.len() - STDERR_TAIL);
                }
            }
            let s = String::from_utf8_lossy(&buf).into_owned();
            let start = s.len().saturating_sub(STDERR_TAIL);
            let start = (start..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
            s[start..].to_string()
        })
    });
    let mut tally = Tally::default();
    let mut stop = None;
    // Lines are bounded: one endless line must not take the runner's memory with it. Bytes, not
    // UTF-8: a byte that is not UTF-8 (anything can write into the CLI's stdout) must not end
    // the reading; it is read as U+FFFD.
    let codec = || SkipLong(AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_STDOUT_LINE));
    let mut lines = child.stdout.take().map(|out| {
        FramedRead::new(out, codec()).map(|chunk| {
            chunk.map(|b| {
                let b = b.strip_suffix(b"\r").unwrap_or(&b);
                String::from_utf8_lossy(b).into_owned()
            })
        })
    });
    if let Some(lines) = lines.as_mut() {
        let mut idle_at = Instant::now() + idle;
        loop {
            tokio::select! {
                line = lines.next() => match line {
                    Some(Ok(l)) => {
                        idle_at = Instant::now() + idle;
                        let changed = tally.push_line(&l);
                        on_line(&l, &tally, changed);
                    }
                    Some(Err(_)) | None => break,
                },
                _ = tokio::time::sleep_until(deadline) => { stop = Some(AgentStop::TimedOut); break; }
                _ = tokio::time::sleep_until(idle_at) => { stop = Some(AgentStop::Idle); break; }
                _ = cancel.cancelled() => { stop = Some(AgentStop::Cancelled); break; }
            }
        }
    }
    let stop = match stop {
        Some(s) => {
            terminate(&mut child, pgid).await;
            // What it printed while stopping still counts (a final usage line, if any).
            if let Some(lines) = lines.as_mut() {
                while let Ok(Some(Ok(l))) = tokio::time::timeout(Duration::from_millis(500), lines.next()).await {
                    let changed = tally.push_line(&l);
                    on_line(&l, &tally, changed);
                }
            }
            s
        }
        None => {
            // stdout closed: the agent is exiting. Still bound the wait by deadline and cancel.
            tokio::select! {
                st = child.wait() => AgentStop::Exited(st.ok().and_then(|s| s.code())),
                _ = tokio::time::sleep_until(deadline) => { terminate(&mut child, pgid).await; AgentStop::TimedOut }
                _ = cancel.cancelled() => { terminate(&mut child, pgid).await; AgentStop::Cancelled }
            }
        }
    };
    // Tools the agent started may linger in its group after it exits; they go with it.
    if let Some(pg) = pgid {
        let _ = killpg(pg, Signal::SIGKILL);
    }
    let stderr_tail = match stderr_task {
        Some(t) => tokio::time::timeout(Duration::from_secs(1), t).await.ok().and_then(Result::ok).unwrap_or_default(),
        None => String::new(),
    };
    Ok(AgentOutcome { tally, stop, stderr_tail, duration: started.elapsed() })
}

/// SIGTERM to the whole group, then SIGKILL after a grace period.
async fn terminate(child: &mut tokio::process::Child, pgid: Option<Pid>) {
    if let Some(pg) = pgid {
        let _ = killpg(pg, Signal::SIGTERM);
    }
    if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
        if let Some(pg) = pgid {
            let _ = killpg(pg, Signal::SIGKILL);
        }
        let _ = child.kill().await;
    }
}

/// Lines over the bound are skipped to their newline, and reading goes on: `FramedRead` ends its
/// stream after the first error, so the error never reaches it (the agent, left writing into a
/// pipe nobody reads, would block until the timeout).
struct SkipLong(AnyDelimiterCodec);

impl tokio_util::codec::Decoder for SkipLong {
    type Item = tokio_util::bytes::Bytes;
    type Error = AnyDelimiterCodecError;

    fn decode(&mut self, buf: &mut tokio_util::bytes::BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        loop {
            match self.0.decode(buf) {
                // The codec now discards up to the next newline: decode again.
                Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => continue,
                other => return other,
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut tokio_util::bytes::BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        loop {
            match self.0.decode_eof(buf) {
                Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => continue,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The Job lists the team's names (the chart default's among them): those pass, then the
    /// manifest's values; a name of ours never does, even when listed.
    #[test]
    fn the_teams_env_reaches_the_agent_but_never_a_name_of_ours() {
        let text = "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {name: a}\nspec: {prompt: p, repository: {url: 'http://127.0.0.1/r.git'}, pod: {env: [{name: TEAM, value: t}]}}\n";
        let m = crate::api::parse_manifest(text).unwrap();
        let r = crate::api::resolve(&m.execution, &[]).unwrap();
        let parent = |k: &str| {
            let v = match k {
                crate::api::contract::AGENT_ENV => "PLATFORM,HOME,CLAUDE_CONFIG_DIR,LD_PRELOAD,TEAM",
                "PLATFORM" => "p",
                "HOME" => "/evil",
                "CLAUDE_CONFIG_DIR" => "/evil",
                "LD_PRELOAD" => "/evil.so",
                "TEAM" => "from-the-container",
                "SECRET_OF_THE_SHELL" => "s",
                _ => return None,
            };
            Some(v.to_string())
        };
        let cmd = build_command(&r, Path::new("claude"), Path::new("/w"), Path::new("/h"), Some("tok"), parent);
        let env: BTreeMap<String, String> = cmd.env.iter().cloned().collect();
        assert_eq!(env.len(), cmd.env.len(), "each name once: {:?}", cmd.env);
        assert_eq!(env.get("PLATFORM").map(String::as_str), Some("p"));
        assert_eq!(env.get("TEAM").map(String::as_str), Some("t"), "the manifest's value");
        assert_eq!(env.get("HOME").map(String::as_str), Some("/h"));
        assert_eq!(env.get("CLAUDE_CONFIG_DIR").map(String::as_str), Some("/h/.claude"));
        assert!(!env.contains_key("LD_PRELOAD") && !env.contains_key("SECRET_OF_THE_SHELL"), "{env:?}");
    }
}
