//! Fakes of the GitHub REST API (`/api/v3`, as GitHub Enterprise serves it) and the GitLab API
//! (`/api/v4`) on 127.0.0.1, over the test git server's repositories: real HTTP, every request
//! recorded, auth enforced, the answers and errors the real APIs give (201/200/401/403/404/409/
//! 422/429 with `Retry-After`), lists paginated with `Link` headers.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Response, Uri};
use serde_json::{Value, json};

/// Which API the fake speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Github,
    Gitlab,
}

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The raw path (GitLab's project id stays percent-encoded).
    pub path: String,
    pub query: String,
    /// The credential presented (`Bearer …`, `token …` or GitLab's `PRIVATE-TOKEN`).
    pub auth: Option<String>,
    pub body: Value,
}

/// A pull request (merge request) the fake holds.
#[derive(Clone, Debug, Default)]
pub struct Pr {
    pub project: String,
    pub number: u64,
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
    pub team_reviewers: Vec<String>,
    pub open: bool,
    /// The fork it comes from (`owner/name`), when not from the project itself.
    pub fork: Option<String>,
}

/// A scripted answer for the next request of one kind (`list`, `create`, `update`, `labels`,
/// `reviewers`, `users`, or `any`).
#[derive(Clone, Debug)]
struct Scripted {
    kind: String,
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

struct Inner {
    flavor: Flavor,
    token: String,
    base_url: Mutex<String>,
    git_root: PathBuf,
    prs: Mutex<Vec<Pr>>,
    calls: Mutex<Vec<Call>>,
    script: Mutex<VecDeque<Scripted>>,
    page_size: usize,
    /// Creates are answered this long after the PR exists (a client that gives up, or a
    /// controller stopped meanwhile, has opened it without learning so).
    create_delay: Mutex<Duration>,
    /// A token the fake accepts for reads only: writes get the provider's 403.
    read_only: Mutex<Option<String>>,
    /// Opened by a person just before the next create is handled (the race a create meets).
    before_create: Mutex<Option<Pr>>,
}

/// A running fake.
#[derive(Clone)]
pub struct FakeForge {
    /// Where the API is (`spec.repository.apiUrl`).
    pub api_url: String,
    inner: Arc<Inner>,
}

impl FakeForge {
    /// Starts a fake over the repositories under `git_root` (`<project>.git`), accepting `token`.
    pub async fn start(flavor: Flavor, git_root: PathBuf, token: &str) -> Self {
        Self::start_with_page_size(flavor, git_root, token, 30).await
    }

    /// Like `start`, with at most `page_size` items per page whatever `per_page` asks.
    pub async fn start_with_page_size(flavor: Flavor, git_root: PathBuf, token: &str, page_size: usize) -> Self {
        let inner = Arc::new(Inner {
            flavor,
            token: token.into(),
            base_url: Mutex::new(String::new()),
            git_root,
            prs: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            page_size,
            create_delay: Mutex::new(Duration::ZERO),
            read_only: Mutex::new(None),
            before_create: Mutex::new(None),
        });
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let base = format!("http://{addr}");
        *inner.base_url.lock().expect("lock") = base.clone();
        let prefix = if flavor == Flavor::Github { "/api/v3" } else { "/api/v4" };
        Self { api_url: format!("{base}{prefix}"), inner }
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().expect("lock").clone()
    }

    /// Every pull request (merge request) so far.
    pub fn prs(&self) -> Vec<Pr> {
        self.inner.prs.lock().expect("lock").clone()
    }

    /// The next request of `kind` gets `status` with the provider's error body saying `message`.
    pub fn fail_next(&self, kind: &str, status: u16, retry_after: Option<u64>, message: &str) {
        let body = match self.inner.flavor {
            Flavor::Github => json!({"message": message, "documentation_url": "https://docs.github.com/rest"}),
            Flavor::Gitlab => json!({"message": message}),
        };
        self.inner.script.lock().expect("lock").push_back(Scripted { kind: kind.into(), status, retry_after, body });
    }

