//! The `distributed:` section of a run config: timeouts of the rendezvous, the collectives and
//! the supervision, the collectives transport, and the number of workers per node on CPU
//! machines. Every field has a default, so single-process configs leave the section out.
//!
//! Also `run.device` ([`Device`], which picks the transport), and [`LaunchConfig`]: the part of
//! a run config the launcher reads, without the models. The trainer's `RunConfig` holds the
//! whole file and rejects unknown fields; the launcher has the trainer check the file first.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The device a run uses (`run.device`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend; an error at start-up if no GPU or CUDA library is found.
    Cuda,
    /// The CUDA kernels on the CPU emulator (a test device: slow, for checking the device path
    /// against the CPU where no GPU exists; docs/kernels.md).
    #[serde(rename = "cuda-emu")]
    CudaEmu,
    /// CUDA when available, else CPU.
    #[default]
    Auto,
}

/// The part of a run config the launcher reads: `run.out_dir`, `run.device` and the
/// `distributed:` section. Every other section and field is ignored here, so this is read from
/// the config the trainer resolved (`trainer config`), never from an unchecked file: the
/// trainer's `RunConfig` rejects unknown fields and checks every range.
#[derive(Deserialize, Clone, Debug, PartialEq)]
pub struct LaunchConfig {
    pub run: LaunchRun,
    #[serde(default)]
    pub distributed: DistributedConfig,
}

/// The fields of `run:` the launcher reads.
#[derive(Deserialize, Clone, Debug, PartialEq)]
pub struct LaunchRun {
    /// The run directory (the launcher holds its lock and writes `logs/` there).
    pub out_dir: PathBuf,
    #[serde(default)]
    pub device: Device,
}

impl LaunchConfig {
    /// Reads the launcher's sections from a resolved config's YAML text.
    pub fn from_resolved_yaml(text: &str) -> Result<LaunchConfig, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}

/// The `distributed:` section. Times are in seconds (fractions allowed).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistributedConfig {
    /// Longest wait to form the gang: reaching the store, every node's launcher joining, every
    /// rank registering, ring neighbours connecting. > 0. Default 300.
    #[serde(default = "default_rendezvous_timeout")]
    pub rendezvous_timeout_s: f64,
    /// Longest wait of one collective (all-reduce, broadcast, barrier) or store get/barrier
    /// after the rendezvous. Must cover the slowest step plus a checkpoint. > 0. Default 600.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: f64,
    /// Interval of the heartbeats every worker (from a thread of its own) and every launcher send
    /// to the store. > 0. Default 5.
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_s: f64,
    /// A worker or launcher silent this long is declared dead and the gang is stopped.
    /// ≥ 2 × `heartbeat_interval_s`. Default 60.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_s: f64,
    /// Time a worker gets between SIGTERM (checkpoint and exit) and SIGKILL. ≥ 0. Default 60.
    #[serde(default = "default_term_grace")]
    pub term_grace_s: f64,
    /// Workers per node when the run is on the CPU (`run.device: cpu`, or no GPU visible).
    /// ≥ 1. Default 1.
    #[serde(default = "default_cpu_procs_per_node")]
    pub cpu_procs_per_node: usize,
    /// Which collectives the workers use: `tcp` (the CPU ring), `nccl` (one GPU per worker,
    /// `LOCAL_RANK` numbering the visible GPUs; the NCCL and CUDA driver libraries must load), or
    /// `auto`: NCCL when the run is on CUDA, else the ring. Default `auto`.
    #[serde(default)]
    pub collectives: CollectivesKind,
}

/// `distributed.collectives`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CollectivesKind {
    #[default]
    Auto,
    Tcp,
    Nccl,
}

/// The transport a run's collectives end up with (what `distributed.collectives` resolves to).
/// Not the compute backend: a run on the CPU may still use NCCL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The TCP ring between processes ([`crate::ring::TcpRing`]).
    Tcp,
    /// NCCL through `cudarc` ([`crate::nccl::NcclComm`]).
    Nccl,
}

fn default_rendezvous_timeout() -> f64 {
    300.0
}
fn default_collective_timeout() -> f64 {
    600.0
}
fn default_heartbeat_interval() -> f64 {
    5.0
}
fn default_heartbeat_timeout() -> f64 {
    60.0
}
fn default_term_grace() -> f64 {
    60.0
}
fn default_cpu_procs_per_node() -> usize {
    1
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            rendezvous_timeout_s: default_rendezvous_timeout(),
            collective_timeout_s: default_collective_timeout(),
            heartbeat_interval_s: default_heartbeat_interval(),
            heartbeat_timeout_s: default_heartbeat_timeout(),
            term_grace_s: default_term_grace(),
            cpu_procs_per_node: default_cpu_procs_per_node(),
            collectives: CollectivesKind::Auto,
        }
    }
}

/// The longest time any of the settings may name (a week): beyond it `Duration` arithmetic is
/// still exact, and a typo such as `1e30` is caught.
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

