//! A minimal HTTP/1.1 client for the tests (JSON in, status and JSON out).

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Http {
    addr: SocketAddr,
    token: Option<String>,
}

impl Http {
    /// A client that presents no token.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, token: None }
    }

    /// A client that presents `token` as a bearer token.
    pub fn with_token(addr: SocketAddr, token: &str) -> Self {
        Self {
            addr,
            token: Some(token.to_string()),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None).await
    }
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send("DELETE", path, None).await
    }
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send("POST", path, Some(body.to_string())).await
    }
    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send("PATCH", path, Some(body.to_string())).await
    }
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        self.send("POST", path, Some(body.to_string())).await
    }

    /// Status and body as text (for non-JSON endpoints such as /metrics).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        self.raw("GET", path, None).await
    }

    async fn send(&self, method: &str, path: &str, body: Option<String>) -> (u16, Value) {
        let (status, text) = self.raw(method, path, body).await;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    async fn raw(&self, method: &str, path: &str, body: Option<String>) -> (u16, String) {
        let Ok(mut stream) = tokio::net::TcpStream::connect(self.addr).await else {
            return (0, String::new());
        };
        let body = body.unwrap_or_default();
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // A server that refuses the connection or closes early answers nothing: status 0.
        if stream.write_all(request.as_bytes()).await.is_err() {
            return (0, String::new());
        }
        let mut response = Vec::new();
        if stream.read_to_end(&mut response).await.is_err() && response.is_empty() {
            return (0, String::new());
        }
        let text = String::from_utf8_lossy(&response).to_string();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        (status, body)
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}
