//! Publishing the agent's work without trusting anything the agent could write in `.git/` or
//! in a HOME: the commit is built in a private repository of ours (outside the agent's
//! checkout), from the files of the work tree, on top of the base commit; and it is pushed to
//! `spec.repository.url` only, as `refs/heads/<work branch>` only.
//!
//! What this ignores, whatever the agent did: the workspace's `.git/config` (remotes, `url`,
//! `pushurl`, `insteadOf`, `core.worktree`, credential helpers, hooks paths), its index and
//! HEAD, `.git/info/*`, and every global, XDG and system git config (`harden`). libgit2 runs no
//! hooks and no external filter drivers. Of the workspace's `.git/` only the clone's pack files
//! are read (the base commit's objects, by id, which is safe because objects are
//! content-addressed: a forged object cannot have the base's id), each checked to be a regular
//! file before it is opened; when they are gone, the base is fetched again from the repository
//! URL. Its alternates, loose objects and everything else there are never opened: a FIFO
//! planted in `.git/objects/info/alternates` would block whoever opens it.
//!
//! Nothing the agent planted as a special file (FIFO, socket, device) is opened in the work
//! tree either (`scan`): git leaves such files out of a commit, and so does publish; one where
//! git would read it (`.gitignore`, `.gitattributes`, `.gitmodules`) or in place of a tracked
//! file is refused, naming it. Repositories of their own inside the work tree (submodules,
//! clones the agent made) are kept out of libgit2's sight: it would open and read them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

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
        let open = || -> Result<Repository, GitError> {
            let flags = git2::RepositoryOpenFlags::NO_SEARCH | git2::RepositoryOpenFlags::BARE;
            let repo = Repository::open_ext(gitdir, flags, std::iter::empty::<&std::ffi::OsStr>())?;
            // In memory only: no `.git` file is written into the work tree, no core.worktree.
            repo.set_workdir(workdir, false)?;
            Ok(repo)
        };
        let taken = take_packs(workdir, gitdir, stop);
        let mut repo = open()?;
        if repo.find_commit(base).is_err() {
            // The agent removed or broke its object store: fetch the base again (into a pack
            // directory without the packs taken, in case one of them is the broken part).
            drop(repo);
            for pack in taken {
                let _ = std::fs::remove_file(pack);
            }
            repo = open()?;
            let mut remote = repo.remote_anonymous(url)?;
            let (fetched, seen) = super::http::with_credentials(creds, stop, || {
                let mut fo = super::fetch_options(stop, 1);
                remote.fetch(&[format!("+{base_ref}:refs/agentops/base")], Some(&mut fo), None)
            });
            fetched.map_err(|e| super::judge(super::classify(e, url, creds), &seen, url, creds))?;
            drop(remote);
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
        if let Err(e) = copy_regular(index, &gitdir.join("index"), &AtomicBool::new(false)) {
            tracing::debug!(error = %e, "no stat cache for publish: every file is hashed");
        }
        self
    }

    /// The work tree's files against the base (additions, edits, deletions, modes, symlinks;
    /// `.gitignore` files of the work tree respected). None when nothing changed.
    ///
    /// Submodules stay gitlinks at the commit the base records: the clone never fills them, so
    /// files the agent writes inside one are not committed (a gitlink turned into a half tree
    /// would break the repository for everyone); `Staged::skipped` names them. Special files
    /// and repositories of their own the agent made are left out (`Staged::left_out`), or
    /// refused where git would read them (see `scan`).
    pub fn stage(&self) -> Result<Option<Staged>, GitError> {
        let repo = &self.repo;
        let workdir = repo.workdir().map(Path::to_path_buf).unwrap_or_default();
        let base_tree = repo.find_commit(self.base)?.tree()?;
        let mut index = repo.index()?;
        index.read_tree(&base_tree)?;
        let gitlinks: Vec<Vec<u8>> = index.iter().filter(|e| e.mode == GITLINK).map(|e| e.path).collect();
        let found = scan(&workdir, &index, &gitlinks)?;
        // libgit2 opens a submodule's repository to diff it, and a repository of its own the
        // agent made to add it as a gitlink (its HEAD, its config and what that includes):
        // none of it is read. Negative pathspecs come first (the first pattern that matches wins).
        let mut specs: Vec<Vec<u8>> = Vec::new();
        for dir in gitlinks.iter().chain(&found.repositories) {
            specs.push([b"!".as_slice(), &pathspec_literal(dir)].concat());
            specs.push([b"!".as_slice(), &pathspec_literal(dir), b"/*"].concat());
        }
        specs.push(b"*".to_vec());
        let in_gitlink = |path: &Path| {
            let p = path.as_os_str().as_encoded_bytes();
            gitlinks.iter().any(|g| p == g.as_slice() || (p.starts_with(g) && p.get(g.len()) == Some(&b'/')))
        };
        let mut keep = |path: &Path, _: &[u8]| i32::from(in_gitlink(path));
        index.add_all(specs.iter(), IndexAddOption::DEFAULT, Some(&mut keep))?;
        index.update_all(specs.iter(), Some(&mut keep))?;
        let skipped: Vec<String> = gitlinks
            .iter()
            .map(|g| String::from_utf8_lossy(g).into_owned())
            .filter(|g| std::fs::read_dir(workdir.join(g)).is_ok_and(|mut d| d.next().is_some()))
            .collect();
        let lfs = keep_lfs_pointers(repo, &base_tree, &mut index)?;
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
        Ok(Some(Staged { tree: tree_id, stats, patch, skipped, lfs, binaries, left_out: found.left_out }))
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

/// Hard-links (or copies, when a link cannot be made) the clone's pack files from the
/// workspace's `.git/objects/pack` into `gitdir`'s: each `pack-<id>.idx` with its `.pack`, both
/// regular files, on a path of real directories (no link followed anywhere). Returns the files
/// taken. Nothing else of the agent's `.git/` is opened.
fn take_packs(workdir: &Path, gitdir: &Path, stop: &AtomicBool) -> Vec<PathBuf> {
    let mut from = workdir.to_path_buf();
    for part in [".git", "objects", "pack"] {
        from.push(part);
        if !std::fs::symlink_metadata(&from).is_ok_and(|m| m.is_dir()) {
            return Vec::new();
        }
    }
    let Ok(entries) = std::fs::read_dir(&from) else { return Vec::new() };
    let to = gitdir.join("objects").join("pack");
    let mut taken = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_prefix("pack-")).and_then(|n| n.strip_suffix(".idx")) else {
            continue;
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let pair = [format!("pack-{id}.pack"), format!("pack-{id}.idx")];
        let mut done = Vec::new();
        for file in &pair {
            match take_file(&from.join(file), &to.join(file), stop) {
                Ok(()) => done.push(to.join(file)),
                Err(e) => {
                    tracing::debug!(file, error = %e, "a pack of the clone is not used; the base may be fetched again");
                    for d in done.drain(..) {
                        let _ = std::fs::remove_file(d);
                    }
                    break;
                }
            }
        }
        taken.extend(done);
    }
    taken
}

