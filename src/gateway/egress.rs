//! The egress proxy: where an agent's tools (curl, npm, pip, go) reach the hosts its execution
//! allows by name (`egress.hosts`), and nothing else. The agent's `HTTPS_PROXY`/`HTTP_PROXY`
//! point here with its execution's own token as the proxy password; the runner can reach
//! nothing else (a pod's default-deny NetworkPolicy, the sandbox's TCP port rules on one
//! machine), so unsetting the variables gains nothing.
//!
//! HTTP `CONNECT host:port` (TLS and anything else tunnelled) and plain HTTP requests in
//! absolute form (`GET http://host/path`, one request per connection) are served. The proxy
//! resolves the name itself and connects to the address it resolved (a second lookup by the
//! agent cannot rebind it), and refuses loopback, private, link-local (cloud metadata
//! included), CGNAT, multicast and reserved addresses unless one of the execution's CIDR rules
//! allows the address and port. Bounded: connections at once per execution, the request head's
//! size and the time to send it, idle time per connection. Every connection is counted (host,
//! port, bytes each way, refused or not, and why).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Connections one execution may hold open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Tunnels open at once through one proxy, every execution together: the controller's file
/// descriptors (shared with its API and model gateway) are not every tenant's to take.
pub const MAX_TOTAL_CONNECTIONS: usize = 2048;
/// Connections the proxy holds before they have shown a known token (all executions).
const MAX_UNPROVEN: usize = 128;
/// Largest request head (request line and headers) read from the agent.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time the agent has to send its request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(30);
/// Time a connection to the upstream may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// Connections recorded one by one per execution (the counts cover all of them).
const RECORDED: usize = 100;

/// One `egress.hosts` entry: a host name (or `*.` and a domain: any name under it, not the
/// domain itself) and a port (443 when none is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// Lower case, without the trailing dot; `*.example.com` for a wildcard.
    pub host: String,
    pub port: u16,
}

impl HostRule {
    /// Parses `pypi.org`, `pypi.org:443`, `*.githubusercontent.com`, `10.0.0.7:8080`,
    /// `[2001:db8::1]:443`.
    pub fn parse(text: &str) -> Result<HostRule, String> {
        let bad = |why: &str| {
            format!("{text:?} is not a host rule ({why}); write e.g. pypi.org, pypi.org:443 or *.githubusercontent.com")
        };
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                (h, p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("the port is not 1 to 65535"))?)
            }
            _ => (text, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
        let name = host.strip_prefix("*.").unwrap_or(&host);
        let is_ip = name.parse::<IpAddr>().is_ok();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !is_ip && (name.len() > 253 || !name.split('.').all(label_ok)) {
            return Err(bad("not a DNS name"));
        }
        if is_ip && host.starts_with("*.") {
            return Err(bad("a wildcard over an address"));
        }
        if host.starts_with("*.") && !name.contains('.') {
            return Err(bad("a wildcard over a top-level domain"));
        }
        if host.starts_with("*.") && name.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad("a wildcard over numbers, which names no host"));
        }
        Ok(HostRule { host, port })
    }

    /// Whether every host and port `other` allows, this allows too (a policy's allowlist
    /// covering an execution's rule): equal, or a wildcard over `other`'s name or wildcard.
    pub fn covers(&self, other: &HostRule) -> bool {
        match other.host.strip_prefix("*.") {
            Some(domain) => {
                other.port == self.port
                    && (self.host == other.host
                        || self.host.strip_prefix("*.").is_some_and(|d| {
                            domain.len() > d.len() + 1
                                && domain.ends_with(d)
                                && domain[..domain.len() - d.len()].ends_with('.')
                        }))
            }
            None => self.matches(&other.host, other.port),
        }
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        port == self.port
            && match self.host.strip_prefix("*.") {
                // A wildcard is over names: never an address (`*.0.1` would match 10.0.0.1).
                Some(_) if host.parse::<IpAddr>().is_ok() => false,
                Some(domain) => {
                    host.len() > domain.len() + 1
                        && host.ends_with(domain)
                        && host[..host.len() - domain.len()].ends_with('.')
                }
                None => host == self.host,
            }
    }
}

/// A CIDR rule that lets the proxy connect to addresses it otherwise refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrRule {
    pub net: IpAddr,
    pub prefix: u8,
    /// Ports it allows (none: every port).
    pub ports: Vec<u16>,
}

