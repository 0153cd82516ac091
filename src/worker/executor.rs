//! Executors run a task's work. A failure is data ([`TaskFailure`]), never a worker crash.
//! A worker offers only the executors its policy enables (policy.rs); every one reads at most
//! [`MAX_OUTPUT_BYTES`] of output and runs under the task's timeout (or `executor_timeout_ms`).
//!
//! | executor | input | output |
//! |---|---|---|
//! | `echo` | anything | `{"input": …, "agent": "<name>"}`, plus `"dependencies": {…}` when the input has `"echo_dependencies": true` |
//! | `sleep` | `{"ms": 250, "fail": false, "output": …}` | `output` if given, else `{"slept_ms": 250}` |
//! | `shell` | `{"command": "…"}` run by `sh -c` under `omoi exec-guard` (guard.rs: its processes die with the task and with the worker), with the worker's environment less its `OMOI_*` settings, plus `OMOI_TASK_ID`, `OMOI_TASK_KEY`, `OMOI_ATTEMPT`, `OMOI_AGENT`, `OMOI_LOCK_TOKENS` set; stdin is `{"input", "dependencies", "task_id", "attempt", "lock_tokens"}` as JSON | stdout parsed as JSON, else `{"stdout": "…"}`; non-zero exit fails with the exit code and stderr |
//! | `http` | `{"url": "http://…"}`: POSTs `{"input", "dependencies", "task_id", "attempt", "lock_tokens"}` as JSON, only to addresses `http_executor_allow` permits (policy.rs) | the response body as JSON (or text); a non-2xx status fails |
//! | `sim` | `{"latency": "uniform:20..200", "fail_rate": 0.1, "seed": 7, "outputs": […], "output": …, "run": 2, "index": 0, "input": …}` (all optional): simulated work for `omoi simulate`; latency and failure are drawn from the seed, task key and attempt | `outputs[index]` or `outputs[run-1]` (the last one past the end), else `output`, else `{"input": …, "simulated_ms": …}` |
//!
//! A task asks to be handed to another agent by returning [`TaskFailure::handoff`]: a `shell`
//! command by exiting with [`SHELL_HANDOFF_EXIT`] and printing `{"handoff": {…}}`; the worker then
//! requests the handoff and gives the task up.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What an executor gets.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub task_id: crate::domain::TaskId,
    pub key: String,
    pub attempt: i32,
    pub agent_name: String,
    pub input: Value,
    pub dependencies: BTreeMap<String, Value>,
    /// Fencing tokens of the resource locks held for this attempt (name → KV revision).
    pub lock_tokens: BTreeMap<String, u64>,
}

/// Why an attempt did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct TaskFailure {
    pub message: String,
    pub exit_code: Option<i32>,
    /// The executor asks to hand the task to another agent instead of failing it.
    pub handoff: Option<HandoffAsk>,
}

/// An executor's request to hand its task over (e.g. "needs capability X I don't have").
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HandoffAsk {
    /// Offer it to agents with every one of these (an open handoff)…
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// …or to this agent.
    #[serde(default)]
    pub to_agent_id: Option<crate::domain::AgentId>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub context: Option<Value>,
}

impl TaskFailure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: None,
            handoff: None,
        }
    }

    /// Asks for a handoff instead of failing.
    pub fn handoff(ask: HandoffAsk) -> Self {
        Self {
            message: format!("asks for a handoff: {}", ask.reason),
            exit_code: None,
            handoff: Some(ask),
        }
    }
}

/// Exit code with which a `shell` task asks for a handoff (`EX_TEMPFAIL`); its stdout must be
/// `{"handoff": {"capabilities"?, "to_agent_id"?, "reason", "context"?}}`.
pub const SHELL_HANDOFF_EXIT: i32 = 75;

