//! The seam for data-parallel training: every reduction a training step needs goes through
//! [`Collectives`], so that NCCL (GPU runs) and a TCP ring (CPU runs, and the tests of the
//! distributed logic) plug in beside [`SingleProcess`] without touching the training loop.

/// Errors of a collective operation.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective {op}: {msg}")]
    Failed { op: &'static str, msg: String },
}

/// The operations data-parallel training uses, over flat f32 buffers.
pub trait Collectives: Send {
    /// This process's rank in [0, world_size).
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank ends with the same bytes.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Copies `root`'s buffer to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Returns when every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// The element-wise mean over all ranks of buffers in GPU memory, in place, where the
    /// transport reads GPU memory (NCCL: one grouped `ncclAllReduce` with `ncclAvg`, waited
    /// for). `bufs` holds (CUDA device address, number of f32) pairs. `Ok(false)`: this
    /// transport cannot (the TCP ring, one process); nothing was done, and the caller reduces
    /// host copies with [`Collectives::all_reduce_sum`] instead.
    ///
    /// # Safety
    /// Every address must point at that many f32 of device memory in the CUDA context the
    /// communicator was opened on (the process's GPU), valid until the call returns, with no
    /// work pending on them in another stream (synchronise first).
    unsafe fn all_reduce_mean_device(
        &mut self,
        bufs: &[(u64, usize)],
    ) -> Result<bool, CollectiveError> {
        let _ = bufs;
        Ok(false)
    }
}

/// One process, world size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root == 0 {
            Ok(())
        } else {
            Err(CollectiveError::Failed {
                op: "broadcast",
                msg: format!("root {root} does not exist in a world of size 1"),
            })
        }
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_is_the_identity_and_rejects_other_roots() {
        let mut c = SingleProcess;
        let mut buf = vec![1.0, 2.0];
        c.all_reduce_sum(&mut buf).unwrap();
        c.broadcast(&mut buf, 0).unwrap();
        c.barrier().unwrap();
        assert_eq!(buf, vec![1.0, 2.0]);
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        assert!(c.broadcast(&mut buf, 1).is_err());
    }
}
