//! Git through libgit2: clone one ref shallowly, commit the workspace as the operator, push.
//! HTTP(S) goes through our own transport (`http.rs`), which puts the token in an
//! Authorization header: never in a URL, the remote's config, an argument or a log line.

mod http;
mod publish;

pub use http::{READ_TIMEOUT, with_read_timeout};
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
    #[error(
        "{url} sent nothing for {secs} s and the transfer was given up: check the git host and the network, and run again"
    )]
    Stalled { url: String, secs: u64 },
    /// The host's own fatal error (side band 3, an `ERR` line): its word, not a network failure.
    #[error("{url} answered with an error: {message}")]
    Host { url: String, message: String },
    #[error("ref {git_ref:?} not found in {url}: check spec.repository.ref")]
    RefNotFound { url: String, git_ref: String },
    #[error(
        "branch {branch} already exists on {url} and this execution does not start from it: set spec.git.branch to a new name, or spec.repository.ref: {branch} to add the work on top of it"
    )]
    BranchExists { url: String, branch: String },
    #[error("push of {branch} was rejected: {message}")]
    PushRejected { branch: String, message: String },
    /// Something in the work tree that publish will not open (a FIFO where git reads).
    #[error("{0}")]
    Refused(String),
    #[error("git: {0}")]
    Other(#[from] git2::Error),
}

/// What a clone produced.
#[derive(Debug, Clone)]
pub struct Cloned {
    /// The commit the work starts from.
    pub base: Oid,
    /// What the work starts from, as a user names it: the branch (the default branch's name
    /// when no ref was given), the tag, or the commit id.
    pub source_branch: String,
    /// The full ref fetched (e.g. `refs/heads/main`, `refs/tags/v1`; the commit id when the ref
    /// was one), to fetch the base again when needed.
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

fn classify(e: git2::Error, url: &str, creds: Option<&GitCredentials>) -> GitError {
    if e.code() == git2::ErrorCode::Auth {
        return classify_auth(url, creds);
    }
    match e.class() {
        git2::ErrorClass::Net | git2::ErrorClass::Http | git2::ErrorClass::Ssl | git2::ErrorClass::Os => {
            GitError::Unreachable { url: url.into(), message: e.message().to_string() }
        }
        _ => GitError::Other(e),
    }
}

/// A failure as the transport saw it, where libgit2 saw only a network error: credentials
/// refused, the host's own error, a stall. What the operation itself found (a missing ref, a
/// branch that exists) stays as it is.
fn judge(e: GitError, seen: &http::Seen, url: &str, creds: Option<&GitCredentials>) -> GitError {
    if !matches!(e, GitError::Unreachable { .. } | GitError::Other(_) | GitError::PushRejected { .. }) {
        return e;
    }
    if seen.auth_rejected {
        return classify_auth(url, creds);
    }
    if let Some(message) = &seen.host_error {
        return GitError::Host { url: url.into(), message: message.clone() };
    }
    match seen.stalled {
        Some(d) if !matches!(e, GitError::PushRejected { .. }) => {
            GitError::Stalled { url: url.into(), secs: d.as_secs() }
        }
        _ => e,
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
    let (result, seen) =
        http::with_credentials(creds, stop, || clone_inner(url, dest, git_ref, depth, creds, work_branch, stop));
    result.map_err(|e| judge(e, &seen, url, creds))
}

fn classify_auth(url: &str, creds: Option<&GitCredentials>) -> GitError {
    match creds {
        Some(_) => GitError::Auth { url: url.into() },
        None => GitError::AuthRequired { url: url.into() },
    }
}

/// What `spec.repository.ref` names, as users write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Omitted: the remote's default branch, whatever its name (its HEAD).
    DefaultBranch,
    /// A full ref name (`refs/heads/x`, `refs/pull/1/head`).
    FullRef(String),
    /// A full commit id.
    Commit(Oid),
    /// A branch name, or else a tag name.
    Name(String),
}

impl Wanted {
    /// Reads `spec.repository.ref`.
    pub fn parse(git_ref: Option<&str>) -> Self {
        match git_ref {
            None => Wanted::DefaultBranch,
            Some(r) if r.starts_with("refs/") => Wanted::FullRef(r.to_string()),
            Some(r) if r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Oid::from_str(r).map_or_else(|_| Wanted::Name(r.to_string()), Wanted::Commit)
            }
            Some(r) => Wanted::Name(r.to_string()),
        }
    }
}

