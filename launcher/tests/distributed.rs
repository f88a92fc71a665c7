//! Distributed training end to end: real `launcher` and `trainer` processes on localhost, the
//! tiny synthetic-data transformer, the CPU ring.
//!
//! - 2 and 4 ranks match one process with the same global batch to float round-off;
//! - a worker killed with SIGKILL: the gang restarts from the last complete checkpoint and the
//!   final weights are byte-identical to an uninterrupted run of the same world size;
//! - two launchers acting as two nodes train together (byte-identical to one node × 2 workers),
//!   started by hand or by `--hostfile` (through a stand-in for ssh);
//! - a stopped worker (SIGSTOP) is found by its missing heartbeats: restart, or a clear failure
//!   with no restarts left;
//! - SIGTERM to the launcher: every rank stops after the same update, rank 0 checkpoints, 143;
//! - node 0's launcher killed: node 1's launcher loses the store and exits 4, no worker is left;
//! - bad input: the master port taken, configs that differ between nodes;
//! - PowerSGD across processes: fewer bytes, and a gang restart that continues like the
//!   uninterrupted run (to round-off: the checkpoint keeps the mean error over ranks);
//! - the store's secret: an outsider with the run id but not the secret can neither register,
//!   report a failure, interrupt nor write a key, and the secret shows in no command line or log;
//!   several nodes without a private secret are refused;
//! - bounds and signals: too many workers for the machine are refused before any starts; SIGTERM
//!   while the launcher waits for the other nodes ends it, and while workers start or wait in
//!   the rendezvous stops them at once; a SIGKILLed launcher
//!   leaves no worker behind, even one waiting in the rendezvous.
//!
//! The trainer binary is built (or found up to date) by `cargo build` in this test's profile, so
//! `cargo test -p launcher` never runs a stale trainer.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The trainer binary of this checkout, built in the profile these tests were built in; or
/// `TESSERA_TRAINER` where that is set (a machine without cargo: scripts/gpu-check.sh).
fn trainer() -> &'static Path {
    static TRAINER: OnceLock<PathBuf> = OnceLock::new();
    TRAINER.get_or_init(|| {
        if let Some(p) = std::env::var_os("TESSERA_TRAINER") {
            return PathBuf::from(p);
        }
        let launcher = Path::new(env!("CARGO_BIN_EXE_launcher"));
        let profile_dir = launcher.parent().expect("target/<profile>");
        let target_dir = profile_dir.parent().expect("target");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "test",
            Some(other) => other,
            None => "test",
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "trainer",
                "--bin",
                "trainer",
                "--profile",
            ])
            .arg(profile)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running cargo build for the trainer binary");
        assert!(
            out.status.success(),
            "cargo build -p trainer failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exe = launcher.with_file_name(format!("trainer{}", std::env::consts::EXE_SUFFIX));
        assert!(exe.exists(), "{} was not built", exe.display());
        exe
    })
}

/// A tiny transformer run: `steps` updates of `batch` sequences per rank, short timeouts.
fn write_config(dir: &Path, out: &Path, steps: u64, batch: usize, every: u64) -> PathBuf {
    write_config_with(dir, out, steps, batch, every, "")
}

