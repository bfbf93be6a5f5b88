//! The gateway's cost of a team budget (issue 26): the same requests through the controller's
//! `Gateways` router, from 8 executions at once, with each account on its own (no budget: the
//! baseline), and with every account held against one shared `Pool` (a namespace budget) plus
//! its own `maxBudgetUsd`. The upstream is a minimal Messages API on loopback answering a short
//! stream with usage, so the gateway's own work (reserve, meter, settle, release) is what is
//! measured. Rounds alternate in one process; the ratio of medians is reported. Target (exit 1
//! when missed): ≤ 1.10× per request.
//!
//! Run: `cargo bench --bench budget` (BENCH_REQUESTS=N per round, default 4,000; BENCH_RUNS=N,
//! default 5).

use std::sync::Arc;
use std::time::Instant;

use agentops::gateway::{Account, Gateways, Pool};

const AGENTS: usize = 8;
const TARGET: f64 = 1.10;

/// A minimal streaming Messages API: every request gets the same short answer with usage.
async fn upstream() -> String {
    let answer = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-6\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ok\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let app = axum::Router::new().fallback(move || async move { ([("content-type", "text/event-stream")], answer) });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

/// A gateway with `AGENTS` accounts, each held against `pool` when given; its base URL.
async fn gateway(upstream: &str, pool: Option<Arc<Pool>>) -> String {
    let g = Arc::new(Gateways::new(upstream).unwrap());
    for i in 0..AGENTS {
        let account = match &pool {
            None => Account::new("sk-ant-real", &format!("tok-{i}"), None),
            Some(p) => Account::new("sk-ant-real", &format!("tok-{i}"), Some(1_000.0)).with_pools(vec![p.clone()]),
        };
        g.open("ns", &format!("x{i}"), account);
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let app = g.router();
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

/// `n` requests spread over the agents, `AGENTS` at a time: the mean time per request (µs).
async fn round(client: &reqwest::Client, base: &str, n: usize) -> f64 {
    let body = serde_json::json!({"model": "claude-sonnet-4-6", "max_tokens": 4096, "stream": true,
                                  "messages": [{"role": "user", "content": "hello"}]})
    .to_string();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..AGENTS {
        let (client, base, body) = (client.clone(), base.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / AGENTS {
                let r = client
                    .post(format!("{base}/gateway/ns/x{i}/v1/messages"))
                    .header("x-api-key", format!("tok-{i}"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; nothing to list.
    }
    let n: usize = std::env::var("BENCH_REQUESTS").ok().and_then(|s| s.parse().ok()).unwrap_or(4_000);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let up = upstream().await;
    let pool = Arc::new(Pool::new("team", 1_000_000.0, "p", 0.0));
    let plain = gateway(&up, None).await;
    let pooled = gateway(&up, Some(pool.clone())).await;
    let client = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
    // Warm both.
    round(&client, &plain, 400).await;
    round(&client, &pooled, 400).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        a.push(round(&client, &plain, n).await);
        b.push(round(&client, &pooled, n).await);
    }
    let (a, b) = (median(a), median(b));
    let ratio = b / a;
    let books = pool.books();
    println!(
        "{n} requests × {runs} rounds from {AGENTS} executions at once: no budget {a:.1} µs/request, \
         namespace budget + own budget {b:.1} µs/request: ratio {ratio:.3} (target ≤ {TARGET}); \
         the pool metered ${:.4} over {} requests, ${:.4} still held",
        books.spent_usd,
        (runs * n + 400) as u64,
        books.reserved_usd
    );
    if ratio > TARGET || books.reserved_usd != 0.0 {
        eprintln!("a target was missed");
        std::process::exit(1);
    }
}
