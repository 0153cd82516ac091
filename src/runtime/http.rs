//! The HTTP server: an accept loop with a connection limit, HTTP/1.1 with a header-read timeout
//! (which also closes keep-alive connections idle longer than it), upgrades for WebSockets, and
//! graceful shutdown. Connections past the limit are closed at once rather than queued, so an
//! idle or slow flood cannot hold the server; the request-level limits (body size, in-flight
//! requests, time) are layers of the router. A first request line whose target hyper would
//! refuse with an empty 400 is answered here in the API's error format, and so is any request
//! hyper cannot parse later on a connection ([`JsonParseErrors`]).

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
                .serve_connection(TokioIo::new(JsonParseErrors::new(stream)), service)
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
    let reply = error_response(
        "400 Bad Request",
        ErrorCode::Malformed,
        &format!("the request target is not a valid URI: {ENCODE_HINT}"),
    );
    use tokio::io::AsyncWriteExt;
    let written = async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(wait, written).await;
    true
}

/// What to do about characters a URL may not hold raw.
const ENCODE_HINT: &str = "percent-encode what a URL may not hold raw, such as `>` (%3E), \
                           `<` (%3C), `\"` (%22), `{` (%7B), `}` (%7D) or a space (%20)";

use crate::protocol::ErrorCode;

/// A whole HTTP/1.1 response closing the connection, with the API's error body.
fn error_response(status: &str, code: ErrorCode, message: &str) -> Vec<u8> {
    let reply = crate::protocol::ErrorReply {
        error: crate::protocol::ErrorBody {
            code,
            message: message.into(),
            field: None,
        },
    };
    let body = serde_json::to_vec(&reply).unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// The API's error response in place of hyper's automatic one — the empty 400, 414 or 431 it
/// writes, then closes, when it cannot parse a request — or `None` if `head` is not one. The
/// router never answers an error with an empty body, and JSON bodies never hold a raw CR LF, so
/// a whole `HTTP/1.1 4xx` head with `content-length: 0` can only be hyper's.
fn instead_of_automatic(head: &[u8]) -> Option<Vec<u8>> {
    if !head.starts_with(b"HTTP/1.1 4") || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let empty = text
        .lines()
        .any(|l| l.eq_ignore_ascii_case("content-length: 0"));
    if !empty {
        return None;
    }
    let status = text.lines().next()?.strip_prefix("HTTP/1.1 ")?;
    let (code, message) = match status.split(' ').next()? {
        "400" => (
            ErrorCode::Malformed,
            format!("the request could not be parsed (its line or a header): {ENCODE_HINT}"),
        ),
        "414" => (
            ErrorCode::TooLarge,
            "the request target is too long".to_string(),
        ),
        "431" => (
            ErrorCode::TooLarge,
            "the request's headers are too large".to_string(),
        ),
        _ => return None,
    };
    Some(error_response(status, code, &message))
}

/// A connection whose writes pass through, except hyper's automatic empty error response, which
/// is replaced by the API's JSON one ([`instead_of_automatic`]). Not vectored: hyper then
/// writes a response head in one buffer.
pub struct JsonParseErrors<S> {
    inner: S,
    /// The replacement still to be written.
    pending: Vec<u8>,
}

impl<S> JsonParseErrors<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Writes what is pending; ready when nothing is.
    fn poll_pending(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        while !self.pending.is_empty() {
            match std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = &mut *self;
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if let Some(replacement) = instead_of_automatic(buf) {
            // Taken whole; written now as far as the socket takes it, the rest on flush.
            this.pending = replacement;
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => std::pin::Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => std::pin::Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::instead_of_automatic;

    #[test]
    fn only_hypers_empty_error_heads_are_replaced() {
        let automatic = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 02:00:00 GMT\r\n\r\n";
        let json = instead_of_automatic(automatic).expect("replaced");
        let text = String::from_utf8(json).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(
            text.contains("\"code\":\"malformed\"") && text.contains("%3E"),
            "{text}"
        );
        let too_long = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n";
        assert!(instead_of_automatic(too_long).is_some());
        // The router's own responses, and body bytes, pass through.
        for other in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 80\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"[..],
            &b"{\"error\": {}}"[..],
        ] {
            assert!(
                instead_of_automatic(other).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
