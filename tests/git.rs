//! git2 operations against the real smart-HTTP server: which ref is cloned, how deep, and what
//! a missing ref says.

mod support;

use std::sync::atomic::AtomicBool;

use agentops::git::{self, GitError};
use support::GitServer;
use support::git_server::git;

async fn server_with_history() -> GitServer {
    let s = GitServer::start("u", None).await;
    let bare = s.create_repo("r", &[("a.txt", "1\n")]);
    // A second commit on main, a feature branch and a tag, made with the git CLI.
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", &bare.to_string_lossy(), "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join("a.txt"), "2\n").unwrap();
    git(&w, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "second"]);
    git(&w, &["tag", "v1"]);
    git(&w, &["checkout", "-qb", "feature"]);
    std::fs::write(w.join("b.txt"), "feature\n").unwrap();
    git(&w, &["add", "b.txt"]);
    git(&w, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "feature"]);
    git(&w, &["push", "-q", "origin", "main", "feature", "v1"]);
    s
}

async fn clone(s: &GitServer, r: Option<&str>, depth: u32) -> Result<(git2::Repository, git::Cloned), GitError> {
    let (url, r) = (s.url("r"), r.map(String::from));
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap().keep();
        git::clone(&url, &dir.join("c"), r.as_deref(), depth, None, "work", &AtomicBool::new(false))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_branch_branch_tag_and_depth() {
    let s = server_with_history().await;
    let main = s.branch_head("r", "main").unwrap();

    let (repo, c) = clone(&s, None, 1).await.unwrap();
    assert_eq!((c.source_branch.as_str(), c.base.to_string()), ("main", main.clone()));
    assert_eq!(repo.head().unwrap().shorthand().ok(), Some("work"));
    assert!(repo.is_shallow(), "depth 1 is shallow");
    assert_eq!(std::fs::read_to_string(repo.workdir().unwrap().join("a.txt")).unwrap(), "2\n");

    let (repo, c) = clone(&s, Some("feature"), 1).await.unwrap();
    assert_eq!(c.source_branch, "feature");
    assert!(repo.workdir().unwrap().join("b.txt").exists());

    let (_, c) = clone(&s, Some("v1"), 1).await.unwrap();
    assert_eq!(c.base.to_string(), main, "the tag points at main's second commit");

    let (repo, _) = clone(&s, None, 0).await.unwrap();
    assert!(!repo.is_shallow(), "depth 0 fetches all history");
    let mut walk = repo.revwalk().unwrap();
    walk.push_head().unwrap();
    assert_eq!(walk.count(), 2);

    let Err(err) = clone(&s, Some("nope"), 1).await else { panic!("a missing ref must fail") };
    assert!(matches!(err, GitError::RefNotFound { .. }), "{err}");
    assert!(err.to_string().contains("spec.repository.ref"));
}