    /// Creates are answered `d` after the pull request exists.
    pub fn delay_creates(&self, d: Duration) {
        *self.inner.create_delay.lock().expect("lock") = d;
    }

    /// Also accepts `token`, for reads only: a write gets 403 with the provider's words (a
    /// fine-grained GitHub token without "Pull requests: write", a GitLab Reporter).
    pub fn accept_read_only(&self, token: &str) {
        *self.inner.read_only.lock().expect("lock") = Some(token.into());
    }

    /// A person opens a pull request for `head` just before the next create is handled: the
    /// create then meets the provider's answer to a duplicate (GitHub 422, GitLab 409).
    pub fn open_before_next_create(&self, project: &str, head: &str, base: &str, title: &str) {
        let pr = Pr {
            project: project.into(),
            head: head.into(),
            base: base.into(),
            title: title.into(),
            open: true,
            ..Default::default()
        };
        *self.inner.before_create.lock().expect("lock") = Some(pr);
    }

    /// Adds an open pull request from the fork `fork` (`owner/name`) whose branch has the
    /// same name as `head`.
    pub fn add_fork_pr(&self, project: &str, fork: &str, head: &str, base: &str, title: &str) -> u64 {
        let number = self.add_pr(project, head, base, title);
        let mut prs = self.inner.prs.lock().expect("lock");
        if let Some(p) = prs.iter_mut().find(|p| p.number == number) {
            p.fork = Some(fork.into());
        }
        number
    }

    /// Adds an open pull request as if a person had opened it.
    pub fn add_pr(&self, project: &str, head: &str, base: &str, title: &str) -> u64 {
        let mut prs = self.inner.prs.lock().expect("lock");
        let number = prs.len() as u64 + 1;
        prs.push(Pr {
            project: project.into(),
            number,
            head: head.into(),
            base: base.into(),
            title: title.into(),
            open: true,
            ..Default::default()
        });
        number
    }
}

fn branch_exists(inner: &Inner, project: &str, branch: &str) -> Option<bool> {
    let repo = git2::Repository::open_bare(inner.git_root.join(format!("{project}.git"))).ok()?;
    Some(repo.find_reference(&format!("refs/heads/{branch}")).is_ok())
}

fn answer(status: u16, body: Value, headers: &[(&str, String)]) -> Response<Body> {
    let mut b = Response::builder().status(status).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Body::from(body.to_string())).expect("response")
}

fn query_map(q: &str) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(String::from);
    let auth = header("private-token").map(|t| format!("PRIVATE-TOKEN {t}")).or_else(|| header("authorization"));
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (path, query) = (uri.path().to_string(), uri.query().unwrap_or_default().to_string());
    inner.calls.lock().expect("lock").push(Call {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        auth: auth.clone(),
        body: json_body.clone(),
    });
    let token_ok = match (&auth, inner.flavor) {
        (Some(a), Flavor::Github) => a == &format!("Bearer {}", inner.token) || a == &format!("token {}", inner.token),
        (Some(a), Flavor::Gitlab) => {
            a == &format!("PRIVATE-TOKEN {}", inner.token) || a == &format!("Bearer {}", inner.token)
        }
        (None, _) => false,
    };
    if inner.flavor == Flavor::Github
        && let Some(refused) = github_headers(&header)
    {
        return refused;
    }
    let presented = auth.as_deref().and_then(|a| a.split_once(' ')).map(|(_, t)| t.to_string());
    let read_only = presented.is_some() && *inner.read_only.lock().expect("lock") == presented;
    if !token_ok && !read_only {
        let msg = if inner.flavor == Flavor::Github { "Bad credentials" } else { "401 Unauthorized" };
        return answer(401, json!({"message": msg}), &[]);
    }
    if read_only && method != Method::GET {
        // GitHub's words for a fine-grained token without the permission; GitLab's for a role
        // that may not write.
        let body = match inner.flavor {
            Flavor::Github => json!({"message": "Resource not accessible by personal access token",
                "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request", "status": "403"}),
            Flavor::Gitlab => json!({"message": "403 Forbidden"}),
        };
        return answer(403, body, &[]);
    }
    if method == Method::POST
        && let Some(pr) = inner.before_create.lock().expect("lock").take()
    {
        let mut prs = inner.prs.lock().expect("lock");
        let number = prs.len() as u64 + 1;
        prs.push(Pr { number, ..pr });
    }
    match inner.flavor {
        Flavor::Github => github(&inner, &method, &path, &query, json_body).await,
        Flavor::Gitlab => gitlab(&inner, &method, &path, &query, json_body).await,
    }
}

