//! Publishing the agent's work without trusting anything the agent could write in `.git/` or
//! in a HOME: the commit is built in a private repository of ours (outside the agent's
//! checkout), from the files of the work tree, on top of the base commit; and it is pushed to
//! `spec.repository.url` only, as `refs/heads/<work branch>` only.
//!
//! What this ignores, whatever the agent did: the workspace's `.git/config` (remotes, `url`,
//! `pushurl`, `insteadOf`, `core.worktree`, credential helpers, hooks paths), its index and
//! HEAD, `.git/info/*`, and every global, XDG and system git config (`harden`). libgit2 runs no
//! hooks and no external filter drivers. The base commit's objects are read from the
//! workspace's object store by id, which is safe because objects are content-addressed (a
//! forged object cannot have the base's id); when they are gone, the base is fetched again
//! from the repository URL.

use std::path::Path;
use std::sync::Once;
use std::sync::atomic::AtomicBool;

use git2::{IndexAddOption, Oid, Repository, Signature};

use super::{ChangeStats, GitCredentials, GitError, Staged};

/// Makes libgit2 read no global, XDG, system or ProgramData config in this process: a
/// `.gitconfig` in a HOME the agent can write (its own, or the runner pod's) must not rewrite
/// URLs (`pushInsteadOf`) or add anything else. Called before any other libgit2 use.
pub fn harden() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for level in [
            git2::ConfigLevel::System,
            git2::ConfigLevel::Global,
            git2::ConfigLevel::XDG,
            git2::ConfigLevel::ProgramData,
        ] {
            // SAFETY: runs once, before this process uses libgit2 anywhere else (every entry
            // point in `git` calls `harden` first, and `Once` makes the others wait).
            if let Err(e) = unsafe { git2::opts::set_search_path(level, "") } {
                tracing::warn!(error = %e, "cannot clear libgit2's config search path");
            }
        }
    });
}

/// The operator's private repository for one publish: `gitdir` (outside the agent's
/// checkout) with the checkout's files as its work tree.
pub struct Publish {
    repo: Repository,
    base: Oid,
    /// The full ref the base was cloned from.
    base_ref: String,
}