/// Runs tasks of one kind.
pub trait Executor: Send + Sync {
    fn run(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskFailure>>;
}

/// The executors a worker offers, by name.
#[derive(Clone, Default)]
pub struct Executors {
    by_name: BTreeMap<String, Arc<dyn Executor>>,
}

impl Executors {
    /// The builtin executors named in `enabled` (of [`super::policy::BUILTIN_EXECUTORS`]), the
    /// `http` one connecting only where `http_allow` permits.
    pub fn builtin(enabled: &[String], http_allow: super::policy::HttpAllow) -> Self {
        let mut e = Self::default();
        for name in enabled {
            let executor: Arc<dyn Executor> = match name.as_str() {
                "echo" => Arc::new(Echo),
                "sleep" => Arc::new(Sleep),
                "shell" => Arc::new(Shell),
                "http" => Arc::new(Http {
                    allow: http_allow.clone(),
                }),
                "sim" => Arc::new(Sim),
                _ => continue,
            };
            e.register(name, executor);
        }
        e
    }

    /// What `settings` enable (`worker_executors`, `http_executor_allow`).
    pub fn from_settings(settings: &crate::config::Settings) -> Result<Self, String> {
        let enabled = super::policy::parse_executors(&settings.worker_executors)?;
        let allow = super::policy::HttpAllow::parse(&settings.http_executor_allow)?;
        Ok(Self::builtin(&enabled, allow))
    }

