//! Tessera's multi-process layer, without the models: how a worker joins a run and gets its
//! [`Collectives`], and the rendezvous store that node 0's launcher hosts.
//!
//! - [`collectives`]: the [`Collectives`] seam every gradient reduction goes through, and
//!   [`SingleProcess`];
//! - [`env`]: torchrun's variables (`RANK`, `WORLD_SIZE`, …) plus `TESSERA_RUN_ID` and the run's
//!   secret;
//! - [`auth`]: the secret and the HMAC that authenticates every frame to the store;
//! - [`config`]: the `distributed:` section (timeouts, workers per node on CPU machines), the
//!   run's [`Device`], and [`config::LaunchConfig`], the part of a run config the launcher reads;
//! - [`protocol`], [`client`], [`store`]: the rendezvous store's frames, a blocking client, and
//!   the store itself (a tokio TCP server that node 0's launcher runs);
//! - [`ring`]: [`ring::TcpRing`], the CPU collectives (deterministic ring all-reduce);
//! - [`nccl`]: [`nccl::NcclComm`], NCCL through `cudarc` for GPU runs;
//! - [`heartbeat`]: the thread that keeps the store informed that a worker is alive;
//! - [`run_lock`]: one run per run directory (an advisory lock rank 0 holds).
//!
//! [`connect`] is all the training loop calls: with no `RANK`/`WORLD_SIZE` it returns
//! [`SingleProcess`]; otherwise it registers with the store (every rank, same world size, same
//! config hash: the rendezvous), starts the heartbeat thread and builds the ring or joins the
//! NCCL communicator (`distributed.collectives`). Until it returns, SIGTERM and SIGINT end the
//! worker at once with status 143 (there is nothing to checkpoint yet), so a worker waiting in
//! the rendezvous does not outlive a launcher that stops it or dies.

pub mod auth;
pub mod client;
pub mod collectives;
pub mod config;
pub mod env;
pub mod heartbeat;
pub mod nccl;
pub mod protocol;
pub mod ring;
pub mod run_lock;
pub mod store;

use client::{Registration, StoreClient, StoreError};
use collectives::{CollectiveError, Collectives, SingleProcess};
use env::{EnvError, WorkerEnv};
use heartbeat::{Heartbeat, HeartbeatOptions};
use ring::{Abort, AddressBook, RingOptions, TcpRing};
use std::sync::Arc;
use std::time::Duration;

pub use config::{CollectivesKind, Device, DistributedConfig, Transport};

/// Errors of joining a multi-process run.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("rendezvous failed")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Nccl(#[from] nccl::NcclError),
    #[error("starting the heartbeat thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("ranks disagree on {what}: rank {rank} has {mine}, rank 0 has {root}{hint}")]
    Disagree {
        what: String,
        rank: usize,
        mine: u64,
        root: u64,
        hint: &'static str,
    },
    #[error("ranks disagree on {what} (the differing ranks' logs say how)")]
    DisagreeElsewhere { what: String },
    #[error("the launcher that started this worker (pid {pid}) is gone; not joining the run")]
    LauncherGone { pid: u32 },
}

/// Exit status of a worker stopped by SIGTERM/SIGINT while joining (128 + SIGTERM).
pub const EXIT_STOPPED_WHILE_JOINING: i32 = 143;

/// While it lives, SIGTERM and SIGINT end the process at once with
/// [`EXIT_STOPPED_WHILE_JOINING`] (signal-hook's conditional shutdown; other handlers, such as
/// the trainer's stop flag, still run first).
struct StopWhileJoining {
    armed: Arc<std::sync::atomic::AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

impl StopWhileJoining {
    fn arm() -> Result<StopWhileJoining, std::io::Error> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut ids = Vec::new();
        for sig in [SIGTERM, SIGINT] {
            ids.push(signal_hook::flag::register_conditional_shutdown(
                sig,
                EXIT_STOPPED_WHILE_JOINING,
                armed.clone(),
            )?);
        }
        Ok(StopWhileJoining { armed, ids })
    }
}

