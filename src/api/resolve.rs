//! Turning an execution (and its template) into concrete settings, checking every value.
//! Pure: no I/O, so every rule is tested directly.

use std::time::Duration;

use super::{AgentExecution, AgentTemplate, GitAuthor, Hook, ManifestError, RetainPolicy, SecretKeyRef};

/// Wall-clock limit when neither the execution nor the template sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// No-output limit when none is set.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything the runner needs, with defaults applied and values checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub name: String,
    pub namespace: String,
    pub prompt: String,
    pub repo_url: String,
    pub git_ref: Option<String>,
    /// 0 means full history.
    pub depth: u32,
    pub credentials: Option<SecretKeyRef>,
    pub branch: String,
    pub base_branch: Option<String>,
    pub commit_message: String,
    pub author: GitAuthor,
    pub push: bool,
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub append_system_prompt: Option<String>,
    pub api_key: Option<SecretKeyRef>,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub pre_hooks: Vec<ResolvedHook>,
    pub post_hooks: Vec<ResolvedHook>,
    pub error_hooks: Vec<ResolvedHook>,
    pub retain: RetainPolicy,
    pub worker: Option<String>,
    pub work_item: Option<String>,
}

/// A hook with its name and limit decided.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedHook {
    pub name: String,
    pub action: HookAction,
    pub timeout: Duration,
}

/// What a hook does.
#[derive(Debug, Clone, PartialEq)]
pub enum HookAction {
    Command(Vec<String>),
    Webhook(String),
}

