//! The device reduction against the host's, rank by rank over two thread ranks: the same
//! averaged gradient, the same error buffers and Q, the same collectives; on the CPU device and
//! on the emulated CUDA device (whose products and orthonormalisation are the `.cu` kernels).

use super::*;
use crate::powersgd::tests::{cfg, grad, table};
use kernels::device::Cpu;
use kernels::gpu::{Emu, Gpu, Schedule};

fn upload<D: Device>(dev: &D, table: &ParamTable, flat: &[f32]) -> Vec<D::Buf<f32>> {
    table
        .specs()
        .iter()
        .map(|s| dev.upload(&flat[s.range()]).unwrap())
        .collect()
}

fn download<D: Device>(dev: &D, bufs: &[D::Buf<f32>]) -> Vec<f32> {
    bufs.iter().flat_map(|b| dev.download(b).unwrap()).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `steps` reductions of [`grad`] on each of two ranks, on the host and on `dev`; checks
/// each step's result and statistics and, at the end, the state. `bad`: (step, rank) whose
/// gradient gets a NaN in a compressed matrix.
fn check_against_host<D: PowerSgdDevice + Sync>(
    dev: &D,
    c: &PowerSgdConfig,
    steps: usize,
    bad: Option<(usize, usize)>,
) {
    let t = table();
    ThreadGroup::run(2, |comm| {
        let rank = comm.rank();
        let mut host = PowerSgd::new(&t, c).unwrap();
        let mut plan = PowerSgd::new(&t, c).unwrap();
        let mut on_dev = DevicePowerSgd::new(dev, &plan).unwrap();
        for step in 0..steps {
            let mut g = grad(t.numel(), step, rank);
            if bad == Some((step, rank)) {
                g[t.spec(1).offset + 3] = f32::NAN;
            }
            let mut bufs = upload(dev, &t, &g);
            let a = host.reduce(&mut g, comm).unwrap();
            let b = on_dev.reduce(dev, &mut plan, &mut bufs, comm).unwrap();
            let what = format!("{} rank {rank} step {step} ({c:?})", dev.name());
            assert_eq!(
                (a.compressed, a.non_finite, a.bytes_sent, a.all_reduces),
                (b.compressed, b.non_finite, b.bytes_sent, b.all_reduces),
                "{what}: the same reduction"
            );
            assert_eq!(a.non_finite, bad.is_some_and(|(s, _)| s == step), "{what}");
            if !a.non_finite {
                let d = max_diff(&g, &download(dev, &bufs));
                assert!(d <= 1e-5, "{what}: the averaged gradients differ by {d}");
            }
        }
        on_dev.store(dev, &mut plan).unwrap();
        let what = format!("{} rank {rank} ({c:?})", dev.name());
        assert_eq!(host.iterations(), plan.iterations());
        let d = max_diff(host.error(), plan.error());
        assert!(d <= 1e-5, "{what}: error buffers differ by {d}");
        for i in 0..host.compressed().len() {
            let d = max_diff(host.q_of(i), plan.q_of(i));
            assert!(d <= 1e-5, "{what}: Q of tensor {i} differs by {d}");
        }
    });
}

fn configs() -> Vec<PowerSgdConfig> {
    vec![
        cfg(2),
        PowerSgdConfig {
            warm_start: true,
            ..cfg(2)
        },
        PowerSgdConfig {
            error_feedback: false,
            ..cfg(3)
        },
        PowerSgdConfig {
            start_step: 1,
            min_compression_rate: 1.0,
            ..cfg(1)
        },
    ]
}

#[test]
fn device_reduction_matches_the_host_reduction_on_the_cpu_device() {
    for c in configs() {
        check_against_host(&Cpu, &c, 3, None);
    }
}

#[test]
fn device_reduction_matches_the_host_reduction_on_the_emulated_gpu() {
    for c in configs() {
        check_against_host(&Gpu(Emu::new(Schedule::Forward)), &c, 3, None);
    }
}

#[test]
fn a_non_finite_gradient_on_one_rank_is_skipped_on_every_rank_without_changing_state() {
    // Step 1 is bad on rank 1: both ranks report it, and the state after step 2 still matches
    // the host's (which also left its state alone at step 1).
    for c in [
        cfg(2),
        PowerSgdConfig {
            warm_start: true,
            ..cfg(2)
        },
    ] {
        check_against_host(&Gpu(Emu::new(Schedule::Forward)), &c, 3, Some((1, 1)));
    }
}

#[test]
fn a_gradient_list_of_the_wrong_length_is_an_error() {
    let t = table();
    let mut plan = PowerSgd::new(&t, &cfg(2)).unwrap();
    let mut on_dev = DevicePowerSgd::new(&Cpu, &plan).unwrap();
    let mut bufs = upload(&Cpu, &t, &vec![0.0; t.numel()]);
    bufs.pop();
    let mut comm = ThreadGroup::new(1).pop().unwrap();
    let err = on_dev
        .reduce(&Cpu, &mut plan, &mut bufs, &mut comm)
        .unwrap_err();
    assert!(
        matches!(err, PowerSgdError::BufferLength { expected, found } if found + 1 == expected),
        "{err}"
    );
}
