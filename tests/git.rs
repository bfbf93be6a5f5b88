//! git2 operations against the real smart-HTTP server, on repositories with history (merges,
//! annotated and lightweight tags, several branches, a default branch not named `main`): which
//! commit a ref names, pushing from a depth-1 clone with only the new objects, a work branch
//! that already exists, and real content (modes, symlinks, binaries, line endings, renames,
//! submodules, LFS pointers) surviving the round trip.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use agentops::git::{self, GitError};
use support::GitServer;
use support::git_server::git;

/// Runs blocking git work off the runtime that serves the git server.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A clone into a fresh directory: (the checkout's directory, what the clone says).
async fn clone(url: &str, r: Option<&str>, depth: u32, branch: &str) -> Result<(PathBuf, git::Cloned), GitError> {
    let (url, r, branch) = (url.to_string(), r.map(String::from), branch.to_string());
    blocking(move || {
        let dir = tempfile::tempdir().unwrap().keep();
        let (_, c) = git::clone(&url, &dir.join("c"), r.as_deref(), depth, None, &branch, &AtomicBool::new(false))?;
        // As the runner does: the clone's index kept outside the checkout, for its stat data.
        std::fs::copy(dir.join("c/.git/index"), dir.join("clone.index")).unwrap();
        Ok((dir, c))
    })
    .await
}

/// What the operator does after the agent: stage the checkout's files, one commit on the base,
/// push the work branch. Ok(None): nothing changed.
async fn publish(
    dir: &Path,
    c: &git::Cloned,
    url: &str,
    branch: &str,
) -> Result<Option<(String, git::Staged)>, GitError> {
    let (dir, c, url, branch) = (dir.to_path_buf(), c.clone(), url.to_string(), branch.to_string());
    blocking(move || {
        let stop = AtomicBool::new(false);
        let p =
            git::Publish::prepare(&dir.join("c"), &dir.join("publish.git"), c.base, &url, &c.source_ref, None, &stop)?;
        let Some(staged) = p.stage()? else { return Ok(None) };
        let sig = git2::Signature::now("agentops", "agentops@localhost")?;
        let oid = p.commit(&staged, &branch, &sig, "the agent's work")?;
        p.push(&url, &branch, None, &stop)?;
        Ok(Some((oid.to_string(), staged)))
    })
    .await
}

/// Commits on top of `branch` of the bare repository from a scratch clone (a person pushing).
fn push_as_someone_else(s: &GitServer, name: &str, branch: &str, file: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "-b", branch, &s.repo_path(name).to_string_lossy(), "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join(file), "someone else's work\n").unwrap();
    git(&w, &["add", "-A"]);
    git(&w, &["-c", "user.name=p", "-c", "user.email=p@p", "commit", "-qm", "someone else"]);
    git(&w, &["push", "-q", "origin", branch]);
    s.branch_head(name, branch).unwrap()
}