/// What GitHub's REST API refuses before anything else (docs.github.com, "Getting started
/// with the REST API"): a request without `User-Agent` (403, with GitHub's words), an
/// `X-GitHub-Api-Version` it does not serve (400), an `Accept` that is not JSON (415).
fn github_headers(header: &dyn Fn(&str) -> Option<String>) -> Option<Response<Body>> {
    if header("user-agent").is_none_or(|u| u.trim().is_empty()) {
        return Some(answer(
            403,
            json!({"message": "Request forbidden by administrative rules. Please make sure your request has a User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required). Check https://developer.github.com for other possible causes."}),
            &[],
        ));
    }
    if let Some(v) = header("x-github-api-version")
        && !GITHUB_API_VERSIONS.contains(&v.as_str())
    {
        return Some(answer(
            400,
            json!({"message": format!("API version '{v}' is not supported."), "documentation_url": "https://docs.github.com/rest/about-the-rest-api/api-versions"}),
            &[],
        ));
    }
    if let Some(a) = header("accept")
        && !(a.contains("json") || a.contains("*/*"))
    {
        return Some(answer(415, json!({"message": format!("Unsupported 'Accept' header: '{a}'")}), &[]));
    }
    None
}

/// The REST API versions GitHub serves.
pub const GITHUB_API_VERSIONS: &[&str] = &["2022-11-28", "2026-03-10"];

/// A scripted answer for this kind of request, if one is waiting.
fn scripted(inner: &Inner, kind: &str) -> Option<Response<Body>> {
    let mut script = inner.script.lock().expect("lock");
    let at = script.iter().position(|s| s.kind == kind || s.kind == "any")?;
    let s = script.remove(at)?;
    let headers: Vec<(&str, String)> = s.retry_after.map(|r| ("retry-after", r.to_string())).into_iter().collect();
    Some(answer(s.status, s.body, &headers))
}

