//! Per-resblock gradient scaling (DALL·E App. D; DESIGN.md "Precision").
//!
//! Every resblock (the attention block and the MLP block of each layer) has its own gradient
//! scale. In the backward pass a resblock
//!
//! 1. takes its incoming gradient from the fp32 residual gradient times its scale, stored as
//!    f16 ([`scale_cast`]: `g = f16(dresid · scale)`, overwritten),
//! 2. runs its backward pass on that scaled gradient,
//! 3. adds its outgoing gradient divided by the scale back into the residual gradient
//!    ([`unscale_add`]: `dresid += float(g) / scale`, accumulated).
//!
//! Non-finite values (inf, NaN, and finite values that overflow in the cast to f16) are zeroed
//! (or add nothing) and raise the resblock's flag, a `u32` set to 1 and never cleared by the ops
//! (the caller clears the flags once per step). After the backward pass, [`param_finite_flags`]
//! raises the flag of every resblock whose parameter gradient holds a non-finite value, and
//! [`GradScaler::update`] turns the flags into the scale update and the decision to apply or skip
//! the optimizer step.
//!
//! The division is an IEEE division by `scale` (not a multiplication by its reciprocal) on every
//! device, so the CPU reference and the CUDA kernels (`kernels/cuda/gradscale.cu`) agree exactly.

use crate::device::{Cpu, Device, Elem};
use crate::error::{check_len, KernelError, Result};
use std::ops::Range;

/// Gradient scaling on a [`Device`] (the CUDA kernels: `kernels/cuda/gradscale.cu`). `G`, the
/// type of the scaled gradient, is f16 (the GPU path) or f32.
pub trait GradScaleOps: Device {
    /// `g = G(dresid · scale)`; a non-finite result is stored as 0 and sets `flags[block] = 1`.
    fn grad_scale<G: Elem>(
        &self,
        g: &mut Self::Buf<G>,
        flags: &mut Self::Buf<u32>,
        block: usize,
        dresid: &Self::Buf<f32>,
        scale: f32,
    ) -> Result<()>;

    /// `dresid += float(g) / scale`; a non-finite quotient adds nothing and sets
    /// `flags[block] = 1`.
    fn grad_unscale_add<G: Elem>(
        &self,
        dresid: &mut Self::Buf<f32>,
        flags: &mut Self::Buf<u32>,
        block: usize,
        g: &Self::Buf<G>,
        scale: f32,
    ) -> Result<()>;

    /// `flags[r] = 1` for every resblock `r` whose parameter gradient `grads[ranges[r]]` holds a
    /// non-finite value (one range per flag; other flags are left as they are).
    fn grad_param_finite(
        &self,
        flags: &mut Self::Buf<u32>,
        grads: &Self::Buf<f32>,
        ranges: &[Range<usize>],
    ) -> Result<()>;
}

/// Checks what every scaling op needs: a known element type, a flag to raise, a usable scale.
pub(crate) fn check_scale_args<G: Elem>(
    op: &'static str,
    flags: usize,
    block: usize,
    scale: f32,
) -> Result<()> {
    if !matches!(G::DTYPE, "f32" | "f16") {
        return Err(KernelError::Shape {
            op,
            what: format!("element type {} (f32 or f16 only)", G::DTYPE),
        });
    }
    if block >= flags {
        return Err(KernelError::Shape {
            op,
            what: format!("resblock {block} has no flag (flags has {flags} elements)"),
        });
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(KernelError::Shape {
            op,
            what: format!("scale {scale} is not a positive finite number"),
        });
    }
    Ok(())
}

/// Checks one range per flag, each inside the gradient buffer.
pub(crate) fn check_ranges(
    op: &'static str,
    flags: usize,
    grads: usize,
    ranges: &[Range<usize>],
) -> Result<()> {
    check_len(op, "flags", flags, ranges.len())?;
    if let Some((r, range)) = ranges
        .iter()
        .enumerate()
        .find(|(_, r)| r.start > r.end || r.end > grads)
    {
        return Err(KernelError::Shape {
            op,
            what: format!(
                "range {r} ({}..{}) is not inside the {grads} gradients",
                range.start, range.end
            ),
        });
    }
    Ok(())
}

