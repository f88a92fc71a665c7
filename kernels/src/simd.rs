//! Shared inner-loop helpers of the CPU kernels: run-time instruction-set dispatch ([`Isa`]),
//! fused multiply-add chosen at compile time, and branch-free `exp` / `tanh` that vectorise
//! (unlike libm's, which are scalar calls).
//!
//! Kernels write their hot loops once, generic over `const FMA: bool`, and compile them inside
//! `#[target_feature]` wrappers picked by [`Isa::best`]. Hot loops take no closures: a closure is a
//! separate function that does not inherit `#[target_feature]`, and a `mul_add` in one becomes a
//! libm call.

/// An instruction set the inner loops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Generic,
    Avx2,
    Avx512,
}

impl Isa {
    pub(crate) const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Generic];

    /// Whether this CPU can run code compiled for `self`.
    pub(crate) fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Generic => true,
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Avx512 => has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Generic
        }
    }

    /// The widest available instruction set, detected once.
    pub(crate) fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .find(|isa| isa.available())
                .unwrap_or(Isa::Generic)
        })
    }
}

/// `a·b + c`, fused when `FMA` (only instantiated as `true` where the CPU has FMA).
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x`: exactly 0 below −87 (so masked `−inf` scores vanish), e^88 above 88, else
/// `2^n · p(r)` with `n = round(x·log2 e)`, `r = x − n·ln 2` and `p` the degree-6 Taylor polynomial
/// (relative error ≈ 2e-7). Branch-free, so loops over it vectorise, unlike `f32::exp`.
#[inline(always)]
pub(crate) fn fast_exp<const FMA: bool>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer in the low bits
    let xc = x.clamp(-87.0, 88.0);
    let z = fmadd::<FMA>(xc, std::f32::consts::LOG2_E, ROUND);
    let n = z - ROUND;
    let r = fmadd::<FMA>(n, -LN2_LO, fmadd::<FMA>(n, -LN2_HI, xc));
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = fmadd::<FMA>(p, r, c);
    }
    // z's bits are ROUND's plus n (two's complement), so this is the float 2^n.
    let two_n = f32::from_bits(z.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

/// `tanh(y) = 1 − 2 / (e^{2y} + 1)`, branch-free through [`fast_exp`]: absolute error ≈ 2e-7,
/// exactly ±1 in the tails.
#[inline(always)]
pub(crate) fn fast_tanh<const FMA: bool>(y: f32) -> f32 {
    1.0 - 2.0 / (fast_exp::<FMA>(2.0 * y) + 1.0)
}

/// Eight-lane maximum and sum, so that the reductions vectorise.
#[inline(always)]
pub(crate) fn max8(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for l in 0..8 {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[inline(always)]
pub(crate) fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        for fused in [false, true] {
            let mut x = -87.0f32;
            while x <= 0.5 {
                let got = if fused {
                    fast_exp::<true>(x)
                } else {
                    fast_exp::<false>(x)
                } as f64;
                let want = (x as f64).exp();
                assert!(
                    (got - want).abs() <= 1e-6 * want,
                    "exp({x}) = {got}, expected {want}"
                );
                x += 0.0137;
            }
            assert_eq!(fast_exp::<false>(f32::NEG_INFINITY), 0.0);
            assert_eq!(fast_exp::<false>(-100.0), 0.0);
            assert_eq!(fast_exp::<false>(0.0), 1.0);
        }
    }

    #[test]
    fn fast_tanh_is_accurate() {
        let mut y = -20.0f32;
        while y <= 20.0 {
            for got in [fast_tanh::<false>(y), fast_tanh::<true>(y)] {
                let want = (y as f64).tanh();
                assert!(
                    (got as f64 - want).abs() <= 3e-7,
                    "tanh({y}) = {got}, expected {want}"
                );
            }
            y += 0.0071;
        }
        assert_eq!(fast_tanh::<false>(100.0), 1.0);
        assert_eq!(fast_tanh::<false>(-100.0), -1.0);
    }
}
