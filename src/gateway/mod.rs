//! The model gateway: the agent talks to the Messages API through it with a token that works
//! only for its execution and only while it runs; the gateway adds the real API key (which the
//! agent never sees), relays the response with streaming intact, and meters every response
//! (`usage` from `message_start` and `message_delta` events or a JSON body, the tools the model
//! called, the turns): the operator counts, rather than trusting what the agent reports. Each
//! request is read strictly first (`request`): what the gateway prices is what the API will
//! bill. With a budget, each request's worst case is held against it while the request is in
//! flight (its `max_tokens` lowered to what is left when needed): what is spent never exceeds
//! the budget, also under concurrent requests. A request the budget cannot pay for is refused,
//! and the run ends `BudgetExceeded`. Every answer is read and metered to its end by a task of
//! its own (`Drain`), whether or not the agent still listens.
//!
//! `agentops run` starts one on loopback per execution ([`Gateway`]); the controller serves
//! one account per running execution on its own listener ([`Gateways`], under
//! `/gateway/{namespace}/{name}/`), with the key read from the execution's Secret: a runner
//! pod never holds it.

pub mod bodies;
pub mod egress;
pub mod git;
pub mod mcp;
mod meter;
pub mod prices;
pub mod request;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::{ToolCalls, Usage};
use bodies::{BodyBudget, BodyError};
use meter::{Meter, Seen};
use prices::PriceTable;
use request::Request;

/// Largest request body relayed (a long conversation with images stays well under it).
const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// Words of the refusal once the budget is spent (the runner maps them to `BudgetExceeded`).
pub const BUDGET_SPENT: &str = "agentops: spec.agent.maxBudgetUsd is spent";

/// Words of the refusal once an execution's requests pass its turn limit's backstop (the
/// runner maps them to `MaxTurns`).
pub const TURNS_SPENT: &str = "agentops: spec.agent.maxTurns is used";

/// The gateway's backstop under `maxTurns`: the CLI ends a run at its turns; the gateway, which
/// counts every answer (subagents' and side requests too), refuses past twice that and ten more.
/// An agent calling the gateway itself gets no further than that.
pub fn turn_backstop(max_turns: u32) -> u64 {
    2 * u64::from(max_turns) + 10
}

/// Words of the refusal once a team budget (AgentBudget) is spent (the runner maps them to
/// `BudgetExhausted`).
pub const TEAM_BUDGET_SPENT: &str = "agentops: the team budget";

/// A team budget as the gateway holds it: what every execution of its namespaces spent this
/// period, and the worst case of their requests in flight, together. A request starts only if
/// the budget can pay its worst case with all the others' in flight held too, so the spend never
/// passes the limit under any concurrency.
pub struct Pool {
    pub name: String,
    books: Mutex<PoolBooks>,
}

/// A pool's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolBooks {
    pub limit_usd: f64,
    /// Spent this period (metered), US dollars.
    pub spent_usd: f64,
    /// The worst case of the requests in flight.
    pub reserved_usd: f64,
    /// Requests refused because the pool could not pay their worst case, this period.
    pub refused: u64,
    /// The period's key (`budget::Window::key`): a new period starts at zero.
    pub period: String,
    /// Set when a request was refused that the pool could not pay even with nothing else in
    /// flight; new executions then wait for the reset (cleared by a new period or a higher limit).
    pub exhausted: bool,
}

impl Pool {
    pub fn new(name: &str, limit_usd: f64, period: &str, spent_usd: f64) -> Self {
        Self {
            name: name.to_string(),
            books: Mutex::new(PoolBooks {
                limit_usd,
                spent_usd,
                period: period.to_string(),
                exhausted: spent_usd >= limit_usd,
                ..Default::default()
            }),
        }
    }

    pub fn books(&self) -> PoolBooks {
        self.books.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// A new limit, or a new period (which starts at `spent_usd`, normally zero; `exhausted` as
    /// recorded for it). Requests in flight keep their hold.
    pub fn set(&self, limit_usd: f64, period: &str, spent_usd: f64, exhausted: bool) {
        if let Ok(mut b) = self.books.lock() {
            if b.period != period {
                b.period = period.to_string();
                b.spent_usd = spent_usd;
                b.refused = 0;
                b.exhausted = false;
            }
            b.exhausted |= exhausted;
            if limit_usd > b.limit_usd {
                b.exhausted = false;
            }
            b.limit_usd = limit_usd;
            b.spent_usd = b.spent_usd.max(spent_usd);
            if b.spent_usd >= b.limit_usd {
                b.exhausted = true;
            }
        }
    }

    /// Whether new executions should wait: spent, or a request was refused for want of money.
    pub fn exhausted(&self) -> bool {
        self.books.lock().is_ok_and(|b| b.exhausted || b.spent_usd >= b.limit_usd)
    }

    fn add(&self, usd: f64) {
        if let Ok(mut b) = self.books.lock() {
            b.spent_usd += usd;
        }
    }
}

/// What the gateway counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metered {
    /// Tokens of every response relayed, of every kind.
    pub usage: Usage,
    /// Of the cache writes, those written for one hour (billed at 2× input, not 1.25×).
    pub cache_creation_1h_input_tokens: u64,
    /// Server tool uses the API reported (`usage.server_tool_use`), billed per use.
    pub web_search_requests: u64,
    pub web_fetch_requests: u64,
    /// Cost of all that at each request's model's list price.
    pub cost_usd: f64,
    /// Responses relayed (successful or not).
    pub responses: u64,
    /// Messages the model completed (each a turn of the agent).
    pub turns: u64,
    /// Tools the model called, by name.
    pub tool_calls: ToolCalls,
    /// The model of the last request relayed.
    pub model: Option<String>,
    /// What each model (at most `MAX_MODELS` names; the rest as `other`) was metered.
    pub by_model: BTreeMap<String, ModelMetered>,
    /// Requests refused because the budget was spent.
    pub refused_over_budget: u64,
    /// Requests refused because their method, path or query is not one the gateway relays.
    pub refused_not_allowed: u64,
    /// Requests refused because their body or headers could be billed otherwise than read
    /// (`request::read`: a key twice, `max_tokens` not a whole number, a beta without a price).
    pub refused_invalid: u64,
    /// The last of those refusals, as `METHOD path` (at most 200 bytes).
    pub last_refused: Option<String>,
    /// Requests relayed to each remote MCP server, by server name.
    pub mcp_requests: BTreeMap<String, u64>,
    /// The worst case of the requests in flight, held against the budget until they end.
    pub reserved_usd: f64,
    /// Requests whose `max_tokens` was lowered to what the budget left could pay for.
    pub clamped: u64,
    /// Answers cut before their end (the upstream failed or went silent): billed at their
    /// worst case, since what the upstream billed is not known.
    pub settled_at_worst_case: u64,
    /// Answers the agent hung up on before their end (each still read and metered to its end,
    /// its reservation and place held until then).
    pub agent_left: u64,
}