impl Publish {
    /// Prepares `gitdir` afresh (whatever is there is removed: the agent may have planted it)
    /// over the work tree `workdir`, with the base commit `base` available.
    pub fn prepare(
        workdir: &Path,
        gitdir: &Path,
        base: Oid,
        url: &str,
        base_ref: &str,
        creds: Option<&GitCredentials>,
        stop: &AtomicBool,
    ) -> Result<Self, GitError> {
        harden();
        match std::fs::symlink_metadata(gitdir) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(gitdir).map_err(io)?,
            Ok(_) => std::fs::remove_file(gitdir).map_err(io)?,
            Err(_) => {}
        }
        drop(Repository::init_bare(gitdir)?);
        // The base is where our history starts: a depth-limited clone has none of its parents,
        // and a push walks from the new commit down to what the server has. Grafting the base
        // as a root (git's `shallow` file, read when the repository opens) stops the walk there.
        std::fs::write(gitdir.join("shallow"), format!("{base}\n")).map_err(io)?;
        // open_ext, not open_bare: libgit2 1.9's open_bare never reads the `shallow` file.
        let flags = git2::RepositoryOpenFlags::NO_SEARCH | git2::RepositoryOpenFlags::BARE;
        let repo = Repository::open_ext(gitdir, flags, std::iter::empty::<&std::ffi::OsStr>())?;
        // In memory only: no `.git` file is written into the work tree, no core.worktree.
        repo.set_workdir(workdir, false)?;
        let objects = workdir.join(".git").join("objects");
        if objects.is_dir() {
            repo.odb()?.add_disk_alternate(&objects.to_string_lossy())?;
        }
        if repo.find_commit(base).is_err() {
            // The agent removed or broke its object store: fetch the base again.
            let mut remote = repo.remote_anonymous(url)?;
            let (fetched, seen) = super::http::with_credentials(creds, stop, || {
                let mut fo = super::fetch_options(stop, 1);
                remote.fetch(&[format!("+{base_ref}:refs/agentops/base")], Some(&mut fo), None)
            });
            fetched.map_err(|e| super::judge(super::classify(e, url, creds), &seen, url, creds))?;
            repo.find_commit(base).map_err(|_| {
                GitError::Other(git2::Error::from_str(&format!(
                    "the base commit {base} is no longer in the workspace and {url} no longer has it at {base_ref}"
                )))
            })?;
        }
        Ok(Self { repo, base, base_ref: base_ref.to_string() })
    }

    /// Takes the stat data of `index` (the clone's own index, kept where the agent cannot
    /// write) so that staging hashes only files whose stat changed. Trusting it is safe: only
    /// entries whose path, mode and id equal the base's keep their stat data (libgit2's
    /// `read_tree`), and any write to a file changes its ctime, which no process can set back;
    /// at worst a forged index would hide a change, never add content. A missing or unreadable
    /// index only costs time.
    pub fn with_stat_cache(self, index: &Path) -> Self {
        let Some(gitdir) = self.repo.path().to_str().map(std::path::PathBuf::from) else { return self };
        if let Err(e) = std::fs::copy(index, gitdir.join("index")) {
            tracing::debug!(error = %e, "no stat cache for publish: every file is hashed");
        }
        self
    }

    /// The work tree's files against the base (additions, edits, deletions, modes, symlinks;
    /// `.gitignore` files of the work tree respected). None when nothing changed.
    ///
    /// Submodules stay gitlinks at the commit the base records: the clone never fills them, so
    /// files the agent writes inside one are not committed (a gitlink turned into a half tree
    /// would break the repository for everyone); `Staged::skipped` names them.
    pub fn stage(&self) -> Result<Option<Staged>, GitError> {
        let repo = &self.repo;
        let workdir = repo.workdir().map(Path::to_path_buf).unwrap_or_default();
        let base_tree = repo.find_commit(self.base)?.tree()?;
        let mut index = repo.index()?;
        index.read_tree(&base_tree)?;
        let gitlinks: Vec<Vec<u8>> = index.iter().filter(|e| e.mode == GITLINK).map(|e| e.path).collect();
        let in_gitlink = |path: &Path| {
            let p = path.as_os_str().as_encoded_bytes();
            gitlinks.iter().any(|g| p == g.as_slice() || (p.starts_with(g) && p.get(g.len()) == Some(&b'/')))
        };
        let mut keep = |path: &Path, _: &[u8]| i32::from(in_gitlink(path));
        index.add_all(["*"], IndexAddOption::DEFAULT, Some(&mut keep))?;
        index.update_all(["*"], Some(&mut keep))?;
        let skipped: Vec<String> = gitlinks
            .iter()
            .map(|g| String::from_utf8_lossy(g).into_owned())
            .filter(|g| std::fs::read_dir(workdir.join(g)).is_ok_and(|mut d| d.next().is_some()))
            .collect();
        let tree_id = index.write_tree_to(repo)?;
        if tree_id == base_tree.id() {
            return Ok(None);
        }
        let tree = repo.find_tree(tree_id)?;
        let mut diff = repo.diff_tree_to_tree(Some(&base_tree), Some(&tree), None)?;
        // Renames count as git's `diff --stat` counts them (one file, the changed lines).
        diff.find_similar(Some(git2::DiffFindOptions::new().renames(true)))?;
        let st = diff.stats()?;
        let stats = ChangeStats {
            changed_files: st.files_changed() as u64,
            insertions: st.insertions() as u64,
            deletions: st.deletions() as u64,
        };
        // A binary file's content is not in the patch: its blob is named for the secret scan.
        let mut binaries = Vec::new();
        for delta in diff.deltas() {
            let new = delta.new_file();
            if new.mode() != git2::FileMode::Commit
                && !new.id().is_zero()
                && repo.find_blob(new.id()).is_ok_and(|b| b.is_binary())
            {
                binaries.push(new.id());
            }
        }
        let mut patch = String::new();
        diff.print(git2::DiffFormat::Patch, |_, _, line| {
            if matches!(line.origin(), '+' | '-' | ' ') {
                patch.push(line.origin());
            }
            patch.push_str(&String::from_utf8_lossy(line.content()));
            true
        })?;
        Ok(Some(Staged { tree: tree_id, stats, patch, skipped, binaries }))
    }

    /// Whether `found` says yes of any of the staged binary files (read one at a time).
    pub fn any_binary(&self, staged: &Staged, found: impl Fn(&[u8]) -> bool) -> Result<bool, GitError> {
        for oid in &staged.binaries {
            if found(self.repo.find_blob(*oid)?.content()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One commit with the staged tree on top of the base, as `refs/heads/<branch>` of the
    /// private repository.
    pub fn commit(
        &self,
        staged: &Staged,
        branch: &str,
        author: &Signature<'_>,
        message: &str,
    ) -> Result<Oid, GitError> {
        let tree = self.repo.find_tree(staged.tree)?;
        let parent = self.repo.find_commit(self.base)?;
        let oid = self.repo.commit(None, author, author, message, &tree, &[&parent])?;
        self.repo.reference(&format!("refs/heads/{branch}"), oid, true, "agentops: the agent's changes")?;
        Ok(oid)
    }

    /// Pushes `refs/heads/<branch>` to `url`, and nothing else anywhere else: a new branch, or
    /// a fast-forward of the branch the work was cloned from, never a force-push.
    pub fn push(
        &self,
        url: &str,
        branch: &str,
        creds: Option<&GitCredentials>,
        stop: &AtomicBool,
    ) -> Result<(), GitError> {
        let (result, seen) = super::http::with_credentials(creds, stop, || {
            let continues = self.base_ref == format!("refs/heads/{branch}");
            super::push_to(&self.repo, url, branch, self.base, continues, creds, stop)
        });
        // The host's word is final: its fatal error is a rejection, never retried as a network
        // failure; and what its hooks said (a protected branch, a policy) is part of the answer.
        result.map_err(|e| match super::judge(e, &seen, url, creds) {
            GitError::Host { message, .. } => {
                GitError::PushRejected { branch: branch.into(), message: format!("the host refused it: {message}") }
            }
            GitError::PushRejected { branch, message } => match seen.remote_text() {
                Some(said) => GitError::PushRejected { branch, message: format!("{message}; the host said: {said}") },
                None => GitError::PushRejected { branch, message },
            },
            other => other,
        })
    }
}

/// A submodule's entry in a tree.
const GITLINK: u32 = 0o160000;

fn io(e: std::io::Error) -> GitError {
    GitError::Other(git2::Error::from_str(&format!("cannot prepare the publish repository: {e}")))
}