/// Where the clone keeps the base (a ref of ours: the agent's checkout has no branch of the remote).
const BASE_REF: &str = "refs/agentops/base";

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
    let wrap = |e: git2::Error| classify(e, url, creds);
    // The remote is created with the plain URL; nothing secret reaches .git/config.
    let mut remote = repo.remote("origin", url)?;
    let wanted = Wanted::parse(git_ref);
    let not_found = || GitError::RefNotFound { url: url.into(), git_ref: git_ref.unwrap_or("HEAD").into() };

    // One connection in the common case: fetch the wanted ref (the remote's HEAD when none is
    // given) straight into BASE_REF. The advertised refs stay readable afterwards, for the
    // default branch's name, a tag of that name, and whether the work branch exists.
    let t1 = Instant::now();
    let first = match &wanted {
        Wanted::DefaultBranch => "HEAD".to_string(),
        Wanted::FullRef(r) => r.clone(),
        Wanted::Name(r) => format!("refs/heads/{r}"),
        Wanted::Commit(oid) => oid.to_string(),
    };
    let fetched_first = remote.fetch(&[format!("+{first}:{BASE_REF}")], Some(&mut fetch_options(stop, depth)), None);
    let mut fetched = first.clone();
    match (&wanted, fetched_first) {
        (_, Ok(())) => {}
        // The server serves no commit by id (git's default: uploadpack.allowReachableSHA1InWant
        // off; GitHub and GitLab allow it), or not this one: fetch every branch and tag, whole,
        // and look for it there (a network or auth failure fails again, and says so).
        (Wanted::Commit(oid), Err(e)) => {
            tracing::info!(commit = %oid, error = %e, "no commit by id; fetching every branch and tag");
            let specs = ["+refs/heads/*:refs/agentops/heads/*", "+refs/tags/*:refs/agentops/tags/*"];
            remote.fetch(&specs, Some(&mut fetch_options(stop, 0)), None).map_err(wrap)?;
            if repo.find_commit(*oid).is_err() {
                return Err(not_found());
            }
            repo.reference(BASE_REF, *oid, true, "agentops: the base commit")?;
        }
        (_, Err(e)) => return Err(wrap(e)),
    }
    let heads: Vec<(String, Oid)> =
        remote.list().map_err(wrap)?.iter().map(|h| (h.name().to_string(), h.oid())).collect();
    if repo.refname_to_id(BASE_REF).is_err() {
        // Not a branch: a tag of that name, if the remote has it.
        let Wanted::Name(r) = &wanted else { return Err(not_found()) };
        let tag = format!("refs/tags/{r}");
        if !heads.iter().any(|(n, _)| *n == tag) {
            return Err(not_found());
        }
        remote.fetch(&[format!("+{tag}:{BASE_REF}")], Some(&mut fetch_options(stop, depth)), None).map_err(wrap)?;
        fetched = tag;
    }
    if fetched == "HEAD"
        && let Some(b) = remote.default_branch().ok().and_then(|b| b.as_str().ok().map(String::from))
    {
        fetched = b;
    }
    drop(remote);
    let t2 = Instant::now();

    // The work branch must not exist on the remote unless the work continues it: a new commit
    // on someone else's branch would be a surprise at best, a force-push a loss.
    let work_ref = format!("refs/heads/{work_branch}");
    if fetched != work_ref && heads.iter().any(|(n, _)| *n == work_ref) {
        return Err(GitError::BranchExists { url: url.into(), branch: work_branch.into() });
    }

    // A tag's ref names a tag object: the work starts from the commit it points at.
    let commit = repo.find_reference(BASE_REF)?.peel_to_commit()?;
    let base = commit.id();
    let short = match &wanted {
        Wanted::Commit(oid) => oid.to_string(),
        _ => fetched
            .strip_prefix("refs/heads/")
            .or_else(|| fetched.strip_prefix("refs/tags/"))
            .unwrap_or(&fetched)
            .into(),
    };
    repo.branch(work_branch, &commit, true)?;
    repo.set_head(&work_ref)?;
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
    /// Submodules the agent wrote files into (not committed: they stay at their commit).
    pub skipped: Vec<String>,
    /// Files Git LFS tracks that the agent wrote real content into: not committed (they keep
    /// their base pointer; publish uploads nothing to an LFS server).
    pub lfs: Vec<String>,
    /// The binary files added or changed (their content is not in `patch`), to be scanned.
    pub binaries: Vec<Oid>,
    /// What git leaves out of a commit and publish did too: special files (FIFOs, sockets,
    /// devices) and repositories of their own, as "path (what)".
    pub left_out: Vec<String>,
}