/// `from` at `to`, if it is a regular file: a hard link, else a copy (`copy_regular`).
fn take_file(from: &Path, to: &Path, stop: &AtomicBool) -> std::io::Result<()> {
    let regular = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file());
    if !regular(from) {
        return Err(std::io::Error::other("not a regular file"));
    }
    if std::fs::hard_link(from, to).is_ok() {
        // The link is the inode we checked only if it is still a regular file now.
        if regular(to) {
            return Ok(());
        }
        std::fs::remove_file(to)?;
        return Err(std::io::Error::other("not a regular file"));
    }
    copy_regular(from, to, stop)
}

/// Copies `from` to `to` (created, or replaced) if `from` is a regular file, read from a
/// descriptor opened without following a link and without blocking (a FIFO is found by its
/// type, never waited on); given up when `stop` is set.
fn copy_regular(from: &Path, to: &Path, stop: &AtomicBool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let mut src = std::fs::OpenOptions::new().read(true).custom_flags(flags.bits()).open(from)?;
    if !src.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut dst = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(to)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if stop.load(Ordering::Relaxed) {
            drop(dst);
            let _ = std::fs::remove_file(to);
            return Err(std::io::Error::other("stopped"));
        }
        let n = std::io::Read::read(&mut src, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        std::io::Write::write_all(&mut dst, &buf[..n])?;
    }
}

/// What the walk of the work tree found for staging.
#[derive(Debug, Default)]
struct Found {
    /// Special files git leaves out of a commit: "path (a FIFO)".
    left_out: Vec<String>,
    /// Directories holding a repository of their own, not in the base: left out, unread.
    repositories: Vec<Vec<u8>>,
}

/// Files git reads its rules from: it (and libgit2) opens them wherever they are.
const RULE_FILES: [&str; 3] = [".gitignore", ".gitattributes", ".gitmodules"];