impl CidrRule {
    /// Parses `10.0.0.0/8` or `fd00::/8`.
    pub fn parse(text: &str, ports: Vec<u16>) -> Result<CidrRule, String> {
        let bad = || format!("{text:?} is not an IP block; write e.g. 10.0.0.0/8 or fd00::/8");
        let (ip, bits) = text.split_once('/').ok_or_else(bad)?;
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = bits.parse().map_err(|_| bad())?;
        if prefix > if net.is_ipv4() { 32 } else { 128 } {
            return Err(bad());
        }
        Ok(CidrRule { net, prefix, ports })
    }

    /// Whether every address and port `other` allows, this allows too.
    pub fn covers(&self, other: &CidrRule) -> bool {
        // As written, in one family: an IPv4-mapped (`::ffff:a.b.c.d/16`) or NAT64
        // (`64:ff9b::a.b.c.d/16`) block is an IPv6 block whose prefix counts IPv6 bits, far wider
        // than the IPv4 block its address falls in.
        other.net.is_ipv4() == self.net.is_ipv4()
            && other.prefix >= self.prefix
            && self.allows_ip(other.net)
            && (self.ports.is_empty()
                || (!other.ports.is_empty() && other.ports.iter().all(|p| self.ports.contains(p))))
    }

    fn allows(&self, addr: SocketAddr) -> bool {
        self.allows_ip(addr.ip()) && (self.ports.is_empty() || self.ports.contains(&addr.port()))
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Where an execution may connect through the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub hosts: Vec<HostRule>,
    /// Addresses the proxy may connect to although they are not public.
    pub cidrs: Vec<CidrRule>,
}

/// One connection the agent asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub host: String,
    pub port: u16,
    /// Bytes from the agent to the host, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Why it was refused; None when it was made.
    pub refused: Option<String>,
}

/// What the proxy counted for one execution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressTally {
    pub connections: u64,
    pub refused: u64,
    /// Bytes each way, counted as they move (connections still open included).
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// The latest connections made and ended (at most 100), oldest first.
    pub recent: VecDeque<Connection>,
    /// The latest refusals (at most 100), oldest first: kept apart, so that many connections
    /// cannot push a refusal out of sight.
    pub refusals: VecDeque<Connection>,
}

impl EgressTally {
    fn record(&mut self, c: Connection) {
        let list = if c.refused.is_some() {
            self.refused += 1;
            &mut self.refusals
        } else {
            // Counted when made (`opened`); its bytes as they moved (`moved`).
            &mut self.recent
        };
        if list.len() == RECORDED {
            list.pop_front();
        }
        list.push_back(c);
    }

    /// The figures a report carries: the latest 20 refused `host:port`, each once, cleaned for
    /// terminals.
    pub fn summary(&self) -> crate::api::EgressSummary {
        let mut refused_hosts: Vec<String> = Vec::new();
        for c in self.refusals.iter().rev() {
            let hp = crate::api::text::clean_line(&format!("{}:{}", c.host, c.port)).into_owned();
            if refused_hosts.len() < 20 && !refused_hosts.contains(&hp) {
                refused_hosts.push(hp);
            }
        }
        crate::api::EgressSummary {
            connections: self.connections,
            refused: self.refused,
            bytes_out: self.bytes_out,
            bytes_in: self.bytes_in,
            refused_hosts,
        }
    }

    /// A tally that starts where `s` ended (a restarted controller reopens a running
    /// execution's account with the figures its status records).
    pub fn continuing(s: &crate::api::EgressSummary) -> Self {
        let refusals = s
            .refused_hosts
            .iter()
            .rev()
            .filter_map(|hp| {
                let (host, port) = hp.rsplit_once(':')?;
                Some(Connection {
                    host: host.to_string(),
                    port: port.parse().ok()?,
                    bytes_out: 0,
                    bytes_in: 0,
                    refused: Some("refused before the controller restarted".into()),
                })
            })
            .collect();
        EgressTally {
            connections: s.connections,
            refused: s.refused,
            bytes_out: s.bytes_out,
            bytes_in: s.bytes_in,
            recent: VecDeque::new(),
            refusals,
        }
    }

    fn opened(&mut self) {
        self.connections += 1;
    }

