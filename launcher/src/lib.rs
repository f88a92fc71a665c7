//! Tessera's launcher: starts and supervises the training workers of one node, torchrun style.
//!
//! - [`plan`]: the command line, SLURM's variables and the run config, resolved into a [`plan::Plan`];
//! - the rendezvous store that node 0's launcher hosts is [`dist::store`] (tokio TCP server);
//! - [`supervise`]: workers, log files, and the gang's stops and restarts; the exit statuses;
//! - [`remote`]: with `--hostfile`, the other nodes' launchers started over ssh;
//! - [`cuda`]: the CUDA and NCCL libraries of GPU workers.
//!
//! ```text
//! launcher --procs-per-node 4 config.yaml                                   # one node
//! export TESSERA_STORE_SECRET_FILE=~/.tessera/r1.secret   # several nodes: the same private file
//! launcher --nodes 2 --node-rank 0 --master-addr node01 --run-id r1 config.yaml  # on node01
//! launcher --nodes 2 --node-rank 1 --master-addr node01 --run-id r1 config.yaml  # on node02
//! srun --ntasks-per-node=1 launcher config.yaml                             # under SLURM
//! launcher --hostfile hosts.txt config.yaml       # on the first host; ssh starts the others
//! ```

pub mod cuda;
pub mod plan;
pub mod remote;
pub mod supervise;
