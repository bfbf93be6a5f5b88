//! Turning an execution (and its template) into concrete settings, checking every value.
//! Pure: no I/O, so every rule is tested directly.

use std::time::Duration;

use super::limits::{self, max_duration};
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
    /// Pod settings: the template's with the execution's on top, checked (the controller puts
    /// them over its own default).
    pub pod: super::PodSettings,
    /// Where runner pods may connect besides DNS and the controller (template's, then the
    /// execution's; cluster only).
    pub egress: Vec<super::execution::EgressRule>,
    /// Hosts the agent may reach by name through the egress proxy (template's, then the
    /// execution's).
    pub egress_hosts: Vec<crate::gateway::egress::HostRule>,
    /// The pull request to open after the push (None: none asked for, or disabled).
    pub pull_request: Option<super::ResolvedPullRequest>,
    /// The JSON Schema the agent's final answer follows (`--json-schema`), checked.
    pub output_schema: Option<serde_json::Value>,
    /// Instructions, permission rules, setting sources, MCP servers, skills, subagents.
    pub agent_config: super::AgentConfig,
    /// `spec.repository.insecure` (plain HTTP to another machine allowed).
    pub repo_insecure: bool,
    /// What the cluster's policies decided (set by whoever applied them; None: no policy).
    pub policy: Option<super::PolicyRecord>,
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
    if prompt.chars().count() > limits::MAX_PROMPT_CHARS {
        let field = if spec.prompt.is_some() { "spec.prompt" } else { "spec.templateRef (the template's spec.prompt)" };
        return Err(too_big(
            field,
            prompt.chars().count(),
            limits::MAX_PROMPT_CHARS,
            "put long instructions in a file in the repository and point the prompt at it",
        ));
    }

    let repo = &spec.repository;
    let url = repo.url.trim().to_string();
    check_repository_url(&url, repo.credentials_secret_ref.is_some(), repo.insecure.unwrap_or(false))?;
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
    if let Some(r) = repo.git_ref.as_deref().filter(|r| !r.is_empty()) {
        // A branch or tag name, `refs/...`, or a full commit id (which is a valid name too).
        let full = if r.starts_with("refs/") { r.to_string() } else { format!("refs/heads/{r}") };
        if r.len() > 255 || !git2::Reference::is_valid_name(&full) {
            return Err(ManifestError::new(
                "spec.repository.ref",
                format!("{r:?} is not a branch, tag, full commit id or refs/... name"),
            ));
        }
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
        Some(n) if (1..=limits::MAX_TURNS).contains(&n) => Some(n as u32),
        Some(n) => {
            return Err(ManifestError::new("spec.agent.maxTurns", format!("is {n}; use 1 to {}", limits::MAX_TURNS)));
        }
    };
    let max_budget_usd = match spec.agent.max_budget_usd.or_else(|| t_agent.and_then(|a| a.max_budget_usd)) {
        Some(b) if !(b.is_finite() && b > 0.0 && b <= limits::MAX_BUDGET_USD) => {
            return Err(ManifestError::new(
                "spec.agent.maxBudgetUsd",
                format!("is {b}; use a positive amount up to {}", limits::MAX_BUDGET_USD),
            ));
        }
        b => b,
    };
    let api_key = spec.agent.api_key_secret_ref.clone().or_else(|| t_agent.and_then(|a| a.api_key_secret_ref.clone()));
    if let Some(r) = &api_key {
        check_secret_ref(r, "spec.agent.apiKeySecretRef")?;
    }

    let timeout = duration(
        spec.timeout.as_ref().or(template.and_then(|t| t.timeout.as_ref())),
        "spec.timeout",
        limits::MAX_TIMEOUT,
    )?
    .unwrap_or(DEFAULT_TIMEOUT);
    let idle_timeout = duration(
        pick(&spec.agent.idle_timeout, |a| &a.idle_timeout).as_ref(),
        "spec.agent.idleTimeout",
        limits::MAX_IDLE_TIMEOUT,
    )?
    .unwrap_or(DEFAULT_IDLE_TIMEOUT);
    if let Some(ttl) = spec.ttl_seconds_after_finished
        && !(0..=limits::MAX_TTL_SECONDS).contains(&ttl)
    {
        return Err(ManifestError::new(
            "spec.ttlSecondsAfterFinished",
            format!("is {ttl}; use 0 to {} (90 days)", limits::MAX_TTL_SECONDS),
        ));
    }
    let append_system_prompt = pick(&spec.agent.append_system_prompt, |a| &a.append_system_prompt);
    if let Some(p) = &append_system_prompt
        && p.chars().count() > limits::MAX_SYSTEM_PROMPT_CHARS
    {
        return Err(too_big(
            "spec.agent.appendSystemPrompt",
            p.chars().count(),
            limits::MAX_SYSTEM_PROMPT_CHARS,
            "shorten it",
        ));
    }
    let allowed_tools =
        spec.agent.allowed_tools.clone().or_else(|| t_agent.and_then(|a| a.allowed_tools.clone())).unwrap_or_default();
    let disallowed_tools = spec
        .agent
        .disallowed_tools
        .clone()
        .or_else(|| t_agent.and_then(|a| a.disallowed_tools.clone()))
        .unwrap_or_default();
    for (field, list) in
        [("spec.agent.allowedTools", &allowed_tools), ("spec.agent.disallowedTools", &disallowed_tools)]
    {
        if list.len() > limits::MAX_TOOL_RULES || list.iter().any(|t| t.chars().count() > limits::MAX_TOOL_RULE_CHARS) {
            return Err(ManifestError::new(
                field,
                format!(
                    "has {} entries; use at most {}, each at most {} characters",
                    list.len(),
                    limits::MAX_TOOL_RULES,
                    limits::MAX_TOOL_RULE_CHARS
                ),
            ));
        }
    }

    let hooks =
        |phase: &str, own: &[Hook], from_template: Option<&[Hook]>| -> Result<Vec<ResolvedHook>, ManifestError> {
            let all: Vec<&Hook> = from_template.unwrap_or_default().iter().chain(own).collect();
            if all.len() > limits::MAX_HOOKS_PER_PHASE {
                return Err(ManifestError::new(
                    format!("spec.hooks.{phase}"),
                    format!(
                        "has {} hooks (template and execution together); use at most {}",
                        all.len(),
                        limits::MAX_HOOKS_PER_PHASE
                    ),
                ));
            }
            all.into_iter().enumerate().map(|(i, h)| resolve_hook(h, phase, i)).collect()
        };

    let output_schema = spec.agent.output_schema.clone().or_else(|| t_agent.and_then(|a| a.output_schema.clone()));
    if let Some(schema) = &output_schema {
        check_output_schema(schema)?;
    }
    let pull_request = super::pull_request::resolve_pull_request(
        spec.git.pull_request.as_ref(),
        template.and_then(|t| t.git.pull_request.as_ref()),
        repo,
        output_schema.as_ref(),
    )?;
    if pull_request.is_some() && spec.git.push == Some(false) {
        return Err(ManifestError::new(
            "spec.git.pullRequest",
            "needs the branch pushed; remove spec.git.push: false or disable the pull request",
        ));
    }

    let mut agent_config = super::agent_config::resolve_agent_config(
        t_agent.map(super::agent_config::Parts::of),
        super::agent_config::Parts::of(&spec.agent),
    )?;
    agent_config.allowed_tools = allowed_tools.clone();
    agent_config.disallowed_tools = disallowed_tools.clone();

    Ok(Resolved {
        agent_config,
        pull_request,
        output_schema,
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
        allowed_tools,
        disallowed_tools,
        append_system_prompt,
        api_key,
        timeout,
        idle_timeout,
        pre_hooks: hooks("pre", &spec.hooks.pre, template.map(|t| t.hooks.pre.as_slice()))?,
        post_hooks: hooks("post", &spec.hooks.post, template.map(|t| t.hooks.post.as_slice()))?,
        error_hooks: hooks("onError", &spec.hooks.on_error, template.map(|t| t.hooks.on_error.as_slice()))?,
        retain: spec.workspace.retain.unwrap_or_default(),
        worker: spec.worker.clone(),
        work_item: spec.work_item.clone(),
        pod: pod_settings(template, spec.pod.as_ref())?,
        egress: egress(template.map(|t| t.egress.as_slice()).unwrap_or_default(), &spec.egress)?,
        egress_hosts: egress_hosts(
            template.map(|t| t.egress_hosts.as_slice()).unwrap_or_default(),
            &spec.egress_hosts,
        )?,
        repo_insecure: repo.insecure.unwrap_or(false),
        policy: None,
        name,
        namespace,
    })
}

