//! Benchmark for issue 26: the egress proxy's cost per connection. An agent's tool opens a
//! connection, sends one small HTTP request and reads the answer, again and again: directly to
//! a loopback origin (the baseline), and through the egress proxy with `CONNECT` (what curl,
//! npm and pip do for https). Both sides run in this process, sequentially, so the machine's
//! speed cancels out; the figure is the ratio of the medians.
//!
//! Then bulk: 64 MiB through one tunnelled connection against the same read directly.
//!
//! Run: `cargo bench --bench egress` (BENCH_CONNECTIONS=N per round, default 2,000; BENCH_RUNS=N
//! rounds, default 5). Exits 1 when a target is missed: per connection ≤ 3.5× the direct cost
//! (the proxy adds a connection and a round trip of its own, the CONNECT, to a request that on
//! loopback costs ~100 µs), bulk ≤ 3.0× (every byte crosses user space twice more; the direct
//! loopback read runs at ~3 GB/s, far beyond any registry an agent downloads from).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentops::gateway::egress::{CidrRule, EgressPolicy, EgressProxy, HostRule};
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONNECTION_TARGET: f64 = 3.5;
const BULK_TARGET: f64 = 3.0;
const BULK_BYTES: usize = 64 * 1024 * 1024;

/// An origin answering each connection's one request with a short body, or `BULK_BYTES` when
/// the path is `/bulk`.
async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                if head.starts_with(b"GET /bulk ") {
                    let _ = s
                        .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {BULK_BYTES}\r\n\r\n").as_bytes())
                        .await;
                    let chunk = vec![7u8; 1024 * 1024];
                    for _ in 0..BULK_BYTES / chunk.len() {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// One connection: optionally a CONNECT through `proxy`, then `GET path`, read to the end.
/// Returns the bytes of the answer.
async fn one(origin: SocketAddr, proxy: Option<(SocketAddr, &str)>, path: &str) -> usize {
    let mut s = match proxy {
        None => TcpStream::connect(origin).await.unwrap(),
        Some((p, auth)) => {
            let mut s = TcpStream::connect(p).await.unwrap();
            s.set_nodelay(true).unwrap();
            let req = format!(
                "CONNECT origin.bench:{0} HTTP/1.1\r\nHost: origin.bench:{0}\r\nProxy-Authorization: Basic {auth}\r\n\r\n",
                origin.port()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(s.read(&mut b).await.unwrap(), 1, "the proxy hung up");
                head.push(b[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
            s
        }
    };
    s.set_nodelay(true).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: origin.bench\r\n\r\n").as_bytes()).await.unwrap();
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return total;
        }
        total += n;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (n, runs) = (env("BENCH_CONNECTIONS", 2_000), env("BENCH_RUNS", 5));
    let origin = origin().await;
    let resolver: agentops::gateway::egress::Resolver =
        std::sync::Arc::new(move |_, port| Box::pin(async move { Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]) }));
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver, Duration::from_secs(60)).await.unwrap();
    proxy.open(
        "bench-token",
        EgressPolicy {
            hosts: vec![HostRule::parse(&format!("origin.bench:{}", origin.port())).unwrap()],
            cidrs: vec![CidrRule::parse("127.0.0.1/32", vec![origin.port()]).unwrap()],
        },
    );
    let auth = base64::engine::general_purpose::STANDARD.encode("agent:bench-token");
    let via = Some((proxy.addr, auth.as_str()));
    println!("{n} connections per round, {runs} rounds (medians)\n");
    // Warm-up.
    for _ in 0..50 {
        one(origin, None, "/").await;
        one(origin, via, "/").await;
    }
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        for _ in 0..n {
            assert_eq!(one(origin, None, "/").await, 43);
        }
        direct.push(t.elapsed().as_secs_f64() / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            assert_eq!(one(origin, via, "/").await, 43);
        }
        proxied.push(t.elapsed().as_secs_f64() / n as f64);
    }
    let (d, p) = (median(direct), median(proxied));
    println!("per connection: direct {:.1} µs, through the proxy {:.1} µs, ratio {:.2}", d * 1e6, p * 1e6, p / d);
    let (mut bd, mut bp) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        assert!(one(origin, None, "/bulk").await > BULK_BYTES);
        bd.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        assert!(one(origin, via, "/bulk").await > BULK_BYTES);
        bp.push(t.elapsed().as_secs_f64());
    }
    let (bd, bp) = (median(bd), median(bp));
    let mib = BULK_BYTES as f64 / (1024.0 * 1024.0);
    println!(
        "64 MiB on one connection: direct {:.0} MiB/s, through the proxy {:.0} MiB/s, time ratio {:.2}",
        mib / bd,
        mib / bp,
        bp / bd
    );
    let t = proxy.tally("bench-token").unwrap();
    println!("the proxy counted {} connections, {} refused, {} bytes in", t.connections, t.refused, t.bytes_in);
    let mut missed = Vec::new();
    if p / d > CONNECTION_TARGET {
        missed.push(format!("per connection {:.2} > {CONNECTION_TARGET}", p / d));
    }
    if bp / bd > BULK_TARGET {
        missed.push(format!("bulk {:.2} > {BULK_TARGET}", bp / bd));
    }
    if !missed.is_empty() {
        eprintln!("targets missed: {}", missed.join("; "));
        std::process::exit(1);
    }
}