/// What one model was metered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelMetered {
    pub usage: Usage,
    pub cost_usd: f64,
    pub turns: u64,
    pub web_search_requests: u64,
    pub web_fetch_requests: u64,
}

/// Model names kept apart in `Metered::by_model` (the agent names the model: bounded).
pub const MAX_MODELS: usize = 16;

/// Requests one execution may have in flight at once (Claude Code sends a few: the main turn,
/// subagents, token counts). Beyond: 429, which the CLI retries later.
pub const MAX_IN_FLIGHT: usize = 16;

/// One execution's access: its token, the key added for it, what it spent.
pub struct Account {
    api_key: String,
    token: String,
    budget_usd: Option<f64>,
    metered: Mutex<Metered>,
    open: AtomicBool,
    /// Requests of this execution in flight, bounded (`MAX_IN_FLIGHT`): a runaway or hostile
    /// agent cannot hold more of the controller's memory and connections than this.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Bytes of its request bodies in memory at once (`bodies::EXECUTION_BYTES`).
    bodies: BodyBudget,
    /// Called when the figures change (the controller wakes the execution's reconcile).
    on_change: Option<Box<dyn Fn() + Send + Sync>>,
    /// What its requests are priced at.
    prices: Arc<PriceTable>,
    /// Its remote MCP servers, with their Secret-backed headers (`mcp`).
    mcp: mcp::McpRoutes,
    /// MCP requests (and event streams) of this execution in flight, bounded.
    mcp_in_flight: Arc<tokio::sync::Semaphore>,
    /// The models the cluster's policies let it name (tagged patterns, `policy::models_allow`);
    /// unset: any.
    models: std::sync::OnceLock<Vec<String>>,
    /// The team budgets it is held against with the other executions of its namespace (sorted
    /// by name: the lock order). Replaced when budgets come, go or change their namespaces.
    pools: Mutex<Vec<Arc<Pool>>>,
    /// Answers it may be given (`turn_backstop` of its `maxTurns`); unset: any.
    max_answers: std::sync::OnceLock<u64>,
}

impl Account {
    pub fn new(api_key: &str, token: &str, budget_usd: Option<f64>) -> Self {
        Self {
            api_key: api_key.to_string(),
            token: token.to_string(),
            budget_usd,
            metered: Mutex::new(Metered::default()),
            open: AtomicBool::new(true),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            bodies: BodyBudget::new(bodies::EXECUTION_BYTES),
            on_change: None,
            prices: PriceTable::list_shared(),
            mcp: mcp::McpRoutes::new(),
            mcp_in_flight: Arc::new(tokio::sync::Semaphore::new(mcp::MAX_MCP_IN_FLIGHT)),
            models: std::sync::OnceLock::new(),
            pools: Mutex::new(Vec::new()),
            max_answers: std::sync::OnceLock::new(),
        }
    }

    /// Refuses requests once its answers pass the backstop of `max_turns` (`turn_backstop`).
    pub fn with_max_turns(self, max_turns: Option<u32>) -> Self {
        if let Some(n) = max_turns {
            let _ = self.max_answers.set(turn_backstop(n));
        }
        self
    }

    /// Holds its requests against these team budgets too (with every other account of theirs).
    pub fn with_pools(self, pools: Vec<Arc<Pool>>) -> Self {
        self.set_pools(pools);
        self
    }

    /// Holds its next requests against these team budgets (those in flight keep their holds).
    pub fn set_pools(&self, mut pools: Vec<Arc<Pool>>) {
        // One lock order for every account: by name.
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        if let Ok(mut p) = self.pools.lock() {
            *p = pools;
        }
    }