    /// The names offered, sorted: what the worker registers its agents with.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn register(&mut self, name: &str, executor: Arc<dyn Executor>) {
        self.by_name.insert(name.to_string(), executor);
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Executor>> {
        self.by_name.get(name).cloned()
    }
}

fn payload(ctx: &TaskContext) -> Value {
    json!({"input": ctx.input, "dependencies": ctx.dependencies, "task_id": ctx.task_id,
           "attempt": ctx.attempt, "lock_tokens": ctx.lock_tokens})
}

struct Echo;
impl Executor for Echo {
    fn run(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskFailure>> {
        Box::pin(async move {
            // Dependencies are echoed only on request: echoing them always would nest every
            // ancestor's output along a chain.
            let mut out = json!({"input": ctx.input, "agent": ctx.agent_name});
            if ctx.input.get("echo_dependencies").and_then(Value::as_bool) == Some(true) {
                out["dependencies"] = json!(ctx.dependencies);
            }
            Ok(out)
        })
    }
}

struct Sleep;
impl Executor for Sleep {
    fn run(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskFailure>> {
        Box::pin(async move {
            let ms = ctx.input.get("ms").and_then(Value::as_u64).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if ctx
                .input
                .get("fail")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                return Err(TaskFailure::new(
                    "failed as asked (sleep executor, fail=true)",
                ));
            }
            Ok(ctx
                .input
                .get("output")
                .cloned()
                .unwrap_or_else(|| json!({"slept_ms": ms})))
        })
    }
}

/// Simulated work (`omoi simulate`): repeatable for a seed, whichever agent runs it.
struct Sim;
impl Executor for Sim {
    fn run(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskFailure>> {
        Box::pin(async move {
            let input = &ctx.input;
            let seed = input.get("seed").and_then(Value::as_u64).unwrap_or(0);
            let mut rng = crate::sim::latency::rng_for(seed, &ctx.key, ctx.attempt);
            let latency = match input.get("latency") {
                None => crate::sim::latency::Latency::Fixed(0.0),
                Some(Value::Number(n)) => {
                    crate::sim::latency::Latency::Fixed(n.as_f64().unwrap_or(0.0))
                }
                Some(Value::String(s)) => s
                    .parse()
                    .map_err(|e| TaskFailure::new(format!("sim executor: latency: {e}")))?,
                Some(other) => {
                    return Err(TaskFailure::new(format!(
                        "sim executor: latency must be a number or a distribution, got {other}"
                    )));
                }
            };
            let ms = latency.sample(&mut rng);
            let fail_rate = input
                .get("fail_rate")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            let fails = fail_rate > 0.0 && rand::Rng::random_bool(&mut rng, fail_rate.min(1.0));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if fails {
                return Err(TaskFailure::new(format!(
                    "simulated failure (fail_rate {fail_rate}, attempt {})",
                    ctx.attempt
                )));
            }
            if let Some(Value::Array(outputs)) = input.get("outputs")
                && let Some(last) = outputs.last()
            {
                // A split child picks by its 0-based `index`; a loop body by its `run` (from 1).
                let index = match input.get("index").and_then(Value::as_u64) {
                    Some(i) => i as usize,
                    None => {
                        input.get("run").and_then(Value::as_u64).unwrap_or(1).max(1) as usize - 1
                    }
                };
                return Ok(outputs.get(index).unwrap_or(last).clone());
            }
            if let Some(output) = input.get("output") {
                return Ok(output.clone());
            }
            Ok(
                json!({"input": input.get("input").cloned().unwrap_or(Value::Null), "simulated_ms": ms}),
            )
        })
    }
}

struct Shell;
impl Executor for Shell {
    fn run(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskFailure>> {
        Box::pin(async move {
            let Some(command) = ctx
                .input
                .get("command")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return Err(TaskFailure::new(
                    "shell executor: input.command (a string) is required",
                ));
            };
            // The program runs under `omoi exec-guard` (guard.rs), in a process group that dies
            // when this future is dropped (timeout, cancel) or the worker dies, even by kill -9.
            let guard = std::env::current_exe()
                .map_err(|e| TaskFailure::new(format!("shell executor: own executable: {e}")))?;
            let lock_tokens = serde_json::to_string(&ctx.lock_tokens).unwrap_or_default();
            let mut program = tokio::process::Command::new(guard);
            // The worker's own settings (`OMOI_*`: its NATS credentials file, a bootstrap token
            // handed to every process of a deployment…) are not the task's business; the rest of
            // the environment (PATH, an agent's API keys) is passed on.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("OMOI_") {
                    program.env_remove(name);
                }
            }
            let mut child = program
                .args(["exec-guard", "--", "sh", "-c"])
                .arg(&command)
                .env("OMOI_TASK_ID", ctx.task_id.to_string())
                .env("OMOI_TASK_KEY", &ctx.key)
                .env("OMOI_ATTEMPT", ctx.attempt.to_string())
                .env("OMOI_AGENT", &ctx.agent_name)
                .env("OMOI_LOCK_TOKENS", lock_tokens)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Not `kill_on_drop`: a guard killed at once could not kill the group. Dropping
                // `lifeline` (with this future) is what stops it.
                .spawn()
                .map_err(|e| TaskFailure::new(format!("cannot start `sh -c {command}`: {e}")))?;
            let mut lifeline = child.stdin.take();
            if let Some(stdin) = lifeline.as_mut() {
                // One line: serde_json escapes every newline inside the payload.
                let mut line = payload(&ctx).to_string();
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    lifeline = None;
                }
            }
            // Both pipes at once (a child filling one while we wait on the other would hang),
            // each read only up to its limit. Too much stdout ends the program's group at once
            // (dropping the lifeline), so that stderr reaches its end too.
            let stdout = child.stdout.take();
            let stdout = async move {
                match read_limited(stdout, MAX_OUTPUT_BYTES, Overflow::Refuse).await {
                    Some(out) => (Some(out), lifeline),
                    None => (None, None),
                }
            };
            let ((stdout, lifeline), stderr) = tokio::join!(
                stdout,
                read_limited(child.stderr.take(), MAX_STDERR_BYTES, Overflow::Truncate),
            );
            let Some(stdout) = stdout else {
                let _ = child.wait().await;
                return Err(TaskFailure::new(format!(
                    "`{}` wrote more than {MAX_OUTPUT_BYTES} bytes to stdout; it was stopped",
                    crate::domain::text::bounded(&command, 200)
                )));
            };
            let stderr = stderr.unwrap_or_default();
            let status = child
                .wait()
                .await
                .map_err(|e| TaskFailure::new(format!("waiting for `{command}`: {e}")))?;
            drop(lifeline);
            let text = String::from_utf8_lossy(&stdout).trim().to_string();
            if status.code() == Some(SHELL_HANDOFF_EXIT) {
                #[derive(serde::Deserialize)]
                struct Asked {
                    handoff: HandoffAsk,
                }
                if let Ok(asked) = serde_json::from_str::<Asked>(&text) {
                    return Err(TaskFailure::handoff(asked.handoff));
                }
            }
            if !status.success() {
                let err = String::from_utf8_lossy(&stderr);
                return Err(TaskFailure {
                    message: format!(
                        "`{command}` failed: {}",
                        err.trim().chars().take(2_000).collect::<String>()
                    ),
                    exit_code: status.code(),
                    handoff: None,
                });
            }
            Ok(serde_json::from_str(&text).unwrap_or_else(|_| json!({"stdout": text})))
        })
    }
}

