//! `omoi exec-guard`: the supervisor between a worker and a `shell` task's processes, so that
//! they never outlive the worker's claim on the task (and on its resource locks).
//!
//! The worker starts `omoi exec-guard -- sh -c <command>` with a pipe on its stdin. The guard
//! reads one line from it (the task's payload, as JSON), starts the program in a process group of
//! its own, hands it the line on its stdin, and then watches its own stdin: when it reaches end
//! of file — the worker closed it (timeout, cancel, output too large), or the worker died, even
//! by `kill -9`, since the kernel closes a dead process's pipes — the guard kills the whole group
//! at once. When the program ends by itself, whatever it left running in its group is killed
//! too: no process of a task runs past the task's end. The guard exits with the program's exit
//! code (128 + the signal if it was killed by one).
//!
//! Nothing here needs `unsafe`: the group is made by `process_group(0)` and killed through
//! rustix; the guard, not a `pre_exec` hook, does the watching.

use std::ffi::OsString;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// What the guard exits with when it could not start the program (`EX_OSERR`).
pub const GUARD_FAILED_EXIT: i32 = 71;
/// What the guard exits with when its stdin closed before the program ended (128 + SIGKILL).
pub const GUARD_STOPPED_EXIT: i32 = 137;

/// Runs `program` under the guard and returns the exit code for the guard's own exit.
pub async fn run(program: Vec<OsString>) -> i32 {
    let Some((cmd, args)) = program.split_first() else {
        eprintln!("omoi exec-guard: no program to run");
        return GUARD_FAILED_EXIT;
    };
    // SIGINT and SIGTERM sent to the worker's process group (Ctrl-C in a terminal) must not end
    // the task behind the worker's back: the worker decides, within its shutdown grace, and
    // closes the pipe when it gives the task up. Registering a handler replaces the default
    // action (terminate) for good; the streams are kept but never read.
    let _ignored = (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
    );
    let mut lifeline = BufReader::new(tokio::io::stdin());
    let mut payload = Vec::new();
    if let Err(e) = lifeline.read_until(b'\n', &mut payload).await {
        eprintln!("omoi exec-guard: reading the payload: {e}");
        return GUARD_FAILED_EXIT;
    }
    if payload.last() != Some(&b'\n') {
        // End of file before a whole line: the worker is already gone.
        return GUARD_STOPPED_EXIT;
    }
    payload.pop();
    let mut child = match tokio::process::Command::new(cmd)
        .args(args)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("omoi exec-guard: cannot start {cmd:?}: {e}");
            return GUARD_FAILED_EXIT;
        }
    };
    let group = child
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
    if let Some(mut stdin) = child.stdin.take() {
        // A program that does not read its stdin closes it early: not an error.
        tokio::spawn(async move {
            let _ = stdin.write_all(&payload).await;
        });
    }
    let kill_group = || {
        if let Some(group) = group {
            // ESRCH: every process of the group has already ended.
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    };
    let status = tokio::select! {
        status = child.wait() => status,
        () = until_closed(lifeline) => {
            kill_group();
            let _ = child.wait().await;
            return GUARD_STOPPED_EXIT;
        }
    };
    // The program ended: nothing it started may run on.
    kill_group();
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(GUARD_FAILED_EXIT)
        }
        Err(e) => {
            eprintln!("omoi exec-guard: waiting for {cmd:?}: {e}");
            GUARD_FAILED_EXIT
        }
    }
}

/// Returns when `r` reaches end of file (or fails); what it reads is dropped.
async fn until_closed(mut r: impl tokio::io::AsyncRead + Unpin) {
    let mut buf = [0u8; 256];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
