//! Git through libgit2: clone one ref shallowly, commit the workspace as the operator, push.
//! HTTP(S) goes through our own transport (`http.rs`), which puts the token in an
//! Authorization header: never in a URL, the remote's config, an argument or a log line.

mod http;
mod publish;

pub use publish::{Publish, harden};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use git2::{AutotagOption, FetchOptions, Oid, PushOptions, RemoteCallbacks, Repository};

/// Basic-auth credentials for the git host.
#[derive(Clone)]
pub struct GitCredentials {
    pub username: String,
    pub token: String,
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCredentials").field("username", &self.username).field("token", &"***").finish()
    }
}

/// A git failure, classified so the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("authentication to {url} failed: check the token in spec.repository.credentialsSecretRef")]
    Auth { url: String },
    #[error("{url} needs credentials: set spec.repository.credentialsSecretRef")]
    AuthRequired { url: String },
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("ref {git_ref:?} not found in {url}: check spec.repository.ref")]
    RefNotFound { url: String, git_ref: String },
    #[error("push of {branch} was rejected: {message}")]
    PushRejected { branch: String, message: String },
    #[error("git: {0}")]
    Other(#[from] git2::Error),
}

/// What a clone produced.
#[derive(Debug, Clone)]
pub struct Cloned {
    /// The commit the work starts from.
    pub base: Oid,
    /// The remote branch it came from.
    pub source_branch: String,
    /// The full ref fetched (e.g. `refs/heads/main`), to fetch the base again when needed.
    pub source_ref: String,
    /// Where the time went.
    pub timings: CloneTimings,
}

/// Time spent in each phase of a clone.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneTimings {
    /// Creating the repository and its remote.
    pub init: Duration,
    /// Connecting, listing refs, downloading and indexing the pack (one connection).
    pub fetch: Duration,
    /// Writing the work tree and index.
    pub checkout: Duration,
}

/// Files and lines changed by the operator's commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeStats {
    pub changed_files: u64,
    pub insertions: u64,
    pub deletions: u64,
}

fn callbacks(stop: &AtomicBool) -> RemoteCallbacks<'_> {
    let mut cb = RemoteCallbacks::new();
    // Returning false aborts the transfer: how cancel and timeout stop a clone or push mid-way.
    cb.transfer_progress(move |_| !stop.load(Ordering::Relaxed));
    cb.sideband_progress(move |_| !stop.load(Ordering::Relaxed));
    cb
}

/// Fetch options: shallow to `depth` (0: all history), no tags, abortable through `stop`.
fn fetch_options(stop: &AtomicBool, depth: u32) -> FetchOptions<'_> {
    let mut fo = FetchOptions::new();
    fo.remote_callbacks(callbacks(stop));
    fo.download_tags(AutotagOption::None);
    if depth > 0 {
        fo.depth(depth as i32);
    }
    fo
}

fn classify(e: git2::Error, url: &str, creds: Option<&GitCredentials>, auth_rejected: bool) -> GitError {
    if auth_rejected || e.code() == git2::ErrorCode::Auth {
        return classify_auth(url, creds);
    }
    match e.class() {
        git2::ErrorClass::Net | git2::ErrorClass::Http | git2::ErrorClass::Ssl | git2::ErrorClass::Os => {
            GitError::Unreachable { url: url.into(), message: e.message().to_string() }
        }
        _ => GitError::Other(e),
    }
}

/// Clones `git_ref` (default: the remote's default branch) of `url` into `dest` with `depth`
/// (0: full history), and checks out a new local branch `work_branch` at it.
pub fn clone(
    url: &str,
    dest: &Path,
    git_ref: Option<&str>,
    depth: u32,
    creds: Option<&GitCredentials>,
    work_branch: &str,
    stop: &AtomicBool,
) -> Result<(Repository, Cloned), GitError> {
    harden();
    let (result, rejected) =
        http::with_credentials(creds, || clone_inner(url, dest, git_ref, depth, creds, work_branch, stop));
    result.map_err(|e| if rejected { classify_auth(url, creds) } else { e })
}

fn classify_auth(url: &str, creds: Option<&GitCredentials>) -> GitError {
    match creds {
        Some(_) => GitError::Auth { url: url.into() },
        None => GitError::AuthRequired { url: url.into() },
    }
}