/// Walks the work tree (never following a link, never opening a file) for what libgit2 must not
/// meet. A FIFO, socket or device is left out of the commit, as git leaves it (`git add -A`
/// ignores one); in place of a tracked file, or named as a file of git's rules (or a link to
/// one), it is refused as git refuses it, naming it: libgit2 would open it and wait forever. A
/// directory with a `.git` that is neither a submodule nor holds a file of the base is a
/// repository of its own: left out and never opened. `.git` itself is not entered.
fn scan(workdir: &Path, index: &git2::Index, gitlinks: &[Vec<u8>]) -> Result<Found, GitError> {
    use std::os::unix::ffi::OsStrExt;
    let tracked: HashSet<Vec<u8>> = index.iter().map(|e| e.path).collect();
    // The directories that hold a tracked file, made when a `.git` below the root first asks.
    let tracked_dirs = std::cell::OnceCell::new();
    let holds_tracked = |dir: &[u8]| {
        let dirs: &HashSet<&[u8]> = tracked_dirs.get_or_init(|| {
            tracked
                .iter()
                .flat_map(|p| p.iter().enumerate().filter(|(_, b)| **b == b'/').map(|(i, _)| &p[..i]))
                .collect()
        });
        dirs.contains(dir)
    };
    let mut found = Found::default();
    let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(dir) = dirs.pop() {
        let at = if dir.is_empty() { workdir.to_path_buf() } else { workdir.join(std::ffi::OsStr::from_bytes(&dir)) };
        // An unreadable directory is one libgit2 cannot read either.
        let Ok(entries) = std::fs::read_dir(&at) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let rel = if dir.is_empty() {
                name.as_bytes().to_vec()
            } else {
                [dir.as_slice(), b"/", name.as_bytes()].concat()
            };
            let shown = String::from_utf8_lossy(&rel).into_owned();
            let Ok(kind) = entry.file_type() else { continue };
            if name.as_bytes().eq_ignore_ascii_case(b".git") {
                if name.as_bytes() == b".git"
                    && !dir.is_empty()
                    && !gitlinks.contains(&dir)
                    && !holds_tracked(&dir)
                    && !found.repositories.contains(&dir)
                {
                    found.left_out.push(format!("{} (a repository of its own)", String::from_utf8_lossy(&dir)));
                    found.repositories.push(dir.clone());
                }
                continue;
            }
            let rules = RULE_FILES.iter().any(|r| name.as_bytes() == r.as_bytes());
            if kind.is_dir() {
                if !gitlinks.contains(&rel) {
                    dirs.push(rel);
                }
            } else if kind.is_symlink() {
                // A link is committed as its target's path; only git's rule files are read
                // through one (libgit2 follows it).
                if rules
                    && let Ok(m) = std::fs::metadata(entry.path())
                    && let Some(what) = special(m.file_type())
                {
                    return Err(refused(&format!("{shown} (a link to {what})"), "where git reads its rules"));
                }
            } else if let Some(what) = special(kind) {
                if rules {
                    return Err(refused(&format!("{shown} ({what})"), "where git reads its rules"));
                }
                if tracked.contains(&rel) {
                    return Err(refused(
                        &format!("{shown} ({what})"),
                        "in place of a tracked file (git add fails the same way)",
                    ));
                }
                found.left_out.push(format!("{shown} ({what})"));
            }
        }
    }
    found.left_out.sort();
    Ok(found)
}

/// What a special file is, or None for a regular file, directory or link.
fn special(kind: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else {
        None
    }
}

fn refused(what: &str, where_: &str) -> GitError {
    GitError::Refused(format!(
        "the agent left {what} {where_}: publish reads only regular files, directories and symlinks; nothing was committed"
    ))
}

/// Git LFS keeps a file tracked with `filter=lfs` (`.gitattributes`) out of git: the repository
/// holds a small pointer, the content lives on the LFS server. libgit2 runs no filter driver
/// and publish uploads nothing to an LFS server, so a tracked file the agent wrote real content
/// into would be committed whole, for everyone who clones to download, and the pointer lost.
/// Such a file keeps its base content (a new one stays out) and is named in the result; a file
/// whose new content is itself an LFS pointer is committed as it is.
fn keep_lfs_pointers(
    repo: &Repository,
    base: &git2::Tree<'_>,
    index: &mut git2::Index,
) -> Result<Vec<String>, GitError> {
    const POINTER: &[u8] = b"version https://git-lfs.github.com/spec/v1\n";
    let changed: Vec<(PathBuf, Oid)> = {
        let diff = repo.diff_tree_to_index(Some(base), Some(index), None)?;
        diff.deltas()
            .filter(|d| {
                d.new_file().mode() == git2::FileMode::Blob || d.new_file().mode() == git2::FileMode::BlobExecutable
            })
            .filter_map(|d| Some((d.new_file().path()?.to_path_buf(), d.new_file().id())))
            .collect()
    };
    let mut kept = Vec::new();
    for (path, id) in changed {
        // The attributes as git reads them at commit time: the work tree's `.gitattributes`
        // files, then the index's.
        let tracked =
            repo.get_attr_bytes(&path, "filter", git2::AttrCheckFlags::FILE_THEN_INDEX)?.is_some_and(|f| f == b"lfs");
        if !tracked {
            continue;
        }
        let blob = repo.find_blob(id)?;
        // A pointer is at most a few hundred bytes (the spec's limit is 1024).
        if blob.size() < 1024 && blob.content().starts_with(POINTER) {
            continue;
        }
        match base.get_path(&path) {
            Ok(entry) => {
                let mut e = index.get_path(&path, 0).ok_or_else(|| git2::Error::from_str("staged entry gone"))?;
                e.id = entry.id();
                e.file_size = 0;
                e.mode = entry.filemode() as u32;
                index.add(&e)?;
            }
            Err(_) => index.remove_path(&path)?,
        }
        kept.push(path.to_string_lossy().into_owned());
    }
    Ok(kept)
}

/// `path` as a pathspec that matches it literally (wildcards and a leading `!` escaped).
fn pathspec_literal(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + 4);
    for (i, b) in path.iter().enumerate() {
        if matches!(b, b'*' | b'?' | b'[' | b'\\') || (i == 0 && *b == b'!') {
            out.push(b'\\');
        }
        out.push(*b);
    }
    out
}
