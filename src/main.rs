//! The `agentops` binary: parse the command line, set up logging, dispatch.

use clap::Parser;

// jemalloc instead of glibc's malloc: the controller's many small, long-lived objects (watch
// caches, accounts) fragment glibc's arenas; BENCHMARKS.md has the measurement.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: one arena (its default, four per CPU, costs
/// `agentops run` ~1.5 MiB of its 30 MiB budget and the controller nothing measurable).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 10] = b"narenas:1\0";

#[tokio::main]
async fn main() {
    // Processes of the same user (a hook over the agent's workspace in a pod's `finish` step)
    // may not read this one's memory, descriptors or environment, nor trace it: /proc/<pid>
    // of a non-dumpable process needs CAP_SYS_PTRACE. What it starts is dumpable again (exec).
    let _ = nix::sys::prctl::set_dumpable(false);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = agentops::cli::Cli::parse();
    let code = match agentops::cli::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", agentops::api::text::clean(&format!("{e:#}")));
            1
        }
    };
    std::process::exit(code);
}
