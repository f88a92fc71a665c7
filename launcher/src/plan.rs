//! The launcher's command line in two stages: [`Args`] as clap parses it, then [`Plan`], with
//! SLURM's variables, the run config and the defaults resolved and checked.
//!
//! The run config is checked by the trainer binary the workers run (`trainer config`, which
//! applies the `--set` overrides and prints the resolved config); the launcher reads its own
//! sections from that text ([`LaunchConfig`]) and does not build the models.

use anyhow::{bail, Context, Result};
use clap::Parser;
use dist::auth::{self, Secret};
use dist::config::LaunchConfig;
use dist::env::{check_run_id, format_host_port};
use dist::Device;
use dist::Transport;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Launch a Tessera training run: one launcher per node, torchrun style.
///
/// Exit status: 0 finished; 1 failed (a worker kept failing, restarts used up, or a node was
/// lost); 2 bad command line or config, or the master port is taken; 3 the rendezvous refused
/// the run (nodes, world sizes or configs disagree); 4 lost the rendezvous store (node 0's
/// launcher); 143 stopped by SIGINT/SIGTERM after the workers checkpointed.
///
/// Every frame to the rendezvous store is authenticated with the run's secret: generated on one
/// node; on several, every launcher needs the same TESSERA_STORE_SECRET_FILE (a file only you can
/// read) or TESSERA_STORE_SECRET (docs/cluster.md).
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// The run config (YAML).
    pub config: PathBuf,
    /// Number of nodes (default: SLURM_NNODES, else 1).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Worker processes per node (default for GPU and NCCL runs: the GPUs visible, the smaller of
    /// the CUDA_VISIBLE_DEVICES count and the CUDA driver's; else the config's
    /// distributed.cpu_procs_per_node). At most one per GPU for NCCL runs, 4 per CPU core for CPU
    /// runs.
    #[arg(long)]
    pub procs_per_node: Option<usize>,
    /// This node's rank in [0, nodes) (default: SLURM_NODEID, else 0).
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// Host of node 0, where the rendezvous store runs (default: the first host of
    /// SLURM_JOB_NODELIST; 127.0.0.1 on one node).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// TCP port of the rendezvous store (default: any free port on one node; 29500, or under
    /// SLURM 20000 + job id mod 20000, on several).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Restarts of the whole gang after a failure before giving up.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: u32,
    /// Run id shared by every node (required on several nodes unless under SLURM, where it is
    /// slurm-<job id>; generated on one node).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Config overrides passed to every worker (`section.field=value`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// DeepSpeed-style host file (`host slots=N` per line): run this launcher on the first host
    /// as node 0 and start the other hosts' launchers over ssh (`TESSERA_SSH` replaces `ssh`).
    #[arg(long, conflicts_with_all = ["nodes", "node_rank"])]
    pub hostfile: Option<PathBuf>,
    /// Read the run's secret from the first line of stdin (how `--hostfile` passes it to the
    /// other nodes' launchers over ssh).
    #[arg(long, hide = true)]
    pub store_secret_stdin: bool,
}

/// How many CPU-ring workers one node may run per core: a stated bound, so that a typo such as
/// `--procs-per-node 100000` is an error before anything starts.
pub const CPU_PROCS_PER_CORE: usize = 4;

/// The file descriptors a launcher needs for one worker (its log and two pipes), and node 0's
/// store for one rank (its connection and its heartbeat's) and one node, with a margin.
const FDS_PER_WORKER: u64 = 3;
const FDS_PER_RANK: u64 = 2;
const FDS_PER_NODE: u64 = 2;
const FDS_MARGIN: u64 = 64;

