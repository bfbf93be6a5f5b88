//! A git smart-HTTP server for tests: git's own `git http-backend` (CGI) behind HTTP basic
//! auth on 127.0.0.1, bridged by a small axum handler. Stops when the runtime ends.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri};
use base64::Engine;
use tokio::io::AsyncWriteExt;

/// Counters of what the server saw.
#[derive(Default, Debug)]
pub struct GitStats {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub receive_pack: AtomicU64,
    /// Bytes of every push request (commands and pack).
    pub receive_pack_bytes: AtomicU64,
    /// Requests answered with headers and then nothing (`stall_after_headers`).
    pub stalled: AtomicU64,
}

struct Inner {
    root: PathBuf,
    user: String,
    token: Option<String>,
    stats: GitStats,
    /// Pushes (receive-pack POSTs) still to be answered 503 (`fail_pushes`).
    failing_pushes: AtomicU64,
    /// The service (`git-upload-pack`, `git-receive-pack`) whose ref advertisement stalls.
    stall: std::sync::Mutex<Option<String>>,
    /// A fatal error sent on side band 3 to every POST of a service: (service, message).
    fatal: std::sync::Mutex<Option<(String, String)>>,
}

/// A running server. Repositories live under `root` as `<name>.git`.
pub struct GitServer {
    pub base_url: String,
    pub root: PathBuf,
    inner: Arc<Inner>,
    _dir: Option<tempfile::TempDir>,
}

impl GitServer {
    /// Starts a server that requires `user:token` basic auth (None: no auth at all).
    pub async fn start(user: &str, token: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Self::start_in(dir.path(), user, token).await;
        s._dir = Some(dir);
        s
    }

