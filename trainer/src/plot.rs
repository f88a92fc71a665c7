//! `trainer plot RUN_DIR`: the run's loss curves and learning rate, from `metrics.jsonl`, drawn
//! as one PNG (two panels sharing the update axis) with `plotters`.
//!
//! The loss panel shows `loss` and the model's parts of it (`loss_text`, `loss_image` for the
//! transformer; `nll` and `kl` for the dVAE); the lower panel the learning rate. Non-finite
//! values (an update whose gradient overflowed) are left out of a curve. Text needs a TrueType
//! font ([`crate::font::find`]: `TESSERA_FONT`, else the usual system folders); without one the
//! curves are drawn without labels and a warning says so.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// The curves of one run: name → (step, value) in step order.
#[derive(Debug, Default)]
pub struct Curves {
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
}

/// Which metrics the loss panel shows.
fn is_loss(name: &str) -> bool {
    name == "loss" || name.starts_with("loss_") || name == "nll" || name == "kl"
}

/// Reads `metrics.jsonl`; a line that is not a JSON object with a numeric `step` is an error
/// naming the file and line.
pub fn read_metrics(path: &Path) -> Result<Curves> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut curves = Curves::default();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = || format!("{}:{}: not a metrics line", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).with_context(bad)?;
        let obj = value.as_object().with_context(bad)?;
        let step = obj.get("step").and_then(|s| s.as_u64()).with_context(bad)?;
        for (k, v) in obj {
            if let Some(x) = v.as_f64().filter(|_| is_loss(k) || k == "lr") {
                curves.series.entry(k.clone()).or_default().push((step, x));
            }
        }
    }
    if curves.series.get("loss").is_none_or(|s| s.is_empty()) {
        bail!("{} has no logged updates to plot", path.display());
    }
    Ok(curves)
}

/// Draws `run_dir`'s curves into `out` (PNG, `width` × `height` pixels).
pub fn plot(run_dir: &Path, out: &Path, width: u32, height: u32) -> Result<()> {
    let curves = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let title = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run_dir.display().to_string());
    let labelled = match crate::font::find() {
        Some(font) => {
            let bytes =
                std::fs::read(&font).with_context(|| format!("reading {}", font.display()))?;
            // plotters keeps registered fonts for the process's life.
            plotters::style::register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into()),
            )
            .map_err(|_| anyhow::anyhow!("{}: not a usable TrueType font", font.display()))?;
            true
        }
        None => {
            tracing::warn!(
                "no TrueType font found (set TESSERA_FONT to a .ttf file): the plot has no labels"
            );
            false
        }
    };
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        let (top, bottom) = root.split_vertically(height * 2 / 3);
        let losses: Vec<_> = curves.series.iter().filter(|(k, _)| is_loss(k)).collect();
        panel(&top, &format!("{title}: loss"), &losses, labelled)?;
        let lr: Vec<_> = curves.series.iter().filter(|(k, _)| *k == "lr").collect();
        panel(&bottom, "learning rate", &lr, labelled)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))?;
    }
    let img = image::RgbImage::from_raw(width, height, pixels).context("plot buffer size")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the plot")?;
    formats::fsutil::write_atomic(out, &png, false)
        .with_context(|| format!("writing {}", out.display()))
}

/// One panel: the named curves against the update, a legend when there is text.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    series: &[(&String, &Vec<(u64, f64)>)],
    labelled: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot: {e}");
    let finite = || {
        series
            .iter()
            .flat_map(|(_, s)| s.iter())
            .filter(|(_, v)| v.is_finite())
    };
    let (mut lo, mut hi) = finite()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
    let last = finite().map(|&(s, _)| s).max().unwrap_or(1).max(1);
    let first = finite().map(|&(s, _)| s).min().unwrap_or(0).min(last - 1);
    let mut builder = ChartBuilder::on(area);
    builder.margin(10);
    if labelled {
        builder
            .caption(caption, ("sans-serif", 20))
            .x_label_area_size(30)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(first..last, (lo - pad)..(hi + pad))
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    if labelled {
        mesh.x_desc("update").y_label_formatter(&tick);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line = LineSeries::new(
            points.iter().filter(|(_, v)| v.is_finite()).copied(),
            color.stroke_width(2),
        );
        let drawn = chart.draw_series(line).map_err(err)?;
        if labelled {
            drawn
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if labelled && series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// An axis label: plain decimals for values of ordinary size, exponent notation for small ones
/// (learning rates).
fn tick(v: &f64) -> String {
    match v.abs() {
        a if a == 0.0 || (0.01..1e5).contains(&a) => format!("{v:.2}"),
        _ => format!("{v:.1e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_become_curves_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"loss\":6.0,\"lr\":0.001,\"loss_text\":5.0,\"step_ms\":3.0}\n\
             {\"step\":2,\"loss\":5.0,\"lr\":0.002,\"loss_text\":4.0,\"step_ms\":3.0}\n",
        )
        .unwrap();
        let c = read_metrics(&path).unwrap();
        assert_eq!(c.series["loss"], [(1, 6.0), (2, 5.0)]);
        assert_eq!(c.series["lr"], [(1, 0.001), (2, 0.002)]);
        assert_eq!(c.series["loss_text"], [(1, 5.0), (2, 4.0)]);
        assert!(!c.series.contains_key("step_ms"));

        std::fs::write(&path, "{\"step\":1,\"loss\":6.0}\nnot json\n").unwrap();
        let e = format!("{:#}", read_metrics(&path).unwrap_err());
        assert!(e.contains("metrics.jsonl:2"), "{e}");
        std::fs::write(&path, "").unwrap();
        let e = format!("{:#}", read_metrics(&path).unwrap_err());
        assert!(e.contains("no logged updates"), "{e}");
    }

    /// The picture has the curves: the two panels' areas hold non-white pixels in the colours of
    /// the first two series, with and without a font.
    #[test]
    fn the_plot_is_a_png_with_curves() {
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (1..=50)
            .map(|s| {
                let loss = 6.0 / (s as f64).sqrt();
                format!(
                    "{{\"step\":{s},\"loss\":{loss},\"lr\":{},\"loss_text\":{}}}\n",
                    s as f64 * 1e-4,
                    loss * 0.9
                )
            })
            .collect();
        std::fs::write(dir.path().join("metrics.jsonl"), lines).unwrap();
        let out = dir.path().join("plot.png");
        plot(dir.path(), &out, 640, 480).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 480));
        let coloured = |y0: u32, y1: u32| {
            (y0..y1)
                .flat_map(|y| (0..640).map(move |x| (x, y)))
                .filter(|&(x, y)| {
                    let p = img.get_pixel(x, y).0;
                    p.iter().max().unwrap() - p.iter().min().unwrap() > 60
                })
                .count()
        };
        assert!(
            coloured(0, 320) > 300,
            "loss panel: {} coloured pixels",
            coloured(0, 320)
        );
        assert!(
            coloured(320, 480) > 150,
            "lr panel: {} coloured pixels",
            coloured(320, 480)
        );
    }
}
