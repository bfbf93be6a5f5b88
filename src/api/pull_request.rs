//! The pull request an execution asks for, resolved: which provider and API, which project,
//! and the title/body templates, checked. Pure: `forge` does the HTTP.

use serde_json::Value;

use super::ManifestError;
use super::execution::{Provider, PullRequestSpec, Repository};
use super::limits;

/// A pull request to open after the push, with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPullRequest {
    pub provider: Provider,
    /// The REST API root, without a trailing slash.
    pub api_url: String,
    /// `owner/repo` (GitHub) or the project's full path (GitLab), from the repository URL.
    pub project: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
    pub team_reviewers: Vec<String>,
    /// None: the base branch of the run (`git.baseBranch`, else the branch cloned).
    pub base: Option<String>,
}

/// The placeholders a title or body may use (besides `output.FIELD`).
pub const PLACEHOLDERS: &[&str] = &["name", "namespace", "prompt", "result", "summary", "branch"];

const DEFAULT_TITLE: &str = "agentops: {{name}}";
const DEFAULT_BODY: &str = "{{result}}";

/// The execution's block over the template's, field by field; None when neither asks for one
/// or it is disabled.
pub fn resolve_pull_request(
    own: Option<&PullRequestSpec>,
    template: Option<&PullRequestSpec>,
    repo: &Repository,
    output_schema: Option<&Value>,
) -> Result<Option<ResolvedPullRequest>, ManifestError> {
    if own.is_none() && template.is_none() {
        return Ok(None);
    }
    fn field<'a, T>(
        own: Option<&'a PullRequestSpec>,
        template: Option<&'a PullRequestSpec>,
        f: fn(&PullRequestSpec) -> &Option<T>,
    ) -> Option<&'a T> {
        own.and_then(|p| f(p).as_ref()).or_else(|| template.and_then(|p| f(p).as_ref()))
    }
    macro_rules! pick {
        ($name:ident) => {
            field(own, template, |p| &p.$name)
        };
    }
    let enabled = pick!(enabled).copied().unwrap_or(true);
    if !enabled {
        return Ok(None);
    }
    let title = pick!(title).cloned().unwrap_or_else(|| DEFAULT_TITLE.into());
    let body = pick!(body).cloned().unwrap_or_else(|| DEFAULT_BODY.into());
    check_text(&title, "spec.git.pullRequest.title", limits::MAX_PR_TITLE_CHARS, output_schema)?;
    check_text(&body, "spec.git.pullRequest.body", limits::MAX_PR_BODY_CHARS, output_schema)?;
    if title.trim().is_empty() {
        return Err(ManifestError::new("spec.git.pullRequest.title", "is empty; give a title (or leave it out)"));
    }
    let names = |field: &str, list: Option<&Vec<String>>| -> Result<Vec<String>, ManifestError> {
        let list = list.cloned().unwrap_or_default();
        if list.len() > limits::MAX_PR_NAMES {
            return Err(ManifestError::new(
                format!("spec.git.pullRequest.{field}"),
                format!("has {} entries; at most {}", list.len(), limits::MAX_PR_NAMES),
            ));
        }
        if let Some(bad) = list.iter().find(|n| n.trim().is_empty() || n.contains(',') || n.chars().count() > 128) {
            return Err(ManifestError::new(
                format!("spec.git.pullRequest.{field}"),
                format!("{bad:?} is not a name (non-empty, no commas, at most 128 characters)"),
            ));
        }
        Ok(list)
    };
    let labels = names("labels", pick!(labels))?;
    let reviewers = names("reviewers", pick!(reviewers))?;
    let team_reviewers = names("teamReviewers", pick!(team_reviewers))?;
    let base = pick!(base).cloned().filter(|b| !b.is_empty());
    if let Some(b) = &base
        && git2::Branch::name_is_valid(b).ok() != Some(true)
    {
        return Err(ManifestError::new("spec.git.pullRequest.base", format!("{b:?} is not a branch name")));
    }
    let (provider, api_url, project) = forge_of(repo)?;
    if provider == Provider::Gitlab && !team_reviewers.is_empty() {
        return Err(ManifestError::new(
            "spec.git.pullRequest.teamReviewers",
            "is GitHub only; GitLab merge requests take users in reviewers",
        ));
    }
    Ok(Some(ResolvedPullRequest {
        provider,
        api_url,
        project,
        title,
        body,
        draft: pick!(draft).copied().unwrap_or(false),
        labels,
        reviewers,
        team_reviewers,
        base,
    }))
}

