//! The egress proxy (`gateway::egress`) driven by curl, as an agent's tools would use it: a host
//! the execution allows is reached, through CONNECT and as a plain HTTP request; another host,
//! the cloud metadata address, a name that resolves to a private address, a missing or wrong
//! token, and a retired one are refused, and every attempt is counted.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use agentops::gateway::egress::{CidrRule, EgressPolicy, EgressProxy, HostRule, Resolver};

/// Names of this test's own: `allowed.test` and `internal.test` resolve to loopback and a
/// private address; anything else does not resolve.
fn resolver() -> Resolver {
    std::sync::Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            // The controller's proxy asks for names fully qualified (`allowed.test.`).
            match host.trim_end_matches('.') {
                "allowed.test" | "other.test" => Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]),
                "internal.test" => Ok(vec![SocketAddr::from(([10, 0, 0, 5], port))]),
                _ => Err(std::io::Error::other("no such host")),
            }
        })
    })
}

/// A loopback HTTP server answering "hello from <path>".
async fn origin() -> u16 {
    let app = axum::Router::new().fallback(|uri: axum::http::Uri| async move { format!("hello from {}", uri.path()) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// curl through the proxy; returns (HTTP code of the last response, body, stderr).
async fn curl(proxy: &str, extra: &[&str], url: &str) -> (String, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "-x", proxy])
        .args(extra)
        .arg(url)
        .env_clear()
        .output()
        .await
        .expect("curl (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_only_what_the_execution_allows_and_every_attempt_is_counted() {
    let port = origin().await;
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(), Duration::from_secs(30)).await.unwrap();
    let policy = EgressPolicy {
        hosts: ["allowed.test", "internal.test", "169.254.169.254:80", "nowhere.test"]
            .iter()
            .map(|h| {
                HostRule::parse(&format!("{h}{}", if h.contains(':') { String::new() } else { format!(":{port}") }))
                    .unwrap()
            })
            .collect(),
        // Loopback is where the test's origin listens: allowed by a CIDR rule, on its port only.
        cidrs: vec![CidrRule::parse("127.0.0.1/32", vec![port]).unwrap()],
    };
    proxy.open("tok-a", policy);
    let with = |token: &str| format!("http://agent:{token}@{}", proxy.addr);

    // Allowed: CONNECT (curl's -p tunnels through the proxy) and a plain absolute-form request.
    let (code, body, err) = curl(&with("tok-a"), &["-p"], &format!("http://allowed.test:{port}/tunnel")).await;
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from /tunnel"), "{err}");
    let (code, body, err) = curl(&with("tok-a"), &[], &format!("http://allowed.test:{port}/plain?q=1")).await;
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from /plain"), "{err}");

    // Refused, with the proxy's reason.
    let cases = [
        (format!("http://other.test:{port}/"), "other.test:", "is not in the execution's egress.hosts"),
        (format!("http://allowed.test:{}/", port + 1), "allowed.test:", "is not in the execution's egress.hosts"),
        ("http://169.254.169.254/latest/meta-data/".to_string(), "169.254.169.254", "not a public address"),
        (format!("http://internal.test:{port}/"), "internal.test resolves to 10.0.0.5", "not a public address"),
        (format!("http://nowhere.test:{port}/"), "nowhere.test does not resolve", ""),
    ];
    for (url, said, why) in &cases {
        for tunnel in [true, false] {
            let extra: &[&str] = if tunnel { &["-p"] } else { &[] };
            let (code, body, err) = curl(&with("tok-a"), extra, url).await;
            if tunnel {
                // curl reports the CONNECT refusal on stderr, with the proxy's status.
                assert!(err.contains("403") || code == "403", "{url}: {code} {body} {err}");
            } else {
                assert_eq!(code, "403", "{url}: {body} {err}");
                assert!(body.contains(said) && body.contains(why), "{url}: {body}");
            }
        }
    }

    // No token, a wrong one: 407, counted nowhere.
    let (code, body, _) = curl(&format!("http://{}", proxy.addr), &[], &format!("http://allowed.test:{port}/")).await;
    assert_eq!(code, "407", "{body}");
    let (code, _, _) = curl(&with("guess"), &[], &format!("http://allowed.test:{port}/")).await;
    assert_eq!(code, "407");

    let t = proxy.tally("tok-a").unwrap();
    assert_eq!((t.connections, t.refused), (2, 10), "{t:#?}");
    assert!(t.bytes_in > 0 && t.bytes_out > 0, "{t:#?}");
    assert!(t.recent.iter().filter(|c| c.refused.is_none()).all(|c| c.host == "allowed.test" && c.port == port));

    // Retired: the run is over, the token is refused.
    let ended = proxy.close("tok-a").unwrap();
    assert_eq!(ended.connections, 2);
    let (code, _, _) = curl(&with("tok-a"), &[], &format!("http://allowed.test:{port}/")).await;
    assert_eq!(code, "407");
}

/// A tunnel to a host that never reads: the bytes the agent pushed are counted as they move
/// (not only when the connection ends), the connection counts while open, and closing the
/// execution's access cuts it. A refusal stays in the record however many connections follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tunnel_is_counted_live_and_cut_at_close_and_refusals_stay_recorded() {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stall_port = stall.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stall.accept().await {
            held.push(s);
        }
    });
    let port = origin().await;
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(), Duration::from_secs(60)).await.unwrap();
    let hosts = [format!("127.0.0.1:{stall_port}"), format!("127.0.0.1:{port}")];
    proxy.open(
        "tok",
        EgressPolicy { hosts: hosts.iter().map(|h| HostRule::parse(h).unwrap()).collect(), cidrs: vec![] },
    );
    let auth = base64::engine::general_purpose::STANDARD.encode("agent:tok");

    // One refusal, then 150 connections: the refusal is still there.
    let (code, _, _) = curl(&format!("http://agent:tok@{}", proxy.addr), &[], "http://refused.test/").await;
    assert_eq!(code, "403");
    for _ in 0..150 {
        let (code, _, _) =
            curl(&format!("http://agent:tok@{}", proxy.addr), &[], &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(code, "200");
    }
    let t = proxy.tally("tok").unwrap();
    assert_eq!((t.connections, t.refused, t.refusals.len(), t.recent.len()), (150, 1, 1, 100));
    assert_eq!(t.refusals[0].host, "refused.test");

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!("CONNECT 127.0.0.1:{stall_port} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let before = proxy.tally("tok").unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..64 {
            if s.write_all(&chunk).await.is_err() {
                return true;
            }
        }
        false
    });
    // Live: the bytes count while the host reads nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = proxy.tally("tok").unwrap();
        if t.bytes_out > before.bytes_out + 65_536 {
            assert_eq!(t.connections, 151, "the open tunnel counts");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no bytes counted while the tunnel is stuck: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = proxy.close("tok").unwrap();
    assert!(ended.bytes_out > before.bytes_out);
    let cut = tokio::time::timeout(Duration::from_secs(10), writer).await.expect("the tunnel was cut").unwrap();
    assert!(cut, "the agent's writes fail once the access is closed");
}