/// `g = G(dresid · scale)`, non-finite → 0 and `*flag = 1`. The reference of
/// [`GradScaleOps::grad_scale`].
pub fn scale_cast<G: Elem>(g: &mut [G], flag: &mut u32, dresid: &[f32], scale: f32) -> Result<()> {
    check_len("scale_cast", "g", g.len(), dresid.len())?;
    for (g, &d) in g.iter_mut().zip(dresid) {
        let v = G::from_f32(d * scale);
        *g = if v.to_f32().is_finite() {
            v
        } else {
            *flag = 1;
            G::from_f32(0.0)
        };
    }
    Ok(())
}

/// `dresid += float(g) / scale`, non-finite → adds nothing and `*flag = 1`. The reference of
/// [`GradScaleOps::grad_unscale_add`].
pub fn unscale_add<G: Elem>(dresid: &mut [f32], flag: &mut u32, g: &[G], scale: f32) -> Result<()> {
    check_len("unscale_add", "g", g.len(), dresid.len())?;
    for (d, &g) in dresid.iter_mut().zip(g) {
        let v = g.to_f32() / scale;
        if v.is_finite() {
            *d += v;
        } else {
            *flag = 1;
        }
    }
    Ok(())
}

/// `flags[r] = 1` where `grads[ranges[r]]` holds a non-finite value. The reference of
/// [`GradScaleOps::grad_param_finite`].
pub fn param_finite_flags(flags: &mut [u32], grads: &[f32], ranges: &[Range<usize>]) -> Result<()> {
    check_ranges("param_finite_flags", flags.len(), grads.len(), ranges)?;
    for (flag, range) in flags.iter_mut().zip(ranges) {
        if grads[range.clone()].iter().any(|x| !x.is_finite()) {
            *flag = 1;
        }
    }
    Ok(())
}

impl GradScaleOps for Cpu {
    fn grad_scale<G: Elem>(
        &self,
        g: &mut Vec<G>,
        flags: &mut Vec<u32>,
        block: usize,
        dresid: &Vec<f32>,
        scale: f32,
    ) -> Result<()> {
        check_scale_args::<G>("grad_scale", flags.len(), block, scale)?;
        scale_cast(g, &mut flags[block], dresid, scale)
    }

    fn grad_unscale_add<G: Elem>(
        &self,
        dresid: &mut Vec<f32>,
        flags: &mut Vec<u32>,
        block: usize,
        g: &Vec<G>,
        scale: f32,
    ) -> Result<()> {
        check_scale_args::<G>("grad_unscale_add", flags.len(), block, scale)?;
        unscale_add(dresid, &mut flags[block], g, scale)
    }

    fn grad_param_finite(
        &self,
        flags: &mut Vec<u32>,
        grads: &Vec<f32>,
        ranges: &[Range<usize>],
    ) -> Result<()> {
        param_finite_flags(flags, grads, ranges)
    }
}

/// The scale update rule, in thousandths of a power of two: the scale of resblock `i` is
/// `M · 2^(log2_milli[i] / 1000)` (M data-parallel replicas), so that every step of the rule is
/// exact integer arithmetic and the state is a few integers.
pub mod rule {
    /// Start: M·2^13.
    pub const START: i32 = 13_000;
    /// ×2^(1/1000) after a clean update.
    pub const GROWTH: i32 = 1;
    /// ÷√2 = ×2^(−1/2) after a non-finite one.
    pub const DECREASE: i32 = 500;
    /// Clamp to [M·2^7, M·2^24].
    pub const MIN: i32 = 7_000;
    pub const MAX: i32 = 24_000;
    /// A scale decreases at most once per this many updates.
    pub const DECREASE_INTERVAL: u32 = 125;
}

