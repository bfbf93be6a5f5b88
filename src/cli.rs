//! The command line: `run`, `crd`, `executions`, `workspaces`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_NO_BORDERS};
use tokio_util::sync::CancellationToken;

use crate::api::{parse_manifest, resolve};
use crate::runner::{self, EXIT_INVALID, RunOptions, Workspace};
use crate::store::{Store, WorkspaceStatus};

/// Run the Claude Code agent against git repositories, on one machine or in Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "agentops", version, about)]
pub struct Cli {
    /// SQLite store file [default: $XDG_DATA_HOME/agentops/agentops.db]
    #[arg(long, global = true, env = "AGENTOPS_DB")]
    pub db: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an AgentExecution manifest on this machine and print a summary.
    ///
    /// Exit status: 0 succeeded, 1 failed, 2 invalid input (nothing ran), 3 timed out, 4 cancelled.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Recorded executions.
    #[command(subcommand)]
    Executions(ExecutionsCmd),
    /// Workspaces on this machine.
    #[command(subcommand)]
    Workspaces(WorkspacesCmd),
}

/// Output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Options of `agentops run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The manifest: one AgentExecution, optionally with AgentTemplates (multi-document YAML).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Summary format on stdout.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
    /// Directory for workspaces [default: the system temp dir].
    #[arg(long, env = "AGENTOPS_WORKSPACE_ROOT")]
    pub workspace_root: Option<PathBuf>,
    /// The Claude Code CLI.
    #[arg(long, env = "AGENTOPS_CLAUDE_BIN", default_value = "claude")]
    pub claude_bin: PathBuf,
    /// Secrets as files `<dir>/<secret-name>/<key>` [default: $XDG_CONFIG_HOME/agentops/secrets].
    #[arg(long, env = "AGENTOPS_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `agentops executions ...`
#[derive(Subcommand, Debug)]
pub enum ExecutionsCmd {
    /// The newest executions.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One execution (by id or unique id prefix).
    Show {
        id: String,
        /// Include the log lines.
        #[arg(long)]
        logs: bool,
        /// Include the diff that was committed.
        #[arg(long)]
        diff: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `agentops workspaces ...`
#[derive(Subcommand, Debug)]
pub enum WorkspacesCmd {
    /// All workspaces and their status.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove finished workspaces older than a duration.
    Clean {
        /// e.g. 24h, 30m, 0s for all finished workspaces.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

fn default_db() -> PathBuf {
    directories::ProjectDirs::from("dev", "agentops", "agentops")
        .map(|d| d.data_dir().join("agentops.db"))
        .unwrap_or_else(|| PathBuf::from("agentops.db"))
}

fn default_secrets_dir() -> PathBuf {
    directories::ProjectDirs::from("dev", "agentops", "agentops")
        .map(|d| d.config_dir().join("secrets"))
        .unwrap_or_else(|| PathBuf::from("secrets"))
}

/// Runs the parsed command; returns the process exit status.
pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let db = cli.db.clone().unwrap_or_else(default_db);
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::crds_yaml()?);
            Ok(0)
        }
        Command::Run(args) => run(&db, args).await,
        Command::Executions(cmd) => executions(&Store::open(&db).await?, cmd).await,
        Command::Workspaces(cmd) => workspaces(&Store::open(&db).await?, cmd).await,
    }
}

async fn run(db: &std::path::Path, args: RunArgs) -> anyhow::Result<i32> {
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return Ok(EXIT_INVALID);
        }
    };
    let resolved = match parse_manifest(&text).and_then(|m| resolve(&m.execution, &m.templates)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}: {e}", args.file.display());
            return Ok(EXIT_INVALID);
        }
    };
    let store = Store::open(db).await?;
    let opts = RunOptions {
        workspace_root: args.workspace_root.unwrap_or_else(std::env::temp_dir),
        claude_bin: args.claude_bin,
        secrets_dir: args.secrets_dir.unwrap_or_else(default_secrets_dir),
        progress: !args.quiet,
    };
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    let env = |k: &str| std::env::var(k).ok();
    let summary = match runner::run_execution(&store, &opts, &resolved, &env, cancel).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(e.exit_code());
        }
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string(&summary)?)?,
        Output::Text => write!(out, "{}", summary.human())?,
    }
    Ok(summary.exit_code())
}

