//! Test support shared by the integration tests, the demo and the benchmarks: a git
//! smart-HTTP server, a scripted fake Anthropic API, and a harness that wires them to the runner.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod fake_anthropic;
pub mod fake_forge;
pub mod fake_mcp;
pub mod git_server;
pub mod kube_api;
pub mod pod;

use std::path::{Path, PathBuf};

use agentops::api::{Resolved, parse_manifest, resolve};
use agentops::runner::{RunError, RunOptions, Summary, run_execution};
use agentops::store::Store;
use tokio_util::sync::CancellationToken;

pub use fake_anthropic::{Block, FakeAnthropic, Step};
pub use git_server::GitServer;

/// An HTTP client for a test. reqwest is built without a default TLS provider (agentops installs
/// ring when it makes its clients): whichever test builds a client first in its process must
/// install it too, or reqwest panics.
pub fn http() -> reqwest::Client {
    http_builder().build().expect("an HTTP client")
}

/// `http`, to configure.
pub fn http_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// The git token of the test server. Tests grep for it to prove it never leaks.
pub const TOKEN: &str = "ghp_agentopsTestToken5f2b9c";
/// The Anthropic API key given to the agent. Same.
pub const API_KEY: &str = "sk-ant-agentopsTestKey7d1e";

/// The Claude Code CLI installed by `npm ci` (or `$AGENTOPS_CLAUDE_BIN`).
pub fn claude_bin() -> PathBuf {
    std::env::var_os("AGENTOPS_CLAUDE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("node_modules/.bin/claude"))
}

/// A git server with a `demo` repository, a fake model, secrets, a store and run options.
pub struct Harness {
    pub git: GitServer,
    pub model: FakeAnthropic,
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub opts: RunOptions,
    pub db_path: PathBuf,
    /// CLAUDE_CODE_MAX_RETRIES for the agent.
    pub max_retries: u32,
}

impl Harness {
    /// Starts everything; the model answers with `script`.
    pub async fn new(script: Vec<Step>) -> Self {
        let git = GitServer::start("x-access-token", Some(TOKEN)).await;
        git.create_repo(
            "demo",
            &[("README.md", "# Demo\n\nHello from the demo repository.\n"), ("src/lib.txt", "one\ntwo\nthree\n")],
        );
        let model = FakeAnthropic::start(script).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = dir.path().join("secrets");
        write_secret(&secrets, "git-cred", "token", TOKEN);
        write_secret(&secrets, "anthropic", "api-key", API_KEY);
        let db_path = dir.path().join("agentops.db");
        let store = Store::open(&db_path).await.expect("store");
        let opts = RunOptions {
            workspace_root: dir.path().join("workspaces"),
            claude_bin: claude_bin(),
            secrets_dir: secrets,
            progress: false,
            report: None,
            // The agent runs confined in every test, as users run it.
            sandbox: Some(agentops::runner::SandboxPolicy { extra_read: vec![], protected: vec![db_path.clone()] }),
            gateway: None,
            git_relay: None,
            egress: None,
            open_pull_request: true,
            bundle: None,
        };
        Self { git, model, dir, store, opts, db_path, max_retries: 1 }
    }

    /// A manifest for the `demo` repository; `extra` is appended under `spec:` (2-space indent).
    pub fn manifest(&self, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata:\n  name: {name}\nspec:\n  prompt: Update the demo repository\n  repository:\n    url: {}\n    credentialsSecretRef: {{name: git-cred}}\n  agent:\n    apiKeySecretRef: {{name: anthropic}}\n{extra}",
            self.git.url("demo")
        )
    }

    /// Parses and resolves a manifest.
    pub fn resolved(&self, yaml: &str) -> Resolved {
        let m = parse_manifest(yaml).expect("manifest");
        resolve(&m.execution, &m.templates).expect("resolve")
    }

    /// The environment the runner sees: the real PATH, the fake model's URL, few retries.
    pub fn env(&self) -> impl Fn(&str) -> Option<String> + Sync + use<> {
        let base = self.model.base_url.clone();
        let retries = self.max_retries.to_string();
        move |k: &str| match k {
            "ANTHROPIC_BASE_URL" => Some(base.clone()),
            "CLAUDE_CODE_MAX_RETRIES" => Some(retries.clone()),
            "ANTHROPIC_API_KEY" => None,
            other => std::env::var(other).ok(),
        }
    }

    /// The `agentops` binary `bin` (`env!("CARGO_BIN_EXE_agentops")` in a test) as a user runs
    /// it against this harness: a clean environment with the real PATH, this harness's HOME,
    /// store, secrets, workspaces and model, one API retry; stdin closed; killed when dropped.
    pub fn agentops(&self, bin: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(bin);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("AGENTOPS_DB", &self.db_path)
            .env("AGENTOPS_CLAUDE_BIN", &self.opts.claude_bin)
            .env("AGENTOPS_SECRETS_DIR", &self.opts.secrets_dir)
            .env("AGENTOPS_WORKSPACE_ROOT", &self.opts.workspace_root)
            .env("ANTHROPIC_BASE_URL", &self.model.base_url)
            .env("CLAUDE_CODE_MAX_RETRIES", "1")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Runs a manifest to the end.
    pub async fn run(&self, yaml: &str) -> Summary {
        self.try_run(yaml, CancellationToken::new()).await.expect("run")
    }

    /// Runs a manifest with a cancel token.
    pub async fn try_run(&self, yaml: &str, cancel: CancellationToken) -> Result<Summary, RunError> {
        let r = self.resolved(yaml);
        let env = self.env();
        run_execution(&self.store, &self.opts, &r, &env, cancel).await
    }
}

/// Writes `<dir>/<name>/<key>` like a mounted Secret.
pub fn write_secret(dir: &Path, name: &str, key: &str, value: &str) {
    std::fs::create_dir_all(dir.join(name)).expect("mkdir");
    std::fs::write(dir.join(name).join(key), value).expect("write secret");
}

/// The agent script of the happy path: Write a file, Read + Edit another, run a Bash command.
pub fn happy_script() -> Vec<Step> {
    use serde_json::json;
    vec![
        Step::tool("Write", json!({"file_path": "greeting.txt", "content": "Hello, agentops!\n"}))
            .with_usage([120, 40, 10, 5]),
        Step::tool("Read", json!({"file_path": "README.md"})),
        Step::tool(
            "Edit",
            json!({"file_path": "README.md", "old_string": "Hello from the demo repository.", "new_string": "Hello from the agent."}),
        ),
        Step::tool(
            "Bash",
            json!({"command": "printf 'built\\n' > build.txt && rm src/lib.txt", "description": "build"}),
        ),
        Step::text("Added greeting.txt, edited README.md, built."),
    ]
}
