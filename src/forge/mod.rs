//! Opens (or updates) the pull request of a pushed branch, with the repository's credential,
//! through the provider's REST API: GitHub (github.com, Enterprise) and GitLab (merge requests).
//!
//! reqwest + serde against the documented endpoints rather than octocrab/gitlab crates: each of
//! those brings its own HTTP stack and TLS setup (hyper-rustls with aws-lc, or curl) next to the
//! reqwest we already build, and we need six calls.
//!
//! Idempotent: every attempt first looks for an open pull request of the head branch, and
//! updates it when there is one; a create answered "already exists" looks again. A retry (or a
//! controller restart between the push and the answer) therefore never opens a second one.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::pull_request::{TemplateValues, render};
use crate::api::{Provider, PullRequestResult, Resolved, ResolvedPullRequest, Summary};

/// What to open: the resolved spec, the branches, and the rendered text.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub pr: &'a ResolvedPullRequest,
    /// The pushed work branch.
    pub head: &'a str,
    /// The branch to merge into. None when the run continued the work branch itself (`ref` is
    /// the branch) and `pullRequest.base` is not set: an open pull request keeps its base, and
    /// none can be opened.
    pub base: Option<String>,
    pub title: String,
    pub body: String,
}

/// How transient failures (429, 5xx, rate limits, the host unreachable) are retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    /// No single wait is longer (a `Retry-After` above it is cut to it).
    pub max_delay: Duration,
    /// No wait starts once this much time has been waited in all.
    pub max_total: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { attempts: 6, max_delay: Duration::from_secs(30), max_total: Duration::from_secs(120) }
    }
}

/// Why the pull request could not be opened, in words that say what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ForgeError {
    /// The HTTP status of the last answer, when there was one.
    pub status: Option<u16>,
    pub message: String,
    transient: bool,
    retry_after: Option<Duration>,
}

/// Largest API answer read.
const BODY_LIMIT: usize = 1024 * 1024;
/// Pages of a list followed (100 per page).
const MAX_PAGES: usize = 10;
/// GitHub's limit on a pull request body, in characters.
pub const GITHUB_BODY_LIMIT: usize = 65_536;
/// GitLab's limit on a merge request description (1,048,576); kept to GitHub's, which is plenty.
pub const GITLAB_BODY_LIMIT: usize = 65_536;

/// A client that follows no redirect (the token must not travel to where an answer points)
/// and gives up on a request after 30 s.
pub fn client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .user_agent(concat!("agentops/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default()
        })
        .clone()
}