/// [`write_config`] with more sections appended.
fn write_config_with(
    dir: &Path,
    out: &Path,
    steps: u64,
    batch: usize,
    every: u64,
    extra: &str,
) -> PathBuf {
    let yaml = format!(
        "run:\n  name: dist\n  out_dir: {}\n  seed: 7\n  device: cpu\n\
         model:\n  text_len: 8\n  text_vocab: 40\n  grid: 4\n  image_vocab: 24\n  d_model: 32\n  heads: 2\n  layers: 4\n  conv_kernel: 3\n\
         data:\n  source: synthetic\n  min_caption_tokens: 3\n\
         optim:\n  lr: 3.0e-3\n\
         train:\n  steps: {steps}\n  batch_size: {batch}\n  log_every: 1\n\
         checkpoint:\n  every: {every}\n  keep_last: 50\n\
         distributed:\n  rendezvous_timeout_s: 60\n  collective_timeout_s: 60\n  heartbeat_interval_s: 0.1\n  heartbeat_timeout_s: 3\n  term_grace_s: 3\n{extra}",
        out.display()
    );
    let path = dir.join(format!(
        "{}.yaml",
        out.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The launcher binary under test (`TESSERA_LAUNCHER` overrides, as `TESSERA_TRAINER` does).
fn launcher_exe() -> PathBuf {
    std::env::var_os("TESSERA_LAUNCHER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_launcher")))
}

/// The secret of the tests' runs on several nodes (one-node runs generate their own unless a test
/// keeps this one).
const TEST_SECRET: &str = "tessera-test-secret-0123456789abcdef0123456789abcdef";

fn launcher_cmd(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(launcher_exe());
    cmd.args(args)
        .arg(config)
        .env_remove("TESSERA_STORE_SECRET_FILE")
        .env("TESSERA_STORE_SECRET", TEST_SECRET)
        .env("TESSERA_TRAINER", trainer())
        .env("TESSERA_PEAK_GFLOPS", "1")
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

/// One process of `trainer train` on `config`, without the launcher, to its successful end.
fn train_alone(config: &Path) {
    let o = Command::new(trainer())
        .args(["train", "--config"])
        .arg(config)
        .env("TESSERA_PEAK_GFLOPS", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

fn launch(config: &Path, args: &[&str]) -> Output {
    launcher_cmd(config, args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A launcher running in the background, its stderr collected line by line.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(config: &Path, args: &[&str]) -> Running {
        Running::spawn(launcher_cmd(config, args))
    }

    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Running {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The pid the launcher announced for `rank` in `generation`.
    fn pid_of(&self, rank: usize, generation: u64) -> Option<i32> {
        let needle = format!("rank {rank}: pid ");
        let suffix = format!("(generation {generation})");
        self.lines.lock().unwrap().iter().find_map(|l| {
            let rest = &l[l.find(&needle)? + needle.len()..];
            rest.contains(&suffix)
                .then(|| rest.split_whitespace().next()?.parse().ok())
                .flatten()
        })
    }

    fn wait(mut self, limit: Duration) -> (i32, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "the launcher did not finish within {limit:?}:\n{}",
                    self.lines.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.reader.take().unwrap().join().unwrap();
        let log = self.lines.lock().unwrap().join("\n");
        (status.code().unwrap_or(-1), log)
    }
}

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

/// The last step in rank 0's metrics.jsonl (0 before the first).
fn logged_step(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .ok()
        .and_then(|t| {
            let last = t.lines().rev().find(|l| l.ends_with('}'))?.to_string();
            serde_json::from_str::<serde_json::Value>(&last).ok()?["step"].as_u64()
        })
        .unwrap_or(0)
}

fn wait_for_step(out: &Path, step: u64, limit: Duration) {
    let started = Instant::now();
    while logged_step(out) < step {
        assert!(
            started.elapsed() < limit,
            "the run never reached step {step} (at {})",
            logged_step(out)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn model_file(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoints/step_{step:08}/model.safetensors"))
}

/// The f32 tensors of a safetensors file, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out: Vec<(String, Vec<f32>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (s, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            let vals = data[s..e]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (k.clone(), vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Largest |a − b| over every weight.
fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// A TCP port free right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// After 20 AdamW updates at lr 3e-3 the weights of 2 and 4 ranks (global batch 8 split 4 + 4
/// and 2 × 4) stay within 1e-4 of one process with batch 8: a thirtieth of one update's size,
/// while 5 updates move them by more than 1e-2. (AdamW divides by √v, so gradients that are
/// round-off apart can differ by a visible fraction of a step where v is tiny.)
#[test]
fn two_and_four_ranks_match_one_process_with_the_same_global_batch() {
    const TOLERANCE: f32 = 1e-4;
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let cfg = write_config(tmp.path(), &single, 20, 8, 5);
    train_alone(&cfg);
    let moved = max_abs_diff(&model_file(&single, 15), &model_file(&single, 20));
    assert!(
        moved > 100.0 * TOLERANCE,
        "5 updates moved the weights by {moved}"
    );

    for (procs, batch) in [(2, 4), (4, 2)] {
        let out = tmp.path().join(format!("ranks{procs}"));
        let cfg = write_config(tmp.path(), &out, 20, batch, 5);
        let o = launch(&cfg, &["--procs-per-node", &procs.to_string()]);
        assert!(o.status.success(), "{}", text(&o));
        let d = max_abs_diff(&model_file(&single, 20), &model_file(&out, 20));
        eprintln!("{procs} ranks: max |Δw| = {d:e}");
        assert!(
            d <= TOLERANCE,
            "{procs} ranks differ from one process by {d}"
        );
        // Only rank 0 wrote the metrics, one line per update; every rank left a log.
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 20);
        for r in 0..procs {
            assert!(out.join(format!("logs/rank_{r}.log")).exists());
        }
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains(&format!("[rank {}] {{\"step\":20", procs - 1)),
            "{stdout}"
        );
    }
}

#[test]
fn a_killed_worker_restarts_the_gang_and_the_result_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    const STEPS: u64 = 400;
    let cfg = write_config(tmp.path(), &straight, STEPS, 4, 25);
    let o = launch(&cfg, &["--procs-per-node", "2"]);
    assert!(o.status.success(), "{}", text(&o));

    let cfg = write_config(tmp.path(), &killed, STEPS, 4, 25);
    let run = Running::start(&cfg, &["--procs-per-node", "2", "--max-restarts", "2"]);
    wait_for_step(&killed, 50, Duration::from_secs(60));
    let pid = run.pid_of(1, 0).expect("rank 1's pid");
    signal(pid, "-KILL");
    let (code, log) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("rank 1 (pid") && log.contains("signal 9 (SIGKILL)"),
        "{log}"
    );
    assert!(
        log.contains("restart 1 of 2: starting generation 1"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(model_file(&straight, STEPS)).unwrap(),
        std::fs::read(model_file(&killed, STEPS)).unwrap(),
        "the restarted run's final weights differ from the uninterrupted run's"
    );
    // The resumed run logged each update once, in order.
    let steps: Vec<u64> = std::fs::read_to_string(killed.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
}

#[test]
fn two_launchers_as_two_nodes_train_together() {
    let tmp = tempfile::tempdir().unwrap();
    let (one_node, two_nodes) = (tmp.path().join("one"), tmp.path().join("two"));
    let cfg = write_config(tmp.path(), &one_node, 30, 4, 10);
    let o = launch(&cfg, &["--procs-per-node", "2"]);
    assert!(o.status.success(), "{}", text(&o));

    let cfg = write_config(tmp.path(), &two_nodes, 30, 4, 10);
    let port = free_port().to_string();
    let common = [
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port,
        "--run-id",
        "two-nodes",
    ];
    // Node 1 first: it waits for node 0's store.
    let node1 = Running::start(&cfg, &[&common[..], &["--node-rank", "1"]].concat());
    std::thread::sleep(Duration::from_millis(300));
    let node0 = Running::start(&cfg, &[&common[..], &["--node-rank", "0"]].concat());
    let (c0, log0) = node0.wait(Duration::from_secs(60));
    let (c1, log1) = node1.wait(Duration::from_secs(60));
    assert_eq!((c0, c1), (0, 0), "node 0:\n{log0}\nnode 1:\n{log1}");
    assert!(
        log0.contains("every node has joined: 2 × 1 workers"),
        "{log0}"
    );
    // Same world size, same ring order: the same bytes as one node with two workers.
    assert_eq!(
        std::fs::read(model_file(&one_node, 30)).unwrap(),
        std::fs::read(model_file(&two_nodes, 30)).unwrap()
    );

    // --hostfile: this launcher is node 0 and starts node 1's over "ssh" (here a stand-in that
    // runs the command on this machine).
    let by_hostfile = tmp.path().join("hostfile");
    let cfg = write_config(tmp.path(), &by_hostfile, 30, 4, 10);
    let ssh = tmp.path().join("fake-ssh");
    std::fs::write(
        &ssh,
        "#!/bin/sh\n# fake ssh HOST COMMAND: run COMMAND here\nshift\nexec sh -c \"$1\"\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&ssh).status().unwrap();
    let hosts = tmp.path().join("hosts.txt");
    std::fs::write(
        &hosts,
        "# two nodes\nlocalhost slots=1\nlocalhost slots=1\n",
    )
    .unwrap();
    let port = free_port().to_string();
    let mut cmd = launcher_cmd(
        &cfg,
        &[
            "--hostfile",
            hosts.to_str().unwrap(),
            "--master-port",
            &port,
        ],
    );
    // No secret given: node 0 generates one and hands it to node 1 on ssh's stdin.
    let o = cmd
        .env("TESSERA_SSH", &ssh)
        .env_remove("TESSERA_STORE_SECRET")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("[launcher node 1]"), "{}", text(&o));
    assert_eq!(
        std::fs::read(model_file(&one_node, 30)).unwrap(),
        std::fs::read(model_file(&by_hostfile, 30)).unwrap()
    );
}

#[test]
fn a_stopped_worker_is_found_by_its_missing_heartbeats() {
    let tmp = tempfile::tempdir().unwrap();
    // With a restart left: the gang restarts and finishes.
    let out = tmp.path().join("restarts");
    let cfg = write_config(tmp.path(), &out, 300, 4, 20);
    let run = Running::start(&cfg, &["--procs-per-node", "2", "--max-restarts", "1"]);
    wait_for_step(&out, 30, Duration::from_secs(60));
    signal(run.pid_of(1, 0).expect("rank 1's pid"), "-STOP");
    let (code, log) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("sent no heartbeat"), "{log}");
    assert!(log.contains("starting generation 1"), "{log}");
    assert!(model_file(&out, 300).exists());

    // Without: the run fails, saying why.
    let out = tmp.path().join("no-restarts");
    let cfg = write_config(tmp.path(), &out, 100_000, 4, 0);
    let run = Running::start(&cfg, &["--procs-per-node", "2"]);
    wait_for_step(&out, 10, Duration::from_secs(60));
    let stopped_at = Instant::now();
    signal(run.pid_of(1, 0).expect("rank 1's pid"), "-STOP");
    let (code, log) = run.wait(Duration::from_secs(60));
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("run failed: rank 1 (pid") && log.contains("sent no heartbeat"),
        "{log}"
    );
    assert!(
        log.contains("no restarts left: 0 of --max-restarts 0 used"),
        "{log}"
    );
    // Heartbeat timeout (3 s) + grace (3 s), with room for a loaded machine.
    assert!(stopped_at.elapsed() < Duration::from_secs(30));
}

#[test]
fn sigterm_to_the_launcher_stops_every_rank_after_the_same_update() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 100_000, 4, 0);
    let run = Running::start(&cfg, &["--procs-per-node", "3"]);
    wait_for_step(&out, 10, Duration::from_secs(60));
    signal(run.child.id() as i32, "-TERM");
    let (code, log) = run.wait(Duration::from_secs(60));
    assert_eq!(code, 143, "{log}");
    // One complete checkpoint, at the last logged step; every rank exited 143 (stopped).
    let done: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("DONE").exists())
        .collect();
    assert_eq!(done.len(), 1, "{done:?}");
    let step = logged_step(&out);
    assert!(
        done[0].ends_with(format!("step_{step:08}")),
        "{done:?} vs {step}"
    );
    for r in 0..3 {
        assert!(
            log.contains(&format!("rank {r} stopped (status 143)")),
            "{log}"
        );
    }
}

#[test]
fn a_taken_master_port_and_configs_that_differ_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = launch(&cfg, &["--master-port", &port]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("already in use"), "{}", text(&o));

    // Node 1 overrides the learning rate: the ranks' config hashes differ.
    let port = free_port().to_string();
    let common = [
        "--nodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port,
        "--run-id",
        "mismatch",
    ];
    let node1 = Running::start(
        &cfg,
        &[&common[..], &["--node-rank", "1", "--set", "optim.lr=1e-3"]].concat(),
    );
    let node0 = Running::start(&cfg, &[&common[..], &["--node-rank", "0"]].concat());
    let (c0, log0) = node0.wait(Duration::from_secs(60));
    let (c1, log1) = node1.wait(Duration::from_secs(60));
    assert_eq!((c0, c1), (3, 3), "node 0:\n{log0}\nnode 1:\n{log1}");
    assert!(log0.contains("'s config (sha256"), "{log0}");
    assert!(log1.contains("same --set overrides"), "{log1}");
}

/// The launcher has the trainer check the whole config (`trainer config`) before it starts
/// anything, though it reads only `run` and `distributed` itself: a misspelt field of the model, a
/// model the transformer cannot build, and a `--set` naming no field are refused with the
/// trainer's message and the usage status, and no worker is started (no `logs/`).
#[test]
fn a_config_the_trainer_refuses_is_refused_before_any_worker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    set_in_config(&cfg, "layers", "4", "4\n  layer: 2");
    let o = launch(&cfg, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("unknown field `layer`"), "{}", text(&o));
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    set_in_config(&cfg, "heads", "2", "3");
    let o = launch(&cfg, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("model.heads"), "{}", text(&o));
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    let o = launch(&cfg, &["--set", "optim.learning_rate=1e-3"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--set optim.learning_rate=1e-3: unknown field 'learning_rate'"),
        "{}",
        text(&o)
    );
    assert!(!out.join("logs").exists());
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn when_node_0s_launcher_dies_no_worker_is_left_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 100_000, 4, 0);
    let port = free_port().to_string();
    let common = [
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port,
        "--run-id",
        "orphans",
    ];
    let node0 = Running::start(&cfg, &[&common[..], &["--node-rank", "0"]].concat());
    let node1 = Running::start(&cfg, &[&common[..], &["--node-rank", "1"]].concat());
    wait_for_step(&out, 10, Duration::from_secs(60));
    let workers = [node0.pid_of(0, 0).unwrap(), node1.pid_of(1, 0).unwrap()];
    signal(node0.child.id() as i32, "-KILL");
    let _ = node0.wait(Duration::from_secs(10));
    // Node 1's launcher loses the store, stops its worker and says so.
    let (code, log) = node1.wait(Duration::from_secs(60));
    assert_eq!(code, 4, "{log}");
    assert!(log.contains("lost the rendezvous store"), "{log}");
    // Node 0's worker got SIGTERM when its launcher died; nothing is left running.
    let started = Instant::now();
    while !workers.iter().all(|p| gone(*p)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "workers {workers:?} still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// PowerSGD across processes: it sends fewer bytes than the plain all-reduce, and a worker killed
/// mid-run restarts the gang from a checkpoint with the PowerSGD state. Not bit-exact at W > 1 by
/// design (the checkpoint holds the mean error over ranks, docs/powersgd.md): 25 updates after
/// the restore the weights are within 1e-3 of the uninterrupted run (measured 1.2e-4; plain W=2
/// vs W=1 after 20 updates: 2.3e-5), and the mean loss of the last 20 updates within 0.1%.
#[test]
fn powersgd_across_processes_saves_bytes_and_survives_a_restart() {
    const POWERSGD: &str = "compression:\n  kind: powersgd\n  rank: 2\n  min_compression_rate: 0\n";
    const STEPS: u64 = 300;
    let tmp = tempfile::tempdir().unwrap();
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    let cfg = write_config_with(tmp.path(), &straight, STEPS, 4, 25, POWERSGD);
    let o = launch(&cfg, &["--procs-per-node", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let metrics = |out: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let last = metrics(&straight).pop().unwrap();
    let (sent, plain) = (
        last["bytes_sent"].as_f64().unwrap(),
        last["bytes_uncompressed"].as_f64().unwrap(),
    );
    assert!(sent < 0.5 * plain, "PowerSGD sent {sent} of {plain} bytes");

    let cfg = write_config_with(tmp.path(), &killed, STEPS, 4, 25, POWERSGD);
    let run = Running::start(&cfg, &["--procs-per-node", "2", "--max-restarts", "1"]);
    wait_for_step(&killed, 40, Duration::from_secs(60));
    let at_kill = logged_step(&killed);
    signal(run.pid_of(1, 0).expect("rank 1's pid"), "-KILL");
    let (code, log) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("starting generation 1"), "{log}");
    // The first checkpoint after the one the gang restarted from (the newest at the kill).
    let next = (at_kill / 25 + 1) * 25;
    let d = max_abs_diff(&model_file(&straight, next), &model_file(&killed, next));
    assert!(
        d <= 1e-3,
        "step {next}, 25 updates after the restore: max |Δw| = {d}"
    );
    let mean_loss = |out: &Path| -> f64 {
        let m = metrics(out);
        m[m.len() - 20..]
            .iter()
            .map(|x| x["loss"].as_f64().unwrap())
            .sum::<f64>()
            / 20.0
    };
    let (a, b) = (mean_loss(&straight), mean_loss(&killed));
    assert!(
        (a - b).abs() <= 1e-3 * a,
        "mean loss of the last 20 updates: {a} vs {b}"
    );
}

/// `launcher` with the environment of the host's CUDA setup removed.
fn launcher_without_cuda_env(config: &Path, args: &[&str]) -> Command {
    let mut cmd = launcher_cmd(config, args);
    for var in cuda_libs::SEARCH_VARS {
        cmd.env_remove(var);
    }
    cmd.env("TESSERA_PYTHON", "/nonexistent/python3");
    cmd
}

/// True when `lib` loads in this process or the library search finds it with `resolution`.
fn usable(lib: &cuda_libs::Library, resolution: &cuda_libs::Resolution) -> bool {
    cuda_libs::loadable(lib) || resolution.get(lib).is_some()
}

/// NCCL collectives on a machine where NCCL or the CUDA driver does not load: the launcher
/// refuses before starting a worker, naming the library and the variable to set.
#[test]
fn nccl_without_its_libraries_stops_the_run_before_any_worker_starts() {
    use cuda_libs::{Resolution, DRIVER, NCCL};
    // What the launcher below finds: the system's directories only.
    let system = Resolution::find(&|_| None, &[]);
    if usable(&DRIVER, &system) && usable(&NCCL, &system) {
        eprintln!("skipped: NCCL and the CUDA driver are installed system-wide on this machine");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nccl");
    let cfg = write_config_with(tmp.path(), &out, 2, 2, 1, "  collectives: nccl\n");
    let o = launcher_without_cuda_env(&cfg, &["--procs-per-node", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "distributed.collectives = nccl needs NCCL and the CUDA driver",
        "not found",
        "TESSERA_CUDA_LIB_PATH",
    ] {
        assert!(err.contains(want), "{want:?} missing:\n{}", text(&o));
    }
    assert!(!out.join("logs/rank_0.log").exists(), "a worker started");
}

/// Skips a test that needs a GPU, saying why; under `TESSERA_REQUIRE_GPU=1`
/// (`scripts/gpu-check.sh run`) fails it instead, where a skip would pass with nothing learned.
fn skip_without_gpu(reason: &str) {
    if std::env::var("TESSERA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("TESSERA_REQUIRE_GPU=1, but this GPU test cannot run: {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// The GPUs of this machine when NCCL is usable too; `None` (after saying why) otherwise.
fn gpus_with_nccl() -> Option<usize> {
    use cuda_libs::{device_count, Resolution, NCCL};
    let gpus = device_count().unwrap_or(0);
    // NCCL from a wheel does not load in this process, but the launcher finds it for workers.
    let nccl = usable(&NCCL, &Resolution::from_env());
    if gpus == 0 || !nccl {
        skip_without_gpu(&format!(
            "needs a GPU and NCCL (found {gpus} GPUs, NCCL found: {nccl}; NCCL is searched as \
             docs/cluster.md says, TESSERA_CUDA_LIB_PATH first)"
        ));
        return None;
    }
    Some(gpus)
}

/// Two launchers on this machine as two nodes of one worker each, both workers on the first
/// visible GPU. NCCL is told they are different hosts (distinct `NCCL_HOSTID`s: NCCL ≤ 2.29
/// refuses two ranks on one GPU of one host, "Duplicate GPU detected") and allowed several ranks
/// per GPU (`NCCL_MULTI_RANK_GPU_ENABLE=1`, NCCL ≥ 2.30); they talk over loopback sockets. The
/// unique id, NCCL's inter-process setup, its network transport, the asynchronous-error and abort
/// paths all run, which one rank per GPU with a single GPU would not.
fn start_two_ranks_on_one_gpu(cfg: &Path, run_id: &str, log: &str) -> [Running; 2] {
    let port = free_port().to_string();
    let node = |k: usize| {
        let mut cmd = launcher_cmd(
            cfg,
            &[
                "--nodes",
                "2",
                "--procs-per-node",
                "1",
                "--node-rank",
                &k.to_string(),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
                "--run-id",
                run_id,
            ],
        );
        cmd.env("NCCL_HOSTID", format!("tessera-test-node{k}"))
            .env("NCCL_MULTI_RANK_GPU_ENABLE", "1")
            .env("RUST_LOG", log);
        for (var, value) in [("NCCL_SOCKET_IFNAME", "lo"), ("NCCL_IB_DISABLE", "1")] {
            if std::env::var_os(var).is_none() {
                cmd.env(var, value);
            }
        }
        Running::spawn(cmd)
    };
    let node1 = node(1);
    let node0 = node(0);
    [node0, node1]
}

/// Rewrites `key: old` to `key: new` in a config written by [`write_config_with`].
fn set_in_config(cfg: &Path, key: &str, old: &str, new: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let (from, to) = (format!("{key}: {old}\n"), format!("{key}: {new}\n"));
    assert!(text.contains(&from), "{from:?} not in {}", cfg.display());
    std::fs::write(cfg, text.replace(&from, &to)).unwrap();
}

/// On a machine with a GPU and NCCL: the same 2-rank run with NCCL and with the CPU ring, with
/// two ranks sharing one GPU (two launchers, see [`start_two_ranks_on_one_gpu`]) and, where two
/// GPUs are visible, one GPU per rank. NCCL sums in its own order, so the weights agree to
/// round-off (the ring's two-node run is byte-identical to its one-node run: see
/// `two_launchers_as_two_nodes_train_together`).
#[test]
fn nccl_collectives_train_like_the_ring_on_gpus() {
    let Some(gpus) = gpus_with_nccl() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = |name: &str, kind: &str| {
        let out = tmp.path().join(name);
        let cfg = write_config_with(
            tmp.path(),
            &out,
            6,
            2,
            6,
            &format!("  collectives: {kind}\n"),
        );
        (out, cfg)
    };
    let (ring, cfg) = config("ring", "tcp");
    let o = launch(&cfg, &["--procs-per-node", "2"]);
    assert!(o.status.success(), "ring: {}", text(&o));

    let (shared, cfg) = config("shared", "nccl");
    let [node0, node1] = start_two_ranks_on_one_gpu(&cfg, "nccl-shared", "warn");
    let (c0, log0) = node0.wait(Duration::from_secs(300));
    let (c1, log1) = node1.wait(Duration::from_secs(60));
    assert_eq!((c0, c1), (0, 0), "node 0:\n{log0}\nnode 1:\n{log1}");
    let mut runs = vec![("two ranks on one GPU", shared, 1e-5)];

    // The model on the GPU too (run.device: cuda): NCCL reduces the gradient in device memory,
    // one grouped all-reduce (`Collectives::all_reduce_mean_device`), no host copy. The
    // device's sums differ from the CPU's by round-off, as the emulated device's do.
    let (resident, cfg) = config("resident", "nccl");
    set_in_config(&cfg, "device", "cpu", "cuda");
    let [node0, node1] = start_two_ranks_on_one_gpu(&cfg, "nccl-resident", "info");
    let (c0, log0) = node0.wait(Duration::from_secs(300));
    let (c1, log1) = node1.wait(Duration::from_secs(60));
    assert_eq!((c0, c1), (0, 0), "node 0:\n{log0}\nnode 1:\n{log1}");
    assert!(
        log0.contains("gradient reduced in GPU memory"),
        "the resident run reduced through the host:\n{log0}"
    );
    runs.push(("two ranks on one GPU, model on the GPU", resident, 1e-4));

    if gpus >= 2 {
        let (own, cfg) = config("own", "nccl");
        let o = launch(&cfg, &["--procs-per-node", "2"]);
        assert!(o.status.success(), "one GPU per rank: {}", text(&o));
        runs.push(("one GPU per rank", own, 1e-5));
    } else {
        eprintln!("one GPU per rank not run: 1 GPU visible");
    }
    for (what, out, tolerance) in runs {
        let d = max_abs_diff(&model_file(&ring, 6), &model_file(&out, 6));
        eprintln!("{what}: NCCL vs ring max |Δw| = {d:e}");
        assert!(d <= tolerance, "{what}: NCCL and the ring differ by {d}");
        assert!(d.is_finite());
    }
}

/// A rank killed mid-run (SIGKILL): the other rank's NCCL operation ends with an error naming
/// it, through NCCL's asynchronous error, the gang stop its heartbeat brings, or
/// `collective_timeout_s` (20 s here), and well before the launcher would SIGKILL it
/// (`term_grace_s`, 120 s here).
#[test]
fn a_rank_killed_during_nccl_collectives_fails_its_peer_within_the_timeout() {
    if gpus_with_nccl().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("killed");
    let cfg = write_config_with(
        tmp.path(),
        &out,
        1_000_000,
        2,
        1_000_000,
        "  collectives: nccl\n",
    );
    set_in_config(&cfg, "collective_timeout_s", "60", "20");
    set_in_config(&cfg, "term_grace_s", "3", "120");
    let [node0, node1] = start_two_ranks_on_one_gpu(&cfg, "nccl-killed", "warn");
    wait_for_step(&out, 3, Duration::from_secs(300));
    let pid = node1.pid_of(1, 0).expect("rank 1's pid");
    signal(pid, "-KILL");
    let killed = Instant::now();
    let (c0, log0) = node0.wait(Duration::from_secs(200));
    let took = killed.elapsed();
    let (c1, log1) = node1.wait(Duration::from_secs(60));
    // Rank 0's own output, stdout and stderr, whatever its launcher printed.
    let rank0 = std::fs::read_to_string(out.join("logs/rank_0.log")).unwrap_or_default();
    let both = format!("node 0:\n{log0}\nnode 1:\n{log1}\nrank 0's log:\n{rank0}");
    assert!(c0 != 0 && c1 != 0, "exit {c0}, {c1}\n{both}");
    assert!(
        took < Duration::from_secs(20 + 15),
        "rank 0 took {took:?} after the kill\n{both}"
    );
    let named = ["all-reduce", "broadcast", "barrier"]
        .iter()
        .any(|op| rank0.contains(&format!("collective {op}:")));
    assert!(named, "rank 0's error names no operation:\n{both}");
    assert!(
        !log0.contains("grace period over: SIGKILL"),
        "rank 0 had to be killed by its launcher:\n{both}"
    );
}

/// The first line of a running launcher's stderr containing `needle`, waiting for it.
fn wait_for_line(run: &Running, needle: &str, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        if let Some(l) = run
            .lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
        {
            return l.clone();
        }
        assert!(
            started.elapsed() < limit,
            "no line with {needle:?}:\n{}",
            run.lines.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The variable `var` of a process's environment, read from /proc.
fn environ_of(pid: i32, var: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{var}=")).map(str::to_string)
    })
}

/// Issue 12: one frame with the run id (printed by the launcher, and on one node
/// `<start time>-<pid>`) used to register as rank 0, report a failed worker or interrupt the run.
/// Without the secret each attempt is refused as unauthenticated and logged, and the run
/// finishes normally; the secret that the launcher generated appears in no command line, no
/// worker environment and no log.
#[test]
fn an_outsider_with_the_run_id_but_not_the_secret_cannot_touch_the_run() {
    use dist::auth::{Credentials, Secret};
    use dist::client::{Registration, StoreClient};
    use dist::protocol::{NodeEvent, RefusalKind};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 200, 4, 100);
    let mut cmd = launcher_cmd(&cfg, &["--procs-per-node", "2"]);
    cmd.env_remove("TESSERA_STORE_SECRET");
    let run = Running::spawn(cmd);
    let limit = Duration::from_secs(60);
    let line = wait_for_line(&run, "rendezvous store on ", limit);
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let line = wait_for_line(&run, " node(s) × ", limit);
    let run_id = line
        .split("] run ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap()
        .to_string();
    // The secret the launcher gave its workers, read as this same user can.
    let worker = loop {
        if let Some(pid) = run.pid_of(0, 0) {
            break pid;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let file = environ_of(worker, "TESSERA_STORE_SECRET_FILE").expect("the worker's secret file");
    assert_eq!(environ_of(worker, "TESSERA_STORE_SECRET"), None);
    let secret = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(secret.len() >= 32, "{secret:?}");
    for pid in [run.child.id() as i32, worker] {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains(&secret));
    }

    let outsider = Credentials {
        run_id: run_id.clone(),
        secret: Secret::from_text(b"a-guess-that-is-not-the-secret-0123456789", "test").unwrap(),
    };
    let stranger = || StoreClient::connect(&addr, &outsider, Duration::from_secs(10)).unwrap();
    let failure = Some(NodeEvent::WorkerFailed {
        reason: "forged".into(),
    });
    let interrupt = Some(NodeEvent::Interrupted {
        reason: "forged".into(),
    });
    let rank0 = Registration {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        generation: 0,
        config_hash: "0".repeat(64),
        pid: 1,
        host: "outsider".into(),
    };
    let errors = [
        (
            "register as rank 0",
            stranger()
                .register(&rank0, Duration::from_secs(10))
                .unwrap_err(),
        ),
        (
            "report a failed worker",
            stranger().node_update(0, 0, failure).unwrap_err(),
        ),
        (
            "interrupt the run",
            stranger().node_update(0, 0, interrupt).unwrap_err(),
        ),
        (
            "write a key",
            stranger().set(0, "ring/addr/0", "127.0.0.1:1").unwrap_err(),
        ),
    ];
    for (what, e) in &errors {
        assert_eq!(
            e.refusal_kind(),
            Some(RefusalKind::Unauthenticated),
            "{what}: {e}"
        );
    }
    let (code, log) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    for r in 0..2 {
        assert!(log.contains(&format!("rank {r} finished")), "{log}");
    }
    assert!(!log.contains("starting generation 1"), "{log}");
    let refused = log
        .lines()
        .filter(|l| l.contains("[store] refused a frame from 127.0.0.1:"))
        .count();
    assert_eq!(refused, 4, "{log}");
    assert!(model_file(&out, 200).exists());
    let mut logs = log;
    for r in 0..2 {
        logs += &std::fs::read_to_string(out.join(format!("logs/rank_{r}.log"))).unwrap();
    }
    assert!(!logs.contains(&secret), "the secret is in a log");
    assert!(
        !Path::new(&file).exists(),
        "the secret file outlived the launcher"
    );
}

#[test]
fn several_nodes_need_a_private_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &tmp.path().join("run"), 5, 4, 0);
    let two = [
        "--nodes",
        "2",
        "--node-rank",
        "0",
        "--master-addr",
        "127.0.0.1",
        "--run-id",
        "r",
    ];
    let o = launcher_cmd(&cfg, &two)
        .env_remove("TESSERA_STORE_SECRET")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("needs a secret shared by every node")
            && text(&o).contains("TESSERA_STORE_SECRET_FILE"),
        "{}",
        text(&o)
    );
    let file = tmp.path().join("secret");
    std::fs::write(&file, format!("{TEST_SECRET}\n")).unwrap();
    Command::new("chmod")
        .arg("644")
        .arg(&file)
        .status()
        .unwrap();
    let o = launcher_cmd(&cfg, &two)
        .env_remove("TESSERA_STORE_SECRET")
        .env("TESSERA_STORE_SECRET_FILE", &file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("{}: mode 0644", file.display())),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains(TEST_SECRET), "{}", text(&o));
}

/// The most CPU-ring workers this machine may run per node (the launcher's stated bound).
fn most_cpu_workers() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Issue 12: `--procs-per-node 100000` spawned thousands of workers; now it is refused before any
/// starts, naming the bound.
#[test]
fn more_workers_than_the_machine_can_run_are_refused_before_any_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    let too_many = (most_cpu_workers() + 1).to_string();
    for procs in ["100000", too_many.as_str()] {
        let o = launch(&cfg, &["--procs-per-node", procs]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            text(&o).contains(&format!("--procs-per-node {procs}: this machine has"))
                && text(&o).contains("at most 4 CPU workers per core"),
            "{}",
            text(&o)
        );
        assert!(!out.join("logs").exists(), "a worker started");
    }
}

/// SIGTERM to a launcher while it starts as many workers as it may: it stops starting, its
/// workers (starting, or waiting in the rendezvous) stop on SIGTERM without needing SIGKILL (the
/// grace period is longer than the test waits), and it exits 143 with none left.
#[test]
fn sigterm_while_starting_many_workers_stops_them_all() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 100_000, 4, 0);
    set_in_config(&cfg, "term_grace_s", "3", "600");
    let procs = most_cpu_workers().to_string();
    let run = Running::start(&cfg, &["--procs-per-node", &procs]);
    wait_for_line(&run, "rank 0: pid ", Duration::from_secs(60));
    signal(run.child.id() as i32, "-TERM");
    let pids: Vec<i32> = {
        let (code, log) = run.wait(Duration::from_secs(120));
        assert_eq!(code, 143, "{log}");
        assert!(!log.contains("grace period over"), "{log}");
        log.lines()
            .filter_map(|l| {
                let rest = &l[l.find(": pid ")? + 6..];
                rest.split_whitespace().next()?.parse().ok()
            })
            .collect()
    };
    assert!(!pids.is_empty());
    for p in pids {
        assert!(gone(p), "worker {p} is still running");
    }
}

/// A worker waiting in the rendezvous (its peer never comes; the rendezvous timeout is 60 s)
/// exits at once with 143 on SIGTERM.
#[test]
fn a_worker_waiting_in_the_rendezvous_exits_on_sigterm() {
    use dist::auth::Secret;
    use dist::store::{StoreParams, StoreServer};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    let secret = Secret::from_text(TEST_SECRET.as_bytes(), "test").unwrap();
    let store = StoreServer::start(
        "127.0.0.1:0".parse().unwrap(),
        StoreParams {
            run_id: "waiting".into(),
            secret: secret.clone(),
            heartbeat_timeout: Duration::from_secs(60),
            rendezvous_timeout: Duration::from_secs(60),
        },
    )
    .unwrap();
    let file = secret.write_private(tmp.path(), "secret").unwrap();
    let mut worker = Command::new(trainer())
        .args(["train", "--config"])
        .arg(&cfg)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", store.local_addr().port().to_string())
        .env("TESSERA_RUN_ID", "waiting")
        .env_remove("TESSERA_STORE_SECRET")
        .env("TESSERA_STORE_SECRET_FILE", &file)
        .env("RUST_LOG", "info")
        .env("TESSERA_PEAK_GFLOPS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "joining the run" is logged just before the registration that waits for rank 1.
    let mut stderr = BufReader::new(worker.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the worker ended first:\n{seen}"
        );
        seen += &line;
        if line.contains("joining the run") {
            break;
        }
    }
    // Give the registration a moment to reach the store; either way SIGTERM must end the wait.
    std::thread::sleep(Duration::from_millis(200));
    signal(worker.id() as i32, "-TERM");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(45) {
            let _ = worker.kill();
            panic!("the worker ignored SIGTERM in the rendezvous:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143), "{seen}");
}

/// Node 1's worker waits in the rendezvous for node 0's, which never registers (node 0's
/// "trainer" only sleeps); SIGKILL to node 1's launcher ends that worker through its parent-death
/// signal, long before the rendezvous timeout (600 s), while node 0's store is still up.
#[test]
fn a_sigkilled_launcher_leaves_no_worker_waiting_in_the_rendezvous() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    set_in_config(&cfg, "rendezvous_timeout_s", "60", "600");
    let sleeper = tmp.path().join("sleeper");
    // A worker that never reaches the rendezvous; `config` (the launcher's reading of the run
    // config through the trainer) still answers.
    std::fs::write(
        &sleeper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = config ]; then exec '{}' \"$@\"; fi\nexec sleep 600\n",
            trainer().display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&sleeper)
        .status()
        .unwrap();
    let port = free_port().to_string();
    let common = [
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port,
        "--run-id",
        "orphans-in-rendezvous",
    ];
    let mut cmd = launcher_cmd(&cfg, &[&common[..], &["--node-rank", "0"]].concat());
    cmd.env("TESSERA_TRAINER", &sleeper);
    let node0 = Running::spawn(cmd);
    let mut cmd = launcher_cmd(&cfg, &[&common[..], &["--node-rank", "1"]].concat());
    cmd.env("RUST_LOG", "info");
    let node1 = Running::spawn(cmd);
    wait_for_line(&node0, "rank 0: pid ", Duration::from_secs(60));
    // Rank 1 logs this just before the registration that waits for rank 0.
    wait_for_line(&node1, "joining the run", Duration::from_secs(60));
    let workers = [node0.pid_of(0, 0).unwrap(), node1.pid_of(1, 0).unwrap()];
    signal(node1.child.id() as i32, "-KILL");
    let _ = node1.wait(Duration::from_secs(10));
    let started = Instant::now();
    while !gone(workers[1]) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rank 1 (pid {}) outlived its launcher in the rendezvous",
            workers[1]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Node 0 finds node 1 lost, stops its worker and fails.
    let (code, log) = node0.wait(Duration::from_secs(120));
    assert_eq!(code, 1, "{log}");
    assert!(gone(workers[0]), "{log}");
}

/// SIGTERM while the launcher waits for the other nodes (node 1 never comes; the rendezvous
/// timeout is 600 s): it exits 143 at once, before starting a worker.
#[test]
fn sigterm_while_waiting_for_the_other_nodes_ends_the_launcher() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &out, 5, 4, 0);
    set_in_config(&cfg, "rendezvous_timeout_s", "60", "600");
    let port = free_port().to_string();
    let run = Running::start(
        &cfg,
        &[
            "--nodes",
            "2",
            "--node-rank",
            "0",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--run-id",
            "lonely",
        ],
    );
    wait_for_line(&run, "rendezvous store on ", Duration::from_secs(60));
    signal(run.child.id() as i32, "-TERM");
    let (code, log) = run.wait(Duration::from_secs(60));
    assert_eq!(code, 143, "{log}");
    assert!(
        log.contains("stopped by a signal before any worker started"),
        "{log}"
    );
    assert!(!out.join("logs").exists(), "a worker started:\n{log}");
}

