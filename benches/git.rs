//! Benchmarks for issue 17, git on real repositories, as ratios against git's own CLI on the
//! same local smart-HTTP server (git-http-backend):
//!  (a) bytes pushed for a one-file change on a 5,000-file repository: ours vs `git push` of
//!      the same change from a `git clone --depth 1`;
//!  (b) a 50,000-file repository with a long history: clone at depth 1, and publish of a
//!      one-file change (stage the work tree, commit, push), wall time and peak RSS, ours vs
//!      `git clone --depth 1 --single-branch` and `git add -A && git commit && git push`.
//!
//! Every measured operation runs in a process of its own (this binary again, `BENCH_CHILD`), so
//! its peak RSS is its own: ours is the child's VmHWM; git's is the peak of the sum of the RSS
//! of every git process alive at once (sampled; git clone runs git-remote-http and index-pack
//! beside itself), and never less than the largest one (`getrusage(RUSAGE_CHILDREN)`).
//!
//! Run outside `.ci/run`: the command exits 1 when a target (below) is missed.
//!
//! Run: `cargo bench --bench git` (BENCH_RUNS=N runs per figure, default 3; BENCH_FILES=N for
//! the large repository, default 50,000; BENCH_COMMITS=N its history, default 2,000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use support::GitServer;
use support::git_server::git;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// What one measured process reports.
#[derive(Debug, Clone, Copy)]
struct Figure {
    secs: f64,
    rss_mib: f64,
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// In a child: does the work `BENCH_CHILD` names, prints "secs rss_kib".
fn child(kind: &str) {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let rss = match kind {
        "clone" => {
            let (_, c) =
                agentops::git::clone(&var("URL"), Path::new(&var("DEST")), None, 1, None, &var("BRANCH"), &stop)
                    .unwrap();
            let t = c.timings;
            eprintln!(
                "      (clone: fetch {:.3} s, checkout {:.3} s)",
                t.fetch.as_secs_f64(),
                t.checkout.as_secs_f64()
            );
            vm_hwm_kib()
        }
        "publish" => {
            let work = PathBuf::from(var("DEST"));
            let base = git2::Oid::from_str(&var("BASE")).unwrap();
            let (url, branch) = (var("URL"), var("BRANCH"));
            let p = agentops::git::Publish::prepare(
                &work,
                &work.with_extension("publish.git"),
                base,
                &url,
                "refs/heads/main",
                None,
                &stop,
            )
            .unwrap()
            .with_stat_cache(&work.with_extension("clone.index"));
            let t0 = Instant::now();
            let staged = p.stage().unwrap().expect("a change");
            let t1 = Instant::now();
            let sig = git2::Signature::now("bench", "bench@localhost").unwrap();
            p.commit(&staged, &branch, &sig, "bench").unwrap();
            let t2 = Instant::now();
            p.push(&url, &branch, None, &stop).unwrap();
            eprintln!(
                "      (publish: prepare {:.3} s, stage {:.3} s, commit {:.3} s, push {:.3} s)",
                (t0 - t).as_secs_f64(),
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                t2.elapsed().as_secs_f64()
            );
            vm_hwm_kib()
        }
        "cli" => {
            let mut sh = Command::new("sh").args(["-c", &var("SCRIPT")]).spawn().unwrap();
            // The sum of the RSS of every process of the script alive at once (git clone runs
            // git-remote-http and index-pack beside itself), sampled every 2 ms: what the
            // machine needed, as our one process's VmHWM is. The largest single process
            // (`getrusage`) is printed beside it.
            let mut peak = 0;
            let st = loop {
                peak = peak.max(tree_rss_kib(sh.id()));
                if let Some(st) = sh.try_wait().unwrap() {
                    break st;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            };
            assert!(st.success(), "the git CLI script failed");
            let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
            eprintln!("      (git: peak of the processes' sum {} KiB, largest one {} KiB)", peak, usage.max_rss());
            peak.max(usage.max_rss() as u64)
        }
        other => panic!("unknown BENCH_CHILD {other}"),
    };
    println!("{} {rss}", t.elapsed().as_secs_f64());
}

/// The RSS of `root` and all its descendants now, in KiB (from /proc).
fn tree_rss_kib(root: u32) -> u64 {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name (which may hold spaces) in its parentheses.
        let ppid = stat.rsplit_once(") ").and_then(|(_, r)| r.split(' ').nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree.iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Runs this binary as a child doing `kind` with `env`.
fn measure(kind: &str, env: &[(&str, &str)]) -> Figure {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.env("BENCH_CHILD", kind).stderr(Stdio::inherit());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "child {kind} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let secs: f64 = parts.next().unwrap().parse().unwrap();
    let kib: f64 = parts.next().unwrap().parse().unwrap();
    Figure { secs, rss_mib: kib / 1024.0 }
}

/// A bare repository of `files` files (~200 bytes each, in 100-file directories) and
/// `commits` commits, each changing a few files, written by `git fast-import`.
fn large_repo(server: &GitServer, name: &str, files: usize, commits: usize) -> PathBuf {
    let bare = server.repo_path(name);
    git(&server.root, &["init", "-q", "--bare", "-b", "main", &bare.to_string_lossy()]);
    let mut fi =
        Command::new("git").args(["fast-import", "--quiet"]).current_dir(&bare).stdin(Stdio::piped()).spawn().unwrap();
    let mut w = std::io::BufWriter::new(fi.stdin.take().unwrap());
    let path = |i: usize| format!("src/d{:03}/f{i:05}.txt", i / 100);
    let body = |i: usize, rev: usize| format!("file {i} revision {rev}\n{}", "lorem ipsum dolor sit amet\n".repeat(7));
    for c in 0..commits {
        let msg = format!("commit {c}");
        writeln!(w, "commit refs/heads/main\ncommitter Seed <seed@example.com> {} +0000", 1_700_000_000 + c * 60)
            .unwrap();
        writeln!(w, "data {}\n{msg}", msg.len()).unwrap();
        let changed: Vec<usize> =
            if c == 0 { (0..files).collect() } else { (0..5).map(|k| (c * 7919 + k * 104_729) % files).collect() };
        for i in changed {
            let b = body(i, c);
            writeln!(w, "M 100644 inline {}\ndata {}\n{b}", path(i), b.len()).unwrap();
        }
        writeln!(w).unwrap();
    }
    drop(w);
    assert!(fi.wait().unwrap().success(), "fast-import failed");
    git(&bare, &["repack", "-adq"]);
    bare
}

fn pushed(server: &GitServer) -> u64 {
    server.stats().receive_pack_bytes.swap(0, Ordering::Relaxed)
}

struct Publishes {
    ours: Figure,
    ours_bytes: u64,
    git: Figure,
    git_bytes: u64,
}

/// Clones at depth 1 both ways, changes one file, and publishes both ways.
fn publish_one_file(server: &GitServer, name: &str, run: usize, tmp: &Path) -> (Figure, Figure, Publishes) {
    let url = server.url(name);
    let ours_dir = tmp.join(format!("ours-{run}"));
    let branch = format!("agentops/bench-{run}");
    let ours_clone = measure("clone", &[("URL", &url), ("DEST", &ours_dir.to_string_lossy()), ("BRANCH", &branch)]);
    let git_dir = tmp.join(format!("git-{run}"));
    let script = format!("git clone -q --depth 1 --single-branch '{url}' '{}'", git_dir.display());
    let git_clone = measure("cli", &[("SCRIPT", &script)]);

    let base = git(&ours_dir, &["rev-parse", "HEAD"]).trim().to_string();
    // As the runner does right after the clone (before the agent runs).
    std::fs::copy(ours_dir.join(".git/index"), ours_dir.with_extension("clone.index")).unwrap();
    let one = "src/d001/f00150.txt";
    for dir in [&ours_dir, &git_dir] {
        std::fs::write(dir.join(one), format!("changed in run {run}\n")).unwrap();
    }
    pushed(server);
    let ours = measure(
        "publish",
        &[("URL", &url), ("DEST", &ours_dir.to_string_lossy()), ("BRANCH", &branch), ("BASE", &base)],
    );
    let ours_bytes = pushed(server);
    let script = format!(
        "cd '{}' && git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm bench && git push -q origin HEAD:refs/heads/cli-{run}",
        git_dir.display()
    );
    let git_push = measure("cli", &[("SCRIPT", &script)]);
    let git_bytes = pushed(server);
    assert!(server.branch_head(name, &branch).is_some() && server.branch_head(name, &format!("cli-{run}")).is_some());
    (ours_clone, git_clone, Publishes { ours, ours_bytes, git: git_push, git_bytes })
}

/// Targets, ours against git's CLI: (time ratio, peak RSS ratio).
const CLONE_TARGET: (f64, f64) = (2.0, 2.0);
const PUBLISH_TARGET: (f64, f64) = (1.25, 2.0);

/// Prints a row; returns (time ratio, RSS ratio).
fn row(label: &str, ours: &[Figure], git: &[Figure]) -> (f64, f64) {
    let (ot, gt) = (median(ours.iter().map(|f| f.secs).collect()), median(git.iter().map(|f| f.secs).collect()));
    let (or, gr) = (median(ours.iter().map(|f| f.rss_mib).collect()), median(git.iter().map(|f| f.rss_mib).collect()));
    println!(
        "{label}: ours {ot:.3} s, {or:.1} MiB; git {gt:.3} s, {gr:.1} MiB; time ratio {:.2}, RSS ratio {:.2}",
        ot / gt,
        or / gr
    );
    (ot / gt, or / gr)
}

#[tokio::main]
async fn main() {
    if let Ok(kind) = std::env::var("BENCH_CHILD") {
        return child(&kind);
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; nothing to list.
    }
    let runs = env_num("BENCH_RUNS", 3);
    let files = env_num("BENCH_FILES", 50_000);
    let commits = env_num("BENCH_COMMITS", 2_000);
    let server = GitServer::start("u", None).await;
    let tmp = tempfile::tempdir().unwrap();
    println!("runs per figure: {runs} (medians)\n");

    // (a) 5,000 files, the history of tests/support (merge, tags, branches).
    let five: Vec<(String, String)> = (0..5_000)
        .map(|i| {
            (
                format!("src/d{:03}/f{i:05}.txt", i / 100),
                format!("file {i}\n{}", "lorem ipsum dolor sit amet\n".repeat(50)),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = five.iter().map(|(p, b)| (p.as_str(), b.as_str())).collect();
    let bare = server.create_repo("five", &refs);
    git(&bare, &["repack", "-adq"]);
    let size = git(&bare, &["count-objects", "-vH"]);
    let pack = size.lines().find(|l| l.starts_with("size-pack")).unwrap_or_default().to_string();
    let (mut ob, mut gb) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let s = server_blocking(&server, "five", run, tmp.path());
        ob.push(s.2.ours_bytes as f64);
        gb.push(s.2.git_bytes as f64);
    }
    let (ob, gb) = (median(ob), median(gb));
    println!(
        "(a) push of a one-file change, 5,000-file repository ({pack}): ours {ob:.0} bytes, git push {gb:.0} bytes, ratio {:.2}",
        ob / gb
    );

    // (b) the large repository.
    let t = Instant::now();
    let bare = large_repo(&server, "large", files, commits);
    let size = git(&bare, &["count-objects", "-vH"]);
    let pack = size.lines().find(|l| l.starts_with("size-pack")).unwrap_or_default().to_string();
    println!("\n(b) {files} files, {commits} commits ({pack}), built in {:.1} s", t.elapsed().as_secs_f64());
    let (mut oc, mut gc, mut op, mut gp, mut ob, mut gb) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let (c_ours, c_git, p) = server_blocking(&server, "large", 100 + run, tmp.path());
        oc.push(c_ours);
        gc.push(c_git);
        op.push(p.ours);
        gp.push(p.git);
        ob.push(p.ours_bytes as f64);
        gb.push(p.git_bytes as f64);
    }
    let clone = row("    clone --depth 1", &oc, &gc);
    let publish = row("    publish one file (stage, commit, push)", &op, &gp);
    let (ob, gb) = (median(ob), median(gb));
    println!("    bytes pushed: ours {ob:.0}, git push {gb:.0}, ratio {:.2}", ob / gb);
    let mut missed = Vec::new();
    for (what, (t, r), (tt, rt)) in [("clone", clone, CLONE_TARGET), ("publish", publish, PUBLISH_TARGET)] {
        if t > tt {
            missed.push(format!("{what} time ratio {t:.2} > {tt}"));
        }
        if r > rt {
            missed.push(format!("{what} RSS ratio {r:.2} > {rt}"));
        }
    }
    if !missed.is_empty() {
        eprintln!("targets missed: {}", missed.join("; "));
        std::process::exit(1);
    }
}

/// The measurements block on child processes while the server runs on this runtime's workers.
fn server_blocking(server: &GitServer, name: &str, run: usize, tmp: &Path) -> (Figure, Figure, Publishes) {
    tokio::task::block_in_place(|| publish_one_file(server, name, run, tmp))
}
