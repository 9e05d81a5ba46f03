//! PNG plots of a run (plotters, bitmap backend, text through ab_glyph with a system
//! TrueType font found at run time).

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::report::{fmt_bytes, fmt_rate};
use crate::{Lat, Results, ServerKind};

const SIZE: (u32, u32) = (1000, 640);

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn find_ttf(dir: &Path, depth: usize) -> Option<std::path::PathBuf> {
    if depth == 0 {
        return None;
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in &entries {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) {
            return Some(p.clone());
        }
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_ttf(p, depth - 1))
}

fn load_font() -> anyhow::Result<()> {
    let path = FONT_CANDIDATES
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| find_ttf(Path::new("/usr/share/fonts"), 4))
        .ok_or_else(|| {
            anyhow!("no TrueType font found under /usr/share/fonts (install fonts-dejavu-core)")
        })?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(&path)?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable font", path.display()))?;
    Ok(())
}

fn color(server: ServerKind, cores: usize) -> RGBColor {
    let base = match server {
        ServerKind::Ringcast => (214, 39, 40),
        ServerKind::RingcastSend => (255, 127, 14),
        ServerKind::RingcastTls => (148, 103, 189),
        ServerKind::RingcastDeflate => (44, 160, 44),
        ServerKind::Floor => (30, 30, 30),
        ServerKind::Tokio => (31, 119, 180),
    };
    if cores <= 1 {
        RGBColor(base.0, base.1, base.2)
    } else {
        // Lighter shade for the 2-core series.
        let l = |c: u8| c + (255 - c) / 2;
        RGBColor(l(base.0), l(base.1), l(base.2))
    }
}

fn label(r: &Results, server: ServerKind, cores: usize) -> String {
    if r.plan.cores.len() > 1 {
        format!(
            "{} ({cores} core{})",
            server.label(),
            if cores > 1 { "s" } else { "" }
        )
    } else {
        server.label().to_string()
    }
}

type Series = Vec<(String, RGBColor, Vec<(f64, f64)>)>;

fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &Series,
    y_fmt: &dyn Fn(&f64) -> String,
    hline: Option<(f64, &str)>,
) -> anyhow::Result<()> {
    let xmax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.05;
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .chain(hline.map(|h| h.0))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| fmt_rate(*v))
        .y_label_formatter(y_fmt)
        .label_style(("sans-serif", 15))
        .draw()?;
    if let Some((y, text)) = hline {
        let grey = RGBColor(150, 150, 150);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, y), (xmax, y)],
                8,
                5,
                grey.stroke_width(2),
            ))?
            .label(text)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
    }
    for (name, c, points) in series {
        let c = *c;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

fn per_size_series(r: &Results, get: fn(&crate::Summary) -> Option<f64>) -> Series {
    let mut out = Vec::new();
    for &cores in &r.plan.cores {
        for &server in &r.plan.servers {
            let pts: Vec<(f64, f64)> = r
                .summary
                .iter()
                .filter(|s| s.server == server && s.cores == cores)
                .filter_map(|s| Some((s.size as f64, get(s)?)))
                .collect();
            if !pts.is_empty() {
                out.push((label(r, server, cores), color(server, cores), pts));
            }
        }
    }
    out
}

/// The quantiles on a "nines" axis, evenly spaced: p50 → 0, p90 → 1, p99 → 2,
/// p99.9 → 3, max → 4.
fn cdf_points(l: &Lat) -> Vec<(f64, f64)> {
    [l.p50, l.p90, l.p99, l.p999, l.max]
        .iter()
        .enumerate()
        .map(|(i, &us)| (us / 1000.0, i as f64))
        .collect()
}

fn latency_cdf(r: &Results, path: &Path) -> anyhow::Result<()> {
    let mut series: Series = Vec::new();
    for &cores in &r.plan.cores {
        for &server in &r.plan.servers {
            if let Some(l) = r
                .paced_summary
                .iter()
                .find(|p| p.server == server && p.cores == cores)
                .and_then(|p| p.latency.as_ref())
            {
                series.push((label(r, server, cores), color(server, cores), cdf_points(l)));
            }
        }
        if let Some(w) = r
            .paced_summary
            .iter()
            .find(|p| p.server == ServerKind::Floor && p.cores == cores)
            .and_then(|p| p.floor_write.as_ref())
        {
            let name = format!(
                "{} own write time (server side)",
                label(r, ServerKind::Floor, cores)
            );
            series.push((name, RGBColor(140, 140, 140), cdf_points(w)));
        }
    }
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .filter(|&x| x > 0.0)
        .collect();
    let xmin = all.iter().copied().fold(f64::INFINITY, f64::min).min(1e9) / 1.5;
    let xmax = all.iter().copied().fold(0.0f64, f64::max).max(xmin * 10.0) * 1.5;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "Delivery latency CDF: {} broadcasts/s to {} subscribers",
        r.plan.paced_rate, r.plan.paced_subscribers
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d((xmin.max(1e-3)..xmax).log_scale(), -0.2f64..4.2)?;
    chart
        .configure_mesh()
        .x_desc("send-to-receive latency (ms, log scale)")
        .y_desc("quantile")
        .y_labels(23)
        .y_label_formatter(&|y| match (*y * 10.0).round() as i64 {
            0 => "p50".into(),
            10 => "p90".into(),
            20 => "p99".into(),
            30 => "p99.9".into(),
            40 => "max".into(),
            _ => String::new(),
        })
        .x_labels(15)
        .x_label_formatter(&|x| {
            if *x >= 10.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.2}")
            }
        })
        .label_style(("sans-serif", 15))
        .draw()?;
    for (name, c, points) in &series {
        let c = *c;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

pub fn draw_all(r: &Results, dir: &Path) -> anyhow::Result<()> {
    load_font()?;
    line_chart(
        &dir.join("deliveries.png"),
        "Fanout throughput: deliveries/s vs subscribers",
        "subscribers",
        "deliveries / s",
        &per_size_series(r, |s| s.deliveries_per_sec),
        &|v| fmt_rate(*v),
        None,
    )
    .context("deliveries.png")?;
    line_chart(
        &dir.join("deliveries_per_cpu.png"),
        "Fanout efficiency: deliveries per server CPU-second",
        "subscribers",
        "deliveries / CPU-second",
        &per_size_series(r, |s| s.deliveries_per_cpu_sec),
        &|v| fmt_rate(*v),
        None,
    )
    .context("deliveries_per_cpu.png")?;
    latency_cdf(r, &dir.join("latency_cdf.png")).context("latency_cdf.png")?;
    line_chart(
        &dir.join("memory_per_connection.png"),
        "User-space memory per idle joined connection (RSS delta / N)",
        "connections",
        "bytes per connection",
        &per_size_series(r, |s| s.rss_per_connection),
        &|v| fmt_bytes(*v),
        Some((2048.0, "target: ringcast <= 2 KiB")),
    )
    .context("memory_per_connection.png")?;
    Ok(())
}