/// Opens the pull request, or updates the open one of the same head branch; retries transient
/// failures within `retry`. `log` hears about each retry.
pub async fn open_or_update(
    http: &reqwest::Client,
    req: &Request<'_>,
    token: &str,
    retry: Retry,
    mut log: impl FnMut(&str),
) -> Result<PullRequestResult, ForgeError> {
    let api = Api { http, base: req.pr.api_url.as_str(), token, provider: req.pr.provider };
    let (mut waited, mut backoff) = (Duration::ZERO, Duration::from_secs(1));
    let mut attempt = 1;
    loop {
        let res = match req.pr.provider {
            Provider::Github => github(&api, req).await,
            Provider::Gitlab => gitlab(&api, req).await,
        };
        match res {
            Err(e) if e.transient && attempt < retry.attempts => {
                let delay = e.retry_after.unwrap_or(backoff).min(retry.max_delay);
                if waited + delay > retry.max_total {
                    return Err(e);
                }
                log(&format!("{e}; trying again in {} s (attempt {attempt} of {})", delay.as_secs(), retry.attempts));
                tokio::time::sleep(delay).await;
                waited += delay;
                backoff = (backoff * 2).min(retry.max_delay);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Keeps the body under the provider's limit: the user's part is cut first, the generated
/// summary (`tail`) stays whole.
pub fn fit_body(user: &str, tail: &str, limit: usize) -> String {
    let tail_len = tail.chars().count();
    let user_len = user.chars().count();
    if user_len + tail_len <= limit {
        return format!("{user}{tail}");
    }
    const CUT: &str = "\n\n… (cut to fit the provider's limit)";
    let keep = limit.saturating_sub(tail_len + CUT.chars().count());
    let user: String = user.chars().take(keep).collect();
    let tail: String = tail.chars().take(limit.saturating_sub(user.chars().count() + CUT.chars().count())).collect();
    format!("{user}{CUT}{tail}")
}

/// Where the run happened, for the summary's last lines.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// `agentops run` on one machine.
    Local,
    /// An `AgentExecution` in a cluster, with its uid.
    Cluster { uid: &'a str },
}

/// The pull request for a run that pushed `s.git.branch`: the user's title and body rendered,
/// and below the body the summary only the operator can give (its gateway's figures).
pub fn request_for<'a>(
    pr: &'a ResolvedPullRequest,
    r: &'a Resolved,
    s: &'a Summary,
    origin: Origin<'_>,
) -> Request<'a> {
    let line = one_line(s);
    let values = TemplateValues {
        name: &r.name,
        namespace: &r.namespace,
        prompt: &r.prompt,
        result: s.result.as_deref().unwrap_or_default(),
        summary: &line,
        branch: &r.branch,
        output: s.output.as_ref(),
    };
    let title: String = render(&pr.title, &values).lines().next().unwrap_or_default().chars().take(256).collect();
    let user = render(&pr.body, &values);
    let body = fit_body(&user, &summary_markdown(s, r, origin), GITHUB_BODY_LIMIT);
    let head = s.git.branch.as_deref().unwrap_or(&r.branch);
    let base = pr.base.clone().or_else(|| s.git.base_branch.clone()).filter(|b| b != head);
    Request { pr, head, base, title, body }
}

/// Opens (or updates) the pull request of a run that pushed: the request built from the run's
/// summary, sent with `token`. The error says that the pushed branch is kept.
pub async fn open_for(
    pr: &ResolvedPullRequest,
    r: &Resolved,
    s: &Summary,
    origin: Origin<'_>,
    token: &str,
    retry: Retry,
    log: impl FnMut(&str),
) -> Result<PullRequestResult, String> {
    let req = request_for(pr, r, s, origin);
    open_or_update(&client(), &req, token, retry, log)
        .await
        .map_err(|e| format!("{e}; the branch {} was pushed and is kept", req.head))
}

/// `{{summary}}`: one line about the run.
pub fn one_line(s: &Summary) -> String {
    format!(
        "{} files changed (+{} -{}); {} turns, {} tool calls, {} tokens, ${:.4}",
        s.git.changed_files,
        s.git.insertions,
        s.git.deletions,
        s.num_turns,
        s.tool_calls.total,
        s.tokens_used,
        s.cost_usd
    )
}

/// The generated part of the body: what the run used, measured by the operator.
pub fn summary_markdown(s: &Summary, r: &Resolved, origin: Origin<'_>) -> String {
    let u = &s.usage;
    let mut tools: Vec<(&String, &u64)> = s.tool_calls.by_tool.iter().collect();
    tools.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let tools: Vec<String> = tools.iter().take(20).map(|(k, v)| format!("{k} {v}")).collect();
    let duration = if s.duration_ms < 60_000 {
        format!("{:.1}s", s.duration_ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(s.duration_ms / 1000)).to_string()
    };
    let mut out = String::from("\n\n---\n<!-- agentops:summary -->\n**agentops run**\n\n| | |\n|---|---|\n");
    let mut row = |k: &str, v: String| out.push_str(&format!("| {k} | {} |\n", v.replace('|', "\\|")));
    row("Model", s.model.clone().or_else(|| r.model.clone()).unwrap_or_else(|| "default".into()));
    row("Turns", s.num_turns.to_string());
    row(
        "Tool calls",
        format!(
            "{}{}",
            s.tool_calls.total,
            if tools.is_empty() { String::new() } else { format!(" ({})", tools.join(", ")) }
        ),
    );
    row(
        "Tokens",
        format!(
            "{} (input {}, output {}, cache read {}, cache write {})",
            s.tokens_used, u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens
        ),
    );
    row("Cost", format!("${:.4} (metered by the operator's gateway)", s.cost_usd));
    row("Duration", duration);
    row(
        "Changes",
        format!("{} files, +{} -{} on `{}`", s.git.changed_files, s.git.insertions, s.git.deletions, r.branch),
    );
    match origin {
        Origin::Cluster { uid } => {
            row("Execution", format!("`{}/{}` (uid `{uid}`)", r.namespace, r.name));
            out.push_str(&format!("\n`kubectl get ax -n {} {}`\n", r.namespace, r.name));
        }
        Origin::Local => row("Execution", format!("`{}` (id `{}`, agentops run)", r.name, s.id)),
    }
    out
}

struct Api<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    token: &'a str,
    provider: Provider,
}

impl Api<'_> {
    fn name(&self) -> &'static str {
        match self.provider {
            Provider::Github => "GitHub",
            Provider::Gitlab => "GitLab",
        }
    }

    /// One call; the JSON answer on 2xx, a classified error otherwise. `what` says what was
    /// being done, for the message.
    async fn call(&self, method: Method, url: &str, body: Option<&Value>, what: &str) -> Result<Answer, ForgeError> {
        let mut rb = self.http.request(method, url);
        rb = match self.provider {
            Provider::Github => rb
                .bearer_auth(self.token)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28"),
            Provider::Gitlab => rb.header("private-token", self.token),
        };
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| ForgeError {
            status: None,
            message: format!("cannot reach {} at {} while {what}: {}", self.name(), self.base, without_url(&e)),
            transient: true,
            retry_after: None,
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut bytes = Vec::new();
        let mut stream = resp;
        while let Ok(Some(chunk)) = stream.chunk().await {
            bytes.extend_from_slice(&chunk[..chunk.len().min(BODY_LIMIT.saturating_sub(bytes.len()))]);
            if bytes.len() >= BODY_LIMIT {
                break;
            }
        }
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            let next = next_link(&headers, self.base);
            return Ok(Answer { json, next });
        }
        Err(self.classify(status, &headers, &json, what))
    }

    fn classify(
        &self,
        status: StatusCode,
        headers: &reqwest::header::HeaderMap,
        json: &Value,
        what: &str,
    ) -> ForgeError {
        let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
        let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
            || (status == StatusCode::FORBIDDEN
                && (retry_after.is_some() || header("x-ratelimit-remaining") == Some("0")));
        let reset = header("x-ratelimit-reset")
            .and_then(|v| v.parse::<i64>().ok())
            .map(|at| Duration::from_secs((at - jiff::Timestamp::now().as_second()).clamp(1, 3600) as u64));
        let said = api_message(json);
        let (name, code) = (self.name(), status.as_u16());
        let scopes = match self.provider {
            Provider::Github => {
                "a fine-grained token with Pull requests: read and write (and Contents: write to push), or a classic token with the repo scope"
            }
            Provider::Gitlab => "a token with the api scope, of a user with at least the Developer role",
        };
        let message = if rate_limited {
            format!("{name} rate-limited {what} (HTTP {code}): {said}")
        } else {
            match code {
                401 => format!(
                    "{name} refused the token while {what} (HTTP 401: {said}): check the token in spec.repository.credentialsSecretRef"
                ),
                403 => format!(
                    "{name} forbade {what} (HTTP 403: {said}): the token needs {scopes}; branch protection or the repository's settings may forbid it too"
                ),
                404 => format!(
                    "{name} answered 404 while {what} ({said}): no such repository at {}, or the token cannot see it (check spec.repository.url, spec.repository.apiUrl and the token's access)",
                    self.base
                ),
                409 | 422 => format!(
                    "{name} refused {what} (HTTP {code}: {said}); check spec.git.pullRequest (the base branch must exist and differ from the work branch)"
                ),
                _ => format!("{name} failed while {what} (HTTP {code}: {said})"),
            }
        };
        ForgeError {
            status: Some(code),
            message,
            transient: rate_limited || status.is_server_error(),
            retry_after: retry_after.or(if rate_limited { reset } else { None }),
        }
    }

    /// Every item of a list, following `Link: rel="next"` on the same origin (bounded).
    async fn list(&self, url: String, what: &str) -> Result<Vec<Value>, ForgeError> {
        let (mut out, mut next) = (Vec::new(), Some(url));
        for _ in 0..MAX_PAGES {
            let Some(url) = next.take() else { break };
            let a = self.call(Method::GET, &url, None, what).await?;
            out.extend(a.json.as_array().cloned().unwrap_or_default());
            next = a.next;
        }
        Ok(out)
    }
}