/// The template's pod settings (with its deprecated `spec.image` as `agentImage`) and the
/// execution's on top, each checked under its own field path.
fn pod_settings(
    template: Option<&super::AgentTemplateSpec>,
    own: Option<&super::PodSettings>,
) -> Result<super::PodSettings, ManifestError> {
    const TEMPLATE: &str = "the AgentTemplate's spec";
    let mut below = template.and_then(|t| t.pod.clone()).unwrap_or_default();
    if let Some(image) = template.and_then(|t| t.image.clone()) {
        if below.agent_image.is_some() {
            return Err(ManifestError::new(
                format!("{TEMPLATE}.image"),
                "is the deprecated name of spec.pod.agentImage, which is set too: keep only spec.pod.agentImage",
            ));
        }
        below.agent_image = Some(image);
    }
    below.check(&format!("{TEMPLATE}.pod"))?;
    let own = own.cloned().unwrap_or_default();
    own.check("spec.pod")?;
    let merged = below.merged(&own);
    merged.check_requests_within_limits("spec.pod")?;
    Ok(merged)
}

/// `spec.agent.outputSchema`: an object, at most 16 KiB, that compiles as a JSON Schema (no
/// remote `$ref`: nothing is fetched).
fn check_output_schema(schema: &serde_json::Value) -> Result<(), ManifestError> {
    let field = "spec.agent.outputSchema";
    if !schema.is_object() {
        return Err(ManifestError::new(field, "must be a JSON Schema object, e.g. {type: object, properties: {...}}"));
    }
    let size = schema.to_string().len();
    if size > limits::MAX_OUTPUT_SCHEMA_BYTES {
        return Err(ManifestError::new(
            field,
            format!("is {size} bytes as JSON; at most {}", limits::MAX_OUTPUT_SCHEMA_BYTES),
        ));
    }
    jsonschema::validator_for(schema)
        .map(|_| ())
        .map_err(|e| ManifestError::new(field, format!("is not a valid JSON Schema: {e}")))
}