/// The soft limit on this process's open files (`ulimit -n`), when known.
fn open_files_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// Checks a layout against what this machine can run: CPU-ring workers at most
/// [`CPU_PROCS_PER_CORE`] per core, and the open files the launcher (and on node 0 the store) will
/// need within `ulimit -n`. `fd_limit`: the open-files limit, when known.
pub fn check_capacity(
    nodes: usize,
    procs_per_node: usize,
    node_rank: usize,
    cpu_cores: Option<usize>,
    fd_limit: Option<u64>,
) -> Result<()> {
    if let Some(cores) = cpu_cores {
        let most = cores.saturating_mul(CPU_PROCS_PER_CORE);
        if procs_per_node > most {
            bail!(
                "--procs-per-node {procs_per_node}: this machine has {cores} CPU cores and runs at \
                 most {CPU_PROCS_PER_CORE} CPU workers per core ({most}); start fewer workers per \
                 node, or more nodes"
            );
        }
    }
    let world = (nodes as u64).saturating_mul(procs_per_node as u64);
    let mut need = (procs_per_node as u64)
        .saturating_mul(FDS_PER_WORKER)
        .saturating_add(FDS_MARGIN);
    if node_rank == 0 {
        need = need
            .saturating_add(world.saturating_mul(FDS_PER_RANK))
            .saturating_add((nodes as u64).saturating_mul(FDS_PER_NODE));
    }
    if let Some(limit) = fd_limit {
        if need > limit {
            bail!(
                "--nodes {nodes} × --procs-per-node {procs_per_node} = {world} workers: this \
                 launcher{} needs about {need} open files, and may open {limit} (ulimit -n); \
                 raise the limit or start fewer workers",
                if node_rank == 0 {
                    " and the rendezvous store it hosts"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// One line of a host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSlots {
    pub host: String,
    pub slots: Option<usize>,
}

/// Parses DeepSpeed's host file format: `hostname [slots=N]` per line, `#` comments.
pub fn parse_hostfile(text: &str, name: &str) -> Result<Vec<HostSlots>> {
    let mut hosts: Vec<HostSlots> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let host = words.next().unwrap_or_default().to_string();
        let mut slots = None;
        for w in words {
            let n = w
                .strip_prefix("slots=")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .with_context(|| format!("{name}:{}: '{w}': expected slots=N with N ≥ 1", i + 1))?;
            slots = Some(n);
        }
        hosts.push(HostSlots { host, slots });
    }
    if hosts.is_empty() {
        bail!("{name}: no hosts");
    }
    Ok(hosts)
}

/// Everything a launcher needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config_path: PathBuf,
    pub overrides: Vec<String>,
    /// The launcher's sections of the resolved config.
    pub cfg: LaunchConfig,
    pub nodes: usize,
    pub node_rank: usize,
    pub procs_per_node: usize,
    pub master_addr: String,
    /// `None`: one node, the store takes any free port.
    pub master_port: Option<u16>,
    pub run_id: String,
    pub max_restarts: u32,
    pub trainer: PathBuf,
    /// With `--hostfile`: the hosts of nodes 1.. whose launchers this one starts over ssh.
    pub remote_hosts: Vec<String>,
    /// The run's secret (its `Debug` does not show it).
    pub secret: Secret,
}

/// Has `trainer config` check the run config (the file, then each `--set` override, exactly as
/// a worker will) and reads the launcher's sections from the resolved text it prints. A config
/// the trainer refuses is an error with the trainer's own message.
fn resolve_config(trainer: &Path, config: &Path, overrides: &[String]) -> Result<LaunchConfig> {
    let mut cmd = Command::new(trainer);
    cmd.arg("config").arg("--config").arg(config);
    for o in overrides {
        cmd.arg("--set").arg(o);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {} config", trainer.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        match stderr.lines().rev().find_map(|l| l.strip_prefix("error: ")) {
            Some(message) => bail!("{message}"),
            None => bail!(
                "{} config --config {} failed ({}): {}",
                trainer.display(),
                config.display(),
                out.status,
                stderr.trim()
            ),
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    LaunchConfig::from_resolved_yaml(&text).with_context(|| {
        format!(
            "reading the launcher's sections of {} as {} resolved it",
            config.display(),
            trainer.display()
        )
    })
}

/// What SLURM tells a task about its allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slurm {
    pub job_id: u64,
    pub nnodes: usize,
    pub node_id: usize,
    pub nodelist: String,
    pub in_step: bool,
}

impl Slurm {
    /// SLURM's variables, when SLURM_JOB_ID, SLURM_NNODES and SLURM_NODEID are all set.
    pub fn detect(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Slurm>> {
        let (Some(job), Some(nnodes), Some(node_id)) = (
            get("SLURM_JOB_ID"),
            get("SLURM_NNODES"),
            get("SLURM_NODEID"),
        ) else {
            return Ok(None);
        };
        let num = |var: &str, v: &str| -> Result<u64> {
            v.trim()
                .parse::<u64>()
                .with_context(|| format!("{var} = '{v}' is not a number"))
        };
        Ok(Some(Slurm {
            job_id: num("SLURM_JOB_ID", &job)?,
            nnodes: num("SLURM_NNODES", &nnodes)? as usize,
            node_id: num("SLURM_NODEID", &node_id)? as usize,
            nodelist: get("SLURM_JOB_NODELIST")
                .or_else(|| get("SLURM_NODELIST"))
                .unwrap_or_default(),
            in_step: get("SLURM_STEP_ID").is_some() || get("SLURM_STEPID").is_some(),
        }))
    }

    /// The first host of the allocation: `scontrol show hostnames` when it runs, else our own
    /// expansion of the node list.
    pub fn first_host(&self) -> Result<String> {
        if let Ok(out) = Command::new("scontrol")
            .args(["show", "hostnames", &self.nodelist])
            .output()
        {
            if out.status.success() {
                if let Some(h) = String::from_utf8_lossy(&out.stdout).lines().next() {
                    if !h.trim().is_empty() {
                        return Ok(h.trim().to_string());
                    }
                }
            }
        }
        expand_nodelist(&self.nodelist)?
            .into_iter()
            .next()
            .with_context(|| "SLURM_JOB_NODELIST is empty".to_string())
    }
}

/// Expands a SLURM host list: `node[01-03,7],gpu7` → node01 node02 node03 node07 gpu7. Handles
/// ranges with zero padding and several bracket groups per name (`r[1-2]n[1-2]`).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        hosts.extend(expand_item(&item).with_context(|| format!("node list '{list}'"))?);
    }
    Ok(hosts)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<String>> {
    let (mut items, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in list.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                if !cur.trim().is_empty() {
                    items.push(std::mem::take(&mut cur).trim().to_string());
                }
                cur.clear();
                continue;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            bail!("node list '{list}': unbalanced or nested brackets");
        }
        cur.push(c);
    }
    if depth != 0 {
        bail!("node list '{list}': unbalanced brackets");
    }
    if !cur.trim().is_empty() {
        items.push(cur.trim().to_string());
    }
    Ok(items)
}

fn expand_item(item: &str) -> Result<Vec<String>> {
    let Some(open) = item.find('[') else {
        return Ok(vec![item.to_string()]);
    };
    let close = item[open..]
        .find(']')
        .map(|i| open + i)
        .context("missing ']'")?;
    let (prefix, inner, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    let tails = expand_item(rest)?;
    let mut out = Vec::new();
    for part in inner.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let (a, b) = (
            lo.parse::<u64>()
                .with_context(|| format!("'{part}' is not a number or range"))?,
            hi.parse::<u64>()
                .with_context(|| format!("'{part}' is not a number or range"))?,
        );
        if b < a || b - a > 100_000 {
            bail!("range '{part}' is empty or too long");
        }
        for n in a..=b {
            for t in &tails {
                out.push(format!("{prefix}{n:0width$}{t}"));
            }
        }
    }
    Ok(out)
}

/// Devices listed in CUDA_VISIBLE_DEVICES (`None` when unset). Entries are device indices (≥ 0),
/// `GPU-<uuid>` or `MIG-<uuid>` (also the older `MIG-GPU-<uuid>/<gi>/<ci>`), as CUDA takes them; any
/// other entry ends the list, as it does for CUDA, which hides it and every device after it. When
/// `strict` (NCCL runs, which need one GPU per worker) such an entry is an error naming the
/// variable and the entry instead; a CPU run with `-1` or Slurm's `NoDevFiles` goes on.
fn visible_gpus(get: &dyn Fn(&str) -> Option<String>, strict: bool) -> Result<Option<usize>> {
    let Some(v) = get("CUDA_VISIBLE_DEVICES") else {
        return Ok(None);
    };
    let mut n = 0;
    for entry in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let uuid = |prefix: &str| {
            entry.strip_prefix(prefix).is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || matches!(c, '-' | '/' | 'G' | 'P' | 'U'))
            })
        };
        if !(entry.parse::<u32>().is_ok() || uuid("GPU-") || uuid("MIG-")) {
            if !strict {
                break;
            }
            bail!(
                "CUDA_VISIBLE_DEVICES = '{v}': entry '{entry}' is not a device index (0, 1, …), \
                 a GPU-<uuid> or a MIG-<uuid>; CUDA ignores it and every device after it. To \
                 hide every GPU set it to the empty string"
            );
        }
        n += 1;
    }
    Ok(Some(n))
}

