//! One node's launcher at work: host the store (node 0), join the run, start this node's workers
//! with torchrun's variables, copy their output to per-rank log files and to the console, and
//! follow the gang's phase in the store, stopping and restarting workers as it says.
//!
//! Every 50 ms the launcher reaps exited workers, reports news to the store (a failed worker, an
//! interrupt, "all my workers stopped", "all my workers finished") and reads back the gang's
//! phase. That report is also the launcher's heartbeat. Stopping a worker is SIGTERM (the trainer
//! checkpoints and exits), then SIGKILL after `distributed.term_grace_s`.
//!
//! Workers are started a few at a time inside that loop, so a stop signal, a worker that fails
//! or a gang that stops ends the spawning at once; SIGINT/SIGTERM while waiting for the store or
//! the other nodes ends the launcher before any worker starts. Each worker gets the run's secret
//! in a file (mode 0600) of a private directory (mode 0700) that lives as long as the launcher,
//! and asks for SIGTERM when its launcher dies (`PR_SET_PDEATHSIG`).

use crate::plan::Plan;
use anyhow::Result;
use dist::auth::{self, Credentials};
use dist::client::{StoreClient, StoreError};
use dist::protocol::{GangView, NodeEvent, Phase};
use dist::store::{StoreParams, StoreServer};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The launcher's exit statuses (also in `launcher --help` and docs/cluster.md).
pub mod exit {
    /// Every worker of every node finished.
    pub const FINISHED: i32 = 0;
    /// A worker kept failing (restarts used up), or a node's launcher was lost.
    pub const FAILED: i32 = 1;
    /// Bad command line or config, the trainer binary is missing, the master port is taken.
    pub const USAGE: i32 = 2;
    /// The rendezvous refused the run: nodes, world sizes or configs disagree, a rank twice, or
    /// not every node joined in time.
    pub const REFUSED: i32 = 3;
    /// This node lost the rendezvous store (node 0's launcher died or is unreachable).
    pub const LOST_STORE: i32 = 4;
    /// Stopped by SIGINT/SIGTERM; the workers checkpointed (the run is resumable).
    pub const INTERRUPTED: i32 = 143;
}

const POLL: Duration = Duration::from_millis(50);
/// The longest the loop spends starting workers before it looks at signals and the store again.
const SPAWN_SLICE: Duration = Duration::from_millis(50);

/// How the launcher ended: an exit status and what to print.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub message: String,
}

fn say(node: usize, msg: &str) {
    eprintln!("[launcher node {node}] {msg}");
}

/// One worker process.
struct Worker {
    rank: usize,
    child: Child,
    exited: Option<ExitStatus>,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Signals the worker's whole process group (it leads its own: `process_group(0)`), so
    /// that nothing it started survives holding the log pipes open.
    fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            // SAFETY: kill(2) on the group of a child not yet reaped (so its pid, the group id,
            // is not reused).
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), sig);
            }
        }
    }
}

/// Runs this node's part of the run to its end.
pub fn run(plan: &Plan) -> Outcome {
    match supervise(plan) {
        Ok(o) => o,
        Err(e) => Outcome {
            code: exit::USAGE,
            message: formats::report::error_chain(&e),
        },
    }
}