/// The template's `egressHosts` and the execution's, parsed (duplicates dropped).
fn egress_hosts(template: &[String], own: &[String]) -> Result<Vec<crate::gateway::egress::HostRule>, ManifestError> {
    if template.len() + own.len() > limits::MAX_EGRESS_HOSTS {
        return Err(ManifestError::new(
            "spec.egressHosts",
            format!(
                "has {} entries with the template's; at most {} (use a wildcard such as *.example.com)",
                template.len() + own.len(),
                limits::MAX_EGRESS_HOSTS
            ),
        ));
    }
    let fields = template
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("the AgentTemplate's spec.egressHosts[{i}]"), h))
        .chain(own.iter().enumerate().map(|(i, h)| (format!("spec.egressHosts[{i}]"), h)));
    let mut all: Vec<crate::gateway::egress::HostRule> = Vec::new();
    for (field, text) in fields {
        let rule = crate::gateway::egress::HostRule::parse(text).map_err(|e| ManifestError::new(field, e))?;
        if !all.contains(&rule) {
            all.push(rule);
        }
    }
    Ok(all)
}

/// The template's egress rules and the execution's, checked: each CIDR a real IP block.
fn egress(
    template: &[super::execution::EgressRule],
    own: &[super::execution::EgressRule],
) -> Result<Vec<super::execution::EgressRule>, ManifestError> {
    if template.len() + own.len() > limits::MAX_EGRESS_RULES {
        return Err(ManifestError::new(
            "spec.egress",
            format!(
                "has {} entries with the template's; at most {} (use wider CIDRs)",
                template.len() + own.len(),
                limits::MAX_EGRESS_RULES
            ),
        ));
    }
    let mut all: Vec<super::execution::EgressRule> = Vec::new();
    let fields = template
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("the AgentTemplate's spec.egress[{i}]"), r))
        .chain(own.iter().enumerate().map(|(i, r)| (format!("spec.egress[{i}]"), r)));
    for (field, rule) in fields {
        let valid = rule.cidr.split_once('/').is_some_and(|(ip, bits)| {
            let max = match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => 32,
                Ok(std::net::IpAddr::V6(_)) => 128,
                Err(_) => return false,
            };
            bits.parse::<u8>().is_ok_and(|b| b <= max)
        });
        if !valid {
            return Err(ManifestError::new(
                format!("{field}.cidr"),
                format!("{:?} is not an IP block; write e.g. 151.101.0.0/16 or 2a04:4e42::/32", rule.cidr),
            ));
        }
        if rule.ports.is_empty() || rule.ports.len() > limits::MAX_EGRESS_PORTS || rule.ports.contains(&0) {
            return Err(ManifestError::new(
                format!("{field}.ports"),
                format!("give 1 to {} TCP ports from 1 to 65535, e.g. [443]", limits::MAX_EGRESS_PORTS),
            ));
        }
    }
    for rule in template.iter().chain(own) {
        if !all.contains(rule) {
            all.push(rule.clone());
        }
    }
    Ok(all)
}

pub(crate) fn check_secret_ref(r: &SecretKeyRef, field: &str) -> Result<(), ManifestError> {
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

fn too_big(field: &str, len: usize, max: usize, what_to_do: &str) -> ManifestError {
    ManifestError::new(field, format!("is {len} characters long; the limit is {max}: {what_to_do}"))
}

/// Whether `text` is a duration the apiserver's CEL `duration()` reads the same way we do:
/// one or more `<integer><unit>` with unit ns, us, ms, s, m or h (e.g. `1h30m`).
pub fn is_plain_duration(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ns", "us", "ms", "s", "m", "h"]
            .into_iter()
            .find(|u| rest.starts_with(u) && !(*u == "m" && rest.starts_with("ms")));
        let Some(unit) = unit else { return false };
        rest = &rest[unit.len()..];
    }
    true
}