/// One gradient scale per attention block and per MLP block, and the rule that updates them
/// (DALL·E App. D), on the host: it is a few scalars per step.
///
/// The rule, read precisely. [`GradScaler::update`] is called once per optimizer step with the
/// step's flags (one per resblock, as the ops above raised them), and every call counts as an
/// update, applied or skipped:
///
/// - no flag raised: the step is applied, and every scale is multiplied by 2^(1/1000), clamped to
///   at most M·2^24;
/// - some flag raised: the whole step is skipped (no parameter changes: the model's gradient is
///   one), no scale grows, and each flagged resblock's scale is divided by √2, clamped to at least
///   M·2^7, *if* its previous decrease was at least 125 updates ago (or it never decreased);
///   otherwise it stays. The count includes skipped updates: a block that keeps overflowing
///   decreases again after 125 more steps instead of never.
///
/// So two decreases of one scale are at least 125 updates apart: a burst of non-finite steps (one
/// bad batch seen by several blocks, or the few steps a scale needs to come down after a spike)
/// costs one factor √2, not one per step.
///
/// The state is the public getters' values: [`GradScaler::replicas`],
/// [`GradScaler::log2_milli`], [`GradScaler::since_decrease`]; [`GradScaler::from_state`] rebuilds
/// a scaler from them (what a checkpoint saves and loads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradScaler {
    replicas: u32,
    log2_milli: Vec<i32>,
    since_decrease: Vec<u32>,
}

/// Whether [`GradScaler::update`] applies or skips the optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Applied,
    Skipped,
}

impl GradScaler {
    /// Scales for `layers` layers (2·layers resblocks, [`GradScaler::attn`] and
    /// [`GradScaler::mlp`] index them), each at M·2^13 with M = `replicas` (0 is taken as 1).
    pub fn new(layers: usize, replicas: u32) -> GradScaler {
        GradScaler {
            replicas: replicas.max(1),
            log2_milli: vec![rule::START; 2 * layers],
            // "Never decreased": the first non-finite step may decrease.
            since_decrease: vec![rule::DECREASE_INTERVAL; 2 * layers],
        }
    }

    /// A scaler from saved state (the getters' values), checked.
    pub fn from_state(
        replicas: u32,
        log2_milli: Vec<i32>,
        since_decrease: Vec<u32>,
    ) -> Result<GradScaler> {
        const OP: &str = "GradScaler::from_state";
        check_len(OP, "since_decrease", since_decrease.len(), log2_milli.len())?;
        let bad = |what: String| Err(KernelError::Shape { op: OP, what });
        if replicas == 0 || !log2_milli.len().is_multiple_of(2) {
            return bad(format!(
                "{replicas} replicas and {} scales (want ≥ 1 replica, two scales per layer)",
                log2_milli.len()
            ));
        }
        if let Some(e) = log2_milli
            .iter()
            .find(|&&e| !(rule::MIN..=rule::MAX).contains(&e))
        {
            return bad(format!(
                "log2 scale {e}/1000 outside [{}, {}]/1000",
                rule::MIN,
                rule::MAX
            ));
        }
        Ok(GradScaler {
            replicas,
            log2_milli,
            since_decrease,
        })
    }

    /// Index of layer `l`'s attention resblock (its flag, range and scale).
    pub fn attn(l: usize) -> usize {
        2 * l
    }

    /// Index of layer `l`'s MLP resblock.
    pub fn mlp(l: usize) -> usize {
        2 * l + 1
    }

    /// Number of scales (resblocks).
    pub fn len(&self) -> usize {
        self.log2_milli.len()
    }

    pub fn is_empty(&self) -> bool {
        self.log2_milli.is_empty()
    }

    /// M, the number of data-parallel replicas.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// log2(scale / M) in thousandths, per resblock.
    pub fn log2_milli(&self) -> &[i32] {
        &self.log2_milli
    }

    /// Updates since each scale's last decrease (saturating; [`rule::DECREASE_INTERVAL`] or more
    /// when it may decrease again).
    pub fn since_decrease(&self) -> &[u32] {
        &self.since_decrease
    }

    /// Resblock `i`'s scale, M · 2^(log2_milli / 1000), as the kernels take it.
    pub fn scale(&self, i: usize) -> f32 {
        (self.replicas as f64 * (self.log2_milli[i] as f64 / 1000.0).exp2()) as f32
    }