#[test]
fn a_run_directory_in_use_is_refused_before_any_worker_starts_and_the_launchers_own_lock_lets_its_ranks_train(
) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("busy");
    let config = write_config(tmp.path(), &out, 2, 4, 0);
    // The trainer is built first, so that no build runs while this process holds the lock.
    trainer();
    // Another run (this test process) holds the directory.
    let held = dist::run_lock::RunLock::acquire(&out).unwrap();
    let started = Instant::now();
    let o = launch(&config, &["--procs-per-node", "2", "--max-restarts", "3"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let pid = format!("pid {}", std::process::id());
    assert!(
        text(&o).contains(&pid) && text(&o).contains("in use"),
        "{}",
        text(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{}", text(&o));
    assert!(
        !out.join("metrics.jsonl").exists(),
        "no worker ran: {}",
        text(&o)
    );
    // Freed: the launcher holds the lock itself, and its rank 0 trains under it.
    drop(held);
    let o = launch(&config, &["--procs-per-node", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("metrics.jsonl").exists());
}

/// Two ranks training on the emulated GPU (`run.device: cuda-emu`: weights, gradients and
/// AdamW on the device, the gradient reduced over the CPU ring between them) match one CPU
/// process with the same global batch, as the CPU ranks do.
#[test]
fn two_ranks_on_the_emulated_gpu_match_one_cpu_process() {
    const TOLERANCE: f32 = 1e-4;
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single-cpu");
    let cfg = write_config(tmp.path(), &single, 6, 4, 3);
    train_alone(&cfg);
    let out = tmp.path().join("ranks-emu");
    let cfg = write_config(tmp.path(), &out, 6, 2, 3);
    let yaml = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("device: cpu", "device: cuda-emu");
    std::fs::write(&cfg, yaml).unwrap();
    let o = launch(&cfg, &["--procs-per-node", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let moved = max_abs_diff(&model_file(&single, 3), &model_file(&single, 6));
    assert!(
        moved > 50.0 * TOLERANCE,
        "3 updates moved the weights by {moved}"
    );
    let d = max_abs_diff(&model_file(&single, 6), &model_file(&out, 6));
    eprintln!("2 ranks on the emulated GPU: max |Δw| = {d:e}");
    assert!(d <= TOLERANCE, "they differ from one CPU process by {d}");
}

/// Two ranks reducing through PowerSGD with their gradients on the emulated GPU (the products,
/// orthonormalisation, decompression and error buffers on the device, the factors over the CPU
/// ring) match two CPU ranks running the host PowerSGD: weights and the saved error buffers.
#[test]
fn two_powersgd_ranks_on_the_emulated_gpu_match_two_on_the_cpu() {
    const TOLERANCE: f32 = 1e-4;
    const POWERSGD: &str = "compression:\n  kind: powersgd\n  rank: 2\n  min_compression_rate: 0\n";
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, device: &str| {
        let out = tmp.path().join(name);
        let cfg = write_config_with(tmp.path(), &out, 4, 2, 2, POWERSGD);
        let yaml = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("device: cpu", &format!("device: {device}"));
        std::fs::write(&cfg, yaml).unwrap();
        let o = launch(&cfg, &["--procs-per-node", "2"]);
        assert!(o.status.success(), "{}", text(&o));
        out
    };
    let (cpu, emu) = (run("psgd-cpu", "cpu"), run("psgd-emu", "cuda-emu"));
    let moved = max_abs_diff(&model_file(&cpu, 2), &model_file(&cpu, 4));
    assert!(
        moved > 50.0 * TOLERANCE,
        "2 updates moved the weights by {moved}"
    );
    let d = max_abs_diff(&model_file(&cpu, 4), &model_file(&emu, 4));
    let state = |out: &Path| out.join("checkpoints/step_00000004/powersgd.safetensors");
    let e = max_abs_diff(&state(&cpu), &state(&emu));
    eprintln!(
        "2 PowerSGD ranks on the emulated GPU vs the CPU: max |Δw| = {d:e}, |Δerror| = {e:e}"
    );
    assert!(
        d <= TOLERANCE,
        "the weights differ from two CPU ranks by {d}"
    );
    assert!(
        e <= TOLERANCE,
        "the error buffers differ from two CPU ranks by {e}"
    );
}

/// Two ranks training a tiny dVAE on the emulated GPU (weights, gradients, AdamW and EMA on the
/// device, the gradient reduced over the CPU ring) match two ranks on the CPU: each rank reads
/// its own images and draws its own Gumbel noise, on either device the same.
#[test]
fn two_dvae_ranks_on_the_emulated_gpu_match_two_on_the_cpu() {
    const TOLERANCE: f32 = 1e-4;
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let res = 16usize;
    let mut w =
        formats::image_shard::ImageShardWriter::create(images.join("images.tis"), res as u32, 4, 3)
            .unwrap();
    for i in 0..16 {
        let px: Vec<u8> = (0..res * res * 3)
            .map(|j| ((j * (3 + i) + 40 * (j % 3)) % 256) as u8)
            .collect();
        w.push(&px, &format!("image {i}"), None).unwrap();
    }
    w.finish().unwrap();
    let config = |name: &str, device: &str| {
        let out = tmp.path().join(name);
        let yaml = format!(
            "run: {{ name: dvae, out_dir: {out}, seed: 7, device: {device} }}\n\
             model: {{ kind: dvae, resolution: 16, n_hid: 8, n_blk_per_group: 1, vocab_size: 16, n_init: 8 }}\n\
             data: {{ source: images, paths: [\"{images}/*.tis\"] }}\n\
             optim: {{ lr: 3.0e-3 }}\n\
             train: {{ steps: 4, batch_size: 2, log_every: 1 }}\n\
             checkpoint: {{ every: 2, keep_last: 5 }}\n\
             distributed: {{ rendezvous_timeout_s: 60, collective_timeout_s: 120, heartbeat_interval_s: 0.1, heartbeat_timeout_s: 10, term_grace_s: 3 }}\n",
            out = out.display(),
            images = images.display(),
        );
        let path = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        (path, out)
    };
    let (cfg_cpu, cpu) = config("dvae-cpu", "cpu");
    let (cfg_emu, emu) = config("dvae-emu", "cuda-emu");
    for cfg in [&cfg_cpu, &cfg_emu] {
        let o = launch(cfg, &["--procs-per-node", "2"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let moved = max_abs_diff(&model_file(&cpu, 2), &model_file(&cpu, 4));
    assert!(
        moved > 50.0 * TOLERANCE,
        "2 updates moved the weights by {moved}"
    );
    let d = max_abs_diff(&model_file(&cpu, 4), &model_file(&emu, 4));
    eprintln!("2 dVAE ranks on the emulated GPU vs the CPU: max |Δw| = {d:e}");
    assert!(d <= TOLERANCE, "they differ from two CPU ranks by {d}");
}