/// One page of `items`, with a `Link` to the next.
fn page(inner: &Inner, path: &str, query: &str, items: Vec<Value>) -> Response<Body> {
    let q = query_map(query);
    let per_page = q.get("per_page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(30).clamp(1, inner.page_size);
    let n = q.get("page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(1).max(1);
    let slice: Vec<Value> = items.iter().skip((n - 1) * per_page).take(per_page).cloned().collect();
    let mut headers = Vec::new();
    if n * per_page < items.len() {
        let mut next: Vec<(String, String)> = q.into_iter().filter(|(k, _)| k != "page").collect();
        next.sort();
        next.push(("page".into(), (n + 1).to_string()));
        let qs = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(next).finish();
        let base = inner.base_url.lock().expect("lock").clone();
        headers.push(("link", format!("<{base}{path}?{qs}>; rel=\"next\"")));
        if inner.flavor == Flavor::Gitlab {
            headers.push(("x-next-page", (n + 1).to_string()));
        }
    }
    answer(200, Value::Array(slice), &headers)
}

fn gh_json(inner: &Inner, p: &Pr) -> Value {
    let base = inner.base_url.lock().expect("lock").clone();
    let source = p.fork.as_deref().unwrap_or(&p.project);
    json!({
        "number": p.number, "state": if p.open { "open" } else { "closed" },
        "html_url": format!("{base}/{}/pull/{}", p.project, p.number),
        "title": p.title, "body": p.body, "draft": p.draft,
        "head": {"ref": p.head, "label": format!("{}:{}", source.split('/').next().unwrap_or_default(), p.head),
            "repo": {"full_name": source}},
        "base": {"ref": p.base},
        "labels": p.labels.iter().map(|l| json!({"name": l})).collect::<Vec<_>>(),
        "requested_reviewers": p.reviewers.iter().map(|r| json!({"login": r})).collect::<Vec<_>>(),
        "requested_teams": p.team_reviewers.iter().map(|t| json!({"slug": t})).collect::<Vec<_>>(),
    })
}

/// 201 with the new pull request, after the configured delay.
async fn created(inner: &Inner, pr: Value) -> Response<Body> {
    let delay = *inner.create_delay.lock().expect("lock");
    tokio::time::sleep(delay).await;
    answer(201, pr, &[])
}

fn gh_validation(message: &str, field: &str) -> Response<Body> {
    answer(
        422,
        json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "field": field, "code": "invalid", "message": message}]}),
        &[],
    )
}

async fn github(inner: &Inner, method: &Method, path: &str, query: &str, body: Value) -> Response<Body> {
    let not_found = || answer(404, json!({"message": "Not Found"}), &[]);
    let Some(rest) = path.strip_prefix("/api/v3/repos/") else { return not_found() };
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() < 3 {
        return not_found();
    }
    let project = format!("{}/{}", parts[0], parts[1]);
    if branch_exists(inner, &project, "x").is_none() {
        return not_found();
    }
    let str_list = |v: &Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    match (method.as_str(), &parts[2..]) {
        ("GET", ["pulls"]) => {
            if let Some(r) = scripted(inner, "list") {
                return r;
            }
            let q = query_map(query);
            let owner = parts[0];
            let items: Vec<Value> = inner
                .prs
                .lock()
                .expect("lock")
                .iter()
                .filter(|p| p.project == project)
                .filter(|p| q.get("state").is_none_or(|s| s == "all" || (s == "open") == p.open))
                .filter(|p| {
                    let source_owner = p.fork.as_deref().and_then(|f| f.split('/').next()).unwrap_or(owner);
                    q.get("head").is_none_or(|h| *h == format!("{source_owner}:{}", p.head))
                })
                .map(|p| gh_json(inner, p))
                .collect();
            page(inner, path, query, items)
        }
        ("POST", ["pulls"]) => {
            if let Some(r) = scripted(inner, "create") {
                return r;
            }
            let (head, base) = (body["head"].as_str().unwrap_or_default(), body["base"].as_str().unwrap_or_default());
            if body["title"].as_str().is_none_or(str::is_empty) {
                return gh_validation("title is missing", "title");
            }
            if branch_exists(inner, &project, base) != Some(true) {
                return gh_validation(&format!("base {base} does not exist"), "base");
            }
            if branch_exists(inner, &project, head) != Some(true) {
                return gh_validation(&format!("head {head} does not exist"), "head");
            }
            let pr = {
                let mut prs = inner.prs.lock().expect("lock");
                if prs.iter().any(|p| p.project == project && p.head == head && p.open && p.fork.is_none()) {
                    let owner = parts[0];
                    return answer(
                        422,
                        json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom",
                            "message": format!("A pull request already exists for {owner}:{head}.")}]}),
                        &[],
                    );
                }
                let pr = Pr {
                    project: project.clone(),
                    number: prs.len() as u64 + 1,
                    head: head.into(),
                    base: base.into(),
                    title: body["title"].as_str().unwrap_or_default().into(),
                    body: body["body"].as_str().unwrap_or_default().into(),
                    draft: body["draft"].as_bool().unwrap_or(false),
                    open: true,
                    ..Default::default()
                };
                prs.push(pr.clone());
                pr
            };
            created(inner, gh_json(inner, &pr)).await
        }
        (m, ["pulls", n, tail @ ..]) | (m, ["issues", n, tail @ ..]) => {
            let kind = match (m, tail) {
                ("PATCH", []) => "update",
                ("POST", ["labels"]) => "labels",
                ("POST", ["requested_reviewers"]) => "reviewers",
                _ => return not_found(),
            };
            if let Some(r) = scripted(inner, kind) {
                return r;
            }
            let n: u64 = n.parse().unwrap_or(0);
            let mut prs = inner.prs.lock().expect("lock");
            let Some(pr) = prs.iter_mut().find(|p| p.project == project && p.number == n) else { return not_found() };
            match kind {
                "update" => {
                    if let Some(t) = body["title"].as_str() {
                        pr.title = t.into();
                    }
                    if let Some(b) = body["body"].as_str() {
                        pr.body = b.into();
                    }
                    if let Some(b) = body["base"].as_str() {
                        pr.base = b.into();
                    }
                    answer(200, gh_json(inner, pr), &[])
                }
                "labels" => {
                    for l in str_list(&body["labels"]) {
                        if !pr.labels.contains(&l) {
                            pr.labels.push(l);
                        }
                    }
                    answer(200, json!(pr.labels.iter().map(|l| json!({"name": l})).collect::<Vec<_>>()), &[])
                }
                _ => {
                    pr.reviewers.extend(str_list(&body["reviewers"]));
                    pr.team_reviewers.extend(str_list(&body["team_reviewers"]));
                    answer(201, gh_json(inner, pr), &[])
                }
            }
        }
        _ => not_found(),
    }
}