impl DistributedConfig {
    /// Checks ranges; the error is `(field, message)` with the field as `distributed.<field>`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |f: &str, m: String| Err((format!("distributed.{f}"), m));
        for (f, v) in [
            ("rendezvous_timeout_s", self.rendezvous_timeout_s),
            ("collective_timeout_s", self.collective_timeout_s),
            ("heartbeat_interval_s", self.heartbeat_interval_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= MAX_SECONDS) {
                return err(
                    f,
                    format!("distributed.{f} = {v} must be in (0, {MAX_SECONDS}] seconds"),
                );
            }
        }
        if !(self.term_grace_s.is_finite() && (0.0..=MAX_SECONDS).contains(&self.term_grace_s)) {
            return err(
                "term_grace_s",
                format!(
                    "distributed.term_grace_s = {} must be in [0, {MAX_SECONDS}] seconds",
                    self.term_grace_s
                ),
            );
        }
        if self.heartbeat_timeout_s < 2.0 * self.heartbeat_interval_s {
            return err(
                "heartbeat_timeout_s",
                format!(
                    "distributed.heartbeat_timeout_s = {} must be ≥ 2 × distributed.heartbeat_interval_s = {}",
                    self.heartbeat_timeout_s,
                    2.0 * self.heartbeat_interval_s
                ),
            );
        }
        if self.cpu_procs_per_node < 1 {
            return err(
                "cpu_procs_per_node",
                "distributed.cpu_procs_per_node must be ≥ 1".into(),
            );
        }
        Ok(())
    }

    /// The collectives transport for a run on `device`. `auto` is the ring until the training
    /// step itself runs on CUDA (`run.device: auto` resolves to the CPU in this release).
    pub fn transport(&self, device: Device) -> Transport {
        match (self.collectives, device) {
            (CollectivesKind::Nccl, _) | (CollectivesKind::Auto, Device::Cuda) => Transport::Nccl,
            _ => Transport::Tcp,
        }
    }

    pub fn rendezvous_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.rendezvous_timeout_s)
    }
    pub fn collective_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.collective_timeout_s)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_interval_s)
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_timeout_s)
    }
    pub fn term_grace(&self) -> Duration {
        Duration::from_secs_f64(self.term_grace_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_follows_the_setting_and_the_device() {
        let with = |k| DistributedConfig {
            collectives: k,
            ..Default::default()
        };
        use CollectivesKind as K;
        assert_eq!(with(K::Nccl).transport(Device::Cpu), Transport::Nccl);
        assert_eq!(with(K::Tcp).transport(Device::Cuda), Transport::Tcp);
        assert_eq!(with(K::Auto).transport(Device::Cuda), Transport::Nccl);
        assert_eq!(with(K::Auto).transport(Device::Auto), Transport::Tcp);
        assert_eq!(with(K::Auto).transport(Device::Cpu), Transport::Tcp);
        let d: DistributedConfig = serde_yaml::from_str("collectives: nccl").unwrap();
        assert_eq!(d.collectives, K::Nccl);
    }

    #[test]
    fn the_launch_view_reads_its_fields_and_ignores_the_other_sections() {
        let text = "run:\n  name: r\n  out_dir: runs/x\n  seed: 3\n  device: cuda-emu\n\
                    model:\n  kind: dvae\n  layers: 2\n\
                    distributed:\n  term_grace_s: 7.5\n  collectives: tcp\n";
        let c = LaunchConfig::from_resolved_yaml(text).unwrap();
        assert_eq!(c.run.out_dir, PathBuf::from("runs/x"));
        assert_eq!(c.run.device, Device::CudaEmu);
        assert_eq!(c.distributed.term_grace_s, 7.5);
        assert_eq!(c.distributed.collectives, CollectivesKind::Tcp);
        let bare = LaunchConfig::from_resolved_yaml("run:\n  out_dir: o\n").unwrap();
        assert_eq!(bare.run.device, Device::Auto);
        assert_eq!(bare.distributed, DistributedConfig::default());
        let e = LaunchConfig::from_resolved_yaml("run:\n  name: r\n").unwrap_err();
        assert!(e.to_string().contains("out_dir"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_an_empty_section_gives_them() {
        let d: DistributedConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(d, DistributedConfig::default());
        d.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "rendezvous_timeout_s: 0",
                "distributed.rendezvous_timeout_s",
            ),
            (
                "collective_timeout_s: .nan",
                "distributed.collective_timeout_s",
            ),
            (
                "heartbeat_interval_s: -1",
                "distributed.heartbeat_interval_s",
            ),
            (
                "heartbeat_interval_s: 10\nheartbeat_timeout_s: 15",
                "distributed.heartbeat_timeout_s",
            ),
            ("term_grace_s: -0.5", "distributed.term_grace_s"),
            ("cpu_procs_per_node: 0", "distributed.cpu_procs_per_node"),
            (
                "rendezvous_timeout_s: 1.0e30",
                "distributed.rendezvous_timeout_s",
            ),
        ];
        for (yaml, field) in cases {
            let d: DistributedConfig = serde_yaml::from_str(yaml).unwrap();
            let (f, m) = d.validate().unwrap_err();
            assert_eq!(f, *field, "{yaml}: {m}");
            assert!(m.contains(field), "{m}");
        }
        let e = serde_yaml::from_str::<DistributedConfig>("collectives: mpi").unwrap_err();
        assert!(e.to_string().contains("unknown variant `mpi`"), "{e}");
        let e = serde_yaml::from_str::<DistributedConfig>("heartbeat_s: 1").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