    /// The names of the team budgets it is held against.
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.lock().map(|p| p.iter().map(|p| p.name.clone()).collect()).unwrap_or_default()
    }

    fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Refuses requests naming a model the policies do not allow (`PolicyRecord::models`).
    pub fn with_models(self, models: Option<Vec<String>>) -> Self {
        if let Some(m) = models {
            let _ = self.models.set(m);
        }
        self
    }

    /// Relays to these remote MCP servers too (`/mcp/{server}`), adding their headers.
    pub fn with_mcp(mut self, routes: mcp::McpRoutes) -> Self {
        self.mcp = routes;
        self
    }

    /// Prices its requests at `prices` instead of the list prices.
    pub fn with_prices(mut self, prices: Arc<PriceTable>) -> Self {
        self.prices = prices;
        self
    }

    /// Counts what was already spent (recorded before this process opened the account).
    pub fn with_spent(self, usage: Usage, cost_usd: f64) -> Self {
        if let Ok(mut m) = self.metered.lock() {
            m.usage = usage;
            m.cost_usd = cost_usd;
        }
        self
    }

    /// Counts the answers already given (recorded before this process opened the account), so
    /// that the turn backstop goes on from them.
    pub fn with_turns(self, turns: u64) -> Self {
        if let Ok(mut m) = self.metered.lock() {
            m.turns = turns;
        }
        self
    }

    /// Holds a request's worst case against the budget, lowering its `max_tokens` to what the
    /// budget left can pay for when needed. Err: the budget cannot pay for the request.
    fn reserve(self: &Arc<Self>, req: &Request, body: Bytes) -> Result<(Option<Hold>, Bytes), String> {
        if !req.free
            && let Some(max) = self.max_answers.get()
            && self.metered.lock().is_ok_and(|m| m.turns >= *max)
        {
            return Err(format!("{TURNS_SPENT} ({max} answers: twice spec.agent.maxTurns and ten more)"));
        }
        let held_pools = self.pools();
        if self.budget_usd.is_none() && held_pools.is_empty() {
            return Ok((None, body));
        }
        let worst = req.worst_case(&self.prices);
        let wanted = if req.free { 0 } else { req.max_tokens };
        let unreadable = || "the gateway's books are unreadable".to_string();
        // Locks: the account, then its pools by name (every path takes them in this order).
        let Ok(mut m) = self.metered.lock() else { return Err(unreadable()) };
        let mut pools = Vec::with_capacity(held_pools.len());
        for p in &held_pools {
            let Ok(b) = p.books.lock() else { return Err(unreadable()) };
            pools.push((p, b));
        }
        // The tightest of the execution's own budget and each team budget decides.
        enum Tightest {
            Own,
            Pool(usize),
        }
        let mut left = f64::INFINITY;
        let mut tightest = None;
        if let Some(budget) = self.budget_usd {
            left = budget - m.cost_usd - m.reserved_usd;
            tightest = Some(Tightest::Own);
        }
        for (i, (_, b)) in pools.iter().enumerate() {
            let l = b.limit_usd - b.spent_usd - b.reserved_usd;
            if l < left {
                left = l;
                tightest = Some(Tightest::Pool(i));
            }
        }
        let spent_out = self.budget_usd.is_some_and(|b| m.cost_usd >= b);
        let pool_out = pools.iter().position(|(_, b)| b.spent_usd >= b.limit_usd);
        // The least a useful request costs (a small prompt, the least output a clamp leaves): a
        // pool that cannot pay that even alone is exhausted. Never this request's own worst case,
        // which the agent chooses (one request held at a whole context window would otherwise
        // mark a team's budget spent with most of it left).
        let per_prompt_token = worst.fixed_usd / worst.prompt_tokens.max(1) as f64;
        let least = per_prompt_token * worst.prompt_tokens.min(LEAST_PROMPT_TOKENS) as f64
            + worst.per_output_usd * wanted.min(MIN_OUTPUT_TOKENS) as f64;
        let refuse = |m: &mut Metered,
                      pools: &mut Vec<(&Arc<Pool>, std::sync::MutexGuard<'_, PoolBooks>)>,
                      which: Option<Tightest>,
                      why: String| {
            m.refused_over_budget += 1;
            match which {
                Some(Tightest::Pool(i)) => {
                    let (p, b) = &mut pools[i];
                    b.refused += 1;
                    if b.limit_usd - b.spent_usd < least {
                        b.exhausted = true;
                    }
                    Err(format!(
                        "{TEAM_BUDGET_SPENT} {:?} is spent for this period ({why}; ${:.4} spent of ${})",
                        p.name, b.spent_usd, b.limit_usd
                    ))
                }
                _ => Err(format!(
                    "{BUDGET_SPENT} ({why}; ${:.4} spent of ${})",
                    m.cost_usd,
                    self.budget_usd.unwrap_or_default()
                )),
            }
        };
        if spent_out {
            return refuse(&mut m, &mut pools, Some(Tightest::Own), "nothing left".into());
        }
        if let Some(i) = pool_out {
            return refuse(&mut m, &mut pools, Some(Tightest::Pool(i)), "nothing left".into());
        }
        if req.free {
            return Ok((None, body));
        }
        let affordable = ((left - worst.fixed_usd) / worst.per_output_usd).floor().max(0.0) as u64;
        let granted = wanted.min(affordable);
        if granted < wanted.min(MIN_OUTPUT_TOKENS) || left < worst.fixed_usd {
            let held = match tightest {
                Some(Tightest::Pool(i)) => pools[i].1.reserved_usd,
                _ => m.reserved_usd,
            };
            let mut why = format!(
                "${left:.4} left, ${held:.4} held by requests in flight; this one could cost ${:.4}",
                worst.usd(wanted)
            );
            if let Some(what) = &req.unbounded_input {
                why +=
                    &format!(" ({what} is held at the model's whole context window, {} tokens)", worst.prompt_tokens);
            }
            return refuse(&mut m, &mut pools, tightest, why);
        }
        let usd = worst.usd(granted);
        m.reserved_usd += usd;
        for (_, b) in pools.iter_mut() {
            b.reserved_usd += usd;
        }
        drop(pools);
        let body = if granted < wanted {
            m.clamped += 1;
            drop(m);
            with_max_tokens(&body, granted).unwrap_or(body)
        } else {
            body
        };
        Ok((Some(Hold { account: self.clone(), pools: held_pools, usd }), body))
    }

    /// Adds what a response added (`model`: the request's).
    fn record(&self, model: &str, seen: Seen) {
        if seen.is_empty() {
            return;
        }
        if let Ok(mut m) = self.metered.lock() {
            let s = seen.usage;
            let add = |u: &mut Usage| {
                u.input_tokens += s.input_tokens;
                u.output_tokens += s.output_tokens;
                u.cache_read_input_tokens += s.cache_read_input_tokens;
                u.cache_creation_input_tokens += s.cache_creation_input_tokens;
            };
            add(&mut m.usage);
            m.cache_creation_1h_input_tokens += s.cache_creation_1h_input_tokens;
            m.web_search_requests += s.web_search_requests;
            m.web_fetch_requests += s.web_fetch_requests;
            m.cost_usd += seen.cost_usd;
            m.turns += seen.turns;
            let key = model_key(&m.by_model, model);
            let by = m.by_model.entry(key).or_default();
            add(&mut by.usage);
            by.cost_usd += seen.cost_usd;
            by.turns += seen.turns;
            by.web_search_requests += s.web_search_requests;
            by.web_fetch_requests += s.web_fetch_requests;
            for tool in seen.tools {
                m.tool_calls.total += 1;
                *m.tool_calls.by_tool.entry(tool).or_default() += 1;
            }
        }
        for p in self.pools() {
            p.add(seen.cost_usd);
        }
        if let Some(f) = &self.on_change {
            f();
        }
    }

    /// Bills `usd` for an answer that could not be metered to its end (cut, silent, compressed).
    fn note_agent_left(&self) {
        if let Ok(mut m) = self.metered.lock() {
            m.agent_left += 1;
        }
    }

    fn settle_unmetered(&self, model: &str, usd: f64) {
        if let Ok(mut m) = self.metered.lock() {
            m.cost_usd += usd;
            m.settled_at_worst_case += 1;
            let key = model_key(&m.by_model, model);
            m.by_model.entry(key).or_default().cost_usd += usd;
        }
        for p in self.pools() {
            p.add(usd);
        }
        if let Some(f) = &self.on_change {
            f();
        }
    }

    /// Waits until no request of this account is in flight (every answer read to its end and
    /// metered), at most `limit`. Returns whether it is so.
    pub async fn settled(&self, limit: std::time::Duration) -> bool {
        let all = self.in_flight.acquire_many(MAX_IN_FLIGHT as u32);
        matches!(tokio::time::timeout(limit, all).await, Ok(Ok(_)))
    }

    /// Calls `f` whenever the figures change.
    pub fn on_change(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_change = Some(Box::new(f));
        self
    }

    pub fn metered(&self) -> Metered {
        self.metered.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The token stops working.
    pub fn close(&self) {
        self.open.store(false, Ordering::Relaxed);
    }

    fn accepts(&self, presented: &str) -> bool {
        self.open.load(Ordering::Relaxed)
            && presented.len() == self.token.len()
            && presented.bytes().zip(self.token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn client() -> std::io::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("agentops-gateway/", env!("CARGO_PKG_VERSION")))
        .tcp_nodelay(true)
        .build()
        .map_err(std::io::Error::other)
}

/// A fresh token for an account (two v4 UUIDs: 244 random bits).
pub fn new_token() -> String {
    format!("agentops-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    mcp_client: reqwest::Client,
    account: Arc<Account>,
}

/// A running gateway on loopback for one execution; dropped or closed, its token no longer
/// works (nothing listens).
pub struct Gateway {
    /// Where the agent sends its requests (`ANTHROPIC_BASE_URL`).
    pub base_url: String,
    /// The agent's credential (`ANTHROPIC_API_KEY`): good for this gateway only.
    pub token: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Gateway {
    /// Starts a gateway on 127.0.0.1 that relays to `upstream` with `api_key`.
    pub async fn start(upstream: &str, api_key: &str) -> std::io::Result<Self> {
        Self::start_with_budget(upstream, api_key, None).await
    }

    /// The same, refusing requests once `budget_usd` is spent (priced by each request's model).
    pub async fn start_with_budget(upstream: &str, api_key: &str, budget_usd: Option<f64>) -> std::io::Result<Self> {
        Self::start_with_budget_and_prices(upstream, api_key, budget_usd, PriceTable::list_shared()).await
    }

    /// The same, priced at `prices` (an operator's table) instead of the list prices.
    pub async fn start_with_budget_and_prices(
        upstream: &str,
        api_key: &str,
        budget_usd: Option<f64>,
        prices: Arc<PriceTable>,
    ) -> std::io::Result<Self> {
        Self::start_with_mcp(upstream, api_key, budget_usd, prices, mcp::McpRoutes::new()).await
    }

    /// The same, relaying to the execution's remote MCP servers too (`<base_url>/mcp/{server}`).
    pub async fn start_with_mcp(
        upstream: &str,
        api_key: &str,
        budget_usd: Option<f64>,
        prices: Arc<PriceTable>,
        mcp_routes: mcp::McpRoutes,
    ) -> std::io::Result<Self> {
        let token = new_token();
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: client()?,
            mcp_client: mcp::client(true)?,
            account: Arc::new(Account::new(api_key, &token, budget_usd).with_prices(prices).with_mcp(mcp_routes)),
        });
        let app = axum::Router::new().fallback(relay_local).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        // Streamed events are small writes: without TCP_NODELAY each waits for the peer's
        // delayed ACK (~40 ms on loopback), several times per turn.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(until).await;
        });
        Ok(Self { base_url, token, shared, stop })
    }

    /// Refuses requests past the backstop of `max_turns` (see `Account::with_max_turns`).
    pub fn restrict_turns(&self, max_turns: Option<u32>) {
        if let Some(n) = max_turns {
            let _ = self.shared.account.max_answers.set(turn_backstop(n));
        }
    }

    /// Refuses requests naming a model the policies do not allow (see `Account::with_models`).
    pub fn restrict_models(&self, models: Option<Vec<String>>) {
        if let Some(m) = models {
            let _ = self.shared.account.models.set(m);
        }
    }

    /// What was counted so far.
    pub fn metered(&self) -> Metered {
        self.shared.account.metered()
    }

    /// Waits (at most `limit`) until every answer relayed was read to its end and metered,
    /// also those whose client went away: then `metered` is final.
    pub async fn settled(&self, limit: std::time::Duration) -> bool {
        self.shared.account.settled(limit).await
    }

    /// Stops listening: the token is worthless from now on.
    pub fn close(&self) {
        self.shared.account.close();
        self.stop.cancel();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay_local(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some((server, rest)) = mcp_path(uri.path()) {
        let account = Some(&shared.account);
        return mcp::relay(&shared.mcp_client, true, account, &[], server, rest, uri.query(), method, &headers, body)
            .await;
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    relay(&shared.client, &shared.upstream, Some(&shared.account), &[], method, &path, &headers, body).await
}

/// `/mcp/{server}[rest]`, matched on the raw path: the server's name and what follows it.
fn mcp_path(path: &str) -> Option<(&str, &str)> {
    let tail = path.strip_prefix("/mcp/")?;
    let end = tail.find('/').unwrap_or(tail.len());
    Some((&tail[..end], &tail[end..]))
}

/// Opens the account or route of a running execution this process has not opened (after a
/// restart: accounts open on first use, not by reading every running execution's Secrets).
/// Returns whether it did.
pub type Opener = Arc<dyn Fn(String, String) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// The controller's gateway: one account per running execution, keyed by namespace and name.
pub struct Gateways {
    upstream: String,
    client: reqwest::Client,
    mcp_client: reqwest::Client,
    /// Whether remote MCP servers may be on loopback or link-local addresses (`allowing_local_mcp`).
    local_mcp: bool,
    accounts: Mutex<HashMap<(String, String), Arc<Account>>>,
    opener: std::sync::OnceLock<Opener>,
    /// Tokens of closed accounts: never opened again.
    retired: Mutex<std::collections::HashSet<String>>,
    /// The operator's prices for every account opened here (None: each account's own).
    prices: Option<Arc<PriceTable>>,
    /// Bytes of request bodies in memory at once, all executions together.
    bodies: BodyBudget,
    /// The same, per namespace (`bodies::NAMESPACE_BYTES`).
    namespace_bodies: Mutex<HashMap<String, BodyBudget>>,
}

impl Gateways {
    /// Relays to `upstream` (e.g. `https://api.anthropic.com`).
    pub fn new(upstream: &str) -> std::io::Result<Self> {
        Ok(Self {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: client()?,
            mcp_client: mcp::client(false)?,
            local_mcp: false,
            accounts: Mutex::new(HashMap::new()),
            opener: std::sync::OnceLock::new(),
            retired: Mutex::new(Default::default()),
            bodies: BodyBudget::new(bodies::GATEWAY_BYTES),
            namespace_bodies: Mutex::new(HashMap::new()),
            prices: None,
        })
    }

    /// Lets remote MCP servers be on loopback and link-local addresses, which a controller
    /// otherwise refuses (its own ports, the metadata service): for tests with servers on
    /// 127.0.0.1, never a cluster.
    pub fn allowing_local_mcp(mut self) -> std::io::Result<Self> {
        self.mcp_client = mcp::client(true)?;
        self.local_mcp = true;
        Ok(self)
    }

    /// Prices every account opened from now on at `prices` (an operator's table).
    pub fn with_prices(mut self, prices: PriceTable) -> Self {
        self.prices = Some(Arc::new(prices));
        self
    }

    /// How accounts this process has not opened get opened on first use.
    pub fn set_opener(&self, opener: Opener) {
        let _ = self.opener.set(opener);
    }

    /// Whether `token` belonged to an account that was closed.
    pub fn retired(&self, token: &str) -> bool {
        self.retired.lock().is_ok_and(|r| r.contains(token))
    }

    /// Opens (or replaces) the account of one execution.
    pub fn open(&self, ns: &str, name: &str, account: Account) {
        let account = match &self.prices {
            Some(p) => account.with_prices(p.clone()),
            None => account,
        };
        if let Ok(mut a) = self.accounts.lock()
            && let Some(old) = a.insert((ns.into(), name.into()), Arc::new(account))
        {
            old.close();
        }
    }

    /// Requests of one execution refused outside the allowlist, and the last one (read on
    /// every reconcile: only these two fields, not the whole account).
    pub fn refusals(&self, ns: &str, name: &str) -> Option<(u64, Option<String>)> {
        let a = self.accounts.lock().ok()?.get(&(ns.to_string(), name.to_string())).cloned()?;
        let m = a.metered.lock().ok()?;
        (m.refused_not_allowed > 0).then(|| (m.refused_not_allowed, m.last_refused.clone()))
    }

    /// Whether an execution's account is open.
    pub fn is_open(&self, ns: &str, name: &str) -> bool {
        self.accounts.lock().is_ok_and(|a| a.contains_key(&(ns.to_string(), name.to_string())))
    }

    /// What one execution's account counted, while it is open.
    pub fn metered(&self, ns: &str, name: &str) -> Option<Metered> {
        let a = self.accounts.lock().ok()?.get(&(ns.to_string(), name.to_string())).cloned()?;
        Some(a.metered())
    }

    /// The open accounts, by namespace and name (for the team budgets to hold them).
    pub fn accounts(&self) -> Vec<((String, String), Arc<Account>)> {
        self.accounts.lock().map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    /// Closes an execution's account: its token is refused from now on. Returns what it counted.
    pub fn close(&self, ns: &str, name: &str) -> Option<Metered> {
        let a = self.accounts.lock().ok()?.remove(&(ns.to_string(), name.to_string()))?;
        a.close();
        if let Ok(mut r) = self.retired.lock() {
            if r.len() > 100_000 {
                r.clear();
            }
            r.insert(a.token.clone());
        }
        Some(a.metered())
    }

    /// `/gateway/{namespace}/{name}/v1/...`, for the controller's runner listener.
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().route("/gateway/{ns}/{name}/{*path}", axum::routing::any(relay_controller)).with_state(self)
    }
}

async fn relay_controller(
    State(g): State<Arc<Gateways>>,
    Path((ns, name, _)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The path as it came, never decoded: `%2F`, `%2E` and `..` reach the allowlist as they are.
    let raw = uri.path().strip_prefix("/gateway/").and_then(|rest| {
        let mut parts = rest.splitn(3, '/');
        let (n, e, tail) = (parts.next()?, parts.next()?, parts.next()?);
        (n == ns && e == name).then(|| format!("/{tail}"))
    });
    let Some(path) = raw else {
        return refuse(StatusCode::NOT_FOUND, "not_found_error", "the gateway relays the Messages API only");
    };
    let key = (ns, name);
    let mut account = g.accounts.lock().ok().and_then(|a| a.get(&key).cloned());
    if account.is_none()
        && let Some(open) = g.opener.get()
        && open(key.0.clone(), key.1.clone()).await
    {
        account = g.accounts.lock().ok().and_then(|a| a.get(&key).cloned());
    }
    // Unknown and finished executions look the same: no token works for them (`relay` says so
    // before it reads a byte of the body).
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let raw_path = path.clone();
    let raw_path = raw_path.as_str();
    let path = format!("{path}{query}");
    let namespace = g.namespace_bodies.lock().ok().map(|mut n| {
        if n.len() > 10_000 {
            // Namespaces come and go; a budget nobody holds is full again, so none is lost.
            n.retain(|_, b| b.available_kib() < bodies::NAMESPACE_BYTES / 1024);
        }
        n.entry(key.0.clone()).or_insert_with(|| BodyBudget::new(bodies::NAMESPACE_BYTES)).clone()
    });
    let process = [Some(&g.bodies), namespace.as_ref()];
    if let Some((server, rest)) = mcp_path(raw_path) {
        return mcp::relay(
            &g.mcp_client,
            g.local_mcp,
            account.as_ref(),
            &process,
            server,
            rest,
            uri.query(),
            method,
            &headers,
            body,
        )
        .await;
    }
    relay(&g.client, &g.upstream, account.as_ref(), &process, method, &path, &headers, body).await
}

/// Asks hyper to close the connection after this answer (the request body may be unread).
fn close(mut r: Response) -> Response {
    r.headers_mut().insert("connection", HeaderValue::from_static("close"));
    r
}

fn refuse(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// The only requests relayed: what the pinned Claude Code CLI sends (seen in its traffic:
/// `POST /v1/messages?beta=true`, and `count_tokens` for `/context`), matched on the raw path
/// and query, before any decoding. Anything else (`/v1/messages/batches`, `/v1/files`,
/// `/v1/../admin`, `%2F`, `%2E`) never reaches the upstream with the operator's key.
fn allowed(method: &Method, path_and_query: &str) -> bool {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    method == Method::POST
        && matches!(path, "/v1/messages" | "/v1/messages/count_tokens")
        && matches!(query, None | Some("beta=true"))
}

/// Request headers passed upstream; everything else the agent sends stays here. The
/// `accept-encoding` is the gateway's own: identity, so every byte relayed is metered.
const REQUEST_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta", "content-type", "accept"];

/// Headers never copied from one side to the other.
fn hop(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "x-api-key"
            | "authorization"
    )
}

/// A clamped request still gets room for a useful answer; below this, the budget is spent.
const MIN_OUTPUT_TOKENS: u64 = 2048;
/// The prompt of the least useful request, for deciding that a team budget is exhausted.
const LEAST_PROMPT_TOKENS: u64 = 8192;

/// A request's worst case held against its account's budget (and the team budgets it was
/// reserved in) while it is in flight.
struct Hold {
    account: Arc<Account>,
    pools: Vec<Arc<Pool>>,
    usd: f64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Ok(mut m) = self.account.metered.lock() {
            m.reserved_usd = (m.reserved_usd - self.usd).max(0.0);
        }
        for p in &self.pools {
            if let Ok(mut b) = p.books.lock() {
                b.reserved_usd = (b.reserved_usd - self.usd).max(0.0);
            }
        }
    }
}

/// The request with `max_tokens` set to `n` (and an extended-thinking budget kept below it).
fn with_max_tokens(body: &[u8], n: u64) -> Option<Bytes> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["max_tokens"] = n.into();
    if let Some(t) = v.get_mut("thinking").and_then(|t| t.get_mut("budget_tokens"))
        && t.as_u64().is_some_and(|b| b >= n)
    {
        *t = (n / 2).into();
    }
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// Relays one request for `account` (None: no running execution here). The token is checked
/// from the headers, and the path against the allowlist, before a byte of the body is read; an
/// unauthenticated request is answered at once and its connection closed with the body unread.
#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &reqwest::Client,
    upstream: &str,
    account: Option<&Arc<Account>>,
    process: &[Option<&BodyBudget>],
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let presented = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")))
        .unwrap_or_default();
    let Some(account) = account.filter(|a| a.accepts(presented)) else {
        return close(refuse(StatusCode::UNAUTHORIZED, "authentication_error", "this gateway token is not valid"));
    };
    if !allowed(&method, path) {
        tracing::warn!(%method, path = %crate::api::report::truncate(path, 200), "the model gateway refused a request outside its allowlist");
        if let Ok(mut m) = account.metered.lock() {
            m.refused_not_allowed += 1;
            m.last_refused = Some(format!("{method} {}", crate::api::report::truncate(path, 200)));
        }
        // The controller tells the execution's owner (an Event), at most once a second.
        if let Some(f) = &account.on_change {
            f();
        }
        return close(refuse(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "the gateway relays POST /v1/messages and /v1/messages/count_tokens only",
        ));
    }
    // Bounded per execution before its body is read (16 × 32 MiB at most in memory).
    let Ok(slot) = account.in_flight.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too many requests of this execution in flight at the model gateway; try again",
        );
    };
    // Read against the execution's budget of bytes and the process's (`bodies`): what all
    // agents together can make the controller hold is bounded, and one cannot take it all.
    let budgets: Vec<&BodyBudget> = std::iter::once(&account.bodies).chain(process.iter().flatten().copied()).collect();
    let (body, held) = match bodies::read(body, bodies::declared_length(headers), MAX_REQUEST_BYTES, &budgets).await {
        Ok(read) => read,
        Err(BodyError::TooLarge) => {
            return close(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request body is over the gateway's 32 MiB limit",
            ));
        }
        Err(BodyError::Busy) => {
            return close(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the model gateway holds as many request bytes as it may; try again",
            ));
        }
        Err(BodyError::Broken(e)) => {
            return close(refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("the body broke off: {e}"),
            ));
        }
        Err(BodyError::TooSlow) => {
            return close(refuse(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive whole within 30 s",
            ));
        }
    };
    // Read strictly: what the gateway reserves and prices is what the upstream will read.
    let req = match request::read(path, headers, &body, &account.prices) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(reason = %why, "the model gateway refused a request it could not price");
            if let Ok(mut m) = account.metered.lock() {
                m.refused_invalid += 1;
            }
            return refuse(StatusCode::BAD_REQUEST, "invalid_request_error", &why.to_string());
        }
    };
    // The model is the policies' to allow, not the agent's: a request naming another is refused
    // before it costs anything (the CLI's own model and small-model choice are set to an allowed one).
    if let Some(models) = account.models.get()
        && !crate::api::policy::models_allow(models, &req.model)
    {
        let shown = crate::api::policy::models_shown(models).join(", ");
        let why = format!(
            "the model {:?} is not allowed by the cluster's AgentPolicy (allowed: {shown})",
            crate::api::report::truncate(&req.model, 100)
        );
        if let Ok(mut m) = account.metered.lock() {
            m.refused_not_allowed += 1;
            m.last_refused = Some(format!("model {}", crate::api::report::truncate(&req.model, 100)));
        }
        return refuse(StatusCode::FORBIDDEN, "permission_error", &why);
    }
    // The budget is hard, also under concurrency: the worst case of every request in flight is
    // held against it until the upstream's answer ends (`Hold`), and settled to the metered figure.
    let (hold, body) = match account.reserve(&req, body) {
        Ok(ok) => ok,
        // 400: the CLI does not retry it, and ends the run with this message.
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_request_error", &why),
    };
    let mut out_req = client.request(method, format!("{upstream}{path}")).body(body);
    for name in REQUEST_HEADERS {
        for value in headers.get_all(*name) {
            out_req = out_req.header(*name, value);
        }
    }
    out_req = out_req.header("accept-encoding", "identity");
    let Ok(key) = HeaderValue::from_str(&account.api_key) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "the configured API key is not a valid header");
    };
    // From here on the agent cannot stop the gateway's work: if it goes away while the upstream
    // works, `forward` still takes the answer, meters it and releases the reservation.
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let forwarding = Forward { account: account.clone(), req, hold, slot, held };
    tokio::spawn(forwarding.run(out_req.header("x-api-key", key), head_tx));
    head_rx.await.unwrap_or_else(|_| refuse(StatusCode::BAD_GATEWAY, "api_error", "the model gateway lost the answer"))
}

