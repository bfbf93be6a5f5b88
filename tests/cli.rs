//! `agentops` as a user runs it: exit statuses, JSON summary, the store commands, signals,
//! and a search for leaked secrets in everything a run leaves behind.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

fn agentops(h: &Harness) -> tokio::process::Command {
    h.agentops(env!("CARGO_BIN_EXE_agentops"))
}

async fn output(mut c: tokio::process::Command) -> (i32, String, String) {
    let out = c.output().await.expect("run agentops");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_manifest(h: &Harness, name: &str, yaml: &str) -> std::path::PathBuf {
    let p = h.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_prints_a_json_summary_and_the_store_commands_read_it() {
    let h = Harness::new(happy_script()).await;
    let file = write_manifest(&h, "json", &h.manifest("json", ""));
    let mut c = agentops(&h);
    // --sandbox-require: this machine's kernel has every protection (Landlock ABI 7), so it runs.
    c.args(["run", "--sandbox-require", "-f"]).arg(&file).args(["--output", "json"]);
    let (code, stdout, stderr) = output(c).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("cloning") && stderr.contains("pushed"), "progress on stderr: {stderr}");
    assert!(stderr.contains("sandbox: Landlock ABI"), "the protections in force are said: {stderr}");
    assert!(!stderr.contains("lacks"), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object on stdout");
    for key in [
        "id",
        "phase",
        "reason",
        "message",
        "durationMs",
        "tokensUsed",
        "usage",
        "costUsd",
        "numTurns",
        "toolCalls",
        "sessionId",
        "git",
        "workspace",
    ] {
        assert!(v.get(key).is_some(), "summary has {key}: {v}");
    }
    for key in ["inputTokens", "outputTokens", "cacheReadInputTokens", "cacheCreationInputTokens"] {
        assert!(v["usage"][key].as_u64().is_some(), "usage.{key}");
    }
    for key in ["branch", "commit", "pushed", "changedFiles", "insertions", "deletions"] {
        assert!(v["git"].get(key).is_some(), "git.{key}");
    }
    assert_eq!(v["phase"], "Succeeded");
    assert_eq!(v["toolCalls"]["byTool"]["Write"], 1);
    let id = v["id"].as_str().unwrap().to_string();

    let mut c = agentops(&h);
    c.args(["executions", "list"]);
    let (code, stdout, _) = output(c).await;
    assert_eq!(code, 0);
    assert!(stdout.contains(&id) && stdout.contains("Succeeded") && stdout.contains("default/json"), "{stdout}");

    let mut c = agentops(&h);
    c.args(["executions", "show", &id[..6], "--logs", "--diff"]);
    let (code, stdout, _) = output(c).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("+Hello, agentops!"), "diff shown: {stdout}");
    assert!(stdout.contains("[agent]") && stdout.contains("[runner]"), "logs shown");

    let mut c = agentops(&h);
    c.args(["executions", "show", "nope", "--json"]);
    let (code, _, stderr) = output(c).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("no execution matches"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_manifests_exit_2_naming_the_field_and_create_nothing() {
    let h = Harness::new(happy_script()).await;
    let cases = [
        (h.manifest("bad", "").replace("prompt:", "promt:"), "spec.promt"),
        (h.manifest("bad", "  timeout: forever\n"), "spec.timeout"),
        (h.manifest("bad", "").replace("url: ", "url: ftp://"), "spec.repository.url"),
        ("apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nspec: [".to_string(), "yaml"),
        (h.manifest("bad", "").replace("agentops.dev/v1alpha1", "v1"), "apiVersion"),
    ];
    for (yaml, field) in cases {
        let file = write_manifest(&h, "bad", &yaml);
        let mut c = agentops(&h);
        c.args(["run", "-f"]).arg(&file);
        let (code, stdout, stderr) = output(c).await;
        assert_eq!(code, 2, "{field}: {stderr}");
        assert!(stderr.contains(field), "error names {field}: {stderr}");
        assert!(stdout.is_empty());
    }
    let mut c = agentops(&h);
    c.args(["run", "-f", "/nonexistent.yaml"]);
    assert_eq!(output(c).await.0, 2);
    assert!(h.store.list_executions(10).await.unwrap().is_empty(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_cancels_with_exit_4_and_keeps_usage() {
    let h = Harness::new(vec![
        Step::tool("Write", json!({"file_path": "a.txt", "content": "a\n"})).with_usage([250, 30, 0, 0]),
        Step::Hang,
    ])
    .await;
    let file = write_manifest(&h, "int", &h.manifest("int", ""));
    let mut c = agentops(&h);
    c.args(["run", "-q", "-o", "json", "-f"]).arg(&file).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    assert!(h.model.wait_for_main_requests(2, Duration::from_secs(60)).await);
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let at = std::time::Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(at.elapsed() < Duration::from_secs(5), "{:?}", at.elapsed());
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "Cancelled");
    assert!(v["usage"]["inputTokens"].as_u64().unwrap() >= 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_list_and_clean() {
    let h = Harness::new(vec![Step::text("nothing")]).await;
    let file = write_manifest(&h, "keep", &h.manifest("keep", "  workspace: {retain: Retain}\n"));
    let mut c = agentops(&h);
    c.args(["run", "-q", "-f"]).arg(&file);
    assert_eq!(output(c).await.0, 0);
    let ws = h.store.list_workspaces().await.unwrap();
    assert_eq!(ws[0].status, "completed");
    assert!(Path::new(&ws[0].path).exists(), "retained");

    let mut c = agentops(&h);
    c.args(["workspaces", "clean", "--older-than", "1h"]);
    let (_, stdout, _) = output(c).await;
    assert!(stdout.contains("0 workspace(s) removed"), "young workspaces stay: {stdout}");
    // --dry-run says what it would remove, and removes nothing.
    let mut c = agentops(&h);
    c.args(["workspaces", "clean", "--older-than", "0s", "--dry-run"]);
    let (code, stdout, _) = output(c).await;
    assert_eq!(code, 0);
    assert!(stdout.contains(&format!("would remove {}", ws[0].path)), "{stdout}");
    assert!(Path::new(&ws[0].path).exists(), "a dry run removes nothing");
    assert_eq!(h.store.list_workspaces().await.unwrap()[0].status, "completed");
    let mut c = agentops(&h);
    c.args(["workspaces", "clean", "--older-than", "0s"]);
    let (code, stdout, _) = output(c).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("1 workspace(s) removed"), "{stdout}");
    assert!(!Path::new(&ws[0].path).exists());
    let mut c = agentops(&h);
    c.args(["workspaces", "list"]);
    assert!(output(c).await.1.contains("cleaned"));
}

/// Every file under `dir`, as bytes.
fn files_under(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_store_logs_git_config_or_summary() {
    // The agent even prints its own environment: the stored log must still not hold the key.
    let mut script = vec![Step::tool(
        "Bash",
        json!({"command": "env | grep -c ANTHROPIC_API_KEY; echo key=$ANTHROPIC_API_KEY; cat .git/config", "description": "snoop"}),
    )];
    script.extend(happy_script());
    let h = Harness::new(script).await;
    let file = write_manifest(&h, "leak", &h.manifest("leak", "  workspace: {retain: Retain}\n"));
    let mut c = agentops(&h);
    c.args(["run", "-o", "json", "-f"]).arg(&file).env("RUST_LOG", "debug");
    let (code, stdout, stderr) = output(c).await;
    assert_eq!(code, 0, "{stderr}");
    // A failing run too (wrong token path and error messages).
    write_secret(&h.opts.secrets_dir, "git-cred", "token", &format!("{TOKEN}-wrong"));
    let file2 = write_manifest(&h, "leak2", &h.manifest("leak2", ""));
    let mut c = agentops(&h);
    c.args(["run", "-o", "json", "-f"]).arg(&file2).env("RUST_LOG", "debug");
    let (code2, stdout2, stderr2) = output(c).await;
    assert_eq!(code2, 1);

    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let ws = Path::new(v["workspace"].as_str().unwrap());
    let logs = h.store.logs(v["id"].as_str().unwrap()).await.unwrap();
    // The agent's environment holds a token of the model gateway, never the API key; the model
    // server got the real key, added by the gateway.
    assert!(logs.iter().any(|l| l.line.contains("key=agentops-")), "the agent holds the gateway's token");
    let keys: Vec<Option<String>> = h.model.seen().iter().map(|s| s.api_key.clone()).collect();
    assert!(!keys.is_empty() && keys.iter().all(|k| k.as_deref() == Some(API_KEY)), "{keys:?}");

    let mut files = Vec::new();
    files_under(&ws.join("repo/.git"), &mut files);
    files_under(h.db_path.parent().unwrap(), &mut files); // agentops.db, -wal, -shm
    assert!(files.iter().any(|(p, _)| p.ends_with("config")), "looked at .git/config");
    for secret in [TOKEN, API_KEY] {
        for (path, bytes) in &files {
            if path.starts_with(&h.opts.secrets_dir) {
                continue;
            }
            assert!(!contains(bytes, secret), "{secret} found in {}", path.display());
        }
        for text in [&stdout, &stderr, &stdout2, &stderr2] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
    }
    // The remote URL in .git/config is the plain one.
    let config = std::fs::read_to_string(ws.join("repo/.git/config")).unwrap();
    assert!(config.contains(&h.git.url("demo")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_exits_3_and_sigterm_cancels_with_exit_4() {
    let h = Harness::new(vec![
        Step::tool("Write", json!({"file_path": "a.txt", "content": "a\n"})).with_usage([250, 30, 0, 0]),
        Step::Hang,
    ])
    .await;
    let file = write_manifest(&h, "slow", &h.manifest("slow", "  timeout: 3s\n"));
    let mut c = agentops(&h);
    c.args(["run", "-q", "-o", "json", "-f"]).arg(&file);
    let (code, stdout, stderr) = output(c).await;
    assert_eq!(code, 3, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!((v["phase"].as_str(), v["reason"].as_str()), (Some("TimedOut"), Some("Timeout")), "{v}");
    assert!(v["usage"]["inputTokens"].as_u64().unwrap() >= 250, "usage kept: {v}");

    // SIGTERM (what `kubectl delete` and systemd send) cancels like Ctrl-C.
    h.model.set_script(vec![Step::tool("Write", json!({"file_path": "a.txt", "content": "a\n"})), Step::Hang]);
    let file = write_manifest(&h, "term", &h.manifest("term", ""));
    let mut c = agentops(&h);
    c.args(["run", "-q", "-o", "json", "-f"]).arg(&file).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let before = h.model.main_requests();
    assert!(h.model.wait_for_main_requests(before + 2, Duration::from_secs(60)).await);
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let at = std::time::Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(at.elapsed() < Duration::from_secs(5), "{:?}", at.elapsed());
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["phase"].as_str(), v["reason"].as_str()), (Some("Cancelled"), Some("Cancelled")), "{v}");
}

/// `--sandbox-read` grants the agent a directory outside its workspace (a toolchain): without
/// it the agent's read is refused (EACCES from Landlock), with it the file is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_read_grants_a_toolchain_directory() {
    let toolchain = tempfile::tempdir().unwrap();
    std::fs::write(toolchain.path().join("VERSION"), "toolchain 1.2.3\n").unwrap();
    let script = || {
        vec![
            Step::tool(
                "Bash",
                json!({"command": format!("cat {}/VERSION > seen.txt 2> refused.txt; true", toolchain.path().display())}),
            ),
            Step::text("Done."),
        ]
    };
    let mut seen = Vec::new();
    for grant in [false, true] {
        let h = Harness::new(script()).await;
        let file = write_manifest(&h, "tc", &h.manifest("tc", "  workspace: {retain: Retain}\n"));
        let mut c = agentops(&h);
        c.args(["run", "-q", "-o", "json", "-f"]).arg(&file);
        if grant {
            c.arg("--sandbox-read").arg(toolchain.path());
        }
        let (code, stdout, stderr) = output(c).await;
        assert_eq!(code, 0, "{stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).unwrap();
        let repo = Path::new(v["workspace"].as_str().unwrap()).join("repo");
        let read = std::fs::read_to_string(repo.join("seen.txt")).unwrap();
        let refused = std::fs::read_to_string(repo.join("refused.txt")).unwrap();
        seen.push((read, refused));
    }
    assert_eq!(seen[0].0, "", "without --sandbox-read nothing is read");
    assert!(seen[0].1.contains("Permission denied"), "EACCES: {}", seen[0].1);
    assert_eq!(seen[1].0, "toolchain 1.2.3\n", "with it, the file is read: {}", seen[1].1);
}

/// A kernel without Landlock, played for real: a seccomp filter makes `landlock_create_ruleset`
/// fail with ENOSYS (what a kernel older than 5.13 answers) for agentops and all it starts.
/// `--sandbox-require` then refuses before anything starts (exit 2, naming what is missing, no
/// request to the model, nothing pushed); without it the run goes on, saying the agent runs
/// less confined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_require_refuses_a_kernel_without_landlock() {
    // struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}: load the syscall number; if it is
    // landlock_create_ruleset (444 on x86_64 and aarch64), return ERRNO(ENOSYS); else allow.
    const OLD_KERNEL: &str = r#"
import ctypes, os, struct, sys
f = [(0x20, 0, 0, 0), (0x15, 0, 1, 444), (0x06, 0, 0, 0x00050000 | 38), (0x06, 0, 0, 0x7fff0000)]
prog = b"".join(struct.pack("HBBI", *i) for i in f)
buf = ctypes.create_string_buffer(prog)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fp = Fprog(len(f), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
os.execv(sys.argv[1], sys.argv[1:])
"#;
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return;
    }
    let h = Harness::new(happy_script()).await;
    let old_kernel = |args: &[&str], file: &std::path::Path| {
        let mut c = h.agentops("/usr/bin/python3");
        c.args(["-c", OLD_KERNEL, env!("CARGO_BIN_EXE_agentops")]).args(args).arg(file);
        c
    };
    let file = write_manifest(&h, "old", &h.manifest("old", ""));
    let (code, stdout, stderr) = output(old_kernel(&["run", "--sandbox-require", "-f"], &file)).await;
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("--sandbox-require: this machine has no Landlock, which lacks:"), "{stderr}");
    assert!(stderr.contains("nothing was started"), "{stderr}");
    assert_eq!(h.model.seen().len(), 0, "no request reached the model");
    assert_eq!(h.git.branch_head("demo", "agentops/old"), None, "nothing pushed");

    // Control: the same kernel without --sandbox-require runs, and says what it lacks.
    let (code, stdout, stderr) = output(old_kernel(&["run", "-f"], &file)).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains("this kernel has no Landlock"), "{stderr}");
    assert!(h.git.branch_head("demo", "agentops/old").is_some());
}