    fn moved(&mut self, out: u64, inn: u64) {
        self.bytes_out += out;
        self.bytes_in += inn;
    }
}

/// Resolves a host name to its addresses (tests give names of their own).
pub type Resolver = Arc<dyn Fn(String, u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// The system's resolver.
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) }))
}

/// Where the controller's egress proxy listens, and how it resolves names (tests give names of
/// their own).
pub struct EgressListener {
    pub listener: TcpListener,
    pub resolver: Resolver,
    /// Lets rules reach loopback and link-local addresses, which the controller's proxy
    /// otherwise never connects to (they are its own ports and its node's metadata service):
    /// for tests with origins on 127.0.0.1, never a cluster.
    pub allow_local: bool,
}

struct Account {
    /// The user name the agent presents with its token (the controller's `namespace.name`).
    user: Option<String>,
    policy: EgressPolicy,
    open: AtomicUsize,
    tally: Mutex<EgressTally>,
    closed: CancellationToken,
    /// Called after a refusal and after a connection ends (the controller wakes the execution).
    on_change: Option<OnChange>,
}

impl Account {
    fn changed(&self) {
        if let Some(f) = &self.on_change {
            f();
        }
    }
}

/// What the controller is told when an account's figures change.
pub type OnChange = Box<dyn Fn() + Send + Sync>;

/// Opens the account of a user this process has not opened (after a controller restart), from
/// what the user name says (`namespace.name`). Returns whether it did.
pub type EgressOpener = Arc<dyn Fn(String) -> BoxFuture<'static, bool> + Send + Sync>;

/// The proxy user name of the execution `name` in namespace `ns` (a namespace has no dot).
pub fn proxy_user(ns: &str, name: &str) -> String {
    format!("{ns}.{name}")
}

/// The namespace and name a proxy user name stands for.
pub fn parse_proxy_user(user: &str) -> Option<(String, String)> {
    let (ns, name) = user.split_once('.')?;
    // A namespace is a DNS label, an execution's name a DNS subdomain: nothing else is ever
    // looked up (no `..`, `/`, `%`, empty parts reach an API path).
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (label(ns) && name.len() <= 253 && name.split('.').all(label)).then(|| (ns.to_string(), name.to_string()))
}

impl EgressProxy {
    /// Whether `user` has an open account.
    pub fn is_open(&self, user: &str) -> bool {
        self.shared.users.lock().is_ok_and(|u| u.contains_key(user))
    }
}

/// One account to open: who, with what token, where it may connect, and what was counted
/// before (a restarted controller's account starts from the status's figures).
pub struct Opening {
    pub user: Option<String>,
    pub token: String,
    pub policy: EgressPolicy,
    pub counted: EgressTally,
    pub on_change: Option<OnChange>,
}

struct Shared {
    accounts: Mutex<HashMap<String, Arc<Account>>>,
    /// The token of each user's open account.
    users: Mutex<HashMap<String, String>>,
    opener: std::sync::OnceLock<EgressOpener>,
    /// Connections that have not yet sent a head with a known token, oldest first: at most
    /// `MAX_UNPROVEN`; a new one pushes the oldest out (silent connections cannot lock the
    /// agents out, who send their head at once).
    unproven: Arc<Mutex<std::collections::VecDeque<(u64, CancellationToken)>>>,
    next_conn: std::sync::atomic::AtomicU64,
    resolver: Resolver,
    idle: Duration,
    /// Loopback, unspecified and link-local addresses are refused whatever the rules say.
    refuse_local: bool,
    /// The controller's proxy (connections leave from its pod): a private address needs a CIDR
    /// rule even when written as a host, and names are resolved fully qualified.
    cluster: bool,
    /// Tunnels open, every account together (`MAX_TOTAL_CONNECTIONS`).
    open_total: AtomicUsize,
    /// Users whose account an opener was asked for and did not give, and when: not asked again
    /// for `RETRY_OPEN` (an unauthenticated client costs the controller no reads in a loop).
    tried: Mutex<HashMap<String, std::time::Instant>>,
}

/// How long a user whose account could not be opened is not looked up again.
const RETRY_OPEN: Duration = Duration::from_secs(30);