struct Answer {
    json: Value,
    next: Option<String>,
}

/// The error and its causes, without the URL reqwest puts in it (short messages).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(u) = e.url() {
        text = text.replace(&format!(" for url ({u})"), "").replace(&format!(" ({u})"), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The provider's own words: `message` and GitHub's `errors[].message`, GitLab's `message`
/// (text, list or map) and `error`.
fn api_message(json: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    match json.get("message") {
        Some(Value::String(s)) => parts.push(s.clone()),
        Some(Value::Array(a)) => parts.extend(a.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), String::from))),
        Some(Value::Object(m)) => parts.extend(m.iter().map(|(k, v)| format!("{k} {v}"))),
        _ => {}
    }
    if let Some(e) = json.get("error").and_then(Value::as_str) {
        parts.push(e.to_string());
    }
    for e in json.get("errors").and_then(Value::as_array).into_iter().flatten() {
        match e.get("message").and_then(Value::as_str) {
            Some(m) => parts.push(m.to_string()),
            None => parts.push(e.to_string()),
        }
    }
    let text = if parts.is_empty() { "no message".to_string() } else { parts.join(": ") };
    crate::api::report::truncate(&text, 500)
}

/// The `rel="next"` URL of a `Link` header, only when it stays on the API's origin.
fn next_link(headers: &reqwest::header::HeaderMap, base: &str) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    let next = link.split(',').find(|part| part.contains("rel=\"next\""))?;
    let url = next.split(';').next()?.trim().trim_start_matches('<').trim_end_matches('>').to_string();
    let (a, b) = (url::Url::parse(&url).ok()?, url::Url::parse(base).ok()?);
    (a.origin() == b.origin()).then_some(url)
}

