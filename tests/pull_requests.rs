//! Pull requests opened by the operator and structured output, through the real Claude Code CLI
//! against the scripted model, the authenticated test git server and fakes of the GitHub and
//! GitLab APIs (`agentops run`'s path; the cluster path is in `controller.rs`).

mod support;

use agentops::api::{Phase, Summary};
use serde_json::json;
use support::fake_forge::{FakeForge, Flavor, gitlab_user_id};
use support::*;

const PROJECT: &str = "acme/demo";

struct Setup {
    h: Harness,
    forge: FakeForge,
}

impl Setup {
    async fn new(flavor: Flavor, script: Vec<Step>) -> Self {
        let h = Harness::new(script).await;
        h.git.create_repo(
            PROJECT,
            &[("README.md", "# Demo\n\nHello from the demo repository.\n"), ("src/lib.txt", "one\ntwo\nthree\n")],
        );
        let forge = FakeForge::start(flavor, h.git.root.clone(), TOKEN).await;
        Self { h, forge }
    }

    /// With a fake that serves at most `page_size` items per page.
    async fn paged(flavor: Flavor, script: Vec<Step>, page_size: usize) -> Self {
        let mut s = Self::new(flavor, script).await;
        s.forge = FakeForge::start_with_page_size(flavor, s.h.git.root.clone(), TOKEN, page_size).await;
        s
    }

    /// A manifest for `acme/demo` on the fake's provider; `repo` goes under `repository:`
    /// (4-space indent), `extra` under `spec:`.
    fn manifest(&self, name: &str, repo: &str, extra: &str) -> String {
        let provider = if self.forge.api_url.ends_with("/v3") { "github" } else { "gitlab" };
        format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata:\n  name: {name}\n  namespace: team-a\nspec:\n  prompt: Update the demo repository\n  repository:\n    url: {}\n    credentialsSecretRef: {{name: git-cred}}\n    provider: {provider}\n    apiUrl: {}\n{repo}  agent:\n    apiKeySecretRef: {{name: anthropic}}\n{extra}",
            self.h.git.url(PROJECT),
            self.forge.api_url
        )
    }
}