/// The provider, API root and project path of a repository.
pub fn forge_of(repo: &Repository) -> Result<(Provider, String, String), ManifestError> {
    let url = url::Url::parse(repo.url.trim())
        .map_err(|e| ManifestError::new("spec.repository.url", format!("is not a URL: {e}")))?;
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let provider = match (repo.provider, host.as_str()) {
        (Some(p), _) => p,
        (None, "github.com") => Provider::Github,
        (None, "gitlab.com") => Provider::Gitlab,
        (None, _) => {
            return Err(ManifestError::new(
                "spec.repository.provider",
                format!(
                    "is needed for a pull request on {host}: set github or gitlab (and apiUrl if the API is not at the default place)"
                ),
            ));
        }
    };
    let api_url = match (&repo.api_url, provider, host.as_str()) {
        (Some(u), _, _) => {
            let parsed = url::Url::parse(u.trim())
                .map_err(|e| ManifestError::new("spec.repository.apiUrl", format!("is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "https" | "http")
                || !parsed.username().is_empty()
                || parsed.password().is_some()
            {
                return Err(ManifestError::new(
                    "spec.repository.apiUrl",
                    "must be an https:// (or http://) URL without credentials",
                ));
            }
            if parsed.scheme() == "http" && !repo.insecure.unwrap_or(false) && !is_loopback(&parsed) {
                return Err(ManifestError::new(
                    "spec.repository.apiUrl",
                    "sends the token over plain http:// to a host other than loopback; use https:// (or spec.repository.insecure: true)",
                ));
            }
            u.trim().trim_end_matches('/').to_string()
        }
        (None, Provider::Github, "github.com") => "https://api.github.com".into(),
        (None, Provider::Gitlab, "gitlab.com") => "https://gitlab.com/api/v4".into(),
        (None, Provider::Github, _) => format!("{}://{}/api/v3", url.scheme(), authority(&url)),
        (None, Provider::Gitlab, _) => format!("{}://{}/api/v4", url.scheme(), authority(&url)),
    };
    let path = url.path().trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path).to_string();
    let segments = path.split('/').filter(|s| !s.is_empty()).count();
    let fits = match provider {
        Provider::Github => segments == 2,
        Provider::Gitlab => segments >= 2,
    };
    if !fits {
        let want = if provider == Provider::Github { "OWNER/REPO" } else { "GROUP/.../PROJECT" };
        return Err(ManifestError::new(
            "spec.repository.url",
            format!("has the path {path:?}; a {} repository URL ends in {want}", provider.as_str()),
        ));
    }
    Ok((provider, api_url, path))
}

fn authority(url: &url::Url) -> String {
    match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    /// A placeholder's name, trimmed (`name`, `output.title`).
    Var(&'a str),
}

/// Splits a template into text and placeholders; an unclosed `{{` is an error.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push(Piece::Text(&rest[..open]));
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| "has a {{ without a closing }}".to_string())?;
        out.push(Piece::Var(after[..close].trim()));
        rest = &after[close + 2..];
    }
    out.push(Piece::Text(rest));
    Ok(out)
}