/// A running egress proxy; stops when dropped.
pub struct EgressProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EgressProxy {
    /// Listens on `bind`; connections idle for `idle` are closed.
    pub async fn start(bind: SocketAddr, resolver: Resolver, idle: Duration) -> std::io::Result<Self> {
        Self::serve(TcpListener::bind(bind).await?, resolver, idle)
    }

    /// Serves on `listener` (bound by the caller: the controller's `--egress-addr`).
    pub fn serve(listener: TcpListener, resolver: Resolver, idle: Duration) -> std::io::Result<Self> {
        Self::serve_as(listener, resolver, idle, false, false)
    }

    /// The controller's proxy: its connections leave from the controller's pod, so, unless
    /// `l.allow_local` (tests), no rule reaches a loopback address (the controller's own ports:
    /// its unauthenticated metrics among them) or a link-local one (the node's metadata service
    /// and the credentials of the controller's service account there).
    pub fn serve_controllers(l: EgressListener, idle: Duration) -> std::io::Result<Self> {
        Self::serve_as(l.listener, l.resolver, idle, !l.allow_local, true)
    }

    fn serve_as(
        listener: TcpListener,
        resolver: Resolver,
        idle: Duration,
        refuse_local: bool,
        cluster: bool,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            accounts: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            opener: std::sync::OnceLock::new(),
            unproven: Arc::new(Mutex::new(std::collections::VecDeque::new())),
            next_conn: std::sync::atomic::AtomicU64::new(0),
            resolver,
            idle,
            refuse_local,
            cluster,
            open_total: AtomicUsize::new(0),
            tried: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        let (s, st) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = st.cancelled() => return,
                };
                let Ok((conn, _)) = accepted else {
                    // Out of file descriptors (EMFILE) and the like: wait, do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                // Connections that have not shown a token yet are bounded too: the oldest goes.
                let id = s.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let pushed_out = CancellationToken::new();
                if let Ok(mut q) = s.unproven.lock() {
                    while q.len() >= MAX_UNPROVEN {
                        if let Some((_, oldest)) = q.pop_front() {
                            oldest.cancel();
                        }
                    }
                    q.push_back((id, pushed_out.clone()));
                }
                let unproven = Unproven { id, queue: s.unproven.clone() };
                let _ = conn.set_nodelay(true);
                let (s, st) = (s.clone(), st.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(&s, conn, unproven) => {}
                        _ = pushed_out.cancelled() => {}
                        _ = st.cancelled() => {}
                    }
                });
            }
        });
        Ok(EgressProxy { addr, shared, stop })
    }

    /// Lets the holder of `token` connect where `policy` allows.
    pub fn open(&self, token: &str, policy: EgressPolicy) {
        self.open_account(Opening {
            user: None,
            token: token.to_string(),
            policy,
            counted: EgressTally::default(),
            on_change: None,
        });
    }

    /// Opens (or replaces) an account; a user's earlier account is closed.
    pub fn open_account(&self, o: Opening) {
        let account = Arc::new(Account {
            user: o.user.clone(),
            policy: o.policy,
            open: AtomicUsize::new(0),
            tally: Mutex::new(o.counted),
            closed: CancellationToken::new(),
            on_change: o.on_change,
        });
        let earlier = match (&o.user, self.shared.users.lock()) {
            (Some(user), Ok(mut users)) => users.insert(user.clone(), o.token.clone()).filter(|t| *t != o.token),
            _ => None,
        };
        if let Ok(mut a) = self.shared.accounts.lock() {
            if let Some(old) = earlier.and_then(|t| a.remove(&t)) {
                old.closed.cancel();
            }
            if let Some(old) = a.insert(o.token, account) {
                old.closed.cancel();
            }
        }
    }

    /// How accounts this process has not opened get opened, on their first connection.
    pub fn set_opener(&self, opener: EgressOpener) {
        let _ = self.shared.opener.set(opener);
    }

    /// The token of `user`'s open account.
    fn token_of(&self, user: &str) -> Option<String> {
        self.shared.users.lock().ok()?.get(user).cloned()
    }

    /// What was counted for `user` so far, while its account is open.
    pub fn tally_of(&self, user: &str) -> Option<EgressTally> {
        self.tally(&self.token_of(user)?)
    }

    /// Ends `user`'s access (see `close`).
    pub fn close_user(&self, user: &str) -> Option<EgressTally> {
        let token = self.shared.users.lock().ok()?.remove(user)?;
        self.close(&token)
    }

    /// What was counted for `token` so far.
    pub fn tally(&self, token: &str) -> Option<EgressTally> {
        let a = self.shared.accounts.lock().ok()?.get(token)?.clone();
        a.tally.lock().ok().map(|t| t.clone())
    }

    /// Ends `token`'s access: its open connections are cut. Returns what was counted.
    pub fn close(&self, token: &str) -> Option<EgressTally> {
        let a = self.shared.accounts.lock().ok()?.remove(token)?;
        if let (Some(user), Ok(mut users)) = (&a.user, self.shared.users.lock())
            && users.get(user).is_some_and(|t| t == token)
        {
            users.remove(user);
        }
        a.closed.cancel();
        a.tally.lock().ok().map(|t| t.clone())
    }
}

