//! The example's two pictures, drawn with plotters' bitmap backend and no font: the few labels
//! are drawn from a built-in 3 × 5 pixel font, so the example needs no font file or feature.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One colour per digit class (ten well-separated hues).
pub const CLASS_COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(90, 90, 90),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The rows of a 3 × 5 glyph, top first, the left pixel in bit 2.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b001, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        '=' => [0b000, 0b111, 0b000, 0b111, 0b000],
        ',' => [0b000, 0b000, 0b000, 0b010, 0b100],
        '(' => [0b010, 0b100, 0b100, 0b100, 0b010],
        ')' => [0b010, 0b001, 0b001, 0b001, 0b010],
        'A' => [0b010, 0b101, 0b111, 0b101, 0b101],
        'B' => [0b110, 0b101, 0b110, 0b101, 0b110],
        'C' => [0b011, 0b100, 0b100, 0b100, 0b011],
        'D' => [0b110, 0b101, 0b101, 0b101, 0b110],
        'E' => [0b111, 0b100, 0b110, 0b100, 0b111],
        'F' => [0b111, 0b100, 0b110, 0b100, 0b100],
        'G' => [0b011, 0b100, 0b101, 0b101, 0b011],
        'H' => [0b101, 0b101, 0b111, 0b101, 0b101],
        'I' => [0b111, 0b010, 0b010, 0b010, 0b111],
        'K' => [0b101, 0b101, 0b110, 0b101, 0b101],
        'L' => [0b100, 0b100, 0b100, 0b100, 0b111],
        'M' => [0b101, 0b111, 0b111, 0b101, 0b101],
        'N' => [0b110, 0b101, 0b101, 0b101, 0b101],
        'O' => [0b010, 0b101, 0b101, 0b101, 0b010],
        'P' => [0b110, 0b101, 0b110, 0b100, 0b100],
        'R' => [0b110, 0b101, 0b110, 0b101, 0b101],
        'S' => [0b011, 0b100, 0b010, 0b001, 0b110],
        'T' => [0b111, 0b010, 0b010, 0b010, 0b010],
        'U' => [0b101, 0b101, 0b101, 0b101, 0b111],
        'V' => [0b101, 0b101, 0b101, 0b101, 0b010],
        'W' => [0b101, 0b101, 0b111, 0b111, 0b101],
        'X' => [0b101, 0b101, 0b010, 0b101, 0b101],
        'Y' => [0b101, 0b101, 0b010, 0b010, 0b010],
        _ => [0; 5],
    }
}

/// Draws `text` with its top-left corner at pixel (x, y), each font pixel `size` pixels wide.
fn text(
    area: &DrawingArea<BitMapBackend, Shift>,
    s: &str,
    (x, y): (i32, i32),
    size: i32,
    colour: RGBColor,
) -> anyhow::Result<()> {
    for (i, c) in s.chars().enumerate() {
        let left = x + 4 * size * i as i32;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..3 {
                if bits & (0b100 >> col) != 0 {
                    let (px, py) = (left + col * size, y + row as i32 * size);
                    area.draw(&Rectangle::new(
                        [(px, py), (px + size, py + size)],
                        colour.filled(),
                    ))
                    .map_err(|e| anyhow!("drawing text: {e}"))?;
                }
            }
        }
    }
    Ok(())
}

/// Width in pixels of `s` drawn at `size`.
fn text_width(s: &str, size: i32) -> i32 {
    (4 * s.chars().count() as i32 - 1).max(0) * size
}

/// About five round tick values covering [lo, hi], and the decimals they need.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, usize) {
    let raw = ((hi - lo) / 5.0).max(1e-12);
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * power);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|i| i as f64 * step).collect(), decimals)
}