fn supervise(plan: &Plan) -> Result<Outcome> {
    let node = plan.node_rank;
    let d = &plan.cfg.distributed;
    let signals = Arc::new(AtomicUsize::new(0));
    watch_signals(signals.clone())?;
    let worker_env = crate::cuda::worker_env(plan)?;
    if let Some(note) = &worker_env.note {
        say(node, note);
    }
    // One run per run.out_dir: node 0's launcher holds the lock for the whole run, restarts
    // included (its rank 0 then leaves it alone: TESSERA_RUN_LOCK_HELD). A second run on the
    // directory is refused here, before anything starts, instead of failing as a worker would
    // and using up the restarts.
    let _run_lock = match node {
        0 => match dist::run_lock::RunLock::acquire(&plan.cfg.run.out_dir) {
            Ok(lock) => Some(lock),
            Err(e) => {
                return Ok(Outcome {
                    code: exit::REFUSED,
                    message: e.to_string(),
                })
            }
        },
        _ => None,
    };

    let server = if node == 0 {
        let ip = if plan.nodes == 1 {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            std::net::IpAddr::from([0, 0, 0, 0])
        };
        let addr = SocketAddr::new(ip, plan.master_port.unwrap_or(0));
        let s = StoreServer::start(
            addr,
            StoreParams {
                run_id: plan.run_id.clone(),
                secret: plan.secret.clone(),
                heartbeat_timeout: d.heartbeat_timeout(),
                rendezvous_timeout: d.rendezvous_timeout(),
            },
        )?;
        say(node, &format!("rendezvous store on {}", s.local_addr()));
        Some(s)
    } else {
        None
    };
    let port = server
        .as_ref()
        .map(|s| s.local_addr().port())
        .or(plan.master_port)
        .unwrap_or(29500);
    let store_addr = plan.store_addr(port);

    let creds = Credentials {
        run_id: plan.run_id.clone(),
        secret: plan.secret.clone(),
    };
    // With --hostfile, node 0 starts the other nodes' launchers over ssh.
    let mut remotes = crate::remote::start(plan, port)?;
    // Connecting and joining wait for the store and the other nodes: on a thread, so that a stop
    // signal or a remote launcher that dies (ssh failed) ends the wait at once.
    let join = {
        let (plan, creds, store_addr) = (plan.clone(), creds.clone(), store_addr.clone());
        std::thread::spawn(move || -> Result<(StoreClient, u64), (i32, StoreError)> {
            let d = &plan.cfg.distributed;
            let mut c = StoreClient::connect(&store_addr, &creds, d.rendezvous_timeout())
                .map_err(|e| (exit::LOST_STORE, e))?;
            let g = c
                .join_node(
                    plan.node_rank,
                    plan.nodes,
                    plan.procs_per_node,
                    plan.max_restarts,
                    d.rendezvous_timeout(),
                )
                .map_err(|e| (exit::REFUSED, e))?;
            Ok((c, g))
        })
    };
    let joined = loop {
        if join.is_finished() {
            break join
                .join()
                .map_err(|_| anyhow::anyhow!("the join thread panicked"))?;
        }
        if signals.load(Ordering::SeqCst) > 0 {
            crate::remote::stop(&mut remotes);
            return Ok(Outcome {
                code: exit::INTERRUPTED,
                message: "stopped by a signal before any worker started".into(),
            });
        }
        if let Some(why) = crate::remote::failed(&mut remotes) {
            crate::remote::stop(&mut remotes);
            return Ok(Outcome {
                code: exit::REFUSED,
                message: why,
            });
        }
        std::thread::sleep(POLL);
    };
    let (mut client, mut generation) = match joined {
        Ok(j) => j,
        Err((code, e)) => {
            crate::remote::stop(&mut remotes);
            return Ok(Outcome {
                code,
                message: e.to_string(),
            });
        }
    };
    say(
        node,
        &format!(
            "run {}: {} node(s) × {} worker(s), store {store_addr}",
            plan.run_id, plan.nodes, plan.procs_per_node
        ),
    );
    let logs = plan.cfg.run.out_dir.join("logs");
    std::fs::create_dir_all(&logs)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", logs.display()))?;

    // The secret for this node's workers, in a file only this user can read.
    let private = private_dir()?;
    let secret_file = plan
        .secret
        .write_private(private.path(), "store-secret")
        .map_err(|e| {
            anyhow::anyhow!(
                "writing the run's secret in {}: {e}",
                private.path().display()
            )
        })?;
    let spawner = Spawner {
        plan,
        port,
        logs: &logs,
        extra_env: &worker_env.vars,
        secret_file: &secret_file,
    };
    let mut workers: Vec<Worker> = Vec::new();
    // Local ranks of this generation still to start.
    let mut pending = 0..plan.procs_per_node;
    let mut events: VecDeque<NodeEvent> = VecDeque::new();
    let mut interrupt_sent = false;
    let mut stop_started: Option<Instant> = None;
    let mut reported_end = false;
    let mut last_contact = Instant::now();
    let mut view: Option<GangView> = None;

    let outcome = loop {
        std::thread::sleep(POLL);
        let sigs = signals.load(Ordering::SeqCst);
        if sigs >= 1 && !interrupt_sent {
            interrupt_sent = true;
            let reason = format!("node {node}'s launcher got a stop signal");
            say(
                node,
                &format!("{reason}: asking every worker to checkpoint and exit"),
            );
            events.push_back(NodeEvent::Interrupted { reason });
        }
        if sigs >= 2 {
            say(node, "second stop signal: killing the workers");
            kill_all(&mut workers, libc::SIGKILL);
        }
        let stopping = matches!(
            view.as_ref().map(|v| &v.phase),
            Some(Phase::Stopping { .. })
        ) || stop_started.is_some();
        // Start workers for a slice of time, unless the gang is stopping or a stop was asked.
        let failing = events
            .iter()
            .any(|e| matches!(e, NodeEvent::WorkerFailed { .. }));
        if !pending.is_empty() && (stopping || interrupt_sent || failing) {
            say(
                node,
                &format!(
                    "not starting local ranks {}..{}: the gang is stopping",
                    pending.start, pending.end
                ),
            );
            pending = 0..0;
        }
        let slice = Instant::now();
        while !pending.is_empty() && slice.elapsed() < SPAWN_SLICE {
            let local = pending.start;
            pending.start += 1;
            match spawner.spawn(local, generation) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    let reason = format!(
                        "rank {} (node {node}) could not start: {e:#}",
                        node * plan.procs_per_node + local
                    );
                    say(node, &reason);
                    events.push_back(NodeEvent::WorkerFailed { reason });
                    pending = 0..0;
                }
            }
        }
        for w in workers.iter_mut().filter(|w| w.exited.is_none()) {
            if let Ok(Some(status)) = w.child.try_wait() {
                w.exited = Some(status);
                if status.success() {
                    say(node, &format!("rank {} finished", w.rank));
                } else if !stopping && !interrupt_sent {
                    let reason = format!(
                        "rank {} (pid {}, node {node}) exited with {}",
                        w.rank,
                        w.child.id(),
                        describe_status(status)
                    );
                    say(node, &reason);
                    events.push_back(NodeEvent::WorkerFailed { reason });
                } else {
                    say(
                        node,
                        &format!("rank {} stopped ({})", w.rank, describe_status(status)),
                    );
                }
            }
        }

        let event = events.front().cloned();
        match client.node_update(node, generation, event) {
            Ok(v) => {
                last_contact = Instant::now();
                events.pop_front();
                view = Some(v);
            }
            Err(e) => {
                if last_contact.elapsed() > d.heartbeat_timeout() {
                    say(node, &format!("lost the rendezvous store: {e}"));
                    stop_all(&mut workers, d.term_grace(), node);
                    break Outcome {
                        code: if interrupt_sent {
                            exit::INTERRUPTED
                        } else {
                            exit::LOST_STORE
                        },
                        message: format!(
                            "lost the rendezvous store at {store_addr} for {:.1} s: {e}",
                            last_contact.elapsed().as_secs_f64()
                        ),
                    };
                }
                if let Ok(c) = StoreClient::connect(&store_addr, &creds, POLL) {
                    client = c;
                }
                continue;
            }
        }
        let Some(v) = view.clone() else { continue };

        if v.generation > generation {
            // The store restarted the gang; our workers are all gone (we reported Stopped). The
            // new generation may already be stopping again: then there is nothing to start, and
            // the Stopping branch below reports this node stopped at once.
            generation = v.generation;
            for w in workers.drain(..) {
                join_pumps(w);
            }
            stop_started = None;
            reported_end = false;
            if v.phase == Phase::Running {
                say(
                    node,
                    &format!(
                        "restart {} of {}: starting generation {generation}",
                        v.restarts, v.max_restarts
                    ),
                );
                pending = 0..plan.procs_per_node;
            }
        }
        match &v.phase {
            Phase::Running => {
                if !reported_end
                    && pending.is_empty()
                    && workers.len() == plan.procs_per_node
                    && workers
                        .iter()
                        .all(|w| w.exited.is_some_and(|s| s.success()))
                {
                    reported_end = true;
                    events.push_back(NodeEvent::Done);
                }
            }
            Phase::Stopping { reason, .. } => {
                pending = 0..0;
                let started = *stop_started.get_or_insert_with(|| {
                    say(node, &format!("stopping the workers: {reason}"));
                    kill_all(&mut workers, libc::SIGTERM);
                    Instant::now()
                });
                if started.elapsed() > d.term_grace() && workers.iter().any(|w| w.exited.is_none())
                {
                    say(node, "grace period over: SIGKILL");
                    kill_all(&mut workers, libc::SIGKILL);
                }
                if !reported_end && workers.iter().all(|w| w.exited.is_some()) {
                    reported_end = true;
                    events.push_back(NodeEvent::Stopped);
                }
            }
            over => {
                stop_all(&mut workers, d.term_grace(), node);
                let (code, message) = match over {
                    Phase::Finished => (exit::FINISHED, "finished".to_string()),
                    Phase::Failed { reason } => (exit::FAILED, format!("run failed: {reason}")),
                    Phase::Refused { reason } => (exit::REFUSED, format!("run refused: {reason}")),
                    Phase::Interrupted { reason } => (
                        exit::INTERRUPTED,
                        format!("stopped: {reason}; the workers checkpointed, run again to resume"),
                    ),
                    _ => (exit::FAILED, format!("unexpected phase {over:?}")),
                };
                break Outcome { code, message };
            }
        }
    };

    // Node 0 keeps the store up until every launcher has heard the outcome.
    if server.is_some() {
        let until = Instant::now() + d.heartbeat_timeout();
        while Instant::now() < until {
            match client.node_update(node, generation, None) {
                Ok(v) if v.informed >= plan.nodes => break,
                Ok(_) => std::thread::sleep(POLL),
                Err(_) => break,
            }
        }
    }
    for w in workers.drain(..) {
        join_pumps(w);
    }
    crate::remote::finish(&mut remotes, d.heartbeat_timeout() + d.term_grace());
    drop(server);
    drop(private);
    Ok(outcome)
}

fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(sig)) => format!("signal {sig}{}", signal_name(sig)),
        _ => s.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGINT => " (SIGINT)",
        _ => "",
    }
}

fn kill_all(workers: &mut [Worker], sig: i32) {
    for w in workers.iter() {
        w.signal(sig);
    }
}

/// SIGTERM, wait up to `grace`, SIGKILL, reap.
fn stop_all(workers: &mut [Worker], grace: Duration, node: usize) {
    if workers.iter().all(|w| w.exited.is_some()) {
        return;
    }
    kill_all(workers, libc::SIGTERM);
    let until = Instant::now() + grace;
    loop {
        for w in workers.iter_mut().filter(|w| w.exited.is_none()) {
            if let Ok(Some(s)) = w.child.try_wait() {
                w.exited = Some(s);
            }
        }
        if workers.iter().all(|w| w.exited.is_some()) {
            return;
        }
        if Instant::now() >= until {
            say(node, "grace period over: SIGKILL");
            kill_all(workers, libc::SIGKILL);
            for w in workers.iter_mut().filter(|w| w.exited.is_none()) {
                w.exited = w.child.wait().ok();
            }
            return;
        }
        std::thread::sleep(POLL);
    }
}

fn join_pumps(w: Worker) {
    for p in w.pumps {
        let _ = p.join();
    }
}