/// The request head the agent sent: method, target, and the raw head.
struct Head {
    method: String,
    target: String,
    /// Header lines (without the request line), as sent.
    headers: Vec<(String, String)>,
    /// Bytes read after the head (the start of a body or of a TLS handshake).
    rest: Vec<u8>,
}

async fn read_head(conn: &mut TcpStream) -> Option<Head> {
    let mut buf = Vec::with_capacity(1024);
    let end = tokio::time::timeout(HEAD_DEADLINE, async {
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(at);
            }
            if buf.len() > MAX_HEAD_BYTES {
                return None;
            }
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .ok()??;
    if end > MAX_HEAD_BYTES {
        return None;
    }
    let text = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") || first.next().is_some() {
        return None;
    }
    let headers = lines
        .map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect::<Option<Vec<_>>>()?;
    Some(Head { method: method.to_string(), target: target.to_string(), headers, rest: buf[end + 4..].to_vec() })
}

async fn answer(conn: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let text = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(text.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// The user and token in `Proxy-Authorization: Basic base64(user:token)` (the user only names
/// the account to reopen after a restart; the token alone proves who the caller is).
fn proxy_credentials(head: &Head) -> Option<(String, String)> {
    let value = head.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization"))?.1.as_str();
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let (user, token) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), token.to_string()))
}

/// `host:port` of a CONNECT target, or of an absolute `http://` URL with its origin-form path.
fn destination(head: &Head) -> Option<(String, u16, Option<String>)> {
    let (host, port, path) = target(head)?;
    // A host name or an address, nothing else: what is recorded (status, Events, the store)
    // stays bounded and plain.
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    valid.then_some((host, port, path))
}

