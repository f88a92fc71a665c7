//! The optimizer side of a training step, over the flat buffers: AdamW with weight decay on
//! matrices only, global-norm clipping, the learning-rate schedules (linear warm-up, then either
//! the paper's halving on a loss plateau or cosine decay). The weight EMA is
//! `kernels::adamw::ema_update`, called by the training loop.
//!
//! Everything here is deterministic and its state serialises exactly (f32 buffers to safetensors,
//! f64 scalars to JSON, which round-trips them), so a resumed run is bit-identical.

pub use crate::config::ScheduleKind;
use crate::params::ParamTable;
use kernels::adamw::{adamw_update, sum_squares, AdamWStep};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// AdamW hyper-parameters (the paper's defaults live in the config).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global-norm clip; 0 disables.
    pub grad_clip: f32,
}

/// AdamW state: first and second moments, laid out like the parameters.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub hp: AdamWParams,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates applied so far.
    pub t: u64,
}

/// What one update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the gradient was not finite and the update was skipped.
    pub applied: bool,
}

impl AdamW {
    pub fn new(hp: AdamWParams, numel: usize) -> Self {
        AdamW {
            hp,
            m: vec![0.0; numel],
            v: vec![0.0; numel],
            t: 0,
        }
    }

    /// Clips `grads` by global norm and applies one update at learning rate `lr`. A non-finite
    /// gradient norm skips the update (parameters and moments untouched).
    pub fn step(
        &mut self,
        table: &ParamTable,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
    ) -> kernels::Result<StepReport> {
        let norm = sum_squares(grads).sqrt();
        if !norm.is_finite() {
            return Ok(StepReport {
                grad_norm: norm,
                applied: false,
            });
        }
        let clip = self.hp.grad_clip as f64;
        let grad_scale = if clip > 0.0 && norm > clip {
            (clip / norm) as f32
        } else {
            1.0
        };
        self.t += 1;
        let ps = table.split_mut(params);
        let ms = table.split_mut(&mut self.m);
        let vs = table.split_mut(&mut self.v);
        for (((spec, p), (m, v)), g) in table
            .specs()
            .iter()
            .zip(ps)
            .zip(ms.into_iter().zip(vs))
            .zip(table.split(grads))
        {
            let step = AdamWStep {
                lr: lr * spec.lr_scale,
                beta1: self.hp.beta1,
                beta2: self.hp.beta2,
                eps: self.hp.eps,
                // The decay stays lr · weight_decay whatever the tensor's lr_scale.
                weight_decay: if spec.kind.decayed() {
                    self.hp.weight_decay / spec.lr_scale
                } else {
                    0.0
                },
                t: self.t,
                grad_scale,
            };
            adamw_update(p, g, m, v, step)?;
        }
        Ok(StepReport {
            grad_norm: norm,
            applied: true,
        })
    }
}

/// Schedule hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScheduleParams {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub min_lr: f64,
    pub total_steps: u64,
    pub plateau_patience: u64,
    pub plateau_window: usize,
    pub plateau_factor: f64,
}

/// The learning-rate schedule and its state (saved in `state.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The rate the plateau rule has decayed to (the peak until the first halving).
    pub base_lr: f64,
    /// Recent training losses (the plateau window).
    pub window: VecDeque<f64>,
    /// Best smoothed loss seen since the last halving.
    pub best: Option<f64>,
    /// Updates since `best` last improved.
    pub since_best: u64,
    /// How many times the rate was halved.
    pub halvings: u32,
}

/// Relative improvement of the smoothed loss that counts as progress on a plateau.
const PLATEAU_MIN_IMPROVEMENT: f64 = 1e-3;

impl LrSchedule {
    pub fn new(p: &ScheduleParams) -> Self {
        LrSchedule {
            base_lr: p.peak_lr,
            window: VecDeque::new(),
            best: None,
            since_best: 0,
            halvings: 0,
        }
    }