/// Counts SIGINT and SIGTERM.
fn watch_signals(count: Arc<AtomicUsize>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        })?;
    Ok(())
}

/// A directory only this user can enter (mode 0700), removed when dropped: under
/// `XDG_RUNTIME_DIR` when that is set (a per-user tmpfs), else the system's temporary directory.
fn private_dir() -> Result<tempfile::TempDir> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("tessera-launcher-")
        .tempdir_in(&base)
        .map_err(|e| anyhow::anyhow!("creating a private directory in {}: {e}", base.display()))
}

/// What starting a worker of this node needs.
struct Spawner<'a> {
    plan: &'a Plan,
    port: u16,
    logs: &'a Path,
    extra_env: &'a [(String, String)],
    secret_file: &'a Path,
}

impl Spawner<'_> {
    /// Starts local rank `local` of `generation`. Called only from the thread that runs
    /// [`supervise`]'s loop: the parent-death signal fires when the thread that forked the worker
    /// exits, not the process, and that thread outlives every worker it starts (it stops and reaps
    /// them before it returns; in the binary it is the main thread).
    fn spawn(&self, local: usize, generation: u64) -> Result<Worker> {
        let plan = self.plan;
        let node = plan.node_rank;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let rayon_threads = (threads / plan.procs_per_node).max(1).to_string();
        let rank = node * plan.procs_per_node + local;
        let mut cmd = Command::new(&plan.trainer);
        cmd.arg("train").arg("--config").arg(&plan.config_path);
        for s in &plan.overrides {
            cmd.arg("--set").arg(s);
        }
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", plan.world_size().to_string())
            .env("LOCAL_WORLD_SIZE", plan.procs_per_node.to_string())
            .env("GROUP_RANK", node.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", self.port.to_string())
            .env("TESSERA_RUN_ID", &plan.run_id)
            .env("TESSERA_RESTART_COUNT", generation.to_string())
            .env("TESSERA_LAUNCHER_PID", std::process::id().to_string())
            .env(dist::run_lock::HELD_ENV, if node == 0 { "1" } else { "0" })
            // The secret travels in the file only, never in a worker's environment.
            .env_remove(auth::SECRET_ENV)
            .env(auth::SECRET_FILE_ENV, self.secret_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", &rayon_threads);
        }
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        {
            use std::os::unix::process::CommandExt;
            // Workers get signals from the launcher only (not the terminal's Ctrl-C), and
            // SIGTERM if the launcher dies.
            cmd.process_group(0);
            #[cfg(target_os = "linux")]
            {
                let launcher = std::process::id() as libc::pid_t;
                // SAFETY: prctl and getppid are async-signal-safe; the closure allocates nothing.
                unsafe {
                    cmd.pre_exec(move || {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                        // The launcher died between the fork and the prctl: the signal will
                        // not come, so do not start.
                        if libc::getppid() != launcher {
                            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                        }
                        Ok(())
                    });
                }
            }
        }
        let log_path = self.logs.join(format!("rank_{rank}.log"));
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", log_path.display()))?;
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", plan.trainer.display()))?;
        let pid = child.id();
        let _ = writeln!(
            log,
            "=== rank {rank}, generation {generation}, pid {pid} ==="
        );
        say(
            node,
            &format!(
                "rank {rank}: pid {pid} (generation {generation}), log {}",
                log_path.display()
            ),
        );
        let log = Arc::new(Mutex::new(log));
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, rank, log.clone(), false));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, rank, log.clone(), true));
        }
        Ok(Worker {
            rank,
            child,
            exited: None,
            pumps,
        })
    }
}

/// Copies a worker's stream line by line to its log file and, prefixed with its rank, to the
/// launcher's stdout or stderr.
fn pump(
    stream: impl std::io::Read + Send + 'static,
    rank: usize,
    log: Arc<Mutex<File>>,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    pump_lines(stream, Some(log), format!("[rank {rank}] "), to_stderr)
}

/// Copies a stream line by line to `log` (if any) and, after `prefix`, to stdout or stderr.
pub(crate) fn pump_lines(
    stream: impl std::io::Read + Send + 'static,
    log: Option<Arc<Mutex<File>>>,
    prefix: String,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            if let Some(Ok(mut f)) = log.as_ref().map(|l| l.lock()) {
                let _ = f.write_all(&line);
            }
            let text = String::from_utf8_lossy(&line);
            if to_stderr {
                let _ = write!(std::io::stderr().lock(), "{prefix}{text}");
            } else {
                let _ = write!(std::io::stdout().lock(), "{prefix}{text}");
            }
        }
    })
}

/// The log file of `rank` under a run directory.
pub fn log_path(out_dir: &Path, rank: usize) -> PathBuf {
    out_dir.join("logs").join(format!("rank_{rank}.log"))
}