impl Drop for StopWhileJoining {
    fn drop(&mut self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Fails when the launcher that started this worker has exited: the parent-death signal the
/// launcher asked for can arrive before [`StopWhileJoining`] is armed, and then only set the
/// trainer's stop flag.
fn check_launcher(env: &WorkerEnv) -> Result<(), DistError> {
    if let Some(pid) = env.launcher_pid {
        // SAFETY: getppid cannot fail.
        let parent = unsafe { libc::getppid() } as u32;
        if parent != pid {
            return Err(DistError::LauncherGone { pid });
        }
    }
    Ok(())
}

/// The collectives of this process: [`SingleProcess`] without torchrun's variables, else those
/// `distributed.collectives` selects, joined through the store named by
/// `MASTER_ADDR:MASTER_PORT`: a [`TcpRing`], or NCCL ([`nccl::NcclComm`]). `run` is what the
/// rendezvous needs of the run config.
pub fn connect(run: &RunInfo) -> Result<Box<dyn Collectives>, DistError> {
    let Some(env) = WorkerEnv::from_env()? else {
        return Ok(Box::new(SingleProcess));
    };
    let _stop = StopWhileJoining::arm()?;
    check_launcher(&env)?;
    match run.distributed.transport(run.device) {
        Transport::Tcp => Ok(Box::new(join(&env, run)?)),
        Transport::Nccl => Ok(Box::new(join_nccl(&env, run)?)),
    }
}

/// What joining a run needs of its config: the `distributed:` section, `run.device` and the
/// config's hash (sha256 of the resolved config, which every rank must share).
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub distributed: DistributedConfig,
    pub device: Device,
    pub config_hash: String,
}

/// A worker registered with the store, its heartbeat running.
struct Joined {
    client: StoreClient,
    heartbeat: Heartbeat,
    abort: Arc<Abort>,
    progress: Arc<std::sync::atomic::AtomicU64>,
}

/// Rendezvous (every rank, same world size, same config hash) and heartbeats.
fn rendezvous(env: &WorkerEnv, run: &RunInfo) -> Result<Joined, DistError> {
    let d = &run.distributed;
    let addr = env.store_addr();
    let mut client = StoreClient::connect(&addr, &env.credentials(), d.rendezvous_timeout())?;
    let registration = Registration {
        rank: env.rank,
        world_size: env.world_size,
        local_rank: env.local_rank,
        generation: env.generation,
        config_hash: run.config_hash.clone(),
        pid: std::process::id(),
        host: hostname(),
    };
    tracing::info!(%env, "joining the run");
    client.register(&registration, d.rendezvous_timeout())?;

    let abort = Arc::new(Abort::default());
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let heartbeat = Heartbeat::start(
        HeartbeatOptions {
            store_addr: addr,
            creds: env.credentials(),
            generation: env.generation,
            rank: env.rank,
            interval: d.heartbeat_interval(),
            lost_after: d.heartbeat_timeout(),
        },
        abort.clone(),
        progress.clone(),
    )?;
    Ok(Joined {
        client,
        heartbeat,
        abort,
        progress,
    })
}

/// Rendezvous, heartbeats and ring for the worker `env` describes.
pub fn join(env: &WorkerEnv, run: &RunInfo) -> Result<TcpRing, DistError> {
    let d = &run.distributed;
    let Joined {
        mut client,
        heartbeat,
        abort,
        progress,
    } = rendezvous(env, run)?;
    let opts = RingOptions {
        run_id: env.run_id.clone(),
        generation: env.generation,
        bind_ip: client.local_ip().map_err(|e| CollectiveError::Failed {
            op: "ring setup",
            msg: format!("local address of the store connection: {e}"),
        })?,
        connect_timeout: d.rendezvous_timeout(),
        op_timeout: d.collective_timeout(),
    };
    let mut book = StoreBook {
        client: &mut client,
        generation: env.generation,
    };
    let mut ring = TcpRing::connect(&mut book, env.rank, env.world_size, &opts, abort, progress)?;
    ring.attach(Box::new(Departure::new(client, heartbeat, env)));
    tracing::info!(rank = env.rank, world = env.world_size, "ring ready");
    Ok(ring)
}

/// Rendezvous, heartbeats and an NCCL communicator on the GPU numbered `LOCAL_RANK`; rank 0
/// creates the unique id and publishes it through the store.
pub fn join_nccl(env: &WorkerEnv, run: &RunInfo) -> Result<nccl::NcclComm, DistError> {
    // Before the rendezvous, so that a refused setting costs no wait (init checks it again).
    nccl::check_env(&|k| std::env::var(k).ok())?;
    nccl::check_libraries()?;
    let ctx = nccl::open_device(env.local_rank)?;
    let d = &run.distributed;
    let Joined {
        mut client,
        heartbeat,
        abort,
        progress,
    } = rendezvous(env, run)?;
    let id = if env.rank == 0 {
        let id = nccl::new_unique_id()?;
        client.set(
            env.generation,
            nccl::UNIQUE_ID_KEY,
            &nccl::encode_unique_id(&id),
        )?;
        id
    } else {
        let text = client.get(env.generation, nccl::UNIQUE_ID_KEY, d.rendezvous_timeout())?;
        nccl::decode_unique_id(&text).map_err(nccl::NcclError::UniqueId)?
    };
    let nccl_vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("NCCL_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(
        rank = env.rank,
        gpu = env.local_rank,
        nccl = nccl::NcclComm::version().unwrap_or_default(),
        vars = nccl_vars.join(" "),
        "joining the NCCL communicator"
    );
    let mut comm = nccl::NcclComm::init(
        ctx,
        env.rank,
        env.world_size,
        id,
        d.rendezvous_timeout(),
        d.collective_timeout(),
        abort,
        progress,
    )?;
    comm.attach(Box::new(Departure::new(client, heartbeat, env)));
    tracing::info!(rank = env.rank, world = env.world_size, "NCCL ready");
    Ok(comm)
}

/// Leaves the run when the ring is dropped: stops the heartbeat thread, then deregisters so the
/// store stops expecting heartbeats from this rank.
struct Departure {
    client: StoreClient,
    heartbeat: Option<Heartbeat>,
    generation: u64,
    rank: usize,
}

impl Departure {
    fn new(client: StoreClient, heartbeat: Heartbeat, env: &WorkerEnv) -> Departure {
        Departure {
            client,
            heartbeat: Some(heartbeat),
            generation: env.generation,
            rank: env.rank,
        }
    }
}

impl Drop for Departure {
    fn drop(&mut self) {
        self.heartbeat.take();
        if let Err(e) = self.client.deregister(self.generation, self.rank) {
            tracing::debug!("deregistering: {e}");
        }
    }
}

/// The store as the ring's [`AddressBook`], in this generation's key space.
struct StoreBook<'a> {
    client: &'a mut StoreClient,
    generation: u64,
}