/// Applies the template (if referenced) and defaults, and checks every value.
pub fn resolve(ax: &AgentExecution, templates: &[AgentTemplate]) -> Result<Resolved, ManifestError> {
    let spec = &ax.spec;
    let name = ax.metadata.name.clone().unwrap_or_default();
    let namespace = ax.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let template = match &spec.template_ref {
        None => None,
        Some(r) => Some(
            templates
                .iter()
                .find(|t| t.metadata.name.as_deref() == Some(r.name.as_str()))
                .map(|t| &t.spec)
                .ok_or_else(|| {
                    ManifestError::new(
                        "spec.templateRef.name",
                        format!("no AgentTemplate named {:?}; add it to the file (as another YAML document)", r.name),
                    )
                })?,
        ),
    };
    let t_agent = template.map(|t| &t.agent);
    let pick = |own: &Option<String>, f: fn(&super::AgentSpec) -> &Option<String>| {
        own.clone().or_else(|| t_agent.and_then(|a| f(a).clone()))
    };

    let prompt = spec
        .prompt
        .clone()
        .or_else(|| template.and_then(|t| t.prompt.clone()))
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| ManifestError::new("spec.prompt", "is required (or set it in the template)"))?;

    let repo = &spec.repository;
    let url = repo.url.trim().to_string();
    let scheme_ok = ["https://", "http://", "file://"].iter().any(|s| url.starts_with(s));
    if !scheme_ok {
        return Err(ManifestError::new(
            "spec.repository.url",
            format!("{url:?} is not an http(s) URL; use e.g. https://github.com/org/repo.git"),
        ));
    }
    if let Some(rest) = url.split("://").nth(1)
        && rest.split('/').next().is_some_and(|host| host.contains('@'))
    {
        return Err(ManifestError::new(
            "spec.repository.url",
            "contains credentials; remove them and use spec.repository.credentialsSecretRef",
        ));
    }
    let depth = match repo.depth {
        None => 1,
        Some(d) if d >= 0 => d as u32,
        Some(d) => {
            return Err(ManifestError::new("spec.repository.depth", format!("is {d}; use 0 (full history) or more")));
        }
    };
    if let Some(r) = &repo.credentials_secret_ref {
        check_secret_ref(r, "spec.repository.credentialsSecretRef")?;
    }

    let branch = spec.git.branch.clone().unwrap_or_else(|| format!("agentops/{name}"));
    if git2::Branch::name_is_valid(&branch).ok() != Some(true) {
        return Err(ManifestError::new("spec.git.branch", format!("{branch:?} is not a valid branch name")));
    }
    let first_line = prompt.lines().next().unwrap_or_default();
    let first_line: String = first_line.chars().take(72).collect();
    let commit_message =
        spec.git.commit_message.clone().unwrap_or_else(|| format!("agentops: {name}\n\n{first_line}\n"));
    let author = spec
        .git
        .author
        .clone()
        .or_else(|| template.and_then(|t| t.author.clone()))
        .unwrap_or_else(|| GitAuthor { name: "agentops".into(), email: "agentops@localhost".into() });
    if author.name.trim().is_empty() || !author.email.contains('@') {
        return Err(ManifestError::new("spec.git.author", "needs a name and an email address"));
    }

    let max_turns = match spec.agent.max_turns.or_else(|| t_agent.and_then(|a| a.max_turns)) {
        None => None,
        Some(n) if n >= 1 => Some(n as u32),
        Some(n) => {
            return Err(ManifestError::new("spec.agent.maxTurns", format!("is {n}; use 1 or more")));
        }
    };
    let max_budget_usd = match spec.agent.max_budget_usd.or_else(|| t_agent.and_then(|a| a.max_budget_usd)) {
        Some(b) if !(b.is_finite() && b > 0.0) => {
            return Err(ManifestError::new("spec.agent.maxBudgetUsd", format!("is {b}; use a positive amount")));
        }
        b => b,
    };
    let api_key = spec.agent.api_key_secret_ref.clone().or_else(|| t_agent.and_then(|a| a.api_key_secret_ref.clone()));
    if let Some(r) = &api_key {
        check_secret_ref(r, "spec.agent.apiKeySecretRef")?;
    }

    let timeout = duration(spec.timeout.as_ref().or(template.and_then(|t| t.timeout.as_ref())), "spec.timeout")?
        .unwrap_or(DEFAULT_TIMEOUT);
    let idle_timeout =
        duration(pick(&spec.agent.idle_timeout, |a| &a.idle_timeout).as_ref(), "spec.agent.idleTimeout")?
            .unwrap_or(DEFAULT_IDLE_TIMEOUT);

    let hooks =
        |phase: &str, own: &[Hook], from_template: Option<&[Hook]>| -> Result<Vec<ResolvedHook>, ManifestError> {
            from_template
                .unwrap_or_default()
                .iter()
                .chain(own)
                .enumerate()
                .map(|(i, h)| resolve_hook(h, phase, i))
                .collect()
        };

    Ok(Resolved {
        prompt,
        repo_url: url,
        git_ref: repo.git_ref.clone().filter(|r| !r.is_empty()),
        depth,
        credentials: repo.credentials_secret_ref.clone(),
        base_branch: spec.git.base_branch.clone().or_else(|| repo.git_ref.clone()),
        branch,
        commit_message,
        author,
        push: spec.git.push.unwrap_or(true),
        model: pick(&spec.agent.model, |a| &a.model),
        max_turns,
        max_budget_usd,
        allowed_tools: spec
            .agent
            .allowed_tools
            .clone()
            .or_else(|| t_agent.and_then(|a| a.allowed_tools.clone()))
            .unwrap_or_default(),
        disallowed_tools: spec
            .agent
            .disallowed_tools
            .clone()
            .or_else(|| t_agent.and_then(|a| a.disallowed_tools.clone()))
            .unwrap_or_default(),
        append_system_prompt: pick(&spec.agent.append_system_prompt, |a| &a.append_system_prompt),
        api_key,
        timeout,
        idle_timeout,
        pre_hooks: hooks("pre", &spec.hooks.pre, template.map(|t| t.hooks.pre.as_slice()))?,
        post_hooks: hooks("post", &spec.hooks.post, template.map(|t| t.hooks.post.as_slice()))?,
        error_hooks: hooks("onError", &spec.hooks.on_error, template.map(|t| t.hooks.on_error.as_slice()))?,
        retain: spec.workspace.retain.unwrap_or_default(),
        worker: spec.worker.clone(),
        work_item: spec.work_item.clone(),
        name,
        namespace,
    })
}

fn check_secret_ref(r: &SecretKeyRef, field: &str) -> Result<(), ManifestError> {
    let ok = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
    if !ok(&r.name) {
        return Err(ManifestError::new(format!("{field}.name"), format!("{:?} is not a Secret name", r.name)));
    }
    if let Some(k) = &r.key
        && !ok(k)
    {
        return Err(ManifestError::new(format!("{field}.key"), format!("{k:?} is not a Secret key")));
    }
    Ok(())
}