/// The controller's proxy connects from the controller's own pod: no rule may reach its
/// loopback (its unauthenticated metrics port, its other listeners) or a link-local address (the
/// node's metadata service, with the controller's cloud credentials), neither an address written
/// as the host nor a name that resolves there, not even with a CIDR rule naming it. Control: the
/// same rules on one machine's proxy (the user's own machine) reach the loopback origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_proxy_never_reaches_its_own_loopback_or_the_metadata_service() {
    use agentops::gateway::egress::EgressListener;
    let port = origin().await;
    let policy = || EgressPolicy {
        hosts: [format!("127.0.0.1:{port}"), format!("allowed.test:{port}"), "169.254.169.254:80".into()]
            .iter()
            .map(|h| HostRule::parse(h).unwrap())
            .collect(),
        cidrs: vec![
            CidrRule::parse("127.0.0.0/8", vec![]).unwrap(),
            CidrRule::parse("169.254.0.0/16", vec![]).unwrap(),
        ],
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let controllers = EgressProxy::serve_controllers(
        EgressListener { listener, resolver: resolver(), allow_local: false },
        Duration::from_secs(30),
    )
    .unwrap();
    let machines =
        EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(), Duration::from_secs(30)).await.unwrap();
    controllers.open("tok", policy());
    machines.open("tok", policy());
    for url in [format!("http://127.0.0.1:{port}/"), format!("http://allowed.test:{port}/")] {
        let (code, body, err) = curl(&format!("http://agent:tok@{}", machines.addr), &[], &url).await;
        assert_eq!((code.as_str(), body.as_str()), ("200", "hello from /"), "control, one machine: {url} {err}");
        let (code, body, _) = curl(&format!("http://agent:tok@{}", controllers.addr), &[], &url).await;
        assert_eq!(code, "403", "{url}: {body}");
        assert!(
            body.contains("(loopback or link-local): the controller's egress proxy never connects there"),
            "{body}"
        );
    }
    let (code, body, _) =
        curl(&format!("http://agent:tok@{}", controllers.addr), &[], "http://169.254.169.254/latest/meta-data/").await;
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("169.254.169.254 (loopback or link-local)"), "{body}");
    let t = controllers.tally("tok").unwrap();
    assert_eq!((t.connections, t.refused), (0, 3), "{t:#?}");
}