fn check_text(text: &str, field: &str, max: usize, output_schema: Option<&Value>) -> Result<(), ManifestError> {
    let n = text.chars().count();
    if n > max {
        return Err(ManifestError::new(field, format!("has {n} characters; at most {max}")));
    }
    for piece in pieces(text).map_err(|e| ManifestError::new(field, e))? {
        let Piece::Var(var) = piece else { continue };
        if PLACEHOLDERS.contains(&var) {
            continue;
        }
        if let Some(path) = var.strip_prefix("output.") {
            let Some(schema) = output_schema else {
                return Err(ManifestError::new(
                    field,
                    format!("uses {{{{{var}}}}} but spec.agent.outputSchema is not set"),
                ));
            };
            let top = path.split('.').next().unwrap_or_default();
            let known = schema.get("properties").and_then(Value::as_object);
            if top.is_empty() || known.is_some_and(|p| !p.contains_key(top)) {
                return Err(ManifestError::new(
                    field,
                    format!("uses {{{{{var}}}}}, and spec.agent.outputSchema has no property {top:?}"),
                ));
            }
            continue;
        }
        return Err(ManifestError::new(
            field,
            format!(
                "uses the unknown placeholder {{{{{var}}}}}; use {}, or output.FIELD",
                PLACEHOLDERS.iter().map(|p| format!("{{{{{p}}}}}")).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    Ok(())
}

/// What the placeholders stand for in one run.
#[derive(Debug, Clone, Default)]
pub struct TemplateValues<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub prompt: &'a str,
    pub result: &'a str,
    pub summary: &'a str,
    pub branch: &'a str,
    pub output: Option<&'a Value>,
}

/// Fills a template checked by `resolve_pull_request` (an output field the run did not give is
/// empty: the schema allowed it to be absent).
pub fn render(text: &str, v: &TemplateValues<'_>) -> String {
    let Ok(pieces) = pieces(text) else { return text.to_string() };
    let mut out = String::with_capacity(text.len());
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Var("name") => out.push_str(v.name),
            Piece::Var("namespace") => out.push_str(v.namespace),
            Piece::Var("prompt") => out.push_str(v.prompt),
            Piece::Var("result") => out.push_str(v.result),
            Piece::Var("summary") => out.push_str(v.summary),
            Piece::Var("branch") => out.push_str(v.branch),
            Piece::Var(var) => {
                let found = var
                    .strip_prefix("output.")
                    .and_then(|path| path.split('.').try_fold(v.output?, |at, key| at.get(key)));
                match found {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Null) | None => {}
                    Some(other) => out.push_str(&other.to_string()),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn repo(url: &str) -> Repository {
        Repository { url: url.into(), ..Default::default() }
    }

    #[test]
    fn the_provider_and_api_come_from_the_host_or_the_spec() {
        let gh = forge_of(&repo("https://github.com/acme/app.git")).unwrap();
        assert_eq!(gh, (Provider::Github, "https://api.github.com".into(), "acme/app".into()));
        let gl = forge_of(&repo("https://gitlab.com/group/sub/app")).unwrap();
        assert_eq!(gl, (Provider::Gitlab, "https://gitlab.com/api/v4".into(), "group/sub/app".into()));
        let mut ghe = repo("https://git.corp.example/acme/app.git");
        let e = forge_of(&ghe).unwrap_err();
        assert_eq!(e.field, "spec.repository.provider");
        ghe.provider = Some(Provider::Github);
        assert_eq!(forge_of(&ghe).unwrap().1, "https://git.corp.example/api/v3");
        ghe.provider = Some(Provider::Gitlab);
        assert_eq!(forge_of(&ghe).unwrap().1, "https://git.corp.example/api/v4");
        ghe.api_url = Some("http://api.corp.example/".into());
        assert_eq!(forge_of(&ghe).unwrap_err().field, "spec.repository.apiUrl", "a token over plain http");
        ghe.api_url = Some("http://127.0.0.1:9000/api/v3/".into());
        assert_eq!(forge_of(&ghe).unwrap().1, "http://127.0.0.1:9000/api/v3");
        let e = forge_of(&repo("https://github.com/acme/app/extra")).unwrap_err();
        assert!(e.message.contains("OWNER/REPO"), "{e}");
    }

    #[test]
    fn unknown_placeholders_are_errors_naming_the_field() {
        let pr = |title: &str, body: &str| PullRequestSpec {
            title: Some(title.into()),
            body: Some(body.into()),
            ..Default::default()
        };
        let r = repo("https://github.com/acme/app");
        let ok = resolve_pull_request(Some(&pr("fix {{ name }}", "{{result}}\n{{summary}}")), None, &r, None);
        assert!(ok.unwrap().is_some());
        let e = resolve_pull_request(Some(&pr("fix {{nmae}}", "")), None, &r, None).unwrap_err();
        assert_eq!(e.field, "spec.git.pullRequest.title");
        assert!(e.message.contains("{{nmae}}") && e.message.contains("{{name}}"), "{e}");
        let e = resolve_pull_request(Some(&pr("t", "{{result")), None, &r, None).unwrap_err();
        assert_eq!(e.field, "spec.git.pullRequest.body");
        let e = resolve_pull_request(Some(&pr("{{output.title}}", "")), None, &r, None).unwrap_err();
        assert!(e.message.contains("outputSchema is not set"), "{e}");
        let schema = json!({"type": "object", "properties": {"title": {"type": "string"}}});
        assert!(resolve_pull_request(Some(&pr("{{output.title}}", "")), None, &r, Some(&schema)).is_ok());
        let e = resolve_pull_request(Some(&pr("{{output.titel}}", "")), None, &r, Some(&schema)).unwrap_err();
        assert!(e.message.contains("no property \"titel\""), "{e}");
    }

    #[test]
    fn the_execution_wins_field_by_field() {
        let r = repo("https://github.com/acme/app");
        let template = PullRequestSpec {
            title: Some("T".into()),
            labels: Some(vec!["agent".into()]),
            draft: Some(true),
            ..Default::default()
        };
        let own = PullRequestSpec { title: Some("own".into()), ..Default::default() };
        let p = resolve_pull_request(Some(&own), Some(&template), &r, None).unwrap().unwrap();
        assert_eq!((p.title.as_str(), p.labels, p.draft), ("own", vec!["agent".to_string()], true));
        let off = PullRequestSpec { enabled: Some(false), ..Default::default() };
        assert_eq!(resolve_pull_request(Some(&off), Some(&template), &r, None).unwrap(), None);
        assert_eq!(resolve_pull_request(None, None, &r, None).unwrap(), None);
        let teams = PullRequestSpec { team_reviewers: Some(vec!["core".into()]), ..Default::default() };
        let e = resolve_pull_request(Some(&teams), None, &repo("https://gitlab.com/g/p"), None).unwrap_err();
        assert_eq!(e.field, "spec.git.pullRequest.teamReviewers");
    }

    #[test]
    fn rendering_fills_every_placeholder() {
        let out = json!({"title": "Fix it", "n": 3, "deep": {"x": "y"}});
        let v = TemplateValues {
            name: "n1",
            namespace: "ns",
            prompt: "p",
            result: "r",
            summary: "s",
            branch: "b",
            output: Some(&out),
        };
        let text = "{{name}}/{{namespace}} {{prompt}} {{result}} {{summary}} {{branch}} {{output.title}} {{output.n}} {{output.deep.x}} {{output.none}}!";
        assert_eq!(render(text, &v), "n1/ns p r s b Fix it 3 y !");
    }
}
