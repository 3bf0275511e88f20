//! Training curves as a PNG: loss per logged step on the left, train/validation accuracy per
//! epoch on the right. The font is embedded so plots render on machines without system fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::files::write_atomic_with;

static FONT: &[u8] = include_bytes!("assets/DejaVuSans.ttf");

pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TTF; a failure here would only lose the labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The series a run collects for its curves.
#[derive(Debug, Default, Clone)]
pub struct Curves {
    /// (step, mean training loss over the last logging window)
    pub loss: Vec<(f64, f64)>,
    /// (epoch, mean training accuracy %)
    pub train_acc: Vec<(f64, f64)>,
    /// (epoch, validation accuracy %)
    pub val_acc: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves of an earlier part of the run, read back from its metrics.jsonl (a resumed
    /// run draws the whole run). Lines that do not parse are skipped.
    pub fn from_metrics(path: &Path) -> Self {
        let mut c = Curves::default();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let f = |k: &str| v[k].as_f64();
            match v["kind"].as_str() {
                Some("train") => {
                    if let (Some(s), Some(l)) = (f("step"), f("loss")) {
                        c.loss.push((s, l));
                    }
                }
                Some("val") => {
                    if let (Some(e), Some(a)) = (f("epoch"), f("acc")) {
                        // A resumed epoch is validated again: keep its latest value.
                        c.val_acc.retain(|p| p.0 != e);
                        c.val_acc.push((e, a));
                    }
                }
                _ => {}
            }
        }
        c
    }
}

/// Values beyond this are not drawn: a loss that large means the run diverged, and an axis
/// spanning ±f64::MAX has an infinite width.
const DRAWABLE: f64 = 1e30;

/// The points that can be drawn: NaN, infinite or astronomically large values (a diverged fp16
/// run logs them) would make the axis range NaN or infinitely wide, and plotters then loops
/// forever over its tick marks.
/// Every chart's legend: a framed, lightly transparent box at `at`.
pub fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    at: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

fn finite(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.abs() <= DRAWABLE && y.abs() <= DRAWABLE)
        .collect()
}

/// Axis ranges that hold `points` (finite ones only), padded; always finite and non-empty.
fn range(points: &[(f64, f64)], pad: f64) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let points = finite(points);
    if points.is_empty() {
        return (0.0..1.0, 0.0..1.0);
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let dy = ((y1 - y0) * pad).max(y1.abs() * pad).max(1e-6);
    let x_end = if x1 > x0 { x1 } else { x0 + 1.0 };
    (x0..x_end, (y0 - dy)..(y1 + dy))
}

/// Draws `curves` to `path` (PNG, 1200×450), written atomically.
pub fn plot_curves(curves: &Curves, title: &str, path: &Path) -> Result<()> {
    register_font();
    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1200, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let root = root
            .titled(title, ("sans-serif", 20))
            .map_err(|e| anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(600);

        let loss = finite(&curves.loss);
        let (xr, yr) = range(&loss, 0.05);
        let caption = if loss.is_empty() && !curves.loss.is_empty() {
            "training loss: no finite values to draw (the run diverged)"
        } else {
            "training loss"
        };
        let mut chart = ChartBuilder::on(&left)
            .margin(12)
            .caption(caption, ("sans-serif", 16))
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(xr, yr)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(loss.iter().copied(), &BLUE))
            .map_err(|e| anyhow!("{e}"))?;

        let all: Vec<_> = curves
            .train_acc
            .iter()
            .chain(&curves.val_acc)
            .copied()
            .collect();
        let (xr, _) = range(&all, 0.05);
        let mut chart = ChartBuilder::on(&right)
            .margin(12)
            .caption("accuracy (%)", ("sans-serif", 16))
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(xr, 0.0..100.0)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("accuracy %")
            .x_label_formatter(&|x| {
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (series, color, label) in [
            (&finite(&curves.train_acc), RED, "train"),
            (&finite(&curves.val_acc), GREEN, "validation"),
        ] {
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        root.present().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_of_nan_and_extreme_values_plot_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        for loss in [
            vec![(1.0, f64::NAN), (2.0, f64::NAN)],
            vec![(1.0, f64::INFINITY), (2.0, f64::NEG_INFINITY)],
            vec![(1.0, f64::MAX), (2.0, -f64::MAX)],
            vec![(1.0, 0.5)],
        ] {
            let (xr, yr) = range(&loss, 0.05);
            assert!(xr.start < xr.end && xr.start.is_finite() && xr.end.is_finite());
            assert!(yr.start < yr.end && yr.start.is_finite() && yr.end.is_finite());
            let curves = Curves {
                loss,
                train_acc: vec![(0.0, f64::NAN)],
                val_acc: vec![(0.0, 20.0)],
            };
            let path = dir.path().join("curves.png");
            plot_curves(&curves, "t", &path).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() > 0);
        }
    }
}