    /// The learning rate of update `t` (1-based).
    pub fn lr(&self, p: &ScheduleParams, t: u64) -> f64 {
        if p.warmup_steps > 0 && t <= p.warmup_steps {
            return p.peak_lr * t as f64 / p.warmup_steps as f64;
        }
        match p.kind {
            ScheduleKind::Plateau => self.base_lr.max(p.min_lr),
            ScheduleKind::Cosine => {
                let span = p.total_steps.saturating_sub(p.warmup_steps).max(1) as f64;
                let frac = ((t - p.warmup_steps) as f64 / span).min(1.0);
                p.min_lr
                    + (p.peak_lr - p.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
            }
        }
    }

    /// Records the training loss of update `t`; on a plateau (after warm-up) decays the rate.
    pub fn observe(&mut self, p: &ScheduleParams, t: u64, loss: f64) {
        if p.kind != ScheduleKind::Plateau || t <= p.warmup_steps || !loss.is_finite() {
            return;
        }
        self.window.push_back(loss);
        while self.window.len() > p.plateau_window.max(1) {
            self.window.pop_front();
        }
        if self.window.len() < p.plateau_window.max(1) {
            return;
        }
        let smoothed = self.window.iter().sum::<f64>() / self.window.len() as f64;
        match self.best {
            Some(best) if smoothed >= best * (1.0 - PLATEAU_MIN_IMPROVEMENT) => {
                self.since_best += 1;
                if self.since_best >= p.plateau_patience {
                    self.base_lr = (self.base_lr * p.plateau_factor).max(p.min_lr);
                    self.halvings += 1;
                    self.since_best = 0;
                    self.best = Some(smoothed);
                }
            }
            _ => {
                self.best = Some(smoothed);
                self.since_best = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamKind;

    fn sched(kind: ScheduleKind) -> ScheduleParams {
        ScheduleParams {
            kind,
            peak_lr: 1.0,
            warmup_steps: 10,
            min_lr: 0.1,
            total_steps: 110,
            plateau_patience: 5,
            plateau_window: 4,
            plateau_factor: 0.5,
        }
    }

    #[test]
    fn warmup_then_cosine() {
        let p = sched(ScheduleKind::Cosine);
        let s = LrSchedule::new(&p);
        assert_eq!(s.lr(&p, 1), 0.1);
        assert_eq!(s.lr(&p, 10), 1.0);
        assert!((s.lr(&p, 60) - 0.55).abs() < 1e-12);
        assert!((s.lr(&p, 110) - 0.1).abs() < 1e-12);
        assert!((s.lr(&p, 500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn plateau_halves_only_when_the_loss_stops_falling() {
        let p = sched(ScheduleKind::Plateau);
        let mut s = LrSchedule::new(&p);
        let mut t = 10;
        for i in 0..50 {
            t += 1;
            s.observe(&p, t, 10.0 - 0.1 * i as f64); // steadily falling
        }
        assert_eq!((s.halvings, s.lr(&p, t + 1)), (0, 1.0));
        for _ in 0..(4 + 5) {
            t += 1;
            s.observe(&p, t, 5.0); // flat
        }
        assert_eq!(s.halvings, 1);
        assert_eq!(s.lr(&p, t + 1), 0.5);
        // The state survives a JSON round trip exactly.
        let back: LrSchedule = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        for _ in 0..100 {
            t += 1;
            s.observe(&p, t, 5.0);
        }
        assert_eq!(s.lr(&p, t + 1), 0.1, "floored at min_lr");
    }

    #[test]
    fn adamw_decays_matrices_only_clips_and_skips_non_finite() {
        let mut table = ParamTable::new();
        table.push("w", &[2, 2], ParamKind::Matrix);
        table.push("b", &[2], ParamKind::Bias);
        let hp = AdamWParams {
            beta1: 0.9,
            beta2: 0.96,
            eps: 1e-8,
            weight_decay: 0.5,
            grad_clip: 1.0,
        };
        let mut opt = AdamW::new(hp, 6);
        let mut p = vec![1.0f32; 6];
        // Zero gradient: only weight decay moves anything, and only the matrix.
        let r = opt.step(&table, &mut p, &[0.0; 6], 0.1).unwrap();
        assert!(r.applied && r.grad_norm == 0.0);
        assert_eq!(&p[..4], &[0.95; 4]);
        assert_eq!(&p[4..], &[1.0; 2]);
        // Norm 10 > clip 1: reported before clipping (the clipped update itself is checked in
        // `adamw_clips_by_global_norm_under_and_over_the_bound`).
        let r = opt
            .step(&table, &mut p, &[5.0, 5.0, 5.0, 5.0, 0.0, 0.0], 0.1)
            .unwrap();
        assert!((r.grad_norm - 10.0).abs() < 1e-9);
        let before = p.clone();
        let r = opt
            .step(&table, &mut p, &[f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0], 0.1)
            .unwrap();
        assert!(!r.applied && p == before && opt.t == 2);
    }

    #[test]
    fn lr_scale_multiplies_the_adam_step_and_not_the_decay() {
        // Two matrices with the same values and gradients; the second steps at 4× the rate.
        let mut table = ParamTable::new();
        table.push("a", &[3], ParamKind::Matrix);
        let b = table.push("b", &[3], ParamKind::Matrix);
        table.set_lr_scale(b, 4.0);
        let hp = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
            grad_clip: 0.0,
        };
        let mut opt = AdamW::new(hp, 6);
        let mut p = vec![1.0f32, -2.0, 0.5, 1.0, -2.0, 0.5];
        let g = [0.3f32, -0.1, 2.0, 0.3, -0.1, 2.0];
        let (lr, decay) = (0.01f64, 0.01f64 * 0.5);
        for _ in 0..3 {
            let before = p.clone();
            opt.step(&table, &mut p, &g, lr as f32).unwrap();
            for i in 0..3 {
                // p' = p − lr·wd·p − lr_scale·(Adam step), the decay the same for both.
                let adam = before[i] as f64 * (1.0 - decay) - p[i] as f64;
                let scaled = before[i + 3] as f64 * (1.0 - decay) - p[i + 3] as f64;
                assert!(adam.abs() > 1e-3, "{adam}");
                assert!(
                    (scaled - 4.0 * adam).abs() < 1e-5,
                    "{i}: {scaled} vs 4 × {adam}"
                );
            }
        }
        // With a zero gradient the Adam step fades with the moments; the decay does not
        // depend on lr_scale at all.
        let mut opt = AdamW::new(hp, 6);
        let mut p = vec![1.0f32; 6];
        opt.step(&table, &mut p, &[0.0; 6], lr as f32).unwrap();
        assert_eq!(p, vec![(1.0 - decay) as f32; 6]);
    }

    /// Parameters and moments of an f64 AdamW, PyTorch's `clip_grad_norm_` then `AdamW`.
    struct Reference {
        p: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
    }

    impl Reference {
        /// One update on the clipped gradient ĝ = g·min(1, c/‖g‖), at update number `t`.
        fn step(&mut self, hp: AdamWParams, decayed: &[bool], g: &[f64], lr: f64, t: i32) {
            let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            let scale = (hp.grad_clip as f64 / norm).min(1.0);
            let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
            let (p, m, v) = (&mut self.p, &mut self.m, &mut self.v);
            for i in 0..p.len() {
                let g = g[i] * scale;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let wd = if decayed[i] {
                    hp.weight_decay as f64
                } else {
                    0.0
                };
                p[i] *= 1.0 - lr * wd;
                let mhat = m[i] / (1.0 - b1.powi(t));
                let vhat = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * mhat / (vhat.sqrt() + hp.eps as f64);
            }
        }
    }

    #[test]
    fn adamw_clips_by_global_norm_under_and_over_the_bound() {
        let mut table = ParamTable::new();
        table.push("w", &[2, 2], ParamKind::Matrix);
        table.push("b", &[2], ParamKind::Bias);
        let decayed = [true, true, true, true, false, false];
        let hp = AdamWParams {
            beta1: 0.9,
            beta2: 0.96,
            eps: 1e-8,
            weight_decay: 0.5,
            grad_clip: 1.0,
        };
        let mut opt = AdamW::new(hp, 6);
        let mut p = vec![1.0f32, -0.5, 0.25, 2.0, 0.75, -1.0];
        let mut reference = Reference {
            p: p.iter().map(|&x| x as f64).collect(),
            m: vec![0.0; 6],
            v: vec![0.0; 6],
        };
        // Update 1 under the bound (‖g‖ = 0.5: left as it is), update 2 over it (‖g‖ = 10:
        // scaled to norm 1), update 3 exactly at it. Adam's first step is nearly scale-free, so
        // the moments are checked too: a missing clip leaves m and v 10× and 100× too large.
        let steps: [[f32; 6]; 3] = [
            [0.3, -0.1, 0.1, 0.1, 0.3, 0.2],
            [6.0, 0.0, -4.0, 4.0, 4.0, -4.0],
            [0.0, 0.6, 0.0, 0.0, -0.8, 0.0],
        ];
        let norms = [0.5, 10.0, 1.0];
        for (t, (g, want_norm)) in steps.iter().zip(norms).enumerate() {
            let r = opt.step(&table, &mut p, g, 0.1).unwrap();
            assert!(r.applied);
            assert!(
                (r.grad_norm - want_norm).abs() < 1e-6,
                "update {}: norm {}",
                t + 1,
                r.grad_norm
            );
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            reference.step(hp, &decayed, &g64, 0.1, t as i32 + 1);
            let Reference {
                p: rp,
                m: rm,
                v: rv,
            } = &reference;
            for i in 0..6 {
                let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 + 1e-5 * b.abs();
                assert!(
                    close(opt.m[i], rm[i]),
                    "update {} m[{i}]: {} vs {}",
                    t + 1,
                    opt.m[i],
                    rm[i]
                );
                assert!(
                    close(opt.v[i], rv[i]),
                    "update {} v[{i}]: {} vs {}",
                    t + 1,
                    opt.v[i],
                    rv[i]
                );
                assert!(
                    close(p[i], rp[i]),
                    "update {} p[{i}]: {} vs {}",
                    t + 1,
                    p[i],
                    rp[i]
                );
            }
        }
        // The clip matters for the parameters too: the same three gradients unclipped move
        // them elsewhere (after update 2 the over-bound gradient dominates the moments).
        let mut unclipped = AdamW::new(
            AdamWParams {
                grad_clip: 0.0,
                ..hp
            },
            6,
        );
        let mut q = vec![1.0f32, -0.5, 0.25, 2.0, 0.75, -1.0];
        for g in &steps {
            unclipped.step(&table, &mut q, g, 0.1).unwrap();
        }
        let gap = p
            .iter()
            .zip(&q)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(gap > 1e-3, "clipping changed the parameters by only {gap}");
    }
}