    /// One update with the step's flags (one per resblock, non-zero = raised); see the type's doc
    /// for the rule. Returns whether the optimizer step is applied.
    pub fn update(&mut self, flags: &[u32]) -> Result<StepOutcome> {
        check_len("GradScaler::update", "flags", flags.len(), self.len())?;
        for s in &mut self.since_decrease {
            *s = s.saturating_add(1);
        }
        if flags.iter().all(|&f| f == 0) {
            for e in &mut self.log2_milli {
                *e = (*e + rule::GROWTH).min(rule::MAX);
            }
            return Ok(StepOutcome::Applied);
        }
        for ((e, since), _) in self
            .log2_milli
            .iter_mut()
            .zip(&mut self.since_decrease)
            .zip(flags)
            .filter(|(_, &f)| f != 0)
        {
            if *since >= rule::DECREASE_INTERVAL {
                *e = (*e - rule::DECREASE).max(rule::MIN);
                *since = 0;
            }
        }
        Ok(StepOutcome::Skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn scale_cast_zeroes_and_flags_what_is_not_finite_in_f16() {
        let dresid = [1.0, -2.5, 40_000.0, f32::NAN, f32::INFINITY, 1e-3];
        let mut g = vec![f16::from_f32(7.0); 6];
        let mut flag = 0;
        // 40 000 · 2 = 80 000 overflows f16 (max 65 504).
        scale_cast(&mut g, &mut flag, &dresid, 2.0).unwrap();
        let got: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
        assert_eq!(
            got,
            [2.0, -5.0, 0.0, 0.0, 0.0, f16::from_f32(2e-3).to_f32()]
        );
        assert_eq!(flag, 1);
        let mut flag = 0;
        scale_cast(&mut g, &mut flag, &[1.0; 6], 65504.0).unwrap();
        assert_eq!(flag, 0, "f16's largest value is finite");
        // In f32 the same overflow is finite.
        let mut g32 = vec![0.0f32; 6];
        let mut flag = 0;
        scale_cast(&mut g32, &mut flag, &dresid[..3], 2.0).unwrap_err();
        scale_cast(&mut g32[..3], &mut flag, &dresid[..3], 2.0).unwrap();
        assert_eq!((&g32[..3], flag), (&[2.0, -5.0, 80_000.0][..], 0));
    }

    #[test]
    fn unscale_add_accumulates_the_finite_quotients_only() {
        let g = [
            f16::from_f32(3.0),
            f16::INFINITY,
            f16::NAN,
            f16::from_f32(-1.0),
        ];
        let mut dresid = vec![1.0, 1.0, 1.0, 1.0];
        let mut flag = 0;
        unscale_add(&mut dresid, &mut flag, &g, 4.0).unwrap();
        assert_eq!((dresid, flag), (vec![1.75, 1.0, 1.0, 0.75], 1));
        let mut dresid = vec![0.5; 4];
        let mut flag = 0;
        unscale_add(&mut dresid, &mut flag, &[2.0f32; 4], 8.0).unwrap();
        assert_eq!((dresid, flag), (vec![0.75; 4], 0));
    }

    #[test]
    fn param_finite_flags_raise_only_the_ranges_with_a_bad_value() {
        let mut grads = vec![0.5f32; 20];
        grads[3] = f32::NAN;
        grads[17] = f32::NEG_INFINITY;
        let ranges = [0..3, 3..4, 4..12, 12..20];
        let mut flags = vec![0, 0, 1, 0];
        param_finite_flags(&mut flags, &grads, &ranges).unwrap();
        assert_eq!(flags, [0, 1, 1, 1]);
        let err = param_finite_flags(&mut flags, &grads, &[0..3, 3..4, 4..12, 12..21]).unwrap_err();
        assert!(err.to_string().contains("range 3 (12..21)"), "{err}");
    }

    #[test]
    fn scales_start_at_m_times_2_to_the_13() {
        let s = GradScaler::new(3, 4);
        assert_eq!(s.len(), 6);
        assert_eq!((GradScaler::attn(2), GradScaler::mlp(2)), (4, 5));
        for i in 0..6 {
            assert_eq!(s.scale(i), 4.0 * 8192.0);
        }
        assert_eq!(GradScaler::new(1, 0).replicas(), 1);
    }

    #[test]
    fn clean_updates_grow_every_scale_by_2_to_the_one_thousandth() {
        let mut s = GradScaler::new(1, 2);
        assert_eq!(s.update(&[0, 0]).unwrap(), StepOutcome::Applied);
        assert_eq!(s.log2_milli(), [13_001, 13_001]);
        assert_eq!(s.scale(0), (2.0 * 2f64.powf(13.001)) as f32);
        for _ in 0..999 {
            s.update(&[0, 0]).unwrap();
        }
        // 1000 clean updates double the scale, exactly.
        assert_eq!(s.log2_milli(), [14_000, 14_000]);
        assert_eq!(s.scale(1), 2.0 * 16384.0);
    }

    #[test]
    fn a_non_finite_update_is_skipped_and_lowers_the_flagged_scale_by_root_two() {
        let mut s = GradScaler::new(2, 1);
        s.update(&[0; 4]).unwrap();
        assert_eq!(s.update(&[0, 1, 0, 1]).unwrap(), StepOutcome::Skipped);
        // Flagged: 13 001 − 500; the others neither grow nor shrink on a skipped update.
        assert_eq!(s.log2_milli(), [13_001, 12_501, 13_001, 12_501]);
        assert_eq!(s.scale(1), 2f64.powf(12.501) as f32);
        assert_eq!(s.since_decrease(), [127, 0, 127, 0]);
        // Exactly ÷√2 from a power of two.
        let mut t = GradScaler::new(1, 1);
        t.update(&[1, 0]).unwrap();
        assert_eq!(t.scale(0), (8192.0 / std::f64::consts::SQRT_2) as f32);
    }

    #[test]
    fn a_scale_decreases_at_most_once_per_125_updates() {
        let mut s = GradScaler::new(1, 1);
        s.update(&[1, 0]).unwrap(); // update 1: decrease
        assert_eq!(s.log2_milli(), [12_500, 13_000]);
        // Updates 2..=125 (124 of them) overflow again: skipped, no further decrease.
        for _ in 2..=125 {
            assert_eq!(s.update(&[1, 0]).unwrap(), StepOutcome::Skipped);
        }
        assert_eq!(s.log2_milli(), [12_500, 13_000]);
        assert_eq!(s.since_decrease()[0], 124);
        // Update 126, 125 updates after the first decrease: the second.
        s.update(&[1, 0]).unwrap();
        assert_eq!(s.log2_milli(), [12_000, 13_000]);
        // Clean updates count too: after 123 of them a non-finite update (the 124th since the
        // decrease) is still too early for block 0, but block 1 never decreased.
        for _ in 0..123 {
            s.update(&[0, 0]).unwrap();
        }
        s.update(&[1, 1]).unwrap();
        assert_eq!(s.log2_milli(), [12_123, 13_123 - 500]);
        // The 125th.
        s.update(&[1, 0]).unwrap();
        assert_eq!(s.log2_milli(), [11_623, 12_623]);
    }

    #[test]
    fn scales_are_clamped_to_m_2_to_the_7_and_m_2_to_the_24() {
        let mut s = GradScaler::from_state(3, vec![7_200, 23_999], vec![125, 125]).unwrap();
        s.update(&[1, 0]).unwrap();
        assert_eq!(s.log2_milli(), [7_000, 23_999]);
        assert_eq!(s.scale(0), 3.0 * 128.0);
        s.update(&[0, 0]).unwrap();
        s.update(&[0, 0]).unwrap();
        assert_eq!(s.log2_milli(), [7_002, 24_000]);
        assert_eq!(s.scale(1), 3.0 * 16_777_216.0);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_an_error() {
        let mut s = GradScaler::new(2, 8);
        s.update(&[0, 0, 1, 0]).unwrap();
        s.update(&[0; 4]).unwrap();
        let t = GradScaler::from_state(
            s.replicas(),
            s.log2_milli().to_vec(),
            s.since_decrease().to_vec(),
        )
        .unwrap();
        assert_eq!(s, t);
        assert!(GradScaler::from_state(1, vec![13_000; 3], vec![0; 3]).is_err());
        assert!(GradScaler::from_state(1, vec![13_000; 2], vec![0; 1]).is_err());
        assert!(GradScaler::from_state(0, vec![13_000; 2], vec![0; 2]).is_err());
        let err = GradScaler::from_state(1, vec![13_000, 25_000], vec![0; 2]).unwrap_err();
        assert!(err.to_string().contains("25000"), "{err}");
        assert!(s.update(&[0; 3]).is_err());
    }
}
