//! The offline demo: one real execution of `agentops run` against a local git server, the
//! scripted model and a fake GitHub API from `tests/support/` (no network, no Anthropic or
//! GitHub account), then the pushed branch, the pull request the operator opened, and the
//! recorded usage. Run it with `scripts/demo`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Stdio;

use support::*;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let h = Harness::new(happy_script()).await;
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("agentops"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("build the binary first: cargo build --bin agentops"))?;
    // A repository with history on the local git server, and GitHub's API for it (the fake).
    h.git.create_repo(
        "acme/demo",
        &[("README.md", "# Demo\n\nHello from the demo repository.\n"), ("src/lib.txt", "one\ntwo\nthree\n")],
    );
    let github = fake_forge::FakeForge::start(fake_forge::Flavor::Github, h.git.root.clone(), TOKEN).await;
    let manifest = h.dir.path().join("demo.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata:\n  name: demo\nspec:\n  prompt: Update the demo repository\n  timeout: 5m\n  repository:\n    url: {}\n    credentialsSecretRef: {{name: git-cred}}\n    provider: github\n    apiUrl: {}\n  git:\n    pullRequest:\n      title: \"Demo: {{{{summary}}}}\"\n      labels: [agent]\n  agent:\n    apiKeySecretRef: {{name: anthropic}}\n",
            h.git.url("acme/demo"),
            github.api_url
        ),
    )?;
    println!("== manifest ({})\n{}", manifest.display(), std::fs::read_to_string(&manifest)?);

    let agentops = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&bin);
        c.args(args)
            .env("AGENTOPS_DB", &h.db_path)
            .env("AGENTOPS_CLAUDE_BIN", claude_bin())
            .env("AGENTOPS_SECRETS_DIR", &h.opts.secrets_dir)
            .env("AGENTOPS_WORKSPACE_ROOT", &h.opts.workspace_root)
            .env("ANTHROPIC_BASE_URL", &h.model.base_url)
            .env_remove("ANTHROPIC_API_KEY")
            .stdin(Stdio::null());
        c
    };
    let shown = manifest.to_string_lossy().into_owned();
    println!("== agentops run -f {shown}");
    let status = agentops(&["run", "-f", &shown]).status().await?;

    println!("\n== the pushed branch on the git server");
    let log = h.git.git("acme/demo", &["log", "--stat", "--format=%h %an <%ae>%n    %s", "main..agentops/demo"]);
    println!("{log}");
    println!("== the repository's history (cloned at depth 1; the work is one commit on main)");
    let graph = h.git.git("acme/demo", &["log", "--graph", "--all", "--format=%h%d %s"]);
    println!("{graph}");
    println!("== the pull request agentops opened on the local fake GitHub");
    for pr in github.prs() {
        println!(
            "#{} {} → {}  labels {:?}\ntitle: {}\n{}\n",
            pr.number, pr.head, pr.base, pr.labels, pr.title, pr.body
        );
    }
    println!("== agentops executions list");
    agentops(&["executions", "list"]).status().await?;
    let code = status.code().unwrap_or(1);
    let db: PathBuf = h.db_path.clone();
    println!("\n(store: {}; exit status {code})", db.display());
    std::process::exit(code);
}