fn duration(text: Option<&String>, field: &str, max: &str) -> Result<Option<Duration>, ManifestError> {
    let Some(text) = text else { return Ok(None) };
    let text = text.trim();
    if !is_plain_duration(text) {
        let shown: String = text.chars().take(40).collect();
        return Err(ManifestError::new(
            field,
            format!("{shown:?} is not a duration; write whole numbers with units h, m, s or ms, e.g. 30m, 1h30m, 90s"),
        ));
    }
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err(ManifestError::new(field, "must be longer than zero")),
        Ok(d) if d > max_duration(max) => Err(ManifestError::new(field, format!("is {text}; the limit is {max}"))),
        Ok(d) => Ok(Some(d)),
        Err(e) => {
            Err(ManifestError::new(field, format!("{text:?} is not a duration ({e}); write e.g. 30m, 1h30m, 90s")))
        }
    }
}

/// The repository URL: a scheme we speak, no credentials anywhere in it (they would be
/// printed, stored and sent as-is), and no credentials over plain HTTP to another machine.
fn check_repository_url(url: &str, has_credentials: bool, insecure: bool) -> Result<(), ManifestError> {
    const FIELD: &str = "spec.repository.url";
    if url.chars().count() > limits::MAX_URL_CHARS {
        return Err(too_big(FIELD, url.chars().count(), limits::MAX_URL_CHARS, "use the repository's clone URL"));
    }
    let bad_scheme = || {
        let shown: String = url.chars().take(80).collect();
        ManifestError::new(FIELD, format!("{shown:?} is not an http(s) URL; use e.g. https://github.com/org/repo.git"))
    };
    if !["https://", "http://", "file://"].iter().any(|s| url.starts_with(s)) {
        return Err(bad_scheme());
    }
    let parsed = url::Url::parse(url).map_err(|e| ManifestError::new(FIELD, format!("is not a valid URL: {e}")))?;
    // `url` percent-decodes nothing here: any userinfo at all is refused, whatever its form.
    let authority = url.split("://").nth(1).and_then(|r| r.split(['/', '?', '#']).next()).unwrap_or_default();
    if !parsed.username().is_empty() || parsed.password().is_some() || authority.contains('@') {
        return Err(ManifestError::new(
            FIELD,
            "contains credentials (user:token@); remove them and use spec.repository.credentialsSecretRef",
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ManifestError::new(
            FIELD,
            "has a query string or fragment (?... or #...); use the plain clone URL, and put a token in spec.repository.credentialsSecretRef",
        ));
    }
    if parsed.scheme() == "http" && has_credentials && !insecure {
        let loopback = match parsed.host() {
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        };
        if !loopback {
            return Err(ManifestError::new(
                FIELD,
                "is plain http:// to another machine, and the credentials in spec.repository.credentialsSecretRef would cross the network unencrypted; use https://, or set spec.repository.insecure: true to accept that",
            ));
        }
    }
    Ok(())
}

fn resolve_hook(h: &Hook, phase: &str, index: usize) -> Result<ResolvedHook, ManifestError> {
    let field = format!("spec.hooks.{phase}[{index}]");
    let action = match (&h.command, &h.url) {
        (Some(cmd), None)
            if cmd.len() > limits::MAX_HOOK_ARGS
                || cmd.iter().any(|a| a.chars().count() > limits::MAX_HOOK_ARG_CHARS) =>
        {
            return Err(ManifestError::new(
                format!("{field}.command"),
                format!(
                    "has {} arguments; use at most {}, each at most {} characters (put a long script in a file)",
                    cmd.len(),
                    limits::MAX_HOOK_ARGS,
                    limits::MAX_HOOK_ARG_CHARS
                ),
            ));
        }
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
        timeout: duration(h.timeout.as_ref(), &format!("{field}.timeout"), limits::MAX_HOOK_TIMEOUT)?
            .unwrap_or(DEFAULT_HOOK_TIMEOUT),
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
    fn refs_are_names_tags_commits_or_full_refs() {
        let with_ref = |r: &str| {
            let text = format!(
                "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: a}}\nspec:\n  prompt: p\n  repository: {{url: 'http://127.0.0.1/r.git', ref: '{r}'}}\n"
            );
            resolve(&parse_manifest(&text).unwrap().execution, &[])
        };
        for good in ["main", "release/1.x", "v1.2.3", "refs/pull/7/head", &"ab12".repeat(10)] {
            assert_eq!(with_ref(good).unwrap().git_ref.as_deref(), Some(good));
        }
        for bad in ["main:refs/heads/x", "a b", "a..b", "refs/heads/", "-x^{}"] {
            assert_eq!(with_ref(bad).unwrap_err().field, "spec.repository.ref", "{bad}");
        }
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