fn duration(text: Option<&String>, field: &str) -> Result<Option<Duration>, ManifestError> {
    let Some(text) = text else { return Ok(None) };
    match humantime::parse_duration(text.trim()) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(ManifestError::new(field, "must be longer than zero")),
        Err(e) => {
            Err(ManifestError::new(field, format!("{text:?} is not a duration ({e}); write e.g. 30m, 1h30m, 90s")))
        }
    }
}

fn resolve_hook(h: &Hook, phase: &str, index: usize) -> Result<ResolvedHook, ManifestError> {
    let field = format!("spec.hooks.{phase}[{index}]");
    let action = match (&h.command, &h.url) {
        (Some(cmd), None) if !cmd.is_empty() && !cmd[0].is_empty() => HookAction::Command(cmd.clone()),
        (None, Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
            HookAction::Webhook(url.clone())
        }
        (None, Some(url)) => {
            return Err(ManifestError::new(format!("{field}.url"), format!("{url:?} is not an http(s) URL")));
        }
        (Some(_), Some(_)) => {
            return Err(ManifestError::new(field, "set either command or url, not both"));
        }
        _ => {
            return Err(ManifestError::new(field, "needs a command (list of strings) or a url"));
        }
    };
    Ok(ResolvedHook {
        name: h.name.clone().unwrap_or_else(|| format!("{phase}-{index}")),
        action,
        timeout: duration(h.timeout.as_ref(), &format!("{field}.timeout"))?.unwrap_or(DEFAULT_HOOK_TIMEOUT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_manifest;

    fn resolved(extra_spec: &str) -> Result<Resolved, ManifestError> {
        let text = format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: hello}}\nspec:\n  prompt: do it\n  repository: {{url: 'http://127.0.0.1/r.git'}}\n{extra_spec}"
        );
        let m = parse_manifest(&text)?;
        resolve(&m.execution, &m.templates)
    }

    #[test]
    fn defaults() {
        let r = resolved("").unwrap();
        assert_eq!(r.branch, "agentops/hello");
        assert_eq!(r.depth, 1);
        assert_eq!(r.timeout, DEFAULT_TIMEOUT);
        assert!(r.push);
        assert_eq!(r.namespace, "default");
        assert!(r.commit_message.starts_with("agentops: hello"));
    }

    #[test]
    fn bad_values_name_their_field() {
        for (spec, field) in [
            ("  timeout: soon\n", "spec.timeout"),
            ("  agent: {maxTurns: 0}\n", "spec.agent.maxTurns"),
            ("  agent: {maxBudgetUsd: -1}\n", "spec.agent.maxBudgetUsd"),
            ("  git: {branch: 'a..b'}\n", "spec.git.branch"),
            ("  hooks: {pre: [{}]}\n", "spec.hooks.pre[0]"),
            ("  hooks: {post: [{url: 'ftp://x'}]}\n", "spec.hooks.post[0].url"),
            ("  templateRef: {name: missing}\n", "spec.templateRef.name"),
        ] {
            let err = resolved(spec).unwrap_err();
            assert_eq!(err.field, field, "{spec}: {err}");
        }
    }

    #[test]
    fn token_in_url_is_refused() {
        let text = "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {name: a}\nspec: {prompt: p, repository: {url: 'https://user:tok@github.com/o/r.git'}}\n";
        let m = parse_manifest(text).unwrap();
        let err = resolve(&m.execution, &[]).unwrap_err();
        assert_eq!(err.field, "spec.repository.url");
    }

    #[test]
    fn template_fills_what_the_execution_leaves_out() {
        let text = "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {name: t}\nspec: {prompt: from template, timeout: 5m, agent: {model: m1, maxTurns: 3}, hooks: {pre: [{command: [\"true\"]}]}}\n---\napiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {name: a}\nspec: {templateRef: {name: t}, agent: {maxTurns: 7}, repository: {url: 'http://h/r.git'}}\n";
        let m = parse_manifest(text).unwrap();
        let r = resolve(&m.execution, &m.templates).unwrap();
        assert_eq!(r.prompt, "from template");
        assert_eq!(r.model.as_deref(), Some("m1"));
        assert_eq!(r.max_turns, Some(7));
        assert_eq!(r.timeout, Duration::from_secs(300));
        assert_eq!(r.pre_hooks.len(), 1);
    }
}
