//! [`ThreadGroup`]: W threads of one process acting as W ranks, for tests of the distributed
//! logic without sockets.
//!
//! Every collective deposits each rank's buffer in a shared slot, waits for all ranks, and then
//! each rank computes the result itself from the slots in rank order (`((s₀ + s₁) + s₂) + …`), so
//! the summation order is fixed and every rank ends with the same bytes. A rank whose
//! `ThreadGroup` is dropped (its thread returned or panicked) breaks the group: every rank waiting
//! in a collective, or entering one later, gets an error instead of hanging.

use dist::collectives::{CollectiveError, Collectives};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

/// One rank of an in-process group; see the module doc.
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    slots: Vec<RwLock<Vec<f32>>>,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    broken: bool,
}

impl ThreadGroup {
    /// The `world_size` ranks of a new group, in rank order (`world_size ≥ 1`).
    pub fn new(world_size: usize) -> Vec<ThreadGroup> {
        assert!(world_size >= 1, "a thread group needs at least one rank");
        let shared = Arc::new(Shared {
            world: world_size,
            slots: (0..world_size).map(|_| RwLock::new(Vec::new())).collect(),
            state: Mutex::new(BarrierState::default()),
            cv: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Runs `f` on `world_size` scoped threads, one per rank, and returns their results in rank
    /// order. A panic on any rank is re-raised here (after the other ranks have returned or
    /// failed their next collective).
    pub fn run<T: Send>(world_size: usize, f: impl Fn(&mut ThreadGroup) -> T + Sync) -> Vec<T> {
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = ThreadGroup::new(world_size)
                .into_iter()
                .map(|mut member| scope.spawn(move || f(&mut member)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    fn lock(&self) -> MutexGuard<'_, BarrierState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns when every rank has arrived; an error if the group is broken.
    fn wait(&self, op: &'static str) -> Result<(), CollectiveError> {
        let broken = || CollectiveError::Failed {
            op,
            msg: "a rank of the thread group has exited".into(),
        };
        let mut st = self.lock();
        if st.broken {
            return Err(broken());
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        loop {
            st = self
                .shared
                .cv
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if st.generation != generation {
                return Ok(());
            }
            if st.broken {
                return Err(broken());
            }
        }
    }

    fn deposit(&self, buf: &[f32]) {
        let mut slot = self.shared.slots[self.rank]
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slot.clear();
        slot.extend_from_slice(buf);
    }

    fn slot(&self, rank: usize) -> std::sync::RwLockReadGuard<'_, Vec<f32>> {
        self.shared.slots[rank]
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.broken = true;
        self.shared.cv.notify_all();
    }
}

impl Collectives for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        const OP: &str = "all_reduce_sum";
        self.deposit(buf);
        self.wait(OP)?;
        let lens: Vec<usize> = (0..self.shared.world).map(|r| self.slot(r).len()).collect();
        let same = lens.iter().all(|&n| n == buf.len());
        if same {
            buf.copy_from_slice(&self.slot(0));
            for r in 1..self.shared.world {
                buf.iter_mut()
                    .zip(self.slot(r).iter())
                    .for_each(|(a, b)| *a += b);
            }
        }
        // Nobody deposits the next buffer before everyone has read this one.
        self.wait(OP)?;
        if same {
            Ok(())
        } else {
            Err(CollectiveError::Failed {
                op: OP,
                msg: format!("ranks passed buffers of different lengths: {lens:?}"),
            })
        }
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        const OP: &str = "broadcast";
        if root >= self.shared.world {
            return Err(CollectiveError::Failed {
                op: OP,
                msg: format!(
                    "root {root} does not exist in a world of size {}",
                    self.shared.world
                ),
            });
        }
        if self.rank == root {
            self.deposit(buf);
        }
        self.wait(OP)?;
        let len = self.slot(root).len();
        if len == buf.len() {
            buf.copy_from_slice(&self.slot(root));
        }
        self.wait(OP)?;
        if len == buf.len() {
            Ok(())
        } else {
            Err(CollectiveError::Failed {
                op: OP,
                msg: format!(
                    "rank {} has {} values, root {root} sent {len}",
                    self.rank,
                    buf.len()
                ),
            })
        }
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.wait("barrier")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powersgd_thread_group_sums_in_rank_order_and_broadcasts() {
        for w in [1, 2, 4] {
            let out = ThreadGroup::run(w, |c| {
                let r = c.rank() as f32;
                // 1e8 + 1 + … is order-sensitive in f32: every rank must get the same bytes.
                let mut buf = vec![if r == 0.0 { 1e8 } else { 1.0 }, r, 0.1 * (r + 1.0)];
                c.all_reduce_sum(&mut buf).unwrap();
                let mut b = vec![r; 2];
                c.broadcast(&mut b, w - 1).unwrap();
                c.barrier().unwrap();
                (buf, b)
            });
            let mut want = [1e8f32, 0.0, 0.1];
            for r in 1..w {
                want[0] += 1.0;
                want[1] += r as f32;
                want[2] += 0.1 * (r as f32 + 1.0);
            }
            for (buf, b) in &out {
                assert_eq!(
                    buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
                assert_eq!(b, &vec![(w - 1) as f32; 2]);
            }
        }
    }

    #[test]
    fn powersgd_thread_group_reports_mismatches_and_exited_ranks() {
        let out = ThreadGroup::run(2, |c| {
            let mut buf = vec![0.0; 1 + c.rank()];
            c.all_reduce_sum(&mut buf).is_err()
        });
        assert_eq!(out, vec![true, true]);
        // Rank 1 returns at once; rank 0's collective fails instead of hanging.
        let out = ThreadGroup::run(2, |c| {
            if c.rank() == 1 {
                return true;
            }
            c.all_reduce_sum(&mut [1.0]).is_err()
        });
        assert_eq!(out, vec![true, true]);
    }
}
