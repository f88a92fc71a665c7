//! `--hostfile`: node 0's launcher starts the launchers of nodes 1.. over ssh.
//!
//! Each remote launcher is `ssh <host> 'cd <cwd> && exec env VAR=… <this launcher> --nodes N
//! --node-rank k --procs-per-node P --master-addr <first host> --master-port <port> --run-id <id>
//! --max-restarts R --store-secret-stdin [--set …] <config>'`: the same paths on every host (a
//! shared filesystem, as `run.out_dir` needs anyway). The run's secret goes to the remote launcher
//! on ssh's stdin, so it appears in no command line on either host. `TESSERA_SSH` replaces `ssh -o BatchMode=yes` (split at
//! whitespace). The remote launchers' output is copied to this launcher's stdout and stderr (their
//! lines already say their node and ranks). They learn the run's fate through the store like any
//! launcher; an ssh that exits before its launcher joined ends the rendezvous at once.

use crate::plan::Plan;
use anyhow::{Context, Result};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Variables passed on to remote launchers when set here.
const FORWARDED: &[&str] = &[
    "RUST_LOG",
    "TESSERA_TRAINER",
    "TESSERA_PEAK_GFLOPS",
    "RAYON_NUM_THREADS",
];

/// One remote launcher's ssh process.
pub struct Remote {
    host: String,
    node_rank: usize,
    child: Child,
    done: bool,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

/// Quotes a word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The shell command a remote node runs.
pub fn remote_command(plan: &Plan, node_rank: usize, port: u16) -> Result<String> {
    let exe = std::env::current_exe().context("locating the launcher binary")?;
    let cwd = std::env::current_dir().context("reading the working directory")?;
    let config = std::path::absolute(&plan.config_path)
        .with_context(|| format!("resolving {}", plan.config_path.display()))?;
    let mut words: Vec<String> = vec!["exec".into(), "env".into()];
    for var in FORWARDED {
        if let Ok(v) = std::env::var(var) {
            words.push(format!("{var}={v}"));
        }
    }
    words.push(exe.display().to_string());
    for (flag, value) in [
        ("--nodes", plan.nodes.to_string()),
        ("--node-rank", node_rank.to_string()),
        ("--procs-per-node", plan.procs_per_node.to_string()),
        ("--master-addr", plan.master_addr.clone()),
        ("--master-port", port.to_string()),
        ("--run-id", plan.run_id.clone()),
        ("--max-restarts", plan.max_restarts.to_string()),
    ] {
        words.push(flag.into());
        words.push(value);
    }
    words.push("--store-secret-stdin".into());
    for s in &plan.overrides {
        words.push("--set".into());
        words.push(s.clone());
    }
    words.push(config.display().to_string());
    let quoted: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
    Ok(format!(
        "cd {} && {}",
        shell_quote(&cwd.display().to_string()),
        quoted.join(" ")
    ))
}

/// Starts the launchers of `plan.remote_hosts` (nodes 1..).
pub fn start(plan: &Plan, port: u16) -> Result<Vec<Remote>> {
    let ssh: Vec<String> = std::env::var("TESSERA_SSH")
        .unwrap_or_else(|_| "ssh -o BatchMode=yes".into())
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let Some((program, ssh_args)) = ssh.split_first() else {
        anyhow::bail!("TESSERA_SSH is empty");
    };
    let mut remotes = Vec::new();
    for (i, host) in plan.remote_hosts.iter().enumerate() {
        let node_rank = i + 1;
        let command = remote_command(plan, node_rank, port)?;
        let mut child = Command::new(program)
            .args(ssh_args)
            .arg(host)
            .arg(&command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}` for {host}", ssh.join(" ")))?;
        eprintln!(
            "[launcher node {}] node {node_rank} on {host}: {} (pid {})",
            plan.node_rank,
            ssh.join(" "),
            child.id()
        );
        // The secret, then end of input (the remote launcher reads one line).
        if let Some(mut stdin) = child.stdin.take() {
            let mut line = plan.secret.expose().to_vec();
            line.push(b'\n');
            if let Err(e) = stdin.write_all(&line) {
                eprintln!(
                    "[launcher node {}] passing the run's secret to node {node_rank} on {host}: {e}",
                    plan.node_rank
                );
            }
        }
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(crate::supervise::pump_lines(
                out,
                None,
                String::new(),
                false,
            ));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(crate::supervise::pump_lines(err, None, String::new(), true));
        }
        remotes.push(Remote {
            host: host.clone(),
            node_rank,
            child,
            done: false,
            pumps,
        });
    }
    Ok(remotes)
}

/// Why the run cannot go on, if a remote launcher's ssh has already exited (before joining).
pub fn failed(remotes: &mut [Remote]) -> Option<String> {
    for r in remotes.iter_mut().filter(|r| !r.done) {
        if let Ok(Some(status)) = r.child.try_wait() {
            r.done = true;
            return Some(format!(
                "the launcher of node {} on {} exited with {status} before joining the run \
                 (ssh failed? see its output above)",
                r.node_rank, r.host
            ));
        }
    }
    None
}

/// Kills the remote launchers' ssh processes (the remote launchers then lose the store and stop
/// their workers).
pub fn stop(remotes: &mut [Remote]) {
    for r in remotes.iter_mut().filter(|r| !r.done) {
        let _ = r.child.kill();
        let _ = r.child.wait();
        r.done = true;
    }
}

/// Waits up to `limit` for the remote launchers to exit (they do once they have heard the
/// outcome), then kills what is left.
pub fn finish(remotes: &mut Vec<Remote>, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until
        && remotes
            .iter_mut()
            .any(|r| matches!(r.child.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(remotes);
    for r in remotes.drain(..) {
        for p in r.pumps {
            let _ = p.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_remote_shell() {
        assert_eq!(
            shell_quote("/opt/tessera/launcher"),
            "/opt/tessera/launcher"
        );
        assert_eq!(shell_quote("optim.lr=1e-3"), "optim.lr=1e-3");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