/// The loss curve: every minibatch's loss (light) and each epoch's mean (dark, with points),
/// against the epoch.
pub fn loss_curve(
    path: &Path,
    step_losses: &[f64],
    epoch_losses: &[f64],
    steps_per_epoch: usize,
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let epochs = epoch_losses.len().max(1) as f64;
    let lo = step_losses.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = step_losses
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (y_lo, y_hi) = (lo - pad, hi + pad);

    let title = "TRAINING LOSS PER EPOCH (MINUS SOFT SAME-LABEL FRACTION)";
    text(&root, title, (70, 12), 2, BLACK)?;
    let mut chart = ChartBuilder::on(&root)
        .margin_top(40)
        .margin_left(80)
        .margin_right(20)
        .margin_bottom(50)
        .build_cartesian_2d(0.0..epochs, y_lo..y_hi)
        .map_err(|e| anyhow!("{e}"))?;

    // Grid and tick labels by hand (plotters' own labels would need a font).
    let grey = RGBColor(220, 220, 220);
    let (x_ticks, _) = ticks(0.0, epochs);
    let (y_ticks, y_decimals) = ticks(y_lo, y_hi);
    for &x in &x_ticks {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, y_lo), (x, y_hi)],
                grey,
            )))
            .map_err(|e| anyhow!("{e}"))?;
        let (px, py) = chart.backend_coord(&(x, y_lo));
        let label = format!("{x:.0}");
        text(
            &root,
            &label,
            (px - text_width(&label, 2) / 2, py + 8),
            2,
            BLACK,
        )?;
    }
    for &y in &y_ticks {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, y), (epochs, y)],
                grey,
            )))
            .map_err(|e| anyhow!("{e}"))?;
        let (px, py) = chart.backend_coord(&(0.0, y));
        let label = format!("{y:.y_decimals$}");
        text(
            &root,
            &label,
            (px - text_width(&label, 2) - 8, py - 5),
            2,
            BLACK,
        )?;
    }
    text(&root, "EPOCH", (400, 478), 2, BLACK)?;

    // Step k of epoch e sits at x = e + (k + 1)/steps; the epoch mean at the epoch's end.
    let per = steps_per_epoch.max(1) as f64;
    let steps = step_losses
        .iter()
        .enumerate()
        .map(|(i, &l)| ((i as f64 + 1.0) / per, l));
    chart
        .draw_series(LineSeries::new(steps, RGBColor(160, 190, 230)))
        .map_err(|e| anyhow!("{e}"))?;
    let means: Vec<(f64, f64)> = epoch_losses
        .iter()
        .enumerate()
        .map(|(e, &l)| (e as f64 + 1.0, l))
        .collect();
    let dark = RGBColor(20, 60, 140);
    chart
        .draw_series(LineSeries::new(means.clone(), dark.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(means.iter().map(|&p| Circle::new(p, 3, dark.filled())))
        .map_err(|e| anyhow!("{e}"))?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// A 2-D scatter of labelled points, each drawn as its own digit in its class colour.
pub fn embedding_scatter(
    path: &Path,
    points: &[f64],
    labels: &[usize],
    title: &str,
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (720, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let range = |axis: usize| {
        let v = points.iter().skip(axis).step_by(2).copied();
        let lo = v.clone().fold(f64::INFINITY, f64::min);
        let hi = v.fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.03).max(1e-9);
        (lo - pad)..(hi + pad)
    };
    text(&root, title, (20, 12), 2, BLACK)?;
    let chart = ChartBuilder::on(&root)
        .margin(30)
        .margin_top(40)
        .build_cartesian_2d(range(0), range(1))
        .map_err(|e| anyhow!("{e}"))?;
    let frame = chart.plotting_area().get_pixel_range();
    root.draw(&Rectangle::new(
        [(frame.0.start, frame.1.start), (frame.0.end, frame.1.end)],
        RGBColor(180, 180, 180),
    ))
    .map_err(|e| anyhow!("{e}"))?;

    for (p, &label) in points.chunks(2).zip(labels) {
        let (px, py) = chart.backend_coord(&(p[0], p[1]));
        let digit = char::from_digit(label as u32, 10).unwrap_or('?');
        text(
            &root,
            &digit.to_string(),
            (px - 3, py - 5),
            2,
            CLASS_COLOURS[label % 10],
        )?;
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