/// GitLab's users: `username` → id (every name but `nobody` exists).
fn gitlab_user(name: &str) -> Option<u64> {
    (name != "nobody").then(|| 1000 + name.bytes().map(u64::from).sum::<u64>())
}

/// The numeric id GitLab gives a project in this fake.
fn project_id(path: &str) -> u64 {
    100 + path.bytes().map(u64::from).sum::<u64>()
}

fn gl_json(inner: &Inner, p: &Pr) -> Value {
    let base = inner.base_url.lock().expect("lock").clone();
    json!({
        "iid": p.number, "id": 5000 + p.number, "state": if p.open { "opened" } else { "closed" },
        "web_url": format!("{base}/{}/-/merge_requests/{}", p.project, p.number),
        "title": p.title, "description": p.body, "draft": p.title.starts_with("Draft:"),
        "source_branch": p.head, "target_branch": p.base, "labels": p.labels,
        "source_project_id": project_id(p.fork.as_deref().unwrap_or(&p.project)), "target_project_id": project_id(&p.project),
        "reviewers": p.reviewers.iter().map(|r| json!({"username": r})).collect::<Vec<_>>(),
    })
}

async fn gitlab(inner: &Inner, method: &Method, path: &str, query: &str, body: Value) -> Response<Body> {
    let not_found = |what: &str| answer(404, json!({"message": format!("404 {what} Not Found")}), &[]);
    if path == "/api/v4/users" && method == Method::GET {
        if let Some(r) = scripted(inner, "users") {
            return r;
        }
        let q = query_map(query);
        let name = q.get("username").cloned().unwrap_or_default();
        let users: Vec<Value> = gitlab_user(&name).map(|id| json!({"id": id, "username": name})).into_iter().collect();
        return page(inner, path, query, users);
    }
    let Some(rest) = path.strip_prefix("/api/v4/projects/") else { return not_found("Route") };
    let mut parts = rest.split('/');
    let id = parts.next().unwrap_or_default();
    let project: String = url::form_urlencoded::parse(format!("p={id}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if id.contains('/') || branch_exists(inner, &project, "x").is_none() {
        return not_found("Project");
    }
    let rest: Vec<&str> = parts.collect();
    let labels_of = |v: &Value| -> Option<Vec<String>> {
        v.as_str().map(|s| s.split(',').filter(|l| !l.is_empty()).map(String::from).collect())
    };
    let reviewers_of = |v: &Value| -> Option<Vec<String>> {
        v.as_array().map(|a| a.iter().filter_map(Value::as_u64).map(|id| format!("user{id}")).collect())
    };
    match (method.as_str(), rest.as_slice()) {
        ("GET", ["merge_requests"]) => {
            if let Some(r) = scripted(inner, "list") {
                return r;
            }
            let q = query_map(query);
            let items: Vec<Value> = inner
                .prs
                .lock()
                .expect("lock")
                .iter()
                .filter(|p| p.project == project)
                .filter(|p| q.get("state").is_none_or(|s| s == "all" || (s == "opened") == p.open))
                .filter(|p| q.get("source_branch").is_none_or(|b| *b == p.head))
                .map(|p| gl_json(inner, p))
                .collect();
            page(inner, path, query, items)
        }
        ("POST", ["merge_requests"]) => {
            if let Some(r) = scripted(inner, "create") {
                return r;
            }
            let head = body["source_branch"].as_str().unwrap_or_default().to_string();
            let base = body["target_branch"].as_str().unwrap_or_default().to_string();
            if branch_exists(inner, &project, &base) != Some(true) {
                return answer(422, json!({"message": ["Target branch does not exist"]}), &[]);
            }
            if branch_exists(inner, &project, &head) != Some(true) {
                return answer(422, json!({"message": ["Source branch does not exist"]}), &[]);
            }
            let pr = {
                let mut prs = inner.prs.lock().expect("lock");
                if let Some(p) =
                    prs.iter().find(|p| p.project == project && p.head == head && p.open && p.fork.is_none())
                {
                    let msg =
                        format!("Another open merge request already exists for this source branch: !{}", p.number);
                    return answer(409, json!({"message": [msg]}), &[]);
                }
                let pr = Pr {
                    project: project.clone(),
                    number: prs.len() as u64 + 1,
                    head,
                    base,
                    title: body["title"].as_str().unwrap_or_default().into(),
                    body: body["description"].as_str().unwrap_or_default().into(),
                    labels: labels_of(&body["labels"]).unwrap_or_default(),
                    reviewers: reviewers_of(&body["reviewer_ids"]).unwrap_or_default(),
                    open: true,
                    ..Default::default()
                };
                prs.push(pr.clone());
                pr
            };
            created(inner, gl_json(inner, &pr)).await
        }
        ("PUT", ["merge_requests", iid]) => {
            if let Some(r) = scripted(inner, "update") {
                return r;
            }
            let iid: u64 = iid.parse().unwrap_or(0);
            let mut prs = inner.prs.lock().expect("lock");
            let Some(pr) = prs.iter_mut().find(|p| p.project == project && p.number == iid) else {
                return not_found("Merge Request");
            };
            if let Some(t) = body["title"].as_str() {
                pr.title = t.into();
            }
            if let Some(d) = body["description"].as_str() {
                pr.body = d.into();
            }
            if let Some(b) = body["target_branch"].as_str() {
                pr.base = b.into();
            }
            if let Some(l) = labels_of(&body["labels"]) {
                pr.labels = l;
            }
            if let Some(r) = reviewers_of(&body["reviewer_ids"]) {
                pr.reviewers = r;
            }
            answer(200, gl_json(inner, pr), &[])
        }
        _ => not_found("Route"),
    }
}

/// The id GitLab gives `username` in this fake (what `reviewer_ids` carry).
pub fn gitlab_user_id(username: &str) -> Option<u64> {
    gitlab_user(username)
}