fn clone_inner(
    url: &str,
    dest: &Path,
    git_ref: Option<&str>,
    depth: u32,
    creds: Option<&GitCredentials>,
    work_branch: &str,
    stop: &AtomicBool,
) -> Result<(Repository, Cloned), GitError> {
    let t0 = Instant::now();
    let repo = Repository::init(dest)?;
    let wrap = |e: git2::Error| classify(e, url, creds, false);
    // The remote is created with the plain URL; nothing secret reaches .git/config.
    let mut remote = repo.remote("origin", url)?;

    // One connection: fetch the wanted ref (the remote's HEAD when none is given) straight
    // into a local ref. The advertised refs stay readable afterwards, for the branch name and
    // for the rare ref that is a tag rather than a branch.
    const BASE_REF: &str = "refs/agentops/base";
    let mut fo = fetch_options(stop, depth);
    let t1 = Instant::now();
    let first = match git_ref {
        Some(r) if r.starts_with("refs/") => r.to_string(),
        Some(r) => format!("refs/heads/{r}"),
        None => "HEAD".to_string(),
    };
    remote.fetch(&[format!("+{first}:{BASE_REF}")], Some(&mut fo), None).map_err(wrap)?;
    let heads: Vec<String> = remote.list().map_err(wrap)?.iter().map(|h| h.name().to_string()).collect();
    let mut fetched = first.clone();
    if repo.refname_to_id(BASE_REF).is_err() {
        // Not a branch: a tag or a full ref name, if the remote has it.
        let r = git_ref.unwrap_or("HEAD");
        let other = [format!("refs/tags/{r}"), r.to_string()]
            .into_iter()
            .find(|cand| heads.iter().any(|n| n == cand))
            .ok_or_else(|| GitError::RefNotFound { url: url.into(), git_ref: r.into() })?;
        let mut fo = fetch_options(stop, depth);
        remote.fetch(&[format!("+{other}:{BASE_REF}")], Some(&mut fo), None).map_err(wrap)?;
        fetched = other;
    }
    if fetched == "HEAD"
        && let Some(b) = remote.default_branch().ok().and_then(|b| b.as_str().ok().map(String::from))
    {
        fetched = b;
    }
    drop(remote);
    let t2 = Instant::now();
    let short = fetched.strip_prefix("refs/heads/").unwrap_or(&fetched).to_string();
    let tracking = BASE_REF;

    let base = repo.refname_to_id(tracking)?;
    let commit = repo.find_commit(base)?;
    repo.branch(work_branch, &commit, true)?;
    repo.set_head(&format!("refs/heads/{work_branch}"))?;
    repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))?;
    drop(commit);
    let timings = CloneTimings { init: t1 - t0, fetch: t2 - t1, checkout: t2.elapsed() };
    Ok((repo, Cloned { base, source_branch: short, source_ref: fetched, timings }))
}

/// The work tree's changes against the base, staged as a tree but not yet committed.
#[derive(Debug, Clone)]
pub struct Staged {
    pub tree: Oid,
    pub stats: ChangeStats,
    /// The unified diff against the base.
    pub patch: String,
}

/// Pushes `refs/heads/<branch>` of `repo` to `url` (an anonymous remote: no configured remote,
/// `pushurl` or `insteadOf` applies). A rejection (non-fast-forward, protected branch, hook) is
/// an error carrying the server's message.
fn push_to(
    repo: &Repository,
    url: &str,
    branch: &str,
    creds: Option<&GitCredentials>,
    stop: &AtomicBool,
) -> Result<(), GitError> {
    let rejected: std::cell::RefCell<Option<String>> = Default::default();
    let mut cb = callbacks(stop);
    cb.push_update_reference(|_refname, status| {
        if let Some(msg) = status {
            *rejected.borrow_mut() = Some(msg.to_string());
        }
        Ok(())
    });
    let mut po = PushOptions::new();
    po.remote_callbacks(cb);
    let mut remote = repo.remote_anonymous(url)?;
    let spec = format!("refs/heads/{branch}:refs/heads/{branch}");
    match remote.push(&[&spec], Some(&mut po)) {
        Ok(()) => {}
        Err(e) => {
            let err = classify(e, url, creds, false);
            return Err(match err {
                GitError::Other(e) => {
                    GitError::PushRejected { branch: branch.into(), message: e.message().to_string() }
                }
                other => other,
            });
        }
    }
    drop(po);
    match rejected.into_inner() {
        Some(message) => Err(GitError::PushRejected { branch: branch.into(), message }),
        None => Ok(()),
    }
}