/// No request to the model, and nothing the agent could read, carries the git token.
fn token_never_reached_the_agent(h: &Harness) {
    for r in h.model.seen() {
        assert!(!r.body.to_string().contains(TOKEN), "the model saw the git token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_opens_a_pull_request_whose_body_has_the_gateways_numbers() {
    // The agent looks for the token first: its environment, its HOME, its parent's environment.
    let mut script = vec![Step::tool(
        "Bash",
        json!({"command": "env; ls -la ~; cat ~/.gitconfig ~/.git-credentials 2>&1; tr '\\0' '\\n' < /proc/$PPID/environ; true",
               "description": "look around"}),
    )];
    script.extend(happy_script());
    let s = Setup::new(Flavor::Github, script).await;
    let yaml = s.manifest(
        "pr",
        "",
        "  git:\n    pullRequest:\n      title: \"Agent: {{name}} in {{namespace}}\"\n      body: \"Asked: {{prompt}}\\n\\nDone: {{result}}\\n\\n{{summary}}\"\n      draft: true\n      labels: [agent, automated]\n      reviewers: [alice]\n      teamReviewers: [core]\n",
    );
    let sum = s.h.run(&yaml).await;
    assert_eq!((sum.phase, sum.reason.as_deref()), (Phase::Succeeded, Some("Completed")), "{sum:#?}");
    let pr = sum.git.pull_request.clone().expect("a pull request");
    assert_eq!((pr.number, pr.provider.as_str(), pr.state.as_str()), (1, "github", "opened"));
    assert_eq!(sum.git.pull_request_url.as_deref(), Some(pr.url.as_str()), "the old field, for one version");
    assert!(pr.url.ends_with("/acme/demo/pull/1"), "{}", pr.url);

    let prs = s.forge.prs();
    assert_eq!(prs.len(), 1);
    let p = &prs[0];
    assert_eq!((p.head.as_str(), p.base.as_str()), ("agentops/pr", "main"), "into the branch cloned");
    assert_eq!(p.title, "Agent: pr in team-a");
    assert!(p.draft);
    assert_eq!(p.labels, ["agent", "automated"]);
    assert_eq!((p.reviewers.clone(), p.team_reviewers.clone()), (vec!["alice".to_string()], vec!["core".to_string()]));
    // The user's part, then ours: the gateway's figures, exactly as reported.
    assert!(p.body.starts_with("Asked: Update the demo repository\n\nDone: Added greeting.txt"), "{}", p.body);
    assert!(p.body.contains(&format!("{} tool calls", sum.tool_calls.total)), "{{{{summary}}}}: {}", p.body);
    assert!(
        p.body.contains(&format!("| Cost | ${:.4} (metered by the operator's gateway) |", sum.cost_usd)),
        "{}",
        p.body
    );
    assert!(
        p.body.contains(&format!("| Tokens | {} (input {},", sum.tokens_used, sum.usage.input_tokens)),
        "{}",
        p.body
    );
    assert!(p.body.contains("| Turns |") && p.body.contains("Write 1") && p.body.contains("| Duration |"));
    assert!(p.body.contains("4 files, +"), "{}", p.body);
    assert!(sum.cost_usd > 0.0);

    // Every API call carried the repository's token; the agent never saw it.
    let calls = s.forge.calls();
    assert!(calls.iter().all(|c| c.auth.as_deref() == Some(&format!("Bearer {TOKEN}") as &str)));
    let kinds: Vec<String> = calls.iter().map(|c| format!("{} {}", c.method, c.path)).collect();
    assert_eq!(
        kinds,
        [
            "GET /api/v3/repos/acme/demo/pulls",
            "POST /api/v3/repos/acme/demo/pulls",
            "POST /api/v3/repos/acme/demo/issues/1/labels",
            "POST /api/v3/repos/acme/demo/pulls/1/requested_reviewers"
        ]
    );
    let looked = s.h.model.seen().iter().any(|r| r.body.to_string().contains("CLAUDE_CONFIG_DIR="));
    assert!(looked, "the agent's environment dump reached the model");
    token_never_reached_the_agent(&s.h);

    // The store has it, in its own columns and in the report.
    let row = s.h.store.get_execution(&sum.id).await.unwrap();
    assert_eq!(row.pull_request_url.as_deref(), Some(pr.url.as_str()));
    assert_eq!(row.pull_request_number, Some(1));
    assert_eq!(row.summary().git.pull_request, Some(pr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_branch_updates_the_one_pull_request() {
    let s = Setup::new(Flavor::Github, happy_script()).await;
    let pr = "  git:\n    branch: agentops/shared\n    pullRequest:\n      title: \"{{name}}\"\n";
    let first = s.h.run(&s.manifest("first", "", pr)).await;
    assert_eq!(first.git.pull_request.as_ref().map(|p| p.state.as_str()), Some("opened"), "{first:#?}");
    // Continue the branch: start from it, one more commit on top.
    s.h.model.set_script(vec![
        Step::tool("Write", json!({"file_path": "second.txt", "content": "two\n"})),
        Step::text("Second pass."),
    ]);
    let second = s.h.run(&s.manifest("second", "    ref: agentops/shared\n", pr)).await;
    assert_eq!(second.phase, Phase::Succeeded, "{second:#?}");
    let p = second.git.pull_request.clone().expect("pull request");
    assert_eq!((p.number, p.state.as_str()), (1, "updated"));
    let prs = s.forge.prs();
    assert_eq!(prs.len(), 1, "never a second pull request for the branch");
    assert_eq!(prs[0].title, "second");
    assert_eq!(prs[0].base, "main", "the base stays what the first run cloned, as the second one was told");
    let creates = s.forge.calls().iter().filter(|c| c.method == "POST" && c.path.ends_with("/pulls")).count();
    assert_eq!(creates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_merge_request_with_labels_reviewers_and_draft() {
    let s = Setup::new(Flavor::Gitlab, happy_script()).await;
    let yaml = s.manifest(
        "mr",
        "",
        "  git:\n    pullRequest:\n      draft: true\n      labels: [agent]\n      reviewers: [bob]\n",
    );
    let sum = s.h.run(&yaml).await;
    assert_eq!(sum.phase, Phase::Succeeded, "{sum:#?}");
    let pr = sum.git.pull_request.clone().expect("merge request");
    assert_eq!((pr.provider.as_str(), pr.number, pr.state.as_str()), ("gitlab", 1, "opened"));
    assert!(pr.url.ends_with("/acme/demo/-/merge_requests/1"), "{}", pr.url);
    let p = &s.forge.prs()[0];
    assert_eq!(p.title, "Draft: agentops: mr", "GitLab drafts are a title prefix");
    assert_eq!(p.labels, ["agent"]);
    assert_eq!(p.reviewers, [format!("user{}", gitlab_user_id("bob").unwrap())]);
    assert!(p.body.starts_with("Added greeting.txt"), "default body: the result, then the summary: {}", p.body);
    let calls = s.forge.calls();
    assert!(calls.iter().all(|c| c.auth.as_deref() == Some(&format!("PRIVATE-TOKEN {TOKEN}") as &str)));
    assert!(calls.iter().any(|c| c.path == "/api/v4/projects/acme%2Fdemo/merge_requests" && c.method == "POST"));
    token_never_reached_the_agent(&s.h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pull_request_fails_and_keeps_the_pushed_branch() {
    let s = Setup::new(Flavor::Github, happy_script()).await;
    let sum = s.h.run(&s.manifest("bad", "", "  git:\n    pullRequest:\n      base: no-such-branch\n")).await;
    assert_eq!((sum.phase, sum.reason.as_deref()), (Phase::Failed, Some("PullRequestFailed")), "{sum:#?}");
    let msg = sum.message.clone().unwrap();
    assert!(msg.contains("HTTP 422") && msg.contains("base no-such-branch does not exist"), "{msg}");
    assert!(msg.contains("agentops/bad was pushed and is kept"), "{msg}");
    assert!(sum.git.pushed);
    assert_eq!(s.h.git.branch_head(PROJECT, "agentops/bad"), sum.git.commit, "the branch is on the remote");
    assert!(s.forge.prs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_then_created_succeeds() {
    let s = Setup::new(Flavor::Github, happy_script()).await;
    s.forge.fail_next("create", 429, Some(1), "API rate limit exceeded");
    s.forge.fail_next("list", 502, None, "Bad Gateway");
    let sum = s.h.run(&s.manifest("rl", "", "  git:\n    pullRequest: {}\n")).await;
    assert_eq!(sum.phase, Phase::Succeeded, "{sum:#?}");
    assert_eq!(s.forge.prs().len(), 1);
    let posts = s.forge.calls().iter().filter(|c| c.method == "POST").count();
    assert_eq!(posts, 2, "the 429 was retried once");
    let logs = s.h.store.logs(&sum.id).await.unwrap();
    assert!(logs.iter().any(|l| l.line.contains("rate-limited") && l.line.contains("trying again in 1 s")), "{logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_says_which_credential() {
    let s = Setup::new(Flavor::Github, happy_script()).await;
    // The git server takes the token; the API does not (a token without API access).
    let forge = FakeForge::start(Flavor::Github, s.h.git.root.clone(), "another-token").await;
    let yaml = s.manifest("auth", "", "  git:\n    pullRequest: {}\n").replace(&s.forge.api_url, &forge.api_url);
    let sum = s.h.run(&yaml).await;
    assert_eq!(sum.reason.as_deref(), Some("PullRequestFailed"));
    let msg = sum.message.unwrap();
    assert!(msg.contains("HTTP 401") && msg.contains("spec.repository.credentialsSecretRef"), "{msg}");
    assert!(!msg.contains(TOKEN));
    assert_eq!(forge.calls().len(), 1, "a 401 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_changes_makes_no_api_call() {
    let s = Setup::new(Flavor::Github, vec![Step::text("Nothing to do.")]).await;
    let sum = s.h.run(&s.manifest("none", "", "  git:\n    pullRequest: {}\n")).await;
    assert_eq!(sum.reason.as_deref(), Some("NoChanges"));
    assert!(s.forge.calls().is_empty());
    assert_eq!(sum.git.pull_request, None);
}

fn schema_yaml() -> &'static str {
    "    outputSchema:\n      type: object\n      properties:\n        title: {type: string}\n        risk: {type: string, enum: [low, high]}\n      required: [title, risk]\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_lands_in_the_summary_the_store_and_the_pull_request() {
    let script = vec![
        Step::tool("Write", json!({"file_path": "out.txt", "content": "x\n"})),
        Step::tool("StructuredOutput", json!({"title": "Add out.txt", "risk": "low"})),
        Step::text("Done."),
    ];
    let s = Setup::new(Flavor::Github, script).await;
    let yaml = s
        .manifest("so", "", "  git:\n    pullRequest:\n      title: \"{{output.title}} ({{output.risk}} risk)\"\n")
        .replace(
            "    apiKeySecretRef: {name: anthropic}\n",
            &format!("    apiKeySecretRef: {{name: anthropic}}\n{}", schema_yaml()),
        );
    let sum = s.h.run(&yaml).await;
    assert_eq!(sum.phase, Phase::Succeeded, "{sum:#?}");
    assert_eq!(sum.output, Some(json!({"title": "Add out.txt", "risk": "low"})));
    // The CLI was given the schema: it offered the model the StructuredOutput tool with it.
    let offered = s.h.model.seen().iter().any(|r| {
        r.body["tools"].as_array().into_iter().flatten().any(|t| {
            t["name"] == "StructuredOutput" && t["input_schema"]["properties"]["risk"]["enum"] == json!(["low", "high"])
        })
    });
    assert!(offered);
    assert_eq!(s.forge.prs()[0].title, "Add out.txt (low risk)");
    let row = s.h.store.get_execution(&sum.id).await.unwrap();
    assert_eq!(
        row.structured_output.as_deref().map(|o| serde_json::from_str::<serde_json::Value>(o).unwrap()),
        sum.output
    );
}

async fn output_run(output: Option<serde_json::Value>) -> Summary {
    let mut script = vec![Step::tool("Write", json!({"file_path": "out.txt", "content": "x\n"}))];
    if let Some(o) = output {
        script.push(Step::tool("StructuredOutput", o));
    }
    script.push(Step::text("Done."));
    let h = Harness::new(script).await;
    let schema = "    outputSchema:\n      type: object\n      properties:\n        title: {type: string}\n        notes: {type: string}\n      required: [title]\n";
    // `manifest` ends inside `agent:`: the schema goes there.
    let s = h.run(&h.manifest("so", schema)).await;
    assert_eq!(h.git.branch_head("demo", "agentops/so"), None, "nothing pushed without valid output");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_invalid_and_oversize_output_fail() {
    let missing = output_run(None).await;
    assert_eq!((missing.phase, missing.reason.as_deref()), (Phase::Failed, Some("InvalidOutput")), "{missing:#?}");
    let invalid = output_run(Some(json!({"title": 42}))).await;
    assert_eq!(invalid.reason.as_deref(), Some("InvalidOutput"), "{invalid:#?}");
    assert_eq!(invalid.output, None);
    let big = output_run(Some(json!({"title": "t", "notes": "n".repeat(20_000)}))).await;
    assert_eq!(big.reason.as_deref(), Some("OutputTooLarge"), "{big:#?}");
    assert!(big.message.unwrap().contains("at most 16384"));
}

/// The fake GitHub refuses what GitHub refuses before anything else (no `User-Agent`: 403 with
/// GitHub's words; an API version it does not serve: 400; an `Accept` that is not JSON: 415),
/// so every pull-request test above proves our client sends all three right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_github_refuses_what_github_refuses_and_our_client_passes() {
    let s = Setup::new(Flavor::Github, vec![]).await;
    let url = format!("{}/repos/{PROJECT}/pulls", s.forge.api_url);
    let bare = support::http_builder().build().unwrap(); // reqwest sends no User-Agent by default
    let auth = format!("Bearer {TOKEN}");
    let r = bare.get(&url).header("authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("User-Agent header"));
    let ua = support::http_builder().user_agent("t").build().unwrap();
    let r =
        ua.get(&url).header("authorization", &auth).header("x-github-api-version", "2020-01-01").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = ua.get(&url).header("authorization", &auth).header("accept", "text/html").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let r = ua
        .get(&url)
        .header("authorization", &auth)
        .header("accept", "application/vnd.github+json")
        .header("x-github-api-version", "2022-11-28")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A person opens the pull request for the work branch between the run's look for one and its
/// create: GitHub answers 422 "already exists", GitLab 409 "Another open merge request already
/// exists". The run looks again and updates that one: one pull request, no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_opened_in_between_is_updated_not_duplicated() {
    for flavor in [Flavor::Github, Flavor::Gitlab] {
        let s = Setup::new(flavor, happy_script()).await;
        s.forge.open_before_next_create(PROJECT, "agentops/race", "main", "opened by a person");
        let sum = s.h.run(&s.manifest("race", "", "  git:\n    pullRequest: {}\n")).await;
        assert_eq!(sum.phase, Phase::Succeeded, "{flavor:?}: {sum:#?}");
        let p = sum.git.pull_request.clone().expect("pull request");
        assert_eq!((p.number, p.state.as_str()), (1, "updated"), "{flavor:?}");
        let prs = s.forge.prs();
        assert_eq!(prs.len(), 1, "{flavor:?}: never a duplicate");
        assert!(prs[0].title.contains("race"), "{flavor:?}: ours now: {}", prs[0].title);
        let calls = s.forge.calls();
        let creates = calls.iter().filter(|c| c.method == "POST" && !c.path.contains("/labels")).count();
        let updates = calls.iter().filter(|c| c.method == "PATCH" || c.method == "PUT").count();
        assert_eq!((creates, updates), (1, 1), "{flavor:?}: {calls:#?}");
    }
}

/// GitLab lists the merge requests from forks into the project too, and a fork's branch may be
/// named like the work branch. Those are someone else's: a first run opens its own (forks on
/// both pages of the list), and a second run on the branch follows the list to its second page
/// to find and update its own, never a fork's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_merge_requests_are_not_ours_and_the_list_is_followed_to_its_last_page() {
    let s = Setup::paged(Flavor::Gitlab, happy_script(), 2).await;
    for fork in ["mallory/demo", "bob/demo", "carol/demo"] {
        s.forge.add_fork_pr(PROJECT, fork, "agentops/shared", "main", &format!("from {fork}"));
    }
    let pr = "  git:\n    branch: agentops/shared\n    pullRequest:\n      title: \"{{name}}\"\n";
    let first = s.h.run(&s.manifest("first", "", pr)).await;
    let p = first.git.pull_request.clone().expect("merge request");
    assert_eq!((p.number, p.state.as_str()), (4, "opened"), "{first:#?}");
    s.h.model.set_script(vec![
        Step::tool("Write", json!({"file_path": "second.txt", "content": "two\n"})),
        Step::text("Second pass."),
    ]);
    let second = s.h.run(&s.manifest("second", "    ref: agentops/shared\n", pr)).await;
    let p = second.git.pull_request.clone().expect("merge request");
    assert_eq!((p.number, p.state.as_str()), (4, "updated"), "{second:#?}");
    let prs = s.forge.prs();
    let titles: Vec<&str> = prs.iter().map(|p| p.title.as_str()).collect();
    assert_eq!(titles, ["from mallory/demo", "from bob/demo", "from carol/demo", "second"]);
    let pages: Vec<String> = s
        .forge
        .calls()
        .iter()
        .filter(|c| c.method == "GET" && c.path.ends_with("/merge_requests"))
        .map(|c| c.query.split('&').find(|q| q.starts_with("page=")).unwrap_or("page=1").to_string())
        .collect();
    assert_eq!(pages, ["page=1", "page=2", "page=1", "page=2"], "each run read both pages");
}

/// The provider's refusals reach the status in its own words, and the pushed branch is kept: a
/// token that may read but not write (403, not retried) and an API that has no such project
/// (404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_and_an_unknown_project_fail_in_the_providers_words() {
    for (flavor, words) in
        [(Flavor::Github, "Resource not accessible by personal access token"), (Flavor::Gitlab, "403 Forbidden")]
    {
        let s = Setup::new(flavor, happy_script()).await;
        let forge = FakeForge::start(flavor, s.h.git.root.clone(), "a-token-that-may-write").await;
        forge.accept_read_only(TOKEN);
        let yaml = s.manifest("ro", "", "  git:\n    pullRequest: {}\n").replace(&s.forge.api_url, &forge.api_url);
        let sum = s.h.run(&yaml).await;
        assert_eq!(sum.reason.as_deref(), Some("PullRequestFailed"), "{flavor:?}: {sum:#?}");
        let msg = sum.message.clone().unwrap();
        assert!(msg.contains("HTTP 403") && msg.contains(words) && msg.contains("the token needs"), "{msg}");
        assert!(msg.contains("agentops/ro was pushed and is kept"), "{msg}");
        assert_eq!(s.h.git.branch_head(PROJECT, "agentops/ro"), sum.git.commit);
        assert_eq!(forge.calls().iter().filter(|c| c.method == "POST").count(), 1, "a 403 is not retried");
        assert!(forge.prs().is_empty());

        // An API over other repositories: no such project.
        let empty = tempfile::tempdir().unwrap();
        let forge = FakeForge::start(flavor, empty.path().to_path_buf(), TOKEN).await;
        s.h.model.set_script(happy_script());
        let yaml = s.manifest("nf", "", "  git:\n    pullRequest: {}\n").replace(&s.forge.api_url, &forge.api_url);
        let sum = s.h.run(&yaml).await;
        assert_eq!(sum.reason.as_deref(), Some("PullRequestFailed"), "{flavor:?}: {sum:#?}");
        let msg = sum.message.unwrap();
        assert!(msg.contains("answered 404") && msg.contains("no such repository"), "{msg}");
        assert!(msg.contains("spec.repository.apiUrl"), "{msg}");
    }
}