/// Ctrl-C or SIGTERM cancels the execution (the agent is stopped, usage kept).
async fn cancel_on_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("cancelling: stopping the agent (usage so far is kept)");
    cancel.cancel();
}

async fn executions(store: &Store, cmd: ExecutionsCmd) -> anyhow::Result<i32> {
    match cmd {
        ExecutionsCmd::List { limit, json } => {
            let rows = store.list_executions(limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            let mut t = Table::new();
            t.load_style(UTF8_NO_BORDERS).set_header([
                "ID", "NAME", "PHASE", "REASON", "TOKENS", "COST", "TURNS", "DURATION", "CREATED",
            ]);
            for r in rows {
                t.add_row([
                    r.id,
                    format!("{}/{}", r.namespace, r.name),
                    r.status,
                    r.reason.unwrap_or_default(),
                    r.tokens_used.to_string(),
                    format!("${:.4}", r.cost_usd),
                    r.num_turns.to_string(),
                    r.duration_ms
                        .map(|d| format!("{:.1}s", d as f64 / 1000.0))
                        .unwrap_or_default(),
                    r.created_at,
                ]);
            }
            println!("{t}");
            Ok(0)
        }
        ExecutionsCmd::Show {
            id,
            logs,
            diff,
            json,
        } => {
            let row = store.get_execution(&id).await?;
            let log_lines = if logs {
                store.logs(&row.id).await?
            } else {
                Vec::new()
            };
            if json {
                let mut v = serde_json::to_value(&row)?;
                if let Some(o) = v.as_object_mut() {
                    o.remove("output_json");
                    if !diff {
                        o.remove("diff");
                    }
                    if logs {
                        o.insert("logs".into(), serde_json::to_value(&log_lines)?);
                    }
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let summary: Option<runner::Summary> = row
                .output_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok());
            match summary {
                Some(s) => print!("{}", s.human()),
                None => println!(
                    "{} {}/{} {} (running or interrupted)",
                    row.status, row.namespace, row.name, row.id
                ),
            }
            if diff {
                println!("{}", row.diff.as_deref().unwrap_or("(no diff)"));
            }
            for l in log_lines {
                println!("{} [{}] {}", l.at, l.source, l.line);
            }
            Ok(0)
        }
    }
}

async fn workspaces(store: &Store, cmd: WorkspacesCmd) -> anyhow::Result<i32> {
    match cmd {
        WorkspacesCmd::List { json } => {
            let rows = store.list_workspaces().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            let mut t = Table::new();
            t.load_style(UTF8_NO_BORDERS).set_header([
                "ID",
                "STATUS",
                "PATH",
                "CREATED",
                "COMPLETED",
                "CLEANED",
            ]);
            for r in rows {
                t.add_row([
                    r.id,
                    r.status,
                    r.path,
                    r.created_at,
                    r.completed_at.unwrap_or_default(),
                    r.cleanup_at.unwrap_or_default(),
                ]);
            }
            println!("{t}");
            Ok(0)
        }
        WorkspacesCmd::Clean {
            older_than,
            dry_run,
        } => {
            let cutoff = chrono::Utc::now()
                - chrono::Duration::from_std(older_than).context("--older-than is too large")?;
            let cutoff = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let stale = store.stale_workspaces(&cutoff).await?;
            let mut removed = 0;
            for w in &stale {
                if dry_run {
                    println!("would remove {} ({})", w.path, w.status);
                    continue;
                }
                store
                    .set_workspace_status(&w.id, WorkspaceStatus::Cleaning)
                    .await?;
                match Workspace::remove(std::path::Path::new(&w.path)) {
                    Ok(()) => {
                        store
                            .set_workspace_status(&w.id, WorkspaceStatus::Cleaned)
                            .await?;
                        println!("removed {}", w.path);
                        removed += 1;
                    }
                    Err(e) => eprintln!("cannot remove {}: {e}", w.path),
                }
            }
            if !dry_run {
                println!("{removed} workspace(s) removed");
            }
            Ok(0)
        }
    }
}
