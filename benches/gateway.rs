//! Benchmark for issue 18: the model gateway under an unauthenticated upload flood. 200
//! connections at once each announce a 32 MiB body with a wrong token and send it as fast as
//! the server takes it. The gateway (the controller's `Gateways` router with one open account)
//! runs in a process of its own (this binary again), so its peak RSS (VmHWM) is its own; the
//! baseline is the same process idle.
//!
//! Then issue 23's case: authenticated agents at their limits. Eight executions' agents each
//! send 16 bodies of 24 MiB at once (their in-flight limit) to an upstream that takes nothing,
//! so every admitted body stays in the gateway's memory. The budgets of bytes (48 MiB per
//! execution, 160 MiB in all) must keep the gateway's peak RSS under 384 MiB: three quarters of
//! the chart's 512 Mi limit, with the controller's own baseline on top. Exits non-zero when a
//! target is missed.
//!
//! Run: `cargo bench --bench gateway` (BENCH_CONNECTIONS=N, default 200).

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// In the child: the gateway router on 127.0.0.1, its port on stdout, until stdin closes.
async fn serve() {
    // The upstream: accepts connections and never reads (bodies stay in the gateway).
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", stall.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = stall.accept().await {
            held.push(sock);
        }
    });
    let g = std::sync::Arc::new(agentops::gateway::Gateways::new(&upstream).unwrap());
    g.open("ns", "run", agentops::gateway::Account::new("sk-ant-real", "the-token", Some(5.0)));
    for i in 0..AGENTS {
        g.open("ns", &format!("agent-{i}"), agentops::gateway::Account::new("sk-ant-real", &format!("tok-{i}"), None));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    let app = g.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await.ok();
}

/// One unauthenticated upload: headers, then up to 32 MiB of body until the server closes.
/// Returns the status the server answered (0: none) and the bytes it took.
fn upload(port: u16) -> (u16, u64) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return (0, 0) };
    let size: u64 = 32 << 20;
    let head = format!(
        "POST /gateway/ns/run/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: wrong\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n"
    );
    if s.write_all(head.as_bytes()).is_err() {
        return (0, 0);
    }
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0u64;
    while sent < size {
        match s.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n as u64,
        }
        // The answer may already be there: stop sending once it is.
        s.set_nonblocking(true).ok();
        let mut peek = [0u8; 12];
        let answered = matches!(s.peek(&mut peek), Ok(n) if n > 0);
        s.set_nonblocking(false).ok();
        if answered {
            break;
        }
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let status = String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, sent)
}

/// Executions whose agents upload at their limit.
const AGENTS: usize = 8;
/// Bodies each sends at once (its in-flight limit).
const BODIES: usize = 16;
/// Size of each body.
const BODY: usize = 24 << 20;
/// The gateway's peak RSS target with every agent at its limit.
const TARGET_MIB: f64 = 384.0;
/// The gateway's peak RSS target under the unauthenticated flood.
const FLOOD_TARGET_MIB: f64 = 128.0;

/// One authenticated upload of a `BODY`-byte request: the status answered within 20 s (0: none,
/// the body was taken and forwarded to the stalled upstream).
fn authenticated_upload(port: u16, agent: usize, body: std::sync::Arc<Vec<u8>>) -> u16 {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).ok();
    let head = format!(
        "POST /gateway/ns/agent-{agent}/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: tok-{agent}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() {
        return 0;
    }
    // A refusal closes the connection mid-body: the write fails, the answer is there.
    let _ = s.write_all(&body);
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn at_the_limit(port: u16, child: u32) -> bool {
    let before = vm_hwm_kib(child);
    let pad = "x".repeat(BODY - 200);
    let body = std::sync::Arc::new(
        format!("{{\"model\":\"claude-haiku-4-5\",\"max_tokens\":8,\"messages\":[{{\"role\":\"user\",\"content\":\"{pad}\"}}]}}")
            .into_bytes(),
    );
    let t = Instant::now();
    let uploads: Vec<_> = (0..AGENTS * BODIES)
        .map(|i| {
            let body = body.clone();
            std::thread::spawn(move || authenticated_upload(port, i % AGENTS, body))
        })
        .collect();
    let answers: Vec<u16> = uploads.into_iter().map(|h| h.join().unwrap()).collect();
    let peak = vm_hwm_kib(child);
    let refused = answers.iter().filter(|s| **s == 429).count();
    let taken = answers.iter().filter(|s| **s == 0).count();
    let mib = peak as f64 / 1024.0;
    println!(
        "{AGENTS} agents × {BODIES} authenticated {} MiB bodies at once ({:.0} MiB offered) to a stalled upstream: {taken} taken, {refused} refused (429) in {:.1} s",
        BODY >> 20,
        (AGENTS * BODIES * BODY) as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    println!(
        "gateway peak RSS: {mib:.1} MiB (before {:.1} MiB); target < {TARGET_MIB} MiB (the chart's limit is 512 Mi)",
        before as f64 / 1024.0
    );
    mib < TARGET_MIB
}

#[tokio::main]
async fn main() {
    if std::env::var("BENCH_CHILD").is_ok() {
        return serve().await;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; nothing to list.
    }
    let connections: usize = std::env::var("BENCH_CONNECTIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("BENCH_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let idle = vm_hwm_kib(child.id());

    let t = Instant::now();
    let uploads: Vec<_> = (0..connections).map(|_| std::thread::spawn(move || upload(port))).collect();
    let results: Vec<(u16, u64)> = uploads.into_iter().map(|h| h.join().unwrap()).collect();
    let secs = t.elapsed().as_secs_f64();
    let peak = vm_hwm_kib(child.id());

    let refused = results.iter().filter(|(s, _)| *s == 401).count();
    let sent: u64 = results.iter().map(|(_, b)| b).sum();
    println!(
        "{connections} unauthenticated 32 MiB uploads at once: {refused} answered 401 in {secs:.2} s; {:.1} MiB of body sent before the answers ({:.0} KiB each on average, out of 32 MiB)",
        sent as f64 / 1048576.0,
        sent as f64 / 1024.0 / connections as f64
    );
    println!(
        "gateway peak RSS: {:.1} MiB (idle {:.1} MiB; +{:.1} MiB under the flood)",
        peak as f64 / 1024.0,
        idle as f64 / 1024.0,
        (peak - idle) as f64 / 1024.0
    );
    let flood_ok = (peak as f64 / 1024.0) < FLOOD_TARGET_MIB;
    let limit_ok = at_the_limit(port, child.id());
    drop(child.stdin.take());
    let _ = child.wait();
    if !(flood_ok && limit_ok) {
        eprintln!("a target was missed");
        std::process::exit(1);
    }
}