fn target(head: &Head) -> Option<(String, u16, Option<String>)> {
    if head.method == "CONNECT" {
        let (host, port) = head.target.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        return Some((host.to_ascii_lowercase(), port.parse().ok()?, None));
    }
    let url = url::Url::parse(&head.target).ok()?;
    if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    let host = match url.host()? {
        url::Host::Domain(d) => d.to_ascii_lowercase(),
        url::Host::Ipv4(a) => a.to_string(),
        url::Host::Ipv6(a) => a.to_string(),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    Some((host.trim_end_matches('.').to_string(), url.port().unwrap_or(80), Some(path)))
}

/// A connection's place among the unproven ones, given up when dropped.
struct Unproven {
    id: u64,
    queue: Arc<Mutex<std::collections::VecDeque<(u64, CancellationToken)>>>,
}

impl Drop for Unproven {
    fn drop(&mut self) {
        if let Ok(mut q) = self.queue.lock() {
            q.retain(|(id, _)| *id != self.id);
        }
    }
}

async fn serve(shared: &Shared, mut conn: TcpStream, unproven: Unproven) {
    let head = read_head(&mut conn).await;
    let Some(head) = head else {
        return answer(&mut conn, "400 Bad Request", "", "agentops egress: not an HTTP proxy request\n").await;
    };
    let credentials = proxy_credentials(&head);
    let find = |token: &str| shared.accounts.lock().ok()?.get(token).cloned();
    let mut account = credentials.as_ref().and_then(|(_, t)| find(t));
    // After a restart: the user's account is opened once (its token read from where the
    // controller keeps it), while this connection still holds its unproven place.
    if account.is_none()
        && let Some((user, token)) = &credentials
        && parse_proxy_user(user).is_some()
        && shared.users.lock().is_ok_and(|u| !u.contains_key(user))
        && !shared.tried.lock().is_ok_and(|t| t.get(user).is_some_and(|at| at.elapsed() < RETRY_OPEN))
        && let Some(open) = shared.opener.get()
    {
        if open(user.clone()).await {
            account = find(token);
        }
        if account.is_none()
            && let Ok(mut t) = shared.tried.lock()
        {
            if t.len() > 10_000 {
                t.retain(|_, at| at.elapsed() < RETRY_OPEN);
            }
            t.insert(user.clone(), std::time::Instant::now());
        }
    }
    drop(unproven);
    let Some(account) = account else {
        // Unknown, missing or retired token: the same answer, nothing counted anywhere.
        return answer(
            &mut conn,
            "407 Proxy Authentication Required",
            "proxy-authenticate: Basic realm=\"agentops\"\r\n",
            "agentops egress: this proxy serves running executions only (their HTTPS_PROXY carries the token)\n",
        )
        .await;
    };
    let Some((host, port, path)) = destination(&head) else {
        return answer(
            &mut conn,
            "400 Bad Request",
            "",
            "agentops egress: CONNECT host:port or an absolute http:// URL\n",
        )
        .await;
    };
    let refuse = |why: String| Connection { host: host.clone(), port, bytes_out: 0, bytes_in: 0, refused: Some(why) };
    let record = |c: Connection| {
        if let Ok(mut t) = account.tally.lock() {
            t.record(c);
        }
        account.changed();
    };
    if !account.policy.hosts.iter().any(|r| r.matches(&host, port)) {
        let why = format!("{host}:{port} is not in the execution's egress.hosts");
        record(refuse(why.clone()));
        return answer(&mut conn, "403 Forbidden", "", &format!("agentops egress: {why}\n")).await;
    }
    if account.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        account.open.fetch_sub(1, Ordering::SeqCst);
        let why = format!("more than {MAX_CONNECTIONS} connections at once");
        record(refuse(why.clone()));
        return answer(&mut conn, "429 Too Many Requests", "", &format!("agentops egress: {why}\n")).await;
    }
    let _open = OpenGuard(&account.open);
    if shared.open_total.fetch_add(1, Ordering::SeqCst) >= MAX_TOTAL_CONNECTIONS {
        shared.open_total.fetch_sub(1, Ordering::SeqCst);
        let why = format!("the proxy has {MAX_TOTAL_CONNECTIONS} connections open for all executions; try again");
        record(refuse(why.clone()));
        return answer(&mut conn, "503 Service Unavailable", "", &format!("agentops egress: {why}\n")).await;
    }
    let _total = OpenGuard(&shared.open_total);
    let upstream = match connect(shared, &account.policy, &host, port).await {
        Ok(u) => u,
        Err(why) => {
            record(refuse(why.clone()));
            return answer(&mut conn, "403 Forbidden", "", &format!("agentops egress: {why}\n")).await;
        }
    };
    let mut upstream = upstream;
    let mut first = Vec::new();
    match path {
        None => {
            if conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
                return;
            }
            first.extend_from_slice(&head.rest);
        }
        Some(path) => {
            // Origin form, our `Connection: close`, no proxy headers: one request per connection.
            let mut text = format!("{} {path} HTTP/1.1\r\n", head.method);
            for (k, v) in &head.headers {
                let k_l = k.to_ascii_lowercase();
                if !matches!(k_l.as_str(), "proxy-authorization" | "proxy-connection" | "connection" | "keep-alive") {
                    text.push_str(&format!("{k}: {v}\r\n"));
                }
            }
            text.push_str("Connection: close\r\n\r\n");
            first.extend_from_slice(text.as_bytes());
            first.extend_from_slice(&head.rest);
        }
    }
    if let Ok(mut t) = account.tally.lock() {
        t.opened();
    }
    let (out, inn) = pipe(&mut conn, &mut upstream, &first, shared.idle, &account).await;
    record(Connection { host, port, bytes_out: out, bytes_in: inn, refused: None });
}

struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves `host` and connects to the first address the policy allows: a public one, or one a
/// CIDR rule names. Never a second lookup.
async fn connect(shared: &Shared, policy: &EgressPolicy, host: &str, port: u16) -> Result<TcpStream, String> {
    // An address named in a host rule is the user's explicit choice (e.g. `127.0.0.1:5432` on
    // one machine), except link-local ones (cloud metadata): those need a CIDR rule.
    // Not in a cluster: there the proxy connects from the controller's pod, and a private
    // address (the API server's ClusterIP, another team's Service, the controller's own pod)
    // needs a CIDR rule, which a policy's `allowed.egress` bounds.
    let named = host
        .parse::<IpAddr>()
        .ok()
        .filter(|ip| !is_link_local(*ip))
        .filter(|_| !shared.cluster)
        .filter(|_| policy.hosts.iter().any(|r| r.host == host && r.port == port));
    let addrs = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        // In a cluster a name is looked up fully qualified: never through the pod's search list
        // (`pypi.org` must not become the Service `pypi` of a namespace `org`).
        Err(_) if shared.cluster => {
            tokio::time::timeout(CONNECT_DEADLINE, (shared.resolver)(format!("{}.", host.trim_end_matches('.')), port))
                .await
                .map_err(|_| format!("{host} did not resolve within {} s", CONNECT_DEADLINE.as_secs()))?
                .map_err(|e| format!("{host} does not resolve: {e}"))?
        }
        Err(_) => tokio::time::timeout(CONNECT_DEADLINE, (shared.resolver)(host.to_string(), port))
            .await
            .map_err(|_| format!("{host} did not resolve within {} s", CONNECT_DEADLINE.as_secs()))?
            .map_err(|e| format!("{host} does not resolve: {e}"))?,
    };
    if shared.refuse_local
        && let Some(a) = addrs.iter().find(|a| is_local(a.ip()))
    {
        return Err(format!(
            "{host} resolves to {} (loopback or link-local): the controller's egress proxy never connects there",
            a.ip()
        ));
    }
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| named.is_some() || is_public(a.ip()) || policy.cidrs.iter().any(|c| c.allows(*a)))
        .collect();
    let Some(_) = allowed.first() else {
        let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
        return Err(format!(
            "{host} resolves to {} (not a public address); an egress CIDR rule must allow it",
            if shown.is_empty() { "nothing".to_string() } else { shown.join(", ") }
        ));
    };
    let mut last = String::new();
    for a in allowed {
        match tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{host}:{port} ({a}) refused the connection: {e}"),
            Err(_) => last = format!("{host}:{port} ({a}) did not answer within {} s", CONNECT_DEADLINE.as_secs()),
        }
    }
    Err(last)
}

/// Copies both ways until either side ends, the connection is idle for `idle`, or the account
/// closes. Returns the bytes sent each way (agent → host, host → agent).
async fn pipe(
    agent: &mut TcpStream,
    host: &mut TcpStream,
    first: &[u8],
    idle: Duration,
    account: &Account,
) -> (u64, u64) {
    let closed = &account.closed;
    let moved = |o: usize, i: usize| {
        if let Ok(mut t) = account.tally.lock() {
            t.moved(o as u64, i as u64);
        }
    };
    // Every write is bounded like a read: a peer that stops reading holds nothing forever.
    macro_rules! write_bounded {
        ($w:expr, $buf:expr) => {
            tokio::select! {
                r = $w.write_all($buf) => r.is_ok(),
                _ = tokio::time::sleep(idle) => false,
                _ = closed.cancelled() => false,
            }
        };
    }
    let (mut out, mut inn) = (0u64, 0u64);
    if !first.is_empty() {
        if !write_bounded!(host, first) {
            return (0, 0);
        }
        out += first.len() as u64;
        moved(first.len(), 0);
    }
    let (mut ar, mut aw) = agent.split();
    let (mut hr, mut hw) = host.split();
    let (mut abuf, mut hbuf) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let (mut agent_open, mut host_open) = (true, true);
    while agent_open || host_open {
        tokio::select! {
            r = ar.read(&mut abuf), if agent_open => match r {
                Ok(0) | Err(_) => { agent_open = false; let _ = hw.shutdown().await; }
                Ok(n) => { if !write_bounded!(hw, &abuf[..n]) { break } out += n as u64; moved(n, 0); }
            },
            r = hr.read(&mut hbuf), if host_open => match r {
                Ok(0) | Err(_) => { host_open = false; let _ = aw.shutdown().await; }
                Ok(n) => { if !write_bounded!(aw, &hbuf[..n]) { break } inn += n as u64; moved(0, n); }
            },
            _ = tokio::time::sleep(idle) => break,
            _ = closed.cancelled() => break,
        }
    }
    (out, inn)
}