/// One request on its way upstream, with its reservation and in-flight slot.
struct Forward {
    account: Arc<Account>,
    req: Request,
    hold: Option<Hold>,
    slot: tokio::sync::OwnedSemaphorePermit,
    /// The request body's room in the budgets, until it has been sent.
    held: bodies::Held,
}

impl Forward {
    /// Sends the request, hands the answer's head to the client (`head`), and reads the answer
    /// to its end.
    async fn run(self, out: reqwest::RequestBuilder, head: tokio::sync::oneshot::Sender<Response>) {
        let Forward { account, req, hold, slot, held } = self;
        // What it is billed if its answer cannot be metered: its reservation (or, without a
        // budget, its worst case).
        let worst_usd = hold
            .as_ref()
            .map(|h| h.usd)
            .unwrap_or_else(|| if req.free { 0.0 } else { req.worst_case(&account.prices).usd(req.max_tokens) });
        let sent = out.send().await;
        // The body is sent (or will never be): its bytes are not held any more.
        drop(held);
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the model gateway cannot reach the upstream API");
                let _ = head.send(refuse(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "the model gateway cannot reach the Anthropic API",
                ));
                return;
            }
        };
        if let Ok(mut m) = account.metered.lock() {
            m.responses += 1;
            m.model = Some(meter::tool_name(&req.model));
        }
        // Identity was asked for; a compressed answer could not be metered, so it is not
        // relayed, and it is billed at its worst case (the upstream billed it).
        if let Some(enc) = resp.headers().get("content-encoding").filter(|v| v.as_bytes() != b"identity") {
            tracing::warn!(encoding = ?enc, "the upstream API answered compressed; not relayed (it could not be metered)");
            let _ = head.send(refuse(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "the upstream API answered compressed content, which the gateway cannot meter",
            ));
            account.settle_unmetered(&req.model, worst_usd);
            return;
        }
        let status = resp.status();
        let mut out = Response::builder().status(status.as_u16());
        for (name, value) in resp.headers() {
            if !hop(name.as_str()) {
                out = out.header(name, value);
            }
        }
        let streaming = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let price = account.prices.price(&req.model);
        let meter = Meter::new(price, req.fast, account.prices.max_fast_multiplier(), streaming);
        let (tx, rx) = tokio::sync::mpsc::channel(RELAYED_CHUNKS);
        let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) });
        let _ =
            head.send(out.body(Body::from_stream(body)).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()));
        let drain = Drain {
            account,
            model: req.model,
            meter,
            worst_usd,
            must_end: streaming && status.is_success(),
            hold,
            slot: Some(slot),
        };
        drain.run(resp, tx).await;
    }
}