/// The GPUs one node's workers can each have: the smaller of those `CUDA_VISIBLE_DEVICES` lists
/// and those the driver reports (`driver`, which applies the variable itself: a MIG list or a
/// device that does not exist shows fewer); whichever of the two is known. `None`: neither.
/// `strict`: an invalid entry is an error (see [`visible_gpus`]).
fn gpu_count(
    get: &dyn Fn(&str) -> Option<String>,
    driver: Option<usize>,
    strict: bool,
) -> Result<Option<usize>> {
    Ok(match (visible_gpus(get, strict)?, driver) {
        (Some(v), Some(d)) => Some(v.min(d)),
        (v, d) => v.or(d),
    })
}

impl Plan {
    /// Resolves `args` against the environment (`get`) and the config file.
    pub fn resolve(args: Args, get: &dyn Fn(&str) -> Option<String>) -> Result<Plan> {
        let trainer = match get("TESSERA_TRAINER") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()
                .context("locating the launcher binary")?
                .with_file_name(format!("trainer{}", std::env::consts::EXE_SUFFIX)),
        };
        if !trainer.exists() {
            bail!(
                "cannot find the trainer binary at {} (build it with `cargo build --release -p \
                 trainer`, or set TESSERA_TRAINER)",
                trainer.display()
            );
        }
        let cfg = resolve_config(&trainer, &args.config, &args.set)?;
        let hostfile = match &args.hostfile {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --hostfile {}", path.display()))?;
                Some(parse_hostfile(&text, &path.display().to_string())?)
            }
            None => None,
        };
        let slurm = if hostfile.is_some() {
            None
        } else {
            Slurm::detect(get)?
        };
        let nodes = match (args.nodes, &slurm) {
            (_, _) if hostfile.is_some() => hostfile.as_ref().map_or(1, |h| h.len()),
            (Some(n), Some(s)) if n != s.nnodes => bail!(
                "--nodes {n} disagrees with SLURM_NNODES = {}; drop --nodes under SLURM",
                s.nnodes
            ),
            (Some(n), _) => n,
            (None, Some(s)) => s.nnodes,
            (None, None) => 1,
        };
        if nodes < 1 {
            bail!("--nodes must be ≥ 1");
        }
        if let Some(s) = &slurm {
            if nodes > 1 && !s.in_step && args.node_rank.is_none() {
                eprintln!(
                    "[launcher] warning: SLURM allocation of {nodes} nodes but no job step: start \
                     one launcher per node with `srun --ntasks-per-node=1 launcher …`"
                );
            }
        }
        let node_rank = args
            .node_rank
            .or(slurm.as_ref().map(|s| s.node_id))
            .unwrap_or(0);
        if node_rank >= nodes {
            bail!("--node-rank {node_rank} must be < --nodes {nodes}");
        }
        let master_addr = match (&args.master_addr, &slurm) {
            (Some(a), _) => a.clone(),
            (None, _) if hostfile.is_some() => hostfile
                .as_ref()
                .map_or_else(String::new, |h| h[0].host.clone()),
            (None, Some(s)) if nodes > 1 => s.first_host()?,
            (None, _) if nodes == 1 => "127.0.0.1".to_string(),
            (None, _) => bail!(
                "--master-addr is required with --nodes {nodes} (the host of node 0, reachable \
                 from every node)"
            ),
        };
        let master_port = match (args.master_port, &slurm) {
            (Some(0), _) => bail!("--master-port must be in [1, 65535]"),
            (Some(p), _) => Some(p),
            (None, _) if nodes == 1 && hostfile.is_none() => None,
            (None, Some(s)) => Some(20000 + (s.job_id % 20000) as u16),
            (None, None) => Some(29500),
        };
        let run_id = match (&args.run_id, &slurm) {
            (Some(id), _) => id.clone(),
            (None, Some(s)) => format!("slurm-{}", s.job_id),
            (None, None) if nodes == 1 || hostfile.is_some() => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                format!("{t}-{}", std::process::id())
            }
            (None, None) => bail!(
                "--run-id is required with --nodes {nodes}: every node's launcher must pass the \
                 same id"
            ),
        };
        check_run_id(&run_id).map_err(|m| anyhow::anyhow!("--run-id: {m}"))?;
        let nccl = cfg.distributed.transport(cfg.run.device) == Transport::Nccl;
        let gpus = match cfg.run.device {
            Device::Cpu | Device::CudaEmu if !nccl => None,
            _ => gpu_count(get, cuda_libs::device_count(), nccl)?,
        };
        let slots = hostfile.as_ref().and_then(|h| {
            let first = h[0].slots;
            h.iter()
                .all(|x| x.slots == first)
                .then_some(first)
                .flatten()
        });
        if let Some(h) = &hostfile {
            if slots.is_none() && h.iter().any(|x| x.slots.is_some()) {
                bail!(
                    "--hostfile: every host needs the same slots=N (found {}); the world is \
                     nodes × procs per node",
                    h.iter()
                        .map(|x| format!(
                            "{} slots={}",
                            x.host,
                            x.slots.map_or("?".into(), |n| n.to_string())
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let procs_per_node = match (args.procs_per_node, gpus) {
            (Some(p), _) => p,
            (None, _) if slots.is_some() => slots.unwrap_or(1),
            (None, Some(g)) if g > 0 => g,
            _ => cfg.distributed.cpu_procs_per_node,
        };
        if procs_per_node < 1 {
            bail!("--procs-per-node must be ≥ 1");
        }
        // CPU-ring workers share the cores; NCCL workers are bounded by the GPUs below.
        let cores = (!nccl)
            .then(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .flatten();
        check_capacity(nodes, procs_per_node, node_rank, cores, open_files_limit())?;
        if let (true, Some(g)) = (nccl, gpus) {
            if procs_per_node > g {
                bail!(
                    "{procs_per_node} workers per node, but NCCL collectives need one GPU per \
                     worker and this node has {g} (CUDA_VISIBLE_DEVICES = {}); start at most {g} \
                     (--procs-per-node), or run more nodes",
                    get("CUDA_VISIBLE_DEVICES").unwrap_or_else(|| "<unset>".into())
                );
            }
        }
        let secret = if args.store_secret_stdin {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("--store-secret-stdin: reading the secret from stdin")?;
            Secret::from_text(line.as_bytes(), "--store-secret-stdin")?
        } else {
            match Secret::from_lookup(get)? {
                Some(s) => s,
                None if nodes == 1 || hostfile.is_some() => {
                    Secret::generate().context("generating the run's secret")?
                }
                None => bail!(
                    "a run on {nodes} nodes needs a secret shared by every node's launcher, which \
                     authenticates every frame to the rendezvous store: set {} to a file only \
                     you can read (`umask 077; openssl rand -hex 32 > ~/.tessera-secret`) or {} \
                     to such a value, the same on every node (docs/cluster.md, \"The store's \
                     secret\")",
                    auth::SECRET_FILE_ENV,
                    auth::SECRET_ENV
                ),
            }
        };
        Ok(Plan {
            secret,
            config_path: args.config,
            overrides: args.set,
            cfg,
            nodes,
            node_rank,
            procs_per_node,
            master_addr,
            master_port,
            run_id,
            max_restarts: args.max_restarts,
            trainer,
            remote_hosts: hostfile
                .map(|h| h.into_iter().skip(1).map(|x| x.host).collect())
                .unwrap_or_default(),
        })
    }

    pub fn world_size(&self) -> usize {
        self.nodes * self.procs_per_node
    }

    /// `host:port` of the store, once the port is known.
    pub fn store_addr(&self, port: u16) -> String {
        format_host_port(&self.master_addr, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_expand_like_scontrol() {
        assert_eq!(
            expand_nodelist("node[01-03,7],gpu7").unwrap(),
            ["node01", "node02", "node03", "node7", "gpu7"]
        );
        assert_eq!(expand_nodelist("a").unwrap(), ["a"]);
        assert_eq!(
            expand_nodelist("r[1-2]n[08-09]-ib").unwrap(),
            ["r1n08-ib", "r1n09-ib", "r2n08-ib", "r2n09-ib"]
        );
        assert_eq!(
            expand_nodelist("x[9-10],y[1,3]").unwrap(),
            ["x9", "x10", "y1", "y3"]
        );
        for bad in ["n[1-", "n[3-1]", "n[a-b]", "n]1["] {
            assert!(expand_nodelist(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_files_parse_like_deepspeeds() {
        let h = parse_hostfile(
            "# cluster\nworker-0 slots=4\n\nworker-1   slots=4 # spare\n",
            "hf",
        )
        .unwrap();
        assert_eq!(
            h,
            [
                HostSlots {
                    host: "worker-0".into(),
                    slots: Some(4)
                },
                HostSlots {
                    host: "worker-1".into(),
                    slots: Some(4)
                }
            ]
        );
        assert_eq!(parse_hostfile("a\nb\n", "hf").unwrap()[1].slots, None);
        let e = parse_hostfile("a slots=x\n", "hf").unwrap_err().to_string();
        assert!(e.contains("hf:1: 'slots=x'"), "{e}");
        assert!(parse_hostfile("# nothing\n", "hf").is_err());
    }

    #[test]
    fn slurm_variables_are_read_when_all_present() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let get = env(&[
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_NNODES", "4"),
            ("SLURM_NODEID", "2"),
            ("SLURM_JOB_NODELIST", "gpu[3-6]"),
            ("SLURM_STEP_ID", "0"),
        ]);
        let s = Slurm::detect(&get).unwrap().unwrap();
        assert_eq!(
            (s.job_id, s.nnodes, s.node_id, s.in_step),
            (4242, 4, 2, true)
        );
        assert_eq!(expand_nodelist(&s.nodelist).unwrap()[0], "gpu3");
        assert_eq!(Slurm::detect(&env(&[("SLURM_JOB_ID", "1")])).unwrap(), None);
        let bad = env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_NNODES", "x"),
            ("SLURM_NODEID", "0"),
        ]);
        assert!(Slurm::detect(&bad)
            .unwrap_err()
            .to_string()
            .contains("SLURM_NNODES"));
    }

    #[test]
    fn procs_per_node_and_nodes_are_checked_against_the_machine() {
        check_capacity(1, 8, 0, Some(2), Some(1024)).unwrap();
        let e = check_capacity(1, 9, 0, Some(2), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--procs-per-node 9") && e.contains("2 CPU cores") && e.contains("(8)"),
            "{e}"
        );
        let e = check_capacity(1, 100_000, 0, Some(64), Some(1 << 20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 4 CPU workers per core (256)"), "{e}");
        // The store on node 0 holds connections for every rank of every node.
        let e = check_capacity(1000, 4, 0, Some(4), Some(1024))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--nodes 1000 × --procs-per-node 4 = 4000 workers")
                && e.contains("rendezvous store")
                && e.contains("may open 1024 (ulimit -n)"),
            "{e}"
        );
        // Other nodes host no store.
        check_capacity(1000, 4, 1, Some(4), Some(1024)).unwrap();
    }

    fn visible(v: &str) -> impl Fn(&str) -> Option<String> + '_ {
        move |k: &str| (k == "CUDA_VISIBLE_DEVICES").then(|| v.to_string())
    }

    #[test]
    fn gpu_count_is_the_smaller_of_the_visible_list_and_the_driver() {
        let count = |v: Option<&str>, driver| match v {
            Some(v) => gpu_count(&visible(v), driver, true).unwrap(),
            None => gpu_count(&|_: &str| None, driver, true).unwrap(),
        };
        assert_eq!(count(Some("0,1,3"), Some(8)), Some(3));
        // The driver sees fewer: devices that do not exist, or MIG instances it shows as one.
        assert_eq!(count(Some("0,1,7"), Some(2)), Some(2));
        assert_eq!(
            count(
                Some("MIG-4f3e1b8a-6c2d-5e9f-a1b2-c3d4e5f60718,MIG-GPU-4f3e1b8a-6c2d-5e9f-a1b2-c3d4e5f60718/1/0"),
                Some(1)
            ),
            Some(1)
        );
        assert_eq!(
            count(Some("GPU-4f3e1b8a-6c2d-5e9f-a1b2-c3d4e5f60718, 1"), None),
            Some(2)
        );
        assert_eq!(count(Some(""), Some(4)), Some(0));
        assert_eq!(count(None, Some(4)), Some(4));
        assert_eq!(count(None, None), None);
    }

    #[test]
    fn an_invalid_cuda_visible_devices_entry_is_an_error_naming_it() {
        for (v, entry) in [
            ("0,abc", "abc"),
            ("-1", "-1"),
            ("0,-2", "-2"),
            ("GPU-", "GPU-"),
            ("MIG-zz", "MIG-zz"),
            ("1.5", "1.5"),
        ] {
            let e = gpu_count(&visible(v), Some(8), true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("CUDA_VISIBLE_DEVICES") && e.contains(&format!("entry '{entry}'")),
                "{v}: {e}"
            );
        }
        // Outside NCCL runs the list ends at the first invalid entry, as CUDA reads it: `-1`
        // (hide every GPU) or Slurm's `NoDevFiles` do not stop a CPU-ring run.
        for (v, n) in [("-1", 0), ("NoDevFiles", 0), ("0,abc,1", 1), ("2,3", 2)] {
            assert_eq!(
                gpu_count(&visible(v), Some(8), false).unwrap(),
                Some(n),
                "{v}"
            );
        }
    }
}