/// Most bytes of output (a `shell` command's stdout, an `http` response) an executor reads:
/// a report must fit in one NATS message anyway.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Most bytes of a `shell` command's stderr kept (the rest is read and dropped).
pub const MAX_STDERR_BYTES: usize = 64 * 1024;

/// What [`read_limited`] does past its limit.
#[derive(Clone, Copy, PartialEq)]
enum Overflow {
    /// Stop reading and say so (`None`).
    Refuse,
    /// Keep the first `limit` bytes, read and drop the rest.
    Truncate,
}

/// Reads `pipe` to its end keeping at most `limit` bytes; past it, per `overflow`.
async fn read_limited<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<R>,
    limit: usize,
    overflow: Overflow,
) -> Option<Vec<u8>> {
    let Some(mut pipe) = pipe else {
        return Some(Vec::new());
    };
    let mut kept = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return Some(kept),
            Ok(n) if kept.len() + n > limit => {
                if overflow == Overflow::Refuse {
                    return None;
                }
                let room = limit - kept.len();
                kept.extend_from_slice(&chunk[..room]);
                let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
                return Some(kept);
            }
            Ok(n) => kept.extend_from_slice(&chunk[..n]),
        }
    }
}

/// How long the `http` executor waits for a connection.
pub const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Http {
    allow: super::policy::HttpAllow,
}

impl Executor for Http {
    fn run(&self, ctx: TaskContext) -> BoxFuture<'static, Result<Value, TaskFailure>> {
        let allow = self.allow.clone();
        Box::pin(async move {
            let Some(url) = ctx.input.get("url").and_then(Value::as_str) else {
                return Err(TaskFailure::new("http executor: input.url is required"));
            };
            let url = url::Url::parse(url)
                .map_err(|e| TaskFailure::new(format!("http executor: bad url: {e}")))?;
            if url.scheme() != "http" {
                return Err(TaskFailure::new(
                    "http executor: only http:// URLs are supported",
                ));
            }
            let host = url.host_str().unwrap_or("localhost").to_string();
            let port = url.port_or_known_default().unwrap_or(80);
            let body = payload(&ctx).to_string();
            let path = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            };
            // Resolve, vet every address, connect to a vetted one (never re-resolve).
            let resolved: Vec<std::net::SocketAddr> = match url.host() {
                Some(url::Host::Ipv4(ip)) => vec![(ip, port).into()],
                Some(url::Host::Ipv6(ip)) => vec![(ip, port).into()],
                _ => tokio::time::timeout(
                    HTTP_CONNECT_TIMEOUT,
                    tokio::net::lookup_host((host.as_str(), port)),
                )
                .await
                .map_err(|_| TaskFailure::new(format!("resolve {host}: timed out")))?
                .map_err(|e| TaskFailure::new(format!("resolve {host}: {e}")))?
                .collect(),
            };
            let Some(target) = resolved.iter().find(|a| allow.permits(&host, a.ip())) else {
                return Err(TaskFailure::new(format!(
                    "http executor: {host} ({}) is not allowed by this worker's http_executor_allow",
                    resolved
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let mut stream = tokio::time::timeout(
                HTTP_CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect(*target),
            )
            .await
            .map_err(|_| TaskFailure::new(format!("connect {host}:{port}: timed out")))?
            .map_err(|e| TaskFailure::new(format!("connect {host}:{port}: {e}")))?;
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| TaskFailure::new(format!("send to {url}: {e}")))?;
            let response = read_limited(
                Some(&mut stream),
                MAX_OUTPUT_BYTES + 64 * 1024,
                Overflow::Refuse,
            )
            .await
            .ok_or_else(|| {
                TaskFailure::new(format!(
                    "the response from {url} is larger than {MAX_OUTPUT_BYTES} bytes"
                ))
            })?;
            let text = String::from_utf8_lossy(&response);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if !(200..300).contains(&status) {
                return Err(TaskFailure {
                    message: format!(
                        "POST {url} answered {status}: {}",
                        body.chars().take(500).collect::<String>()
                    ),
                    exit_code: None,
                    handoff: None,
                });
            }
            Ok(serde_json::from_str(body.trim()).unwrap_or_else(|_| json!({"body": body})))
        })
    }
}
