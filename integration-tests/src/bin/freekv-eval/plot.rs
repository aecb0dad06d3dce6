//! PNG line charts (plotters into an RGB buffer, encoded with `png`). Text needs a TrueType
//! font, read from the usual system locations at run time.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One line of a chart: a label and its points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart: title, axis labels, optional fixed y range, and its series.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub y_range: Option<(f64, f64)>,
    /// An x value labelled with a name instead of its number (e.g. dense drawn past the budgets).
    pub x_named: Option<(f64, &'a str)>,
    pub log2_x: bool,
    pub series: Vec<Series>,
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a system font for plotters once; an error names the paths tried.
fn ensure_font() -> Result<()> {
    static FONT: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        for path in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable TrueType font"));
            }
        }
        Err(format!(
            "no TrueType font for the plots (tried {}); install fonts-dejavu-core",
            FONT_PATHS.join(", ")
        ))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Whether plots can be drawn on this machine (a font is present).
pub fn available() -> bool {
    ensure_font().is_ok()
}

const W: u32 = 900;
const H: u32 = 540;

/// Draws `chart` into a PNG at `path`.
pub fn draw(path: &Path, chart: &Chart) -> Result<()> {
    ensure_font()?;
    let mut buf = vec![255u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        render(&root, chart).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
        root.present()
            .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    }
    write_png(path, &buf)
}

fn tx(x: f64, log2: bool) -> f64 {
    if log2 {
        x.max(1e-9).log2()
    } else {
        x
    }
}

fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    c: &Chart,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let pts = || c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(tx(p.0, c.log2_x)), b.max(tx(p.0, c.log2_x)))
    });
    if pts().next().is_none() {
        // Nothing to plot (e.g. a run of variants this chart does not show): empty axes,
        // not an unbounded range (which makes the mesh's tick search run forever).
        (x0, x1) = (0.0, 1.0);
    } else if x0 >= x1 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = (x1 - x0) * 0.04;
    let (y0, y1) = c.y_range.unwrap_or_else(|| {
        let (a, b) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let a = a.min(0.0);
        (a, if b > a { b * 1.08 } else { a + 1.0 })
    });
    let mut chart = ChartBuilder::on(root)
        .caption(c.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), y0..y1)?;
    let log2 = c.log2_x;
    let named = c.x_named;
    let x_fmt = move |v: &f64| {
        let x = if log2 { 2f64.powf(*v) } else { *v };
        if let Some((at, name)) = named {
            if (x - at).abs() < 1e-6 * at.abs().max(1.0) {
                return name.to_string();
            }
        }
        if (x - x.round()).abs() < 1e-6 {
            format!("{}", x.round() as i64)
        } else {
            format!("{x:.2}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(c.x_label)
        .y_desc(c.y_label)
        .x_label_formatter(&x_fmt)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17));
    if log2 {
        mesh.x_labels(((x1 - x0).round() as usize + 1).max(2));
    }
    mesh.draw()?;
    for (i, s) in c.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s.points.iter().map(|p| (tx(p.0, log2), p.1)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chart none of whose series has a point (a run of variants it does not show) draws
    /// empty axes instead of searching an unbounded range for ticks.
    #[test]
    fn a_chart_without_points_draws_empty_axes() {
        if !available() {
            println!("SKIPPED: no TrueType font on this machine");
            return;
        }
        let chart = Chart {
            title: "empty",
            x_label: "budget",
            y_label: "accuracy",
            y_range: Some((0.0, 1.05)),
            x_named: Some((1024.0, "dense")),
            log2_x: true,
            series: vec![Series {
                label: "single key".into(),
                points: vec![],
            }],
        };
        let path = std::env::temp_dir().join(format!("freekv-empty-{}.png", std::process::id()));
        draw(&path, &chart).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        let _ = std::fs::remove_file(path);
    }
}
