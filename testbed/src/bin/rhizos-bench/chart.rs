//! PNG charts of benchmark reports (plotters, drawn in memory and PNG-encoded; text rendered
//! with ab_glyph from a TrueType font on the machine, DejaVu Sans by default).

use crate::scale::Point;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Where the chart text's font is looked for, first found wins (`$RHIZOS_CHART_FONT` first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the font as plotters' "sans-serif" once.
fn font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let candidates = std::env::var("RHIZOS_CHART_FONT")
                .ok()
                .into_iter()
                .chain(FONTS.iter().map(|f| (*f).to_owned()));
            for path in candidates {
                if let Ok(bytes) = std::fs::read(&path) {
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                        .map_err(|_| format!("{path} is not a TrueType font plotters can read"));
                }
            }
            Err(format!(
                "no font for the chart's text: install fonts-dejavu-core (apt) or set \
                 RHIZOS_CHART_FONT to a .ttf file (looked in {})",
                FONTS.join(", ")
            ))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// One panel: `series` (name, colour, y per point) against the fleet size (log scale).
struct Panel<'a> {
    title: &'a str,
    y_label: &'a str,
    series: Vec<(&'a str, RGBColor, Vec<f64>)>,
}

/// The scale scenario's chart: six panels, each figure against the number of nodes.
pub fn scale(path: &Path, points: &[Point]) -> anyhow::Result<()> {
    font()?;
    let nodes: Vec<f64> = points.iter().map(|p| p.nodes as f64).collect();
    let of = |f: fn(&Point) -> f64| points.iter().map(f).collect::<Vec<_>>();
    let panels = [
        Panel {
            title: "orchestrator CPU",
            y_label: "% of one core",
            series: vec![
                ("heartbeats only", BLUE, of(|p| p.idle_cpu_percent)),
                ("with jobs flowing", RED, of(|p| p.load_cpu_percent)),
            ],
        },
        Panel {
            title: "heartbeats per second",
            y_label: "heartbeats/s",
            series: vec![
                ("sent by the fleet", BLACK, of(|p| p.heartbeats_sent_per_s)),
                ("absorbed", BLUE, of(|p| p.heartbeats_absorbed_per_s)),
            ],
        },
        Panel {
            title: "jobs settled per second",
            y_label: "jobs/s",
            series: vec![("settled", BLUE, of(|p| p.jobs_settled_per_s))],
        },
        Panel {
            title: "submit → running",
            y_label: "ms",
            series: vec![
                ("p50", BLUE, of(|p| p.submit_to_running_ms.p50)),
                ("p99", RED, of(|p| p.submit_to_running_ms.p99)),
            ],
        },
        Panel {
            title: "orchestrator memory",
            y_label: "MiB",
            series: vec![
                ("resident", BLUE, of(|p| p.rss_mib)),
                ("peak", RED, of(|p| p.peak_rss_mib)),
            ],
        },
        Panel {
            title: "one pick (in the registry)",
            y_label: "µs",
            series: vec![("pick + allocate + release", BLUE, of(|p| p.pick_us))],
        },
    ];
    let (width, height) = (1500u32, 900u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            "RhizOS scale: one orchestrator against growing fleets",
            ("sans-serif", 26),
        )?;
        let (min_x, max_x) = nodes.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &n| {
            (lo.min(n), hi.max(n))
        });
        let x_range = (min_x / 1.5).max(1.0)..(max_x * 1.5).max(2.0);
        for (area, panel) in root.split_evenly((2, 3)).iter().zip(&panels) {
            let top = panel
                .series
                .iter()
                .flat_map(|(_, _, ys)| ys.iter().copied())
                .filter(|y| y.is_finite())
                .fold(0.0f64, f64::max);
            let mut chart = ChartBuilder::on(area)
                .caption(panel.title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(64)
                .build_cartesian_2d(x_range.clone().log_scale(), 0.0..(top * 1.15).max(1e-3))?;
            chart
                .configure_mesh()
                .x_desc("nodes")
                .y_desc(panel.y_label)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .light_line_style(RGBColor(240, 240, 240))
                .label_style(("sans-serif", 13))
                .draw()?;
            for (name, colour, ys) in &panel.series {
                let line: Vec<(f64, f64)> = nodes.iter().copied().zip(ys.iter().copied()).collect();
                let colour = *colour;
                chart
                    .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                chart.draw_series(
                    line.iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, colour.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 13))
                .draw()?;
        }
        root.present()?;
    }
    image_png(path, width, height, &pixels)
}

/// A timeline: a figure per event (ms, log scale, `y_label`) at its moment (s), with each
/// fault's span shaded from its start to its end and labelled.
pub fn timeline(
    path: &Path,
    title: &str,
    y_label: &str,
    points: &[(f64, f64)],
    faults: &[(f64, f64, String)],
) -> anyhow::Result<()> {
    font()?;
    let (width, height) = (1400u32, 700u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let end = points
            .iter()
            .map(|p| p.0)
            .chain(faults.iter().map(|f| f.1))
            .fold(1.0f64, f64::max)
            * 1.05;
        let top = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 2.0;
        let bottom = points
            .iter()
            .map(|p| p.1)
            .filter(|y| *y > 0.0)
            .fold(top, f64::min)
            .max(0.01)
            / 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..end, (bottom..top).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("seconds since the first request")
            .y_desc(y_label)
            .light_line_style(RGBColor(240, 240, 240))
            .label_style(("sans-serif", 14))
            .draw()?;
        let shade = RGBColor(255, 200, 200);
        for (index, (from, to, victim)) in faults.iter().enumerate() {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(*from, bottom), (*to, top)],
                shade.mix(0.5).filled(),
            )))?;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(*from, bottom), (*from, top)],
                RED.stroke_width(2),
            )))?;
            // Labels staggered so that faults close together stay readable.
            let y = top / 1.6f64.powi(index as i32 % 4 + 1);
            chart.draw_series(std::iter::once(Text::new(
                victim.clone(),
                (*from, y),
                ("sans-serif", 14).into_font().color(&RED),
            )))?;
        }
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y.max(bottom)), 3, BLUE.filled())),
            )?
            .label(y_label)
            .legend(|(x, y)| Circle::new((x + 8, y), 3, BLUE.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
    }
    image_png(path, width, height, &pixels)
}

/// Writes an RGB buffer as a PNG.
fn image_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> anyhow::Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(rgb)?;
    Ok(())
}