    /// Like `start`, with repositories under `root` (kept after the server stops).
    pub async fn start_in(root: &Path, user: &str, token: Option<&str>) -> Self {
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            user: user.into(),
            token: token.map(Into::into),
            stats: GitStats::default(),
            failing_pushes: AtomicU64::new(0),
            stall: Default::default(),
            fatal: Default::default(),
        });
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base_url: format!("http://{addr}"), root: root.to_path_buf(), inner, _dir: None }
    }

    /// Counters.
    pub fn stats(&self) -> &GitStats {
        &self.inner.stats
    }

    /// URL of repository `name`.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}.git", self.base_url)
    }

    /// Path of the bare repository `name`.
    pub fn repo_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.git"))
    }

    /// Creates bare repository `name` with a real history on `main` whose tip holds `files`
    /// (see `create_repo_on`).
    pub fn create_repo(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        self.create_repo_on(name, "main", files)
    }

    /// Creates bare repository `name` whose default branch (the remote's HEAD) is
    /// `default_branch`, with history as real repositories have it, never one commit:
    ///
    /// ```text
    /// v0.1 (annotated) ── first ─┬─ files ── merge ── changelog   ← default_branch, tag v0.2
    ///                             └─ guide ──┘   (feature/docs)     └─ develop ← develop
    /// ```
    ///
    /// `files` are added by the second commit, so they are at the tip; the tip also has
    /// `CHANGELOG.md` and `docs/` from the other commits.
    pub fn create_repo_on(&self, name: &str, default_branch: &str, files: &[(&str, &str)]) -> PathBuf {
        let work = tempfile::tempdir().expect("tempdir");
        let w = work.path();
        let commit = |msg: &str| {
            git(w, &["add", "-A"]);
            git(w, &["-c", "user.name=Seed", "-c", "user.email=seed@example.com", "commit", "-q", "-m", msg]);
        };
        let write = |path: &str, content: &str| {
            let p = w.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, content).expect("write");
        };
        git(w, &["init", "-q", "-b", default_branch]);
        write("CHANGELOG.md", "# Changelog\n\n- 0.1: first release\n");
        write("docs/history.md", "one\n");
        commit("first release");
        git(w, &["-c", "user.name=Seed", "-c", "user.email=seed@example.com", "tag", "-a", "v0.1", "-m", "0.1"]);
        git(w, &["checkout", "-q", "-b", "feature/docs"]);
        write("docs/guide.md", "# Guide\n");
        commit("docs: a guide");
        git(w, &["checkout", "-q", default_branch]);
        for (path, content) in files {
            write(path, content);
        }
        write("docs/history.md", "one\ntwo\n");
        commit("the project's files");
        git(
            w,
            &[
                "-c",
                "user.name=Seed",
                "-c",
                "user.email=seed@example.com",
                "merge",
                "-q",
                "--no-ff",
                "-m",
                "Merge branch 'feature/docs'",
                "feature/docs",
            ],
        );
        write("CHANGELOG.md", "# Changelog\n\n- 0.2: the project's files\n- 0.1: first release\n");
        commit("changelog for 0.2");
        git(w, &["tag", "v0.2"]);
        git(w, &["checkout", "-q", "-b", "develop"]);
        write("docs/develop.md", "next\n");
        commit("develop: next steps");
        git(w, &["checkout", "-q", default_branch]);
        let bare = self.repo_path(name);
        git(&self.root, &["clone", "-q", "--bare", "--no-local", &w.to_string_lossy(), &bare.to_string_lossy()]);
        // A bare clone maps the source's branches to its own; HEAD follows the default branch.
        bare
    }

    /// Commits content that is easy to get wrong on top of `main` (with the git CLI): an
    /// executable, symlinks, a binary, CRLF line endings by `.gitattributes`, a file to rename
    /// and one to delete, non-ASCII nested paths, `.gitignore`, a submodule (gitlink) and a Git
    /// LFS pointer. Returns the pointer's text.
    pub fn add_real_content(&self, name: &str) -> String {
        let work = tempfile::tempdir().expect("tempdir");
        git(work.path(), &["clone", "-q", &self.repo_path(name).to_string_lossy(), "w"]);
        let w = work.path().join("w");
        let write = |p: &str, b: &[u8]| {
            std::fs::create_dir_all(w.join(p).parent().expect("parent")).expect("mkdir");
            std::fs::write(w.join(p), b).expect("write");
        };
        write(".gitattributes", b"*.bat text eol=crlf\n*.psd filter=lfs diff=lfs merge=lfs -text\n");
        write(".gitignore", b"target/\nnode_modules/\n");
        write("scripts/build.sh", b"#!/bin/sh\necho build\n");
        std::os::unix::fs::symlink("README.md", w.join("link-to-readme")).expect("symlink");
        write("README.md", b"# Readme\n");
        write("assets/logo.bin", &[0u8, 159, 146, 150, 0, 1, 2, 255, 0]);
        write("win/run.bat", b"@echo off\r\necho one\r\n");
        write("old-name.txt", &b"a line that moves with its file\n".repeat(20));
        write("to-delete.txt", b"gone soon\n");
        write("docs/ünïcödé/日本語.md", b"konnichiwa\n");
        let pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n";
        write("assets/big.psd", pointer.as_bytes());
        write(
            ".gitmodules",
            b"[submodule \"vendor/lib\"]\n\tpath = vendor/lib\n\turl = https://example.invalid/lib.git\n",
        );
        git(&w, &["add", "-A"]);
        git(&w, &["update-index", "--chmod=+x", "scripts/build.sh"]);
        let sub = git(&w, &["rev-parse", "HEAD"]);
        git(&w, &["update-index", "--add", "--cacheinfo", &format!("160000,{},vendor/lib", sub.trim())]);
        git(&w, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "content that is easy to get wrong"]);
        git(&w, &["push", "-q", "origin", "main"]);
        pointer.to_string()
    }

    /// Checks that `commit` (one commit on `base`) holds what `REAL_EDITS` did to the content of
    /// `add_real_content`, that the remote passes `git fsck`, and returns git's own
    /// `diff --shortstat` counts of it (files, insertions, deletions).
    pub fn check_real_edits(&self, name: &str, commit: &str, base: &str, pointer: &str) -> (u64, u64, u64) {
        let tree = self.git(name, &["ls-tree", "-r", "--full-tree", commit]);
        let mode = |path: &str| {
            tree.lines()
                .find(|l| l.ends_with(&format!("\t{path}")))
                .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(mode("tools/gen.sh").as_deref(), Some("100755"));
        assert_eq!(mode("scripts/build.sh").as_deref(), Some("100644"), "a mode change is committed");
        assert_eq!(mode("link-to-docs").as_deref(), Some("120000"));
        assert_eq!(mode("link-to-readme").as_deref(), Some("120000"));
        assert_eq!(mode("vendor/lib").as_deref(), Some("160000"), "the submodule stays a gitlink");
        assert_eq!(
            self.git(name, &["rev-parse", &format!("{commit}:vendor/lib")]),
            self.git(name, &["rev-parse", &format!("{base}:vendor/lib")]),
            "at its recorded commit"
        );
        assert_eq!(mode("new-name.txt").as_deref(), Some("100644"));
        for gone in
            ["old-name.txt", "to-delete.txt", "target/debug/out.o", "node_modules/x/index.js", "vendor/lib/patched.c"]
        {
            assert_eq!(mode(gone), None, "{gone}");
        }
        let show = |p: &str| self.git(name, &["show", &format!("{commit}:{p}")]);
        assert_eq!(show("README.md"), "# README\n", "a same-size, same-mtime edit");
        assert_eq!(
            show("win/run.bat"),
            "@echo off\necho one\necho two\n",
            "CRLF in the work tree, LF in the repository"
        );
        assert_eq!(show("assets/big.psd"), pointer, "the LFS pointer stays a pointer");
        assert_eq!(show("docs/ünïcödé/新しい.md"), "atarashii\n");
        assert_eq!(show("link-to-docs"), "docs", "a link is its target path");
        let size = self.git(name, &["cat-file", "-s", &format!("{commit}:assets/new.bin")]);
        assert_eq!(size.trim(), "7", "binary content byte for byte");
        assert_eq!(self.git(name, &["rev-parse", &format!("{commit}^")]).trim(), base);
        self.git(name, &["fsck", "--strict", "--no-dangling"]);
        let short = self.git(name, &["diff", "--shortstat", base, commit]);
        let n = |word: &str| -> u64 {
            short
                .split(',')
                .find(|p| p.contains(word))
                .and_then(|p| p.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (n("changed"), n("insertion"), n("deletion"))
    }

    /// Answers the next `n` pushes (receive-pack requests, after the ref advertisement) with
    /// 503, as a host or a relay in trouble does.
    pub fn fail_pushes(&self, n: u64) {
        self.inner.failing_pushes.store(n, Ordering::SeqCst);
    }

    /// Makes every push to `name` fail with `message` (a real pre-receive hook that prints it,
    /// byte for byte, on its stderr: git sends it to the client on side band 2, `remote:`).
    pub fn reject_pushes(&self, name: &str, message: &str) {
        use std::os::unix::fs::PermissionsExt;
        let hook = self.repo_path(name).join("hooks/pre-receive");
        std::fs::write(&hook, format!("#!/bin/sh\ncat >&2 <<'HOOK_EOF'\n{message}\nHOOK_EOF\nexit 1\n")).expect("hook");
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// From now on, answers the ref advertisement of `service` (`git-upload-pack`: clones and
    /// fetches; `git-receive-pack`: pushes) with its headers and then nothing, ever: a host or a
    /// proxy that hangs mid-answer. None: answer again.
    pub fn stall_after_headers(&self, service: Option<&str>) {
        *self.inner.stall.lock().expect("lock") = service.map(String::from);
    }

    /// From now on, answers every request of `service` after its ref advertisement with a
    /// fatal error on side band 3, as git's own daemons die (`fatal: ...`) and hosts refuse
    /// (quota, maintenance, a policy).
    pub fn fail_fatally(&self, service: &str, message: &str) {
        *self.inner.fatal.lock().expect("lock") = Some((service.into(), message.into()));
    }

    /// The commit a branch points at in the bare repository, if it exists.
    pub fn branch_head(&self, name: &str, branch: &str) -> Option<String> {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--verify", "-q", &format!("refs/heads/{branch}")])
            .current_dir(self.repo_path(name))
            .output()
            .expect("git rev-parse");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `git show <rev>:<path>` in the bare repository.
    pub fn show(&self, name: &str, rev: &str, path: &str) -> Option<String> {
        let out = std::process::Command::new("git")
            .args(["show", &format!("{rev}:{path}")])
            .current_dir(self.repo_path(name))
            .output()
            .expect("git show");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs git in the bare repository and returns stdout.
    pub fn git(&self, name: &str, args: &[&str]) -> String {
        git(&self.repo_path(name), args)
    }
}

/// What an agent does to the content of `GitServer::add_real_content`, as one shell command
/// (the agent's Bash tool runs it, or a test with `bash -c`, in the checkout): a new
/// executable, a mode change, a new symlink, a binary, a CRLF edit, a rename, a deletion, a
/// non-ASCII path, ignored build output, a file inside the submodule, and an edit that keeps
/// the file's size and mtime (publish trusts the clone's stat data; the ctime still changes).
pub const REAL_EDITS: &str = "set -e; mkdir -p tools target/debug node_modules/x vendor/lib \
    && printf '#!/bin/sh\\necho gen\\n' > tools/gen.sh && chmod 755 tools/gen.sh && chmod 644 scripts/build.sh \
    && ln -s docs link-to-docs && printf '\\000\\001\\002\\003\\000\\377\\376' > assets/new.bin \
    && printf '@echo off\\r\\necho one\\r\\necho two\\r\\n' > win/run.bat \
    && mv old-name.txt new-name.txt && rm to-delete.txt && printf 'atarashii\\n' > 'docs/ünïcödé/新しい.md' \
    && echo out > target/debug/out.o && echo x > node_modules/x/index.js && echo 'int x;' > vendor/lib/patched.c \
    && cp -p README.md target/readme.orig && printf '# README\\n' > README.md && touch -r target/readme.orig README.md";

/// Runs git with a clean config and returns stdout; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn authorized(inner: &Inner, headers: &HeaderMap) -> bool {
    let Some(token) = &inner.token else {
        return true;
    };
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(b64) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return false;
    };
    // The username too, as a host that ties a token to its user (GitLab's deploy tokens, a
    // Gitea user's token) checks it: a client that sends the wrong one fails here as it would there.
    let expected = format!("{}:{}", inner.user, token);
    decoded == expected.as_bytes()
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    inner.stats.requests.fetch_add(1, Ordering::Relaxed);
    if !authorized(&inner, &headers) {
        inner.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", "Basic realm=\"git\"")
            .body(Body::from("unauthorized"))
            .expect("response");
    }
    let query = uri.query().unwrap_or_default();
    let stall = inner.stall.lock().expect("lock").clone();
    if let Some(service) = stall.filter(|s| uri.path().ends_with("/info/refs") && query == format!("service={s}")) {
        inner.stats.stalled.fetch_add(1, Ordering::Relaxed);
        // The headers go out; the body never comes (the stream stays pending until the server
        // stops with its runtime).
        let never = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        return Response::builder()
            .header("content-type", format!("application/x-{service}-advertisement"))
            .header("cache-control", "no-cache")
            .body(Body::from_stream(never))
            .expect("response");
    }
    if uri.path().ends_with("git-receive-pack") {
        inner.stats.receive_pack.fetch_add(1, Ordering::Relaxed);
    }
    let fatal = inner.fatal.lock().expect("lock").clone();
    if let Some((service, message)) = fatal.filter(|(s, _)| method == Method::POST && uri.path().ends_with(s.as_str()))
    {
        // As git does it: a NAK where a fetch expects one, then `\x03` + the message on side band 3.
        let mut body = Vec::new();
        if service == "git-upload-pack" {
            body.extend_from_slice(b"0008NAK\n");
        }
        let text = format!("\x03fatal: {message}\n");
        body.extend_from_slice(format!("{:04x}{text}", text.len() + 4).as_bytes());
        return Response::builder()
            .header("content-type", format!("application/x-{service}-result"))
            .body(Body::from(body))
            .expect("response");
    }
    if uri.path().ends_with("git-receive-pack") {
        if inner.failing_pushes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Response::builder().status(503).body(Body::from("try again later")).expect("response");
        }
        inner.stats.receive_pack_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    }
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &inner.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("PATH_INFO", uri.path())
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_USER", &inner.user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("git http-backend");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.expect("http-backend output");
    let _ = writer.await;
    cgi_response(&out.stdout)
}

/// Turns CGI output (headers, blank line, body) into an HTTP response.
fn cgi_response(raw: &[u8]) -> Response<Body> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((end, sep)) = split else {
        return Response::builder().status(500).body(Body::from("bad CGI output")).expect("response");
    };
    let mut builder = Response::builder().status(200);
    for line in String::from_utf8_lossy(&raw[..end]).lines() {
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("status") {
                let code = v.split_whitespace().next().and_then(|c| c.parse::<u16>().ok()).unwrap_or(500);
                builder = builder.status(code);
            } else {
                builder = builder.header(k.trim(), v);
            }
        }
    }
    builder.body(Body::from(raw[end + sep..].to_vec())).expect("response")
}
