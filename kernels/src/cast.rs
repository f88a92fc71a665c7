//! Conversion of f32 values to a buffer's storage type (f32: a copy; f16: rounded to nearest
//! even, overflow to ±inf, NaN kept). The fp16 transformer rounds a product's f32 output through
//! it where the next product reads f16 (docs/model.md §5). CUDA source: `kernels/cuda/cast.cu`.

use crate::device::{store, Cpu, Device, Elem};
use crate::error::{check_len, Result};

pub trait CastOps: Device {
    /// `out[i] = T(inp[i])` (overwritten); `out` and `inp` have the same length.
    fn cast_from_f32<T: Elem>(&self, out: &mut Self::Buf<T>, inp: &Self::Buf<f32>) -> Result<()>;
}

impl CastOps for Cpu {
    fn cast_from_f32<T: Elem>(&self, out: &mut Vec<T>, inp: &Vec<f32>) -> Result<()> {
        check_len("cast_from_f32", "out", out.len(), inp.len())?;
        store(out, inp.clone());
        Ok(())
    }
}