/// The base a new pull request needs.
fn no_base<'a>(req: &'a Request<'_>) -> Result<&'a str, ForgeError> {
    req.base.as_deref().ok_or_else(|| ForgeError {
        status: None,
        message: format!(
            "no branch to merge {} into: the run continued that branch itself; set spec.git.pullRequest.base",
            req.head
        ),
        transient: false,
        retry_after: None,
    })
}

fn number_of(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

async fn github(api: &Api<'_>, req: &Request<'_>) -> Result<PullRequestResult, ForgeError> {
    let repo = format!("{}/repos/{}", api.base, req.pr.project);
    let owner = req.pr.project.split('/').next().unwrap_or_default();
    let head = format!("{owner}:{}", req.head);
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("head", &head)
        .append_pair("state", "open")
        .finish();
    let open = api.list(format!("{repo}/pulls?{query}&per_page=100"), "looking for an open pull request").await?;
    // Ours: this branch of this repository (a fork's branch of the same name is someone else's).
    let existing = open.iter().find(|p| {
        p["head"]["ref"].as_str().is_none_or(|r| r == req.head)
            && p["head"]["repo"]["full_name"].as_str().is_none_or(|f| f.eq_ignore_ascii_case(&req.pr.project))
    });
    let body = fit_body(&req.body, "", GITHUB_BODY_LIMIT);
    let (pr, state) = match existing.and_then(|p| number_of(p, "number")) {
        Some(n) => {
            let mut patch = json!({"title": req.title, "body": body});
            if let Some(base) = &req.base {
                patch["base"] = json!(base);
            }
            let a = api
                .call(Method::PATCH, &format!("{repo}/pulls/{n}"), Some(&patch), "updating the pull request")
                .await?;
            (a.json, "updated")
        }
        None => {
            let base = no_base(req)?;
            let create =
                json!({"title": req.title, "head": req.head, "base": base, "body": body, "draft": req.pr.draft});
            match api.call(Method::POST, &format!("{repo}/pulls"), Some(&create), "opening the pull request").await {
                Ok(a) => (a.json, "opened"),
                // Opened in between (another attempt, another controller): update that one.
                Err(e) if e.status == Some(422) && e.message.contains("already exists") => {
                    return Err(ForgeError { transient: true, retry_after: Some(Duration::from_secs(1)), ..e });
                }
                Err(e) => return Err(e),
            }
        }
    };
    let n = number_of(&pr, "number").ok_or_else(|| ForgeError {
        status: None,
        message: "GitHub answered without a pull request number".into(),
        transient: false,
        retry_after: None,
    })?;
    if !req.pr.labels.is_empty() {
        let labels = json!({"labels": req.pr.labels});
        api.call(Method::POST, &format!("{repo}/issues/{n}/labels"), Some(&labels), "setting labels").await?;
    }
    if !req.pr.reviewers.is_empty() || !req.pr.team_reviewers.is_empty() {
        let who = json!({"reviewers": req.pr.reviewers, "team_reviewers": req.pr.team_reviewers});
        api.call(Method::POST, &format!("{repo}/pulls/{n}/requested_reviewers"), Some(&who), "requesting reviewers")
            .await?;
    }
    Ok(PullRequestResult { url: str_of(&pr, "html_url"), number: n, provider: "github".into(), state: state.into() })
}

async fn gitlab(api: &Api<'_>, req: &Request<'_>) -> Result<PullRequestResult, ForgeError> {
    let id: String = url::form_urlencoded::byte_serialize(req.pr.project.as_bytes()).collect();
    let project = format!("{}/projects/{id}", api.base);
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("source_branch", req.head)
        .append_pair("state", "opened")
        .finish();
    let open =
        api.list(format!("{project}/merge_requests?{query}&per_page=100"), "looking for an open merge request").await?;
    // Ours: this branch of this project. GitLab lists merge requests from forks into the
    // project too, and a fork's branch may have the same name.
    let existing = open.iter().find(|m| {
        m["source_branch"].as_str().is_none_or(|b| b == req.head)
            && (m["source_project_id"].is_null() || m["source_project_id"] == m["target_project_id"])
    });
    let mut reviewer_ids = Vec::new();
    for user in &req.pr.reviewers {
        let q: String = url::form_urlencoded::Serializer::new(String::new()).append_pair("username", user).finish();
        let found = api.list(format!("{}/users?{q}", api.base), "looking up a reviewer").await?;
        let id = found.first().and_then(|u| number_of(u, "id")).ok_or_else(|| ForgeError {
            status: None,
            message: format!("GitLab has no user {user:?} (spec.git.pullRequest.reviewers)"),
            transient: false,
            retry_after: None,
        })?;
        reviewer_ids.push(id);
    }
    let title = if req.pr.draft && !req.title.starts_with("Draft:") {
        format!("Draft: {}", req.title)
    } else {
        req.title.clone()
    };
    let mut fields = json!({
        "title": title,
        "description": fit_body(&req.body, "", GITLAB_BODY_LIMIT),
    });
    if let Some(base) = &req.base {
        fields["target_branch"] = json!(base);
    }
    if !req.pr.labels.is_empty() {
        fields["labels"] = json!(req.pr.labels.join(","));
    }
    if !reviewer_ids.is_empty() {
        fields["reviewer_ids"] = json!(reviewer_ids);
    }
    let (mr, state) = match existing.and_then(|m| number_of(m, "iid")) {
        Some(iid) => {
            let a = api
                .call(
                    Method::PUT,
                    &format!("{project}/merge_requests/{iid}"),
                    Some(&fields),
                    "updating the merge request",
                )
                .await?;
            (a.json, "updated")
        }
        None => {
            fields["target_branch"] = json!(no_base(req)?);
            fields["source_branch"] = json!(req.head);
            fields["remove_source_branch"] = json!(false);
            match api
                .call(Method::POST, &format!("{project}/merge_requests"), Some(&fields), "opening the merge request")
                .await
            {
                Ok(a) => (a.json, "opened"),
                Err(e) if e.status == Some(409) => {
                    return Err(ForgeError { transient: true, retry_after: Some(Duration::from_secs(1)), ..e });
                }
                Err(e) => return Err(e),
            }
        }
    };
    let iid = number_of(&mr, "iid").ok_or_else(|| ForgeError {
        status: None,
        message: "GitLab answered without a merge request iid".into(),
        transient: false,
        retry_after: None,
    })?;
    Ok(PullRequestResult { url: str_of(&mr, "web_url"), number: iid, provider: "gitlab".into(), state: state.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_part_is_cut_first_and_the_summary_stays() {
        let tail = "\n\n---\nsummary";
        assert_eq!(fit_body("short", tail, 100), "short\n\n---\nsummary");
        let long = "x".repeat(200);
        let body = fit_body(&long, tail, 100);
        assert_eq!(body.chars().count(), 100);
        assert!(body.ends_with(tail) && body.contains("cut to fit"), "{body}");
        let huge_tail = "y".repeat(150);
        assert_eq!(fit_body("u", &huge_tail, 100).chars().count(), 100, "never above the limit");
    }

    #[test]
    fn next_links_stay_on_the_api_origin() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("link", r#"<https://api.github.com/x?page=2>; rel="next", <https://api.github.com/x?page=9>; rel="last""#.parse().unwrap());
        assert_eq!(next_link(&h, "https://api.github.com").as_deref(), Some("https://api.github.com/x?page=2"));
        h.insert("link", r#"<https://evil.example/x?page=2>; rel="next""#.parse().unwrap());
        assert_eq!(next_link(&h, "https://api.github.com"), None, "the token never follows a link elsewhere");
    }

    #[test]
    fn api_messages_are_read_from_either_provider() {
        let gh = json!({"message": "Validation Failed", "errors": [{"message": "No commits between main and x"}]});
        assert_eq!(api_message(&gh), "Validation Failed: No commits between main and x");
        let gl = json!({"message": ["Another open merge request already exists for this source branch: !1"]});
        assert!(api_message(&gl).starts_with("Another open merge request"));
        assert_eq!(api_message(&Value::Null), "no message");
    }
}
