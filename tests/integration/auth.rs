//! Authentication and roles on HTTP and WebSockets: every route needs a token with the right
//! role, agent tokens act only as their agents, tokens are revoked and expire, the control
//! plane refuses to start with no way in, and WebSockets check token and origin.

use std::process::Stdio;
use std::time::Duration;

use omoi::domain::access::{ROUTES, Rule};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::cluster::Cluster;
use crate::env::{TestEnv, eventually};
use crate::http::Http;

/// A route's path with its parameters filled in.
fn concrete(path: &str) -> String {
    format!(
        "/api/v1{}",
        path.replace("{id}", &uuid::Uuid::now_v7().to_string())
            .replace("{name}", "res")
    )
}

/// Raw request: status line and headers (lower-cased) of the answer.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

async fn create_token(http: &Http, name: &str, role: &str, agents: &[&str]) -> String {
    let (status, body) = http
        .post(
            "/api/v1/tokens",
            &json!({"name": name, "role": role, "agents": agents}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn every_route_but_the_openapi_document_needs_a_token_and_says_so_in_json() {
    let c = Cluster::start().await;
    let addr = c.http_addr.unwrap();
    let anonymous = Http::new(addr);
    let forged = Http::with_token(addr, "omoi_not-a-real-token-at-all-0000000000");
    for (method, path, rule) in ROUTES {
        if *rule == Rule::Public {
            continue;
        }
        let url = if path.starts_with("/metrics") {
            path.to_string()
        } else {
            concrete(path)
        };
        for client in [&anonymous, &forged] {
            let (status, body) = match *method {
                "GET" => client.get(&url).await,
                "DELETE" => client.delete(&url).await,
                "PATCH" => client.patch(&url, &json!({})).await,
                _ => client.post(&url, &json!({})).await,
            };
            assert_eq!(status, 401, "{method} {url}: {body}");
            assert_eq!(body["error"]["code"], "unauthorized", "{method} {url}");
        }
    }
    let head = raw(
        addr,
        "GET /api/v1/agents HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    // Probes and the API's description stay open.
    for open in ["/healthz", "/readyz", "/api/v1/openapi.json"] {
        let (status, _) = anonymous.get_text(open).await;
        assert_eq!(status, 200, "{open}");
    }
    c.stop().await;
}

#[tokio::test]
async fn each_role_gets_exactly_its_permissions() {
    let c = Cluster::start_with(crate::cluster::patient).await;
    let admin = c.http();
    let addr = c.http_addr.unwrap();
    let viewer = Http::with_token(addr, &create_token(&admin, "v", "viewer", &[]).await);
    let operator = Http::with_token(addr, &create_token(&admin, "o", "operator", &[]).await);
    let alice = Http::with_token(addr, &create_token(&admin, "a", "agent", &["alice"]).await);
    // Only admins manage tokens.
    for other in [&viewer, &operator, &alice] {
        let (status, _) = other
            .post("/api/v1/tokens", &json!({"name": "x", "role": "admin"}))
            .await;
        assert_eq!(status, 403);
    }
    let (status, _) = viewer.get_text("/metrics").await;
    assert_eq!(status, 200, "viewers read metrics");
    let (status, _) = alice.get_text("/metrics").await;
    assert_eq!(status, 403);

    // Agents: alice's token registers alice, not bob.
    let (status, a) = alice
        .post(
            "/api/v1/agents/register",
            &json!({"name": "alice", "capabilities": ["x"]}),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    let (status, _) = alice
        .post(
            "/api/v1/agents/register",
            &json!({"name": "bob", "capabilities": ["x"]}),
        )
        .await;
    assert_eq!(status, 403);
    let (_, b) = admin
        .post(
            "/api/v1/agents/register",
            &json!({"name": "bob", "capabilities": ["x"]}),
        )
        .await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_eq!(
        alice
            .post_raw(&format!("/api/v1/agents/{a}/heartbeat"), "")
            .await
            .0,
        200
    );
    for (method, path, body) in [
        ("POST", format!("/api/v1/agents/{b}/heartbeat"), json!({})),
        (
            "PATCH",
            format!("/api/v1/agents/{b}"),
            json!({"status": "maintenance"}),
        ),
        (
            "POST",
            format!("/api/v1/agents/{b}/availability"),
            json!({"available": false}),
        ),
        ("DELETE", format!("/api/v1/agents/{b}"), json!(null)),
    ] {
        let (status, reply) = match method {
            "PATCH" => alice.patch(&path, &body).await,
            "DELETE" => alice.delete(&path).await,
            _ => alice.post(&path, &body).await,
        };
        assert_eq!(status, 403, "{method} {path}: {reply}");
    }
    // Registry reads are open to every role.
    assert_eq!(alice.get("/api/v1/agents").await.0, 200);
    // Collaboration as itself only.
    let (status, thread) = alice
        .post(
            "/api/v1/collaboration/threads",
            &json!({"thread_type": "discussion", "participants": [a, b]}),
        )
        .await;
    assert_eq!(status, 201, "{thread}");
    let thread = thread["id"].as_str().unwrap();
    let (status, _) = alice
        .post(
            "/api/v1/collaboration/messages",
            &json!({"thread_id": thread, "sender_id": a, "content": "hi"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = alice
        .post(
            "/api/v1/collaboration/messages",
            &json!({"thread_id": thread, "sender_id": b, "content": "forged"}),
        )
        .await;
    assert_eq!(status, 403, "sending as bob");
    assert_eq!(
        alice
            .get(&format!("/api/v1/collaboration/threads?agent_id={b}"))
            .await
            .0,
        403,
        "reading bob's threads"
    );
    assert_eq!(alice.get("/api/v1/collaboration/threads").await.0, 400);
    assert_eq!(
        alice
            .get(&format!("/api/v1/collaboration/threads?agent_id={a}"))
            .await
            .0,
        200
    );
    // A handoff meant for bob cannot be accepted by alice's token naming bob.
    let wf = c
        .submit(json!({"name": "h", "tasks": [{"key": "t", "capabilities": ["x"]}]}))
        .await;
    let (status, h) = admin
        .post(
            "/api/v1/collaboration/handoff/request",
            &json!({"task_id": wf.tasks["t"], "from_agent_id": a, "to_agent_id": b, "reason": "r"}),
        )
        .await;
    assert_eq!(status, 201, "{h}");
    let (status, _) = alice
        .post(
            &format!(
                "/api/v1/collaboration/handoff/{}/accept",
                h["id"].as_str().unwrap()
            ),
            &json!({"agent_id": b}),
        )
        .await;
    assert_eq!(status, 403);
    // Workflows: operators write, viewers read, agents neither.
    let spec = json!({"name": "w", "tasks": [{"key": "a"}]});
    assert_eq!(viewer.post("/api/v1/workflows", &spec).await.0, 403);
    assert_eq!(alice.post("/api/v1/workflows", &spec).await.0, 403);
    assert_eq!(alice.get("/api/v1/workflows").await.0, 403);
    let (status, made) = operator.post("/api/v1/workflows", &spec).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(viewer.get("/api/v1/workflows").await.0, 200);
    assert_eq!(viewer.delete("/api/v1/locks/res").await.0, 403);
    assert_eq!(
        operator.delete("/api/v1/locks/res").await.0,
        404,
        "not held"
    );
    // Operators do not manage agents.
    assert_eq!(operator.delete(&format!("/api/v1/agents/{b}")).await.0, 403);
    c.stop().await;
}

#[tokio::test]
async fn a_revoked_or_expired_token_stops_working() {
    let c = Cluster::start().await;
    let admin = c.http();
    let addr = c.http_addr.unwrap();
    let token = create_token(&admin, "short", "viewer", &[]).await;
    let viewer = Http::with_token(addr, &token);
    assert_eq!(viewer.get("/api/v1/workflows").await.0, 200);
    let (status, _) = admin.delete("/api/v1/tokens/short").await;
    assert_eq!(status, 200);
    assert_eq!(
        viewer.get("/api/v1/workflows").await.0,
        401,
        "revoked: at once here"
    );
    let (_, body) = admin
        .post(
            "/api/v1/tokens",
            &json!({"name": "brief", "role": "viewer", "expires_in_seconds": 1}),
        )
        .await;
    let brief = Http::with_token(addr, body["token"].as_str().unwrap());
    eventually(Duration::from_secs(20), "the token expires", || async {
        (brief.get("/api/v1/workflows").await.0 == 401).then_some(())
    })
    .await;
    // The list shows tokens, never their values.
    let (_, list) = admin.get("/api/v1/tokens").await;
    assert!(!list.to_string().contains(&token));
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "short" && !t["revoked_at"].is_null())
    );
    c.stop().await;
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test]
async fn a_coordinator_with_no_token_refuses_to_start_unless_bootstrapped_or_told_to_run_open() {
    let env = TestEnv::new().await;
    let out = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .arg("coordinator")
        .envs(env.child_env())
        .env_remove("OMOI_BOOTSTRAP_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("omoi token create") && stderr.contains("OMOI_HTTP_AUTH=open"),
        "{stderr}"
    );
    // Bootstrapped from the environment: the token works and nothing else does.
    for (extra, token) in [
        (vec![], Some(env.admin_token.clone())),
        (vec![("OMOI_HTTP_AUTH", "open")], None),
    ] {
        let addr = free_addr();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_omoi"));
        cmd.arg("coordinator")
            .envs(env.child_env())
            .env("OMOI_HTTP_ADDR", &addr)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if token.is_none() {
            cmd.env_remove("OMOI_BOOTSTRAP_ADMIN_TOKEN");
        }
        for (k, v) in &extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let sock: std::net::SocketAddr = addr.parse().unwrap();
        let http = match &token {
            Some(t) => Http::with_token(sock, t),
            None => Http::new(sock),
        };
        eventually(
            Duration::from_secs(30),
            "the coordinator answers",
            || async { (http.get("/api/v1/agents").await.0 == 200).then_some(()) },
        )
        .await;
        if token.is_some() {
            assert_eq!(Http::new(sock).get("/api/v1/agents").await.0, 401);
        }
        let _ = child.kill().await;
    }
}

#[tokio::test]
async fn the_token_command_creates_lists_and_revokes() {
    let c = Cluster::start().await;
    let omoi = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_omoi"));
        cmd.args(args).envs(c.env.child_env());
        cmd
    };
    let out = omoi(&[
        "token",
        "create",
        "--name",
        "ci",
        "--role",
        "operator",
        "--expires-in",
        "1d",
    ])
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("omoi_"), "{token}");
    let ci = Http::with_token(c.http_addr.unwrap(), &token);
    assert_eq!(
        ci.post(
            "/api/v1/workflows",
            &json!({"name": "w", "tasks": [{"key": "a"}]})
        )
        .await
        .0,
        201
    );
    let out = omoi(&["token", "list"]).output().await.unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("\tci\toperator\t"), "{listed}");
    assert!(!listed.contains(&token));
    let out = omoi(&["token", "create", "--name", "bad", "--role", "agent"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "an agent token names its agents");
    let out = omoi(&["token", "revoke", "ci"]).output().await.unwrap();
    assert!(out.status.success());
    // Revoked in another process: every control plane drops it within the cache time.
    eventually(
        Duration::from_secs(15),
        "the revoked token refused",
        || async { (ci.get("/api/v1/workflows").await.0 == 401).then_some(()) },
    )
    .await;
    c.stop().await;
}

/// A WebSocket handshake with `headers`: the status line of the answer, and its
/// `Sec-WebSocket-Protocol` if any.
async fn ws_handshake(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>) {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut protocol = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("sec-websocket-protocol") {
                protocol = Some(v.trim().to_string());
            }
        }
    }
    (code, protocol)
}

#[tokio::test]
async fn websockets_check_the_token_and_the_pages_origin() {
    let c =
        Cluster::start_with(|s| s.http_allowed_origins = "https://dash.example.com".into()).await;
    let addr = c.http_addr.unwrap();
    let path = "/api/v1/ws/events";
    assert_eq!(ws_handshake(addr, path, &[]).await.0, 401);
    let bearer = format!("Bearer {}", c.env.admin_token);
    assert_eq!(
        ws_handshake(addr, path, &[("Authorization", &bearer)])
            .await
            .0,
        101
    );
    // Browsers: the token as a subprotocol; the server selects omoi.v1.
    let offered = format!("omoi.v1, omoi.token.{}", c.env.admin_token);
    let (code, protocol) = ws_handshake(addr, path, &[("Sec-WebSocket-Protocol", &offered)]).await;
    assert_eq!((code, protocol.as_deref()), (101, Some("omoi.v1")));
    // A page of another origin may not read the stream, even with a token.
    let (code, _) = ws_handshake(
        addr,
        path,
        &[
            ("Sec-WebSocket-Protocol", &offered),
            ("Origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(code, 403);
    let (code, _) = ws_handshake(
        addr,
        path,
        &[
            ("Sec-WebSocket-Protocol", &offered),
            ("Origin", "https://dash.example.com"),
        ],
    )
    .await;
    assert_eq!(code, 101);
    let own = format!("http://{addr}");
    let (code, _) = ws_handshake(addr, path, &[("Authorization", &bearer), ("Origin", &own)]).await;
    assert_eq!(code, 101, "the control plane's own pages");
    // An agent token opens only its own agent's collaboration stream.
    let admin = c.http();
    let alice = create_token(&admin, "alice", "agent", &["alice"]).await;
    let (_, a) = admin
        .post(
            "/api/v1/agents/register",
            &json!({"name": "alice", "capabilities": ["x"]}),
        )
        .await;
    let (_, b) = admin
        .post(
            "/api/v1/agents/register",
            &json!({"name": "bob", "capabilities": ["x"]}),
        )
        .await;
    let alice_bearer = format!("Bearer {alice}");
    let collab = |id: &Value| {
        format!(
            "/api/v1/collaboration/ws?agent_id={}",
            id["id"].as_str().unwrap()
        )
    };
    assert_eq!(
        ws_handshake(addr, &collab(&a), &[("Authorization", &alice_bearer)])
            .await
            .0,
        101
    );
    assert_eq!(
        ws_handshake(addr, &collab(&b), &[("Authorization", &alice_bearer)])
            .await
            .0,
        403
    );
    assert_eq!(
        ws_handshake(addr, path, &[("Authorization", &alice_bearer)])
            .await
            .0,
        403
    );
    c.stop().await;
}

#[tokio::test]
async fn omoi_dev_prints_an_admin_token_that_works() {
    let env = TestEnv::new().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args(["dev", "--workers", "1"])
        .envs(env.child_env())
        .env_remove("OMOI_BOOTSTRAP_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut addr, mut token) = (None, None);
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("control plane on http://").nth(1) {
                addr = rest.split_whitespace().next().map(str::to_string);
            }
            if let Some(t) = line.trim().strip_prefix("export OMOI_TOKEN=") {
                token = Some(t.to_string());
            }
            if addr.is_some() && token.is_some() {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "omoi dev printed its address and a token");
    let sock: std::net::SocketAddr = addr.unwrap().parse().unwrap();
    let token = token.unwrap();
    assert_eq!(
        Http::with_token(sock, &token).get("/api/v1/agents").await.0,
        200
    );
    assert_eq!(Http::new(sock).get("/api/v1/agents").await.0, 401);
    let _ = child.kill().await;
}

#[tokio::test]
async fn a_revoked_bootstrap_token_stays_revoked_after_a_restart() {
    let env = TestEnv::new().await;
    let settings = env.settings();
    let first = omoi::runtime::Shutdown::new();
    let running = omoi::coordinator::start(&settings, &first).await.unwrap();
    let admin = Http::with_token(running.http_addr, &env.admin_token);
    assert_eq!(admin.get("/api/v1/agents").await.0, 200);
    // Another admin first, so the control plane can still be used.
    create_token(&admin, "second", "admin", &[]).await;
    assert_eq!(admin.delete("/api/v1/tokens/bootstrap").await.0, 200);
    first.drain(Duration::from_secs(5)).await;
    let again = omoi::runtime::Shutdown::new();
    let running = omoi::coordinator::start(&settings, &again).await.unwrap();
    let same = Http::with_token(running.http_addr, &env.admin_token);
    assert_eq!(
        same.get("/api/v1/agents").await.0,
        401,
        "a revoked secret came back"
    );
    again.drain(Duration::from_secs(5)).await;
}