impl Staged {
    /// What the commit leaves out of the work tree, for the user: "; ..." clauses, or nothing.
    pub fn note(&self) -> String {
        let mut note = String::new();
        if !self.skipped.is_empty() {
            note += &format!(
                "; files written inside submodule {} were not committed (submodules stay at their recorded commit)",
                self.skipped.join(", ")
            );
        }
        if !self.lfs.is_empty() {
            note += &format!(
                "; {} tracked by Git LFS kept their pointer (agentops uploads nothing to an LFS server: \
                 the agent's content for them was not committed)",
                self.lfs.join(", ")
            );
        }
        if !self.left_out.is_empty() {
            const SHOWN: usize = 10;
            let more = self.left_out.len().saturating_sub(SHOWN);
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            note += &format!(
                "; left out of the commit, as git leaves them: {}{more}",
                self.left_out[..self.left_out.len().min(SHOWN)].join(", ")
            );
        }
        note
    }
}

/// Pushes `refs/heads/<branch>` of `repo`, one commit on top of `base`, to `url` (an anonymous
/// remote: no configured remote, `pushurl` or `insteadOf` applies), only if the remote branch
/// is where the clone left it: absent (a new work branch), or at `base` when the work
/// `continues` that branch. Never a force-push. A rejection (someone pushed in between, protected
/// branch, hook) is an error carrying the server's message (the host's `remote:` lines are added
/// by `Publish::push`).
fn push_to(
    repo: &Repository,
    url: &str,
    branch: &str,
    base: Oid,
    continues: bool,
    creds: Option<&GitCredentials>,
    stop: &AtomicBool,
) -> Result<(), GitError> {
    let expected = continues.then_some(base);
    let rejected: std::cell::RefCell<Option<String>> = Default::default();
    let surprise: std::cell::RefCell<Option<GitError>> = Default::default();
    let dst = format!("refs/heads/{branch}");
    let mut cb = callbacks(stop);
    cb.push_update_reference(|_refname, status| {
        if let Some(msg) = status {
            *rejected.borrow_mut() = Some(msg.to_string());
        }
        Ok(())
    });
    // Compare before sending: what the server has now (zero: no such branch) against what the
    // clone saw. libgit2 asks here, before it builds the pack.
    cb.push_negotiation(|updates| {
        for u in updates.iter().filter(|u| u.dst_refname() == Ok(dst.as_str())) {
            let now = (!u.src().is_zero()).then(|| u.src());
            if now == Some(u.dst()) {
                // Already there: an earlier attempt's answer was lost on the way back.
                continue;
            }
            let err = match (expected, now) {
                (None, Some(_)) => GitError::BranchExists { url: url.into(), branch: branch.into() },
                (Some(was), Some(now)) if was != now => GitError::PushRejected {
                    branch: branch.into(),
                    message: format!(
                        "the branch moved on the remote since the clone (was {}, now {}): someone pushed to it; fetch their work and run again",
                        &was.to_string()[..12],
                        &now.to_string()[..12]
                    ),
                },
                _ => continue,
            };
            *surprise.borrow_mut() = Some(err);
            return Err(git2::Error::from_str("the remote branch is not where the clone left it"));
        }
        Ok(())
    });
    let mut po = PushOptions::new();
    po.remote_callbacks(cb);
    let mut remote = repo.remote_anonymous(url)?;
    let spec = format!("{dst}:{dst}");
    // The server has the base: we cloned it from there (see `http::with_haves`).
    let pushed = http::with_haves(&[base], || remote.push(&[&spec], Some(&mut po)));
    drop(po);
    if let Some(err) = surprise.into_inner() {
        return Err(err);
    }
    if let Err(e) = pushed {
        return Err(match classify(e, url, creds) {
            GitError::Other(e) => GitError::PushRejected { branch: branch.into(), message: e.message().to_string() },
            other => other,
        });
    }
    match rejected.into_inner() {
        Some(message) => Err(GitError::PushRejected { branch: branch.into(), message }),
        None => Ok(()),
    }
}