/// The address an IPv4-mapped or NAT64 IPv6 address stands for, else the address itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96 (the NAT64 well-known prefix), 64:ff9b:1::/48 (local-use NAT64) and
            // ::ffff:0:0/96 (SIIT): an IPv4 address inside.
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            let local_nat64 = s[..3] == [0x64, 0xff9b, 1];
            let siit = s[..6] == [0, 0, 0, 0, 0xffff, 0];
            if nat64 || local_nat64 || siit {
                return IpAddr::V4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Loopback, unspecified or link-local: this machine's own, or its metadata service.
fn is_local(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    ip.is_loopback() || ip.is_unspecified() || is_link_local(ip)
}

fn is_link_local(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => a.is_link_local(),
        // fe80::/10, and AWS's metadata address over IPv6.
        IpAddr::V6(a) => {
            (a.segments()[0] & 0xffc0) == 0xfe80 || a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

/// Whether `ip` is an address of the public internet: not loopback, private, link-local (cloud
/// metadata at 169.254.169.254 and fd00:ec2::254 included), CGNAT, multicast, documentation,
/// benchmarking or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || a == Ipv6Addr::UNSPECIFIED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rules_parse_and_match_as_written() {
        let r = HostRule::parse("PyPI.org.").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("pypi.org", 443));
        assert!(r.matches("pypi.org", 443) && !r.matches("pypi.org", 80) && !r.matches("evilpypi.org", 443));
        let w = HostRule::parse("*.githubusercontent.com:443").unwrap();
        assert!(w.matches("raw.githubusercontent.com", 443));
        assert!(!w.matches("githubusercontent.com", 443), "the domain itself is not under it");
        assert!(!w.matches("evilgithubusercontent.com", 443));
        assert_eq!(HostRule::parse("10.0.0.7:8080").unwrap().port, 8080);
        assert_eq!(HostRule::parse("[2001:db8::1]:8443").unwrap().host, "2001:db8::1");
        // A wildcard never matches an address: `*.example.com` does not cover 10.0.0.1.
        assert!(!HostRule::parse("*.example.com").unwrap().matches("10.0.0.1", 443));
        for bad in ["*.com", "a b", "x:0", "x:70000", "*.10.0.0.1", "", "-a.com", "a..b", "*.0.1:80", "*.example.1"] {
            assert!(HostRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_proxy_user_names_one_execution_and_a_tally_continues_from_its_summary() {
        // A namespace has no dot; a name may have several.
        assert_eq!(parse_proxy_user(&proxy_user("team-a", "fix.bug.1")), Some(("team-a".into(), "fix.bug.1".into())));
        assert_eq!(parse_proxy_user("nodot"), None);
        assert_eq!(parse_proxy_user(".x"), None);
        let mut t = EgressTally::default();
        t.opened();
        t.moved(10, 20);
        for (host, port) in [("a.test", 443), ("b.test", 80), ("a.test", 443)] {
            t.record(Connection { host: host.into(), port, bytes_out: 0, bytes_in: 0, refused: Some("no".into()) });
        }
        let s = t.summary();
        assert_eq!((s.connections, s.refused, s.bytes_out, s.bytes_in), (1, 3, 10, 20));
        assert_eq!(s.refused_hosts, ["a.test:443", "b.test:80"], "latest first, each once");
        assert_eq!(EgressTally::continuing(&s).summary(), s, "a restarted controller counts on from the status");
    }

    #[test]
    fn only_public_addresses_pass_without_a_cidr_rule() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["151.101.1.1", "2a04:4e42::1", "::ffff:151.101.1.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        let c = CidrRule::parse("10.0.0.0/8", vec![5432]).unwrap();
        assert!(c.allows("10.9.9.9:5432".parse().unwrap()));
        assert!(!c.allows("10.9.9.9:22".parse().unwrap()));
        assert!(c.allows("[::ffff:10.0.0.1]:5432".parse().unwrap()), "a mapped address is its IPv4 one");
        assert!(CidrRule::parse("10.0.0.0/33", vec![]).is_err());
    }
}