/// Chunks of an answer buffered between the upstream and a slow client.
const RELAYED_CHUNKS: usize = 16;

/// How long the upstream may send nothing before its answer is given up as cut (the API sends
/// `ping` events while it works).
const UPSTREAM_SILENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// Reads one upstream answer to its end, metering it and passing it to the client while the
/// client listens. The client cannot stop it: an agent that hangs up half way still pays for
/// what the upstream produced. The reservation and the in-flight slot are held until the end.
struct Drain {
    account: Arc<Account>,
    model: String,
    meter: Meter,
    worst_usd: f64,
    /// A successful stream ends with `message_stop` (or an `error` event); one that ends
    /// otherwise was cut.
    must_end: bool,
    hold: Option<Hold>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drain {
    async fn run(mut self, resp: reqwest::Response, tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) {
        let mut upstream = resp.bytes_stream();
        let mut listening = true;
        let mut cut = false;
        let mut billed = 0.0;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(UPSTREAM_SILENCE, upstream.next()) => next,
                // The client went away while the upstream was quiet: noticed now, not with the
                // next chunk.
                _ = tx.closed(), if listening => {
                    listening = false;
                    self.account.note_agent_left();
                    continue;
                }
            };
            match next {
                Ok(Some(Ok(bytes))) => {
                    let seen = self.meter.feed(&bytes);
                    billed += seen.cost_usd;
                    self.account.record(&self.model, seen);
                    if listening && tx.send(Ok(bytes)).await.is_err() {
                        // The client went away: keep reading and metering to the end.
                        listening = false;
                        self.account.note_agent_left();
                    }
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "the upstream API's answer broke off");
                    if listening {
                        let _ = tx.send(Err(std::io::Error::other(e))).await;
                    }
                    cut = true;
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("the upstream API went silent in the middle of an answer; given up");
                    cut = true;
                    break;
                }
            }
        }
        let seen = self.meter.finish();
        billed += seen.cost_usd;
        self.account.record(&self.model, seen);
        if cut || (self.must_end && !self.meter.ended()) {
            // What the upstream billed for it is not known: the worst case.
            self.account.settle_unmetered(&self.model, (self.worst_usd - billed).max(0.0));
        }
        // The reservation and the slot go once the last figure is in, and only then does the
        // client see the end of the answer (it may read the figures at once).
        drop(self.hold.take());
        drop(self.slot.take());
        drop(tx);
    }
}

/// The `by_model` key of `model`: its name, or `other` beyond `MAX_MODELS` names.
fn model_key(by_model: &BTreeMap<String, ModelMetered>, model: &str) -> String {
    let name = meter::tool_name(model);
    if by_model.contains_key(&name) || by_model.len() < MAX_MODELS - 1 { name } else { "other".into() }
}
