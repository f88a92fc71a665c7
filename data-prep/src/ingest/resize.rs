//! Resize to the training resolution: the shorter side becomes `res`, then a centre crop to
//! `res × res`, done in one pass by resampling the centred square of the source.
//!
//! We use `fast_image_resize` with its box (area-averaging) filter: each output pixel is the
//! mean of the source pixels it covers, which is what "area" resampling means for downscaling
//! (no aliasing of fine texture, no ringing), and the crate's SIMD convolution is several times
//! faster than the `image` crate's generic resize. Upscaling (allowed when `--min-side` is below
//! the resolution) degrades to near-neighbour blocks, as a box filter does.

use std::cell::RefCell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// `[h, w, 3]` RGB → `[res, res, 3]` RGB: shorter side to `res` (box filter), centre crop.
pub fn resize_center_crop(rgb: &[u8], w: u32, h: u32, res: u32) -> Result<Vec<u8>, String> {
    let src = ImageRef::new(w, h, rgb, PixelType::U8x3).map_err(|e| e.to_string())?;
    let side = w.min(h) as f64;
    let (left, top) = ((w as f64 - side) / 2.0, (h as f64 - side) / 2.0);
    let mut dst = Image::new(res, res, PixelType::U8x3);
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Box))
        .crop(left, top, side, side);
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &opts))
        .map_err(|e| e.to_string())?;
    Ok(dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_filter_averages_and_crops_the_centre() {
        // 8×4 image: left quarter red, centre half green/blue checker, right quarter red.
        let (w, h) = (8u32, 4u32);
        let mut img = vec![0u8; (w * h * 3) as usize];
        for y in 0..h {
            for x in 0..w {
                let at = ((y * w + x) * 3) as usize;
                let px = if !(2..6).contains(&x) {
                    [255, 0, 0]
                } else if (x + y) % 2 == 0 {
                    [0, 200, 0]
                } else {
                    [0, 0, 200]
                };
                img[at..at + 3].copy_from_slice(&px);
            }
        }
        let out = resize_center_crop(&img, w, h, 2).unwrap();
        assert_eq!(out.len(), 12);
        for px in out.chunks(3) {
            // The red border is cropped away; the checker averages to (0, 100, 100).
            assert!(px[0] <= 1, "{px:?}");
            assert!(
                (99..=101).contains(&px[1]) && (99..=101).contains(&px[2]),
                "{px:?}"
            );
        }
    }

    /// An asymmetric gradient (red grows along x, green along y, blue along both at different
    /// rates), so that a transposed, flipped or wrongly cropped resize cannot match.
    fn gradient(w: u32, h: u32) -> Vec<u8> {
        let mut img = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                img.extend_from_slice(&[(x * 20) as u8, (y * 21) as u8, (x * 7 + y * 3) as u8]);
            }
        }
        img
    }

    /// The centred square of `rgb`, each `f × f` block averaged (an integer downscale).
    fn block_means(rgb: &[u8], w: u32, h: u32, res: u32) -> Vec<f64> {
        let side = w.min(h);
        let (left, top, f) = ((w - side) / 2, (h - side) / 2, side / res);
        let mut out = Vec::new();
        for oy in 0..res {
            for ox in 0..res {
                for c in 0..3 {
                    let mut sum = 0.0;
                    for y in top + oy * f..top + (oy + 1) * f {
                        for x in left + ox * f..left + (ox + 1) * f {
                            sum += rgb[((y * w + x) * 3 + c) as usize] as f64;
                        }
                    }
                    out.push(sum / (f * f) as f64);
                }
            }
        }
        out
    }

    #[test]
    fn box_filter_keeps_orientation_on_an_asymmetric_gradient() {
        // Landscape (crop in x), portrait (crop in y), and no crop; factors 2 and 3.
        for (w, h, res) in [(12u32, 6u32, 3u32), (6, 12, 3), (12, 12, 4)] {
            let img = gradient(w, h);
            let out = resize_center_crop(&img, w, h, res).unwrap();
            let want = block_means(&img, w, h, res);
            assert_eq!(out.len(), want.len());
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                let (px, c) = (i / 3, i % 3);
                assert!(
                    (got as f64 - want).abs() <= 1.0,
                    "{w}×{h} → {res}: pixel (x {}, y {}) channel {c}: {got}, want {want:.1}",
                    px as u32 % res,
                    px as u32 / res
                );
            }
        }
    }
}
