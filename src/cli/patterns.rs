//! `omoi patterns list | show | validate` and `omoi run`: pattern files (src/pattern) from the
//! command line, with live progress per step group.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::config::Settings;
use crate::domain::{TaskStatus, WorkflowId};
use crate::protocol::workflows::{TaskRecord, WorkflowView};

#[derive(Debug, Subcommand)]
pub enum PatternsCommand {
    /// The built-in patterns and those in `patterns_dir`.
    List,
    /// A pattern's description, parameters and source.
    Show { name: String },
    /// Check pattern files (or built-in names): parameters, bindings, the DAG they expand to.
    Validate {
        #[arg(required = true)]
        files: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A built-in pattern's name, a name found in `patterns_dir`, or a file.
    pub pattern: String,
    /// A parameter, `name=value` (lists: `a,b,c` or JSON); repeatable.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Submit and print the workflow id without following it.
    #[arg(long)]
    pub detach: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Keep the run waiting when no live agent can take some of its steps (for agents about to
    /// start); without it such a run is cancelled at once, saying what to start.
    #[arg(long)]
    pub wait_for_agents: bool,
}

/// Loads a pattern by name or path, searching `patterns_dir` and `./patterns`.
pub fn find(settings: &Settings, name: &str) -> anyhow::Result<crate::pattern::Pattern> {
    let mut dirs = settings.pattern_dirs();
    dirs.push(PathBuf::from("patterns"));
    Ok(crate::pattern::find(name, &dirs)?)
}

pub fn run_patterns(settings: &Settings, command: PatternsCommand) -> anyhow::Result<()> {
    match command {
        PatternsCommand::List => {
            for p in crate::pattern::list(&settings.pattern_dirs()) {
                let params: Vec<String> = p
                    .parameters
                    .iter()
                    .map(|s| {
                        if s.required() {
                            s.name.clone()
                        } else {
                            format!("[{}]", s.name)
                        }
                    })
                    .collect();
                let summary = p.description.lines().next().unwrap_or_default();
                println!("{:<26} {:<40} {}", p.name, params.join(" "), summary.trim());
            }
            Ok(())
        }
        PatternsCommand::Show { name } => {
            let p = find(settings, &name)?;
            println!("{} ({})\n", p.name(), p.file());
            println!("{}\n", p.description().trim());
            println!("parameters:");
            for s in p.parameters() {
                let default = s
                    .default
                    .as_ref()
                    .map(|d| format!("default {d}"))
                    .unwrap_or_else(|| "required".into());
                println!(
                    "  {:<18} {:<8} {:<28} {}",
                    s.name,
                    s.kind.as_str(),
                    default,
                    s.description.as_deref().unwrap_or_default()
                );
            }
            let expanded = p.validate()?;
            println!("\nexpands to (with defaults):");
            for t in &expanded.spec.tasks {
                println!(
                    "  {:<22} {:<6} after [{}]",
                    t.key,
                    t.kind().as_str(),
                    t.depends_on.join(", ")
                );
            }
            Ok(())
        }
        PatternsCommand::Validate { files } => {
            let mut failed = 0;
            for f in &files {
                match find(settings, f).and_then(|p| {
                    let i = p.validate()?;
                    Ok((p, i))
                }) {
                    Ok((p, i)) => println!(
                        "ok    {f}: {} — {} steps, {} parameters",
                        p.name(),
                        i.spec.tasks.len(),
                        p.parameters().len()
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("error {e}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} pattern files are invalid", files.len());
            }
            Ok(())
        }
    }
}

/// `omoi run`: instantiate, submit, follow.
pub async fn run(settings: &Settings, args: RunArgs) -> anyhow::Result<()> {
    let pattern = find(settings, &args.pattern)?;
    let params = pattern.parse_assignments(args.params.iter().map(String::as_str))?;
    let instantiated = pattern.instantiate(&params)?;
    let names = crate::bus::Names::new(&settings.namespace).map_err(anyhow::Error::msg)?;
    let nats =
        crate::bus::connect_once(crate::bus::NatsAccess::from_settings(settings), "omoi-cli")
            .await?;
    let client = crate::client::WorkflowClient::new(nats, names);
    let submitted = client.submit(&instantiated.spec).await?;
    if args.detach {
        println!("{}", serde_json::to_string_pretty(&submitted)?);
        return Ok(());
    }
    eprintln!(
        "running pattern {} as workflow {}",
        pattern.name(),
        submitted.workflow_id
    );
    if !submitted.unschedulable.is_empty() {
        let said = unschedulable_help(&pattern, &submitted.unschedulable);
        if !args.wait_for_agents {
            let _ = client.cancel(submitted.workflow_id).await;
            bail!(
                "{said}workflow {} cancelled; start them and run it again, or pass --wait-for-agents to keep a run waiting for them",
                submitted.workflow_id
            );
        }
        eprintln!("{said}waiting for them (--wait-for-agents)");
    }
    let view = follow(
        &client,
        submitted.workflow_id,
        Duration::from_secs(args.timeout),
    )
    .await?;
    print!("{}", summary(&view));
    if view.workflow.status != crate::domain::WorkflowStatus::Completed {
        bail!(
            "workflow {} ended {}",
            view.workflow.id,
            view.workflow.status
        );
    }
    Ok(())
}

/// What no live agent can take, step by step, and what would: the worker to start (every missing
/// capability and executor in one command) and the pattern's parameters that choose
/// capabilities, if it has any.
fn unschedulable_help(
    pattern: &crate::pattern::Pattern,
    steps: &[crate::protocol::workflows::Unschedulable],
) -> String {
    let mut said = String::new();
    let mut capabilities = std::collections::BTreeSet::new();
    let mut executors = std::collections::BTreeSet::new();
    for u in steps {
        said.push_str(&format!(
            "no live agent has {} for step `{}`\n",
            u.missing(),
            u.key
        ));
        capabilities.extend(u.missing_capabilities.iter().cloned());
        executors.extend(u.missing_executor.iter().cloned());
    }
    let mut command = "omoi worker --agent helper".to_string();
    if !capabilities.is_empty() {
        let list: Vec<String> = capabilities.into_iter().collect();
        command.push_str(&format!(" --capabilities {}", list.join(",")));
    }
    if !executors.is_empty() {
        let list: Vec<String> = executors.into_iter().collect();
        command.push_str(&format!(" --executors {}", list.join(",")));
    }
    said.push_str(&format!("start an agent that has them: {command}\n"));
    let choosers: Vec<String> = pattern
        .parameters()
        .iter()
        .filter(|p| p.name.ends_with("capabilities"))
        .map(|p| format!("--param {}=…", p.name))
        .collect();
    if !choosers.is_empty() {
        said.push_str(&format!(
            "or ask for capabilities your agents have (empty: any agent): omoi run {} {}\n",
            pattern.name(),
            choosers.join(" ")
        ));
    }
    said
}

/// Polls the workflow and draws a progress bar per step group on stderr until it finishes.
pub async fn follow(
    client: &crate::client::WorkflowClient,
    id: WorkflowId,
    timeout: Duration,
) -> anyhow::Result<WorkflowView> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut drawn_lines = 0;
    let mut last = String::new();
    let mut last_print = Instant::now();
    loop {
        let view = match client.get(id).await {
            Ok(v) => v,
            // A very large workflow does not fit a reply: fall back to counts.
            Err(crate::client::ClientError::Remote(e))
                if e.code == crate::protocol::ErrorCode::TooLarge =>
            {
                client.view(id, false).await?
            }
            // A control plane restarting (none answers for a moment), or one whose database
            // is away for a while, is not the end.
            Err(e) if e.is_transient() && started.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let frame = progress(&view);
        if tty {
            // Redraw in place.
            if drawn_lines > 0 {
                eprint!("\x1b[{drawn_lines}A\x1b[J");
            }
            eprint!("{frame}");
            drawn_lines = frame.lines().count();
        } else if frame != last && last_print.elapsed() >= Duration::from_secs(2)
            || view.workflow.status.is_terminal()
        {
            eprint!("{frame}");
            last_print = Instant::now();
        }
        last = frame;
        if view.workflow.status.is_terminal() {
            return Ok(view);
        }
        if started.elapsed() > timeout {
            bail!("workflow {id} still running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The group of a task: its key up to the first `/` (a split's children and a loop's
/// iterations are grouped under the node that made them).
fn group(key: &str) -> &str {
    key.split('/').next().unwrap_or(key)
}

#[derive(Default)]
struct Group {
    total: usize,
    by_status: BTreeMap<&'static str, usize>,
    first_ready: Option<chrono::DateTime<chrono::Utc>>,
    first_start: Option<chrono::DateTime<chrono::Utc>>,
    last_finish: Option<chrono::DateTime<chrono::Utc>>,
    retries: i32,
}

/// Step groups in the order they became ready (groups not yet ready last, by key).
fn groups(tasks: &[TaskRecord]) -> Vec<(String, Group)> {
    let mut by: BTreeMap<String, Group> = BTreeMap::new();
    for t in tasks {
        let e = by.entry(group(&t.key).to_string()).or_default();
        if let Some(r) = t.ready_at.or(t.started_at) {
            e.first_ready = Some(e.first_ready.map_or(r, |f| f.min(r)));
        }
        e.total += 1;
        *e.by_status.entry(t.status.as_str()).or_default() += 1;
        e.retries += t.failures;
        if let Some(s) = t.started_at {
            e.first_start = Some(e.first_start.map_or(s, |f| f.min(s)));
        }
        if let Some(f) = t.finished_at {
            e.last_finish = Some(e.last_finish.map_or(f, |l| l.max(f)));
        }
    }
    let mut out: Vec<(String, Group)> = by.into_iter().collect();
    out.sort_by(|a, b| match (a.1.first_ready, b.1.first_ready) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.0.cmp(&b.0)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.0.cmp(&b.0),
    });
    out
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    format!("{}{}", "#".repeat(filled), "-".repeat(width - filled))
}

/// One line per step group: a bar of finished tasks, and the running and failed counts.
fn progress(view: &WorkflowView) -> String {
    let mut out = String::new();
    if view.tasks.is_empty() {
        let total: usize = view.counts.values().sum();
        let done = view.counts.get("completed").copied().unwrap_or(0);
        out.push_str(&format!(
            "  {:<24} [{}] {done}/{total}\n",
            "(all)",
            bar(done, total, 30)
        ));
        return out;
    }
    for (name, g) in groups(&view.tasks) {
        let n = |s: TaskStatus| g.by_status.get(s.as_str()).copied().unwrap_or(0);
        let finished = n(TaskStatus::Completed) + n(TaskStatus::Failed) + n(TaskStatus::Cancelled);
        let running = n(TaskStatus::Running) + n(TaskStatus::Assigned);
        let mut line = format!(
            "  {:<24} [{}] {finished}/{}",
            name,
            bar(finished, g.total, 30),
            g.total
        );
        if running > 0 {
            line.push_str(&format!("  running {running}"));
        }
        if n(TaskStatus::Failed) > 0 {
            line.push_str(&format!("  failed {}", n(TaskStatus::Failed)));
        }
        if g.retries > 0 {
            line.push_str(&format!("  retries {}", g.retries));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The final status, then per group: tasks, outcome and time from first start to last finish.
pub fn summary(view: &WorkflowView) -> String {
    let w = &view.workflow;
    let elapsed = w
        .finished_at
        .map(|f| (f - w.created_at).num_milliseconds())
        .unwrap_or_default();
    let mut out = format!(
        "\nworkflow {} ({}) {} in {:.2} s\n",
        w.id,
        w.name,
        w.status,
        elapsed as f64 / 1000.0
    );
    out.push_str(&format!(
        "  {:<24} {:>5} {:>9} {:>6} {:>9} {:>7}  {}\n",
        "step", "tasks", "completed", "failed", "cancelled", "retries", "span"
    ));
    for (name, g) in groups(&view.tasks) {
        let n = |s: &str| g.by_status.get(s).copied().unwrap_or(0);
        let span = match (g.first_start, g.last_finish) {
            (Some(s), Some(f)) => format!("{:.2} s", (f - s).num_milliseconds() as f64 / 1000.0),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "  {:<24} {:>5} {:>9} {:>6} {:>9} {:>7}  {}\n",
            name,
            g.total,
            n("completed"),
            n("failed"),
            n("cancelled"),
            g.retries,
            span
        ));
    }
    for t in view.tasks.iter().filter(|t| t.status == TaskStatus::Failed) {
        out.push_str(&format!(
            "  failed: {} — {}\n",
            t.key,
            t.error.as_deref().unwrap_or("")
        ));
    }
    out
}
