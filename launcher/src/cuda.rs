//! The CUDA libraries of GPU workers: before starting workers that use NCCL, the launcher finds
//! NCCL and the CUDA driver ([`cuda_libs`]), makes them loadable under the names
//! `cudarc` tries, and gives the workers the `LD_LIBRARY_PATH` that does it. A library that
//! neither loads in the launcher nor is found stops the run before any worker starts.

use anyhow::{Context, Result};
use cuda_libs::{self, Resolution};
use dist::Transport;
use std::path::PathBuf;

use crate::plan::Plan;

/// What the workers of a run need added to their environment.
#[derive(Debug, Default)]
pub struct WorkerEnv {
    /// Variables to set in every worker.
    pub vars: Vec<(String, String)>,
    /// Where the libraries come from, for the console.
    pub note: Option<String>,
}

/// The environment the workers of `plan` need (nothing for CPU-ring runs).
pub fn worker_env(plan: &Plan) -> Result<WorkerEnv> {
    if plan.cfg.distributed.transport(plan.cfg.run.device) != Transport::Nccl {
        return Ok(WorkerEnv::default());
    }
    let r = Resolution::from_env();
    let mut said = Vec::new();
    for lib in [cuda_libs::DRIVER, cuda_libs::NCCL] {
        match r.require(&lib) {
            Ok(f) => said.push(format!("{} {}", lib.what, f.path().display())),
            // Loadable through the system's own search (ld.so.cache): nothing to add.
            Err(_) if cuda_libs::loadable(&lib) => said.push(format!("{} (system)", lib.what)),
            Err(e) => {
                return Err(e)
                    .context("distributed.collectives = nccl needs NCCL and the CUDA driver")
            }
        }
    }
    let dir = link_dir();
    let existing = std::env::var("LD_LIBRARY_PATH").ok();
    let path = r
        .library_path(&dir, existing.as_deref())
        .with_context(|| format!("making the CUDA library links in {}", dir.display()))?;
    Ok(WorkerEnv {
        vars: vec![("LD_LIBRARY_PATH".into(), path)],
        note: Some(format!("workers load {}", said.join(", "))),
    })
}

/// This user's directory of library links on this machine.
fn link_dir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("tessera-cuda-libs-{uid}"))
}