impl AddressBook for StoreBook<'_> {
    fn publish(&mut self, key: &str, value: &str) -> Result<(), String> {
        self.client
            .set(self.generation, key, value)
            .map_err(|e| e.to_string())
    }
    fn lookup(&mut self, key: &str, timeout: Duration) -> Result<String, String> {
        self.client
            .get(self.generation, key, timeout)
            .map_err(|e| e.to_string())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// True on every rank when `flag` is true on any rank (one all-reduce of one element). The
/// training loop uses it so that a stop request that reached some ranks stops all of them after
/// the same update.
pub fn any_rank(comm: &mut dyn Collectives, flag: bool) -> Result<bool, CollectiveError> {
    let mut v = [if flag { 1.0f32 } else { 0.0 }];
    comm.all_reduce_sum(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Replaces each named value (loss terms) by its mean over ranks, identical on every rank; a
/// no-op with one rank. The sum runs in f32 (in the ring's fixed order, so it is reproducible).
pub fn mean_over_ranks(
    comm: &mut dyn Collectives,
    terms: &mut [(&'static str, f64)],
) -> Result<(), CollectiveError> {
    let w = comm.world_size();
    if w == 1 {
        return Ok(());
    }
    let mut buf: Vec<f32> = terms.iter().map(|t| t.1 as f32).collect();
    comm.all_reduce_sum(&mut buf)?;
    for (t, v) in terms.iter_mut().zip(buf) {
        t.1 = v as f64 / w as f64;
    }
    Ok(())
}

/// Checks that every rank holds the same `value` (e.g. the step it resumed from); on a mismatch
/// every rank fails, the differing ones saying what they have.
pub fn same_on_every_rank(
    comm: &mut dyn Collectives,
    what: &str,
    value: u64,
) -> Result<(), DistError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    // Four 16-bit pieces: exact in f32.
    let mut root: Vec<f32> = (0..4)
        .map(|i| ((value >> (16 * i)) & 0xffff) as f32)
        .collect();
    comm.broadcast(&mut root, 0)?;
    let root_value = root
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, p)| acc | ((*p as u64) << (16 * i)));
    let differs = root_value != value;
    if any_rank(comm, differs)? {
        if differs {
            return Err(DistError::Disagree {
                what: what.into(),
                rank: comm.rank(),
                mine: value,
                root: root_value,
                hint: "; run.out_dir must be one directory that every node sees",
            });
        }
        return Err(DistError::DisagreeElsewhere { what: what.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::with_local_rings;

    #[test]
    fn any_rank_and_same_on_every_rank() {
        let out = with_local_rings(3, Duration::from_secs(10), |rank, ring| {
            let any = any_rank(ring, rank == 2).unwrap();
            let none = any_rank(ring, false).unwrap();
            let same = same_on_every_rank(ring, "resumed step", 1 << 40).map_err(|e| e.to_string());
            let differ = same_on_every_rank(ring, "resumed step", if rank == 1 { 6 } else { 9 })
                .map_err(|e| e.to_string());
            (any, none, same, differ)
        });
        for (rank, (any, none, same, differ)) in out.iter().enumerate() {
            assert!(*any && !*none);
            assert!(same.is_ok());
            let e = differ.as_ref().unwrap_err();
            if rank == 1 {
                assert!(e.contains("rank 1 has 6, rank 0 has 9"), "{e}");
            } else {
                assert!(e.contains("disagree on resumed step"), "{e}");
            }
        }
    }
}
