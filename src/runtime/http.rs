//! The HTTP server: an accept loop with a connection limit, HTTP/1.1 with a header-read timeout
//! (which also closes keep-alive connections idle longer than it), upgrades for WebSockets, and
//! graceful shutdown. Connections past the limit are closed at once rather than queued, so an
//! idle or slow flood cannot hold the server; the request-level limits (body size, in-flight
//! requests, time) are layers of the router. A first request line whose target hyper would
//! refuse with an empty 400 is answered here in the API's error format.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections served at once (upgraded WebSockets are counted by their own limit).
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and the longest a keep-alive connection
    /// may sit idle between requests.
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `token` is cancelled; then stops accepting, lets each open
/// connection finish its request, and returns when they are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    token: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("omoi_http_connections_refused_total").increment(1);
            tracing::debug!("connection limit reached; closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let token = token.clone();
        connections.spawn(async move {
            let mut stream = stream;
            if answered_unreadable_target(&mut stream, limits.header_timeout).await {
                drop(slot);
                return;
            }
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// A first request whose target hyper would refuse with an empty 400 — say `?types=task.>`,
/// a raw `>` being no URL character — is answered here in the API's error format, saying what
/// to encode. The request line is peeked, not read: anything else goes to hyper untouched (a
/// line that has not fully arrived yet too, and later requests of the connection). Returns
/// whether the connection is done with: answered, or silent for the whole header timeout.
async fn answered_unreadable_target(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut head = [0u8; 8192];
    let Ok(peeked) = tokio::time::timeout(wait, stream.peek(&mut head)).await else {
        // Nothing arrived within the header timeout: closed, as hyper would.
        return true;
    };
    let Ok(n) = peeked else { return false };
    let Some(end) = head[..n].windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let mut parts = head[..end].split(|b| *b == b' ');
    let (Some(_method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let readable = std::str::from_utf8(target)
        .map(|t| t.parse::<axum::http::Uri>().is_ok())
        .unwrap_or(false);
    if readable || !version.starts_with(b"HTTP/1.") {
        return false;
    }
    let reply = crate::protocol::ErrorReply {
        error: crate::protocol::ErrorBody {
            code: "malformed".into(),
            message: "the request target is not a valid URI: percent-encode what a URL may not \
                      hold raw, such as `>` (%3E), `<` (%3C), `\"` (%22), `{` (%7B), `}` (%7D) \
                      or a space (%20)"
                .into(),
            field: None,
        },
    };
    let body = serde_json::to_vec(&reply).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    use tokio::io::AsyncWriteExt;
    let written = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(wait, written).await;
    true
}