fn rev(s: &GitServer, name: &str, r: &str) -> String {
    s.git(name, &["rev-parse", r]).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ref_form_users_write_names_the_commit_they_expect() {
    let s = GitServer::start("u", None).await;
    s.create_repo_on("r", "trunk", &[("a.txt", "1\n")]);
    let url = s.url("r");

    // Omitted: the remote's default branch, read from its HEAD (here `trunk`, no `main` at all).
    let (dir, c) = clone(&url, None, 1, "work").await.unwrap();
    assert_eq!((c.source_branch.as_str(), c.source_ref.as_str()), ("trunk", "refs/heads/trunk"));
    assert_eq!(c.base.to_string(), rev(&s, "r", "trunk"));
    let repo = git2::Repository::open(dir.join("c")).unwrap();
    assert!(repo.is_shallow(), "depth 1 is shallow");
    assert_eq!(repo.head().unwrap().shorthand().ok(), Some("work"));
    assert_eq!(std::fs::read_to_string(dir.join("c/a.txt")).unwrap(), "1\n");

    // A branch.
    let (dir, c) = clone(&url, Some("feature/docs"), 1, "work").await.unwrap();
    assert_eq!((c.source_branch.as_str(), c.base.to_string()), ("feature/docs", rev(&s, "r", "feature/docs")));
    assert!(dir.join("c/docs/guide.md").exists() && !dir.join("c/a.txt").exists());

    // An annotated tag: the commit it points at, not the tag object.
    let (dir, c) = clone(&url, Some("v0.1"), 1, "work").await.unwrap();
    assert_eq!((c.source_branch.as_str(), c.source_ref.as_str()), ("v0.1", "refs/tags/v0.1"));
    assert_eq!(c.base.to_string(), rev(&s, "r", "v0.1^{commit}"));
    assert_ne!(c.base.to_string(), rev(&s, "r", "v0.1"), "v0.1 is an annotated tag");
    assert!(!dir.join("c/a.txt").exists(), "v0.1 is older than a.txt");
    // A lightweight tag, and a full ref name.
    let (_, c) = clone(&url, Some("v0.2"), 1, "work").await.unwrap();
    assert_eq!(c.base.to_string(), rev(&s, "r", "v0.2"));
    let (_, c) = clone(&url, Some("refs/heads/develop"), 1, "work").await.unwrap();
    assert_eq!((c.source_branch.as_str(), c.base.to_string()), ("develop", rev(&s, "r", "develop")));

    // A full commit id that no ref points at. git-http-backend, as git ships it, serves no
    // commit by id: every branch and tag is fetched and the commit found in them.
    let files_commit = rev(&s, "r", "trunk~2");
    let (dir, c) = clone(&url, Some(&files_commit), 1, "work").await.unwrap();
    assert_eq!((c.base.to_string(), c.source_branch.clone()), (files_commit.clone(), files_commit.clone()));
    assert!(dir.join("c/a.txt").exists() && !dir.join("c/docs/guide.md").exists());
    // A server that does (GitHub, GitLab): fetched by id, shallow.
    s.git("r", &["config", "uploadpack.allowReachableSHA1InWant", "true"]);
    let (dir, c) = clone(&url, Some(&files_commit), 1, "work").await.unwrap();
    assert_eq!(c.base.to_string(), files_commit);
    assert!(git2::Repository::open(dir.join("c")).unwrap().is_shallow());

    // Full history on request.
    let (dir, _) = clone(&url, None, 0, "work").await.unwrap();
    let repo = git2::Repository::open(dir.join("c")).unwrap();
    assert!(!repo.is_shallow(), "depth 0 fetches all history");
    let mut walk = repo.revwalk().unwrap();
    walk.push_head().unwrap();
    assert_eq!(walk.count(), 5, "first, guide, files, merge, changelog");

    // What does not exist says which field to fix.
    for missing in ["nope", "refs/heads/nope", &"0123456789".repeat(4)] {
        let Err(err) = clone(&url, Some(missing), 1, "work").await else { panic!("{missing} must fail") };
        assert!(matches!(err, GitError::RefNotFound { .. }), "{missing}: {err}");
        assert!(err.to_string().contains("spec.repository.ref"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_depth_1_clone_pushes_only_the_new_objects_whatever_the_base() {
    let s = GitServer::start("u", None).await;
    // 400 files of ~2 KiB: the repository is ~800 KiB; a one-file change is a few hundred bytes.
    let files: Vec<(String, String)> =
        (0..400).map(|i| (format!("src/m{}/f{i}.txt", i % 20), format!("file {i}\n").repeat(200))).collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(p, b)| (p.as_str(), b.as_str())).collect();
    s.create_repo("r", &refs);
    let url = s.url("r");
    let pushed_bytes = || s.stats().receive_pack_bytes.swap(0, Ordering::Relaxed);

    // (1) The base is the remote's branch tip; (2) a commit no ref points at, fetched by id as
    // GitHub serves it; (3) a branch tip, and the branch moves on while the agent works. In (2)
    // and (3) the server advertises no ref at the base: the pack must still be only the new objects.
    s.git("r", &["config", "uploadpack.allowReachableSHA1InWant", "true"]);
    let middle = rev(&s, "r", "main~1");
    for (case, r) in [("tip", None), ("sha", Some(middle.as_str())), ("moved", Some("develop"))] {
        let branch = format!("agentops/{case}");
        let (dir, c) = clone(&url, r, 1, &branch).await.unwrap();
        std::fs::write(dir.join("c/src/m3/f3.txt"), "one line changed\n").unwrap();
        std::fs::write(dir.join("c/NEW.md"), format!("new in {case}\n")).unwrap();
        if case == "moved" {
            push_as_someone_else(&s, "r", "develop", "moved.txt");
        }
        pushed_bytes();
        let (commit, staged) = publish(&dir, &c, &url, &branch).await.unwrap().unwrap();
        let bytes = pushed_bytes();
        assert!(bytes < 2048, "{case}: pushed {bytes} bytes for a two-file change");
        assert_eq!(s.branch_head("r", &branch).as_deref(), Some(commit.as_str()), "{case}");
        assert_eq!(rev(&s, "r", &format!("{commit}^")), c.base.to_string(), "{case}: one commit on the base");
        assert_eq!(s.git("r", &["rev-list", "--count", &format!("{}..{commit}", c.base)]).trim(), "1");
        assert_eq!((staged.stats.changed_files, staged.stats.insertions, staged.stats.deletions), (2, 2, 200));
    }
    s.git("r", &["fsck", "--strict", "--no-dangling"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_work_branch_is_continued_only_when_the_run_started_from_it() {
    let s = GitServer::start("u", None).await;
    s.create_repo("r", &[("a.txt", "1\n")]);
    let url = s.url("r");
    let develop = s.branch_head("r", "develop").unwrap();

    // Started from main, working on `develop`, which exists: refused at the clone, before any
    // agent spends a token, naming the branch and both ways out.
    let Err(err) = clone(&url, None, 1, "develop").await else { panic!("an existing branch must be refused") };
    assert!(matches!(err, GitError::BranchExists { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("develop") && msg.contains("spec.git.branch") && msg.contains("spec.repository.ref"), "{msg}");

    // Started from `develop` itself: the new commit goes on top (a fast-forward).
    let (dir, c) = clone(&url, Some("develop"), 1, "develop").await.unwrap();
    std::fs::write(dir.join("c/next.txt"), "continued\n").unwrap();
    let (commit, _) = publish(&dir, &c, &url, "develop").await.unwrap().unwrap();
    assert_eq!(rev(&s, "r", "develop^"), develop);
    assert_eq!(s.branch_head("r", "develop"), Some(commit.clone()));

    // Someone pushes to it while the agent works: rejected, their commit kept, nothing forced.
    let (dir, c) = clone(&url, Some("develop"), 1, "develop").await.unwrap();
    std::fs::write(dir.join("c/again.txt"), "more\n").unwrap();
    let theirs = push_as_someone_else(&s, "r", "develop", "theirs.txt");
    let Err(err) = publish(&dir, &c, &url, "develop").await else { panic!("a moved branch must be refused") };
    assert!(matches!(err, GitError::PushRejected { .. }), "{err}");
    assert!(err.to_string().contains("moved"), "{err}");
    assert_eq!(s.branch_head("r", "develop"), Some(theirs));

    // A new work branch someone creates while the agent works: BranchExists, theirs kept.
    let (dir, c) = clone(&url, None, 1, "agentops/late").await.unwrap();
    std::fs::write(dir.join("c/late.txt"), "late\n").unwrap();
    s.git("r", &["branch", "agentops/late", "develop"]);
    let Err(err) = publish(&dir, &c, &url, "agentops/late").await else { panic!("must be refused") };
    assert!(matches!(err, GitError::BranchExists { .. }), "{err}");
    assert_eq!(s.branch_head("r", "agentops/late"), s.branch_head("r", "develop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_content_survives_the_round_trip_and_the_stats_match_git() {
    let s = GitServer::start("u", None).await;
    s.create_repo("r", &[("a.txt", "1\n")]);
    let pointer = s.add_real_content("r");
    let url = s.url("r");
    let (dir, c) = clone(&url, None, 1, "agentops/content").await.unwrap();
    let w = dir.join("c");
    // The checkout is what a developer's would be.
    assert_eq!(std::fs::read(w.join("win/run.bat")).unwrap(), b"@echo off\r\necho one\r\n");
    assert_eq!(std::fs::read_link(w.join("link-to-readme")).unwrap(), Path::new("README.md"));
    assert_eq!(std::fs::read_to_string(w.join("assets/big.psd")).unwrap(), pointer, "LFS pointers stay pointers");

    // What an agent does (the same script the real CLI's Bash tool runs in run_pipeline.rs).
    let st = std::process::Command::new("bash").args(["-c", support::git_server::REAL_EDITS]).current_dir(&w).status();
    assert!(st.unwrap().success());
    let (commit, staged) = publish(&dir, &c, &url, "agentops/content").await.unwrap().unwrap();
    assert_eq!(staged.skipped, ["vendor/lib"], "the edit inside the submodule is reported");
    let git_stat = s.check_real_edits("r", &commit, &c.base.to_string(), &pointer);
    assert_eq!((staged.stats.changed_files, staged.stats.insertions, staged.stats.deletions), git_stat);
}

/// An agent that edits a file Git LFS tracks writes real content where the repository keeps a
/// pointer. Publish runs no filter driver and uploads nothing to an LFS server, so the file keeps
/// its pointer and the note says so; the rest of the change is committed, and a pointer the
/// agent wrote itself is committed as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_to_an_lfs_tracked_file_keeps_its_pointer_and_is_named() {
    let s = GitServer::start("u", None).await;
    s.create_repo("r", &[("a.txt", "1\n")]);
    let pointer = s.add_real_content("r");
    let url = s.url("r");
    let (dir, c) = clone(&url, None, 1, "agentops/lfs").await.unwrap();
    let w = dir.join("c");
    let real: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(w.join("assets/big.psd"), &real).unwrap();
    std::fs::write(w.join("assets/new.psd"), &real).unwrap();
    let other = "version https://git-lfs.github.com/spec/v1\noid sha256:0000000000000000000000000000000000000000000000000000000000000001\nsize 9\n";
    std::fs::write(w.join("assets/other.psd"), other).unwrap();
    std::fs::write(w.join("a.txt"), "2\n").unwrap();
    let (commit, staged) = publish(&dir, &c, &url, "agentops/lfs").await.unwrap().unwrap();
    assert_eq!(staged.lfs, ["assets/big.psd", "assets/new.psd"]);
    let note = staged.note();
    assert!(note.contains("assets/big.psd, assets/new.psd tracked by Git LFS kept their pointer"), "{note}");
    let show = |p: &str| s.git("r", &["show", &format!("{commit}:{p}")]);
    assert_eq!(show("assets/big.psd"), pointer, "the pointer, not 200 kB of content");
    assert_eq!(show("assets/other.psd"), other, "a pointer the agent wrote is committed");
    assert_eq!(show("a.txt"), "2\n");
    let tree = s.git("r", &["ls-tree", "-r", "--name-only", &commit]);
    assert!(!tree.lines().any(|l| l == "assets/new.psd"), "{tree}");
    assert_eq!((staged.stats.changed_files, staged.stats.insertions, staged.stats.deletions), (2, 4, 1));

    // Control: the same edit to a path LFS does not track is committed whole.
    let (dir, c) = clone(&url, None, 1, "agentops/plain").await.unwrap();
    std::fs::write(dir.join("c/assets/big.bin"), &real).unwrap();
    let (commit, staged) = publish(&dir, &c, &url, "agentops/plain").await.unwrap().unwrap();
    assert!(staged.lfs.is_empty());
    let size = s.git("r", &["cat-file", "-s", &format!("{commit}:assets/big.bin")]);
    assert_eq!(size.trim(), "200000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stalls_fails_by_the_read_timeout_and_a_stop_ends_the_wait_at_once() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let s = GitServer::start("u", None).await;
    s.create_repo("r", &[("a.txt", "1\n")]);
    let url = s.url("r");
    // Cloned before the host goes quiet, for the push below.
    let (dir, c) = clone(&url, None, 1, "agentops/stall").await.unwrap();
    std::fs::write(dir.join("c/b.txt"), "b\n").unwrap();

    // The ref advertisement's headers, then nothing: no deadline, only the read timeout.
    s.stall_after_headers(Some("git-upload-pack"));
    let (u, started) = (url.clone(), Instant::now());
    let err = blocking(move || {
        let dest = tempfile::tempdir().unwrap().keep().join("c");
        git::with_read_timeout(Duration::from_secs(2), || {
            git::clone(&u, &dest, None, 1, None, "work", &AtomicBool::new(false)).map(|_| ())
        })
    })
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, GitError::Stalled { secs: 2, .. }), "{err}");
    assert!(err.to_string().contains("sent nothing for 2 s"), "{err}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "{took:?}");
    assert_eq!(s.stats().stalled.load(Ordering::Relaxed), 1);

    // With the 60 s read timeout, a stop (cancel, the deadline) ends the wait within a second.
    let stop = Arc::new(AtomicBool::new(false));
    let (u, flag) = (url.clone(), stop.clone());
    let clone = blocking(move || {
        let dest = tempfile::tempdir().unwrap().keep().join("c");
        git::clone(&u, &dest, None, 1, None, "work", &flag).map(|_| ())
    });
    let stopper = async {
        while s.stats().stalled.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        Instant::now()
    };
    let (cloned, stopped_at) = tokio::join!(clone, stopper);
    assert!(cloned.is_err());
    assert!(stopped_at.elapsed() < Duration::from_secs(2), "ended {:?} after the stop", stopped_at.elapsed());

    // A push whose host stalls the same way.
    s.stall_after_headers(Some("git-receive-pack"));
    let (d, cl, u) = (dir.clone(), c.clone(), url.clone());
    let err = blocking(move || {
        git::with_read_timeout(Duration::from_secs(2), || {
            let stop = AtomicBool::new(false);
            let p =
                git::Publish::prepare(&d.join("c"), &d.join("publish.git"), cl.base, &u, &cl.source_ref, None, &stop)?;
            let staged = p.stage()?.expect("a change");
            p.commit(&staged, "agentops/stall", &git2::Signature::now("a", "a@a")?, "work")?;
            p.push(&u, "agentops/stall", None, &stop)
        })
    })
    .await
    .unwrap_err();
    assert!(matches!(err, GitError::Stalled { secs: 2, .. }), "{err}");
    // Control: the same push goes through once the host answers.
    s.stall_after_headers(None);
    publish(&dir, &c, &url, "agentops/stall").await.unwrap().unwrap();
    assert!(s.branch_head("r", "agentops/stall").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_own_errors_are_reported_in_its_words_without_control_characters() {
    let s = GitServer::start("u", None).await;
    s.create_repo("r", &[("a.txt", "1\n")]);
    let url = s.url("r");
    let shown = |m: &str| !m.chars().any(|c| c.is_control());
    let pushes = || s.stats().receive_pack.load(Ordering::Relaxed);

    // A pre-receive hook's refusal: its words (side band 2) reach the message, once.
    s.reject_pushes("r", "protected branch: agentops/* needs review\x1b]0;pwned\x07\x1b[2K");
    let (dir, c) = clone(&url, None, 1, "agentops/hook").await.unwrap();
    std::fs::write(dir.join("c/b.txt"), "b\n").unwrap();
    let before = pushes();
    let Err(err) = publish(&dir, &c, &url, "agentops/hook").await else { panic!("the hook refuses") };
    let GitError::PushRejected { message, .. } = &err else { panic!("{err}") };
    assert!(message.contains("pre-receive hook declined"), "{message}");
    assert!(message.contains("the host said: protected branch: agentops/* needs review"), "{message}");
    assert!(shown(message), "{message:?}");
    assert_eq!(pushes(), before + 1);
    std::fs::remove_file(s.repo_path("r").join("hooks/pre-receive")).unwrap();

    // A fatal error on side band 3 during a push: a rejection in the host's words, not "cannot reach".
    s.fail_fatally("git-receive-pack", "the repository is over its quota\x1b[31m");
    let before = pushes();
    let Err(err) = publish(&dir, &c, &url, "agentops/hook").await else { panic!("the host refuses") };
    let GitError::PushRejected { message, .. } = &err else { panic!("{err}") };
    assert!(message.contains("fatal: the repository is over its quota"), "{message}");
    assert!(shown(message), "{message:?}");
    assert_eq!(pushes(), before + 1);

    // And during a clone.
    s.fail_fatally("git-upload-pack", "upload-pack: not our ref\x07");
    let Err(err) = clone(&url, None, 1, "agentops/clone").await else { panic!("the host refuses") };
    assert!(matches!(err, GitError::Host { .. }), "{err}");
    assert!(err.to_string().contains("answered with an error: fatal: upload-pack: not our ref"), "{err}");
    assert!(shown(&err.to_string()));
}

/// Whether any process has `fifo` open for reading (one blocked opening it counts: a writer's
/// non-blocking open succeeds only then).
fn someone_reads(fifo: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NONBLOCK.bits();
    std::fs::OpenOptions::new().write(true).custom_flags(flags).open(fifo).is_ok()
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}

/// Runs `f` on a thread of its own and says whether it is still blocked after `wait` (then it
/// is left to finish once unblocked, its result sent on the receiver).
fn blocks<T: Send + 'static>(
    wait: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (bool, std::sync::mpsc::Receiver<T>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let blocked = matches!(rx.recv_timeout(wait), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
    (blocked, rx)
}

/// Lets a reader blocked opening `fifo` go: it opens, reads nothing, and sees the end.
fn release(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NONBLOCK.bits();
    drop(std::fs::OpenOptions::new().write(true).custom_flags(flags).open(fifo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_opens_nothing_the_agent_planted_as_a_special_file() {
    use std::time::Duration;
    let s = GitServer::start("u", None).await;
    s.create_repo("r", &[("a.txt", "1\n")]);
    let url = s.url("r");
    let (dir, c) = clone(&url, None, 1, "agentops/fifo").await.unwrap();
    let w = dir.join("c");
    // The attack of issue 23: a FIFO where libgit2 looks for alternates of an object store.
    let alternates = w.join(".git/objects/info/alternates");
    mkfifo(&alternates);
    // Control: adding the checkout's objects as an alternate (what publish did) blocks on it.
    let objects = w.join(".git/objects");
    let scratch = tempfile::tempdir().unwrap().keep();
    let (blocked, rx) = blocks(Duration::from_millis(1500), move || {
        let repo = git2::Repository::init_bare(&scratch).unwrap();
        repo.odb().unwrap().add_disk_alternate(&objects.to_string_lossy()).is_ok()
    });
    assert!(blocked, "libgit2 opens a FIFO at objects/info/alternates and waits");
    release(&alternates);
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    assert!(!someone_reads(&alternates));

    // In the work tree: a FIFO and a socket (git leaves both out of a commit), and a repository
    // of the agent's own whose config is a FIFO (libgit2 would open it to add it as a gitlink).
    mkfifo(&w.join("pipe.fifo"));
    let _socket = std::os::unix::net::UnixListener::bind(w.join("docs/agent.sock")).unwrap();
    git(&w, &["init", "-q", "tools/vendored"]);
    std::fs::write(w.join("tools/vendored/lib.c"), "int x;\n").unwrap();
    let nested_config = w.join("tools/vendored/.git/config");
    std::fs::remove_file(&nested_config).unwrap();
    mkfifo(&nested_config);
    let nested = w.join("tools/vendored");
    let (blocked, rx) = blocks(Duration::from_millis(1500), move || git2::Repository::open(&nested).is_ok());
    assert!(blocked, "libgit2 opens a repository's config, and waits on a FIFO there");
    release(&nested_config);
    let _ = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    std::fs::write(w.join("legit.txt"), "the real fix\n").unwrap();

    let started = std::time::Instant::now();
    let published = tokio::time::timeout(Duration::from_secs(30), publish(&dir, &c, &url, "agentops/fifo")).await;
    let Ok(published) = published else {
        // Let the blocked reader go, or the test would hang instead of failing.
        for f in [&alternates, &w.join("pipe.fifo"), &nested_config] {
            release(f);
        }
        panic!("publish blocked on a FIFO");
    };
    let (commit, staged) = published.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    for fifo in [&alternates, &w.join("pipe.fifo"), &nested_config] {
        assert!(!someone_reads(fifo), "{} was not opened", fifo.display());
    }
    assert_eq!(
        staged.left_out,
        ["docs/agent.sock (a socket)", "pipe.fifo (a FIFO)", "tools/vendored (a repository of its own)"]
    );
    assert!(staged.note().contains("left out of the commit, as git leaves them: docs/agent.sock (a socket)"));
    let tree = s.git("r", &["ls-tree", "-r", "--name-only", &commit]);
    assert!(tree.lines().any(|l| l == "legit.txt"), "{tree}");
    assert!(!tree.contains("pipe.fifo") && !tree.contains("agent.sock") && !tree.contains("tools/"), "{tree}");
    assert_eq!(s.branch_head("r", "agentops/fifo"), Some(commit));

    // Where git itself would read one (a file of its rules, a link to one, a tracked file): refused,
    // named, within seconds; nothing pushed.
    let outside = tempfile::tempdir().unwrap();
    mkfifo(&outside.path().join("fifo"));
    type Plant<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: [(&str, Plant); 3] = [
        (
            "a.txt (a FIFO) in place of a tracked file",
            Box::new(|w: &Path| {
                std::fs::remove_file(w.join("a.txt")).unwrap();
                mkfifo(&w.join("a.txt"));
            }),
        ),
        ("docs/.gitignore (a FIFO) where git reads its rules", Box::new(|w: &Path| mkfifo(&w.join("docs/.gitignore")))),
        (
            "docs/.gitattributes (a link to a FIFO) where git reads its rules",
            Box::new(|w: &Path| {
                std::os::unix::fs::symlink(outside.path().join("fifo"), w.join("docs/.gitattributes")).unwrap()
            }),
        ),
    ];
    for (i, (said, plant)) in cases.iter().enumerate() {
        let branch = format!("agentops/refused{i}");
        let (dir, c) = clone(&url, None, 1, &branch).await.unwrap();
        plant(&dir.join("c"));
        std::fs::write(dir.join("c/legit.txt"), "the real fix\n").unwrap();
        let published = tokio::time::timeout(Duration::from_secs(30), publish(&dir, &c, &url, &branch)).await;
        let Ok(published) = published else {
            for f in [dir.join("c/a.txt"), dir.join("c/docs/.gitignore"), outside.path().join("fifo")] {
                release(&f);
            }
            panic!("{said}: publish blocked on it");
        };
        let Err(err) = published else { panic!("{said}: must be refused") };
        assert!(matches!(err, GitError::Refused(_)), "{said}: {err}");
        assert!(err.to_string().contains(said) && err.to_string().contains("regular files"), "{err}");
        assert_eq!(s.branch_head("r", &branch), None);
    }
    assert!(!someone_reads(&outside.path().join("fifo")));
}

/// The transport blocks its caller while it waits: from a worker of a multi-threaded runtime it
/// gives the thread up for the wait (the git bench calls it so), and from a current-thread
/// runtime, which cannot, it answers an error instead of panicking.
#[test]
fn the_transport_can_be_called_from_inside_a_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (server, url) = rt.block_on(async {
        let server = GitServer::start("x-access-token", None).await;
        server.create_repo("inside", &[("a.txt", "a\n")]);
        let url = server.url("inside");
        (server, url)
    });
    let dir = tempfile::tempdir().unwrap();
    let cloned = rt.block_on(async {
        git::clone(&url, &dir.path().join("multi"), None, 1, None, "work", &AtomicBool::new(false)).map(|_| ())
    });
    assert!(cloned.is_ok(), "{cloned:?}");
    let single = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let refused = single.block_on(async {
        git::clone(&url, &dir.path().join("single"), None, 1, None, "work", &AtomicBool::new(false)).map(|_| ())
    });
    let err = refused.expect_err("a current-thread runtime cannot give its thread up");
    assert!(err.to_string().contains("spawn_blocking"), "{err}");
    drop(server);
}

/// The test git server checks the username with the token, as a host that ties a token to its
/// user does: the right token under another name is refused (`Auth`), under its own accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_host_checks_the_username_with_the_token() {
    let server = GitServer::start("x-access-token", Some(support::TOKEN)).await;
    server.create_repo("named", &[("a.txt", "a\n")]);
    let url = server.url("named");
    let attempt = |user: &'static str| {
        let url = url.clone();
        blocking(move || {
            let dir = tempfile::tempdir().unwrap();
            let creds = git::GitCredentials { username: user.into(), token: support::TOKEN.into() };
            git::clone(&url, &dir.path().join("c"), None, 1, Some(&creds), "work", &AtomicBool::new(false)).map(|_| ())
        })
    };
    assert!(matches!(attempt("someone-else").await, Err(GitError::Auth { .. })));
    assert!(attempt("x-access-token").await.is_ok());
}
