//! Throughput/latency charts of `tandem bench --plot`, drawn into a pixel
//! buffer and written as PNG (RGB, zlib through `miniz_oxide`), so that no
//! plotting library or font file is needed.

/// A line or set of points on a chart.
pub(super) struct Series {
    /// Its legend.
    pub(super) name: String,
    /// Its colour.
    pub(super) color: [u8; 3],
    /// Its points, (x, y).
    pub(super) points: Vec<(f64, f64)>,
    /// Whether consecutive points (by x) are joined by a line.
    pub(super) joined: bool,
    /// Words written beside the points, one per point (or none).
    pub(super) labels: Vec<String>,
}

/// A chart: series over linear axes from zero, and labelled vertical marks.
pub(super) struct Chart {
    /// The line above the plot.
    pub(super) title: String,
    /// The horizontal axis' label.
    pub(super) x_label: String,
    /// The vertical axis' label.
    pub(super) y_label: String,
    /// What is drawn.
    pub(super) series: Vec<Series>,
    /// Dashed vertical lines at these x, each with its label.
    pub(super) marks: Vec<(f64, String)>,
}

const WIDTH: usize = 800;
const HEIGHT: usize = 480;
const LEFT: usize = 80;
const RIGHT: usize = 24;
const TOP: usize = 48;
const BOTTOM: usize = 56;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [225, 225, 225];
const MARK: [u8; 3] = [140, 140, 140];

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            pixels: BACKGROUND.repeat(WIDTH * HEIGHT),
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let at = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&color);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: [u8; 3]) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, color);
            }
        }
    }

    /// A line two pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=steps {
            let x = x0 + (x1 - x0) * i / steps;
            let y = y0 + (y1 - y0) * i / steps;
            self.rect(x, y, x + 1, y + 1, color);
        }
    }

    /// Text in the 5×7 font scaled `scale` times, from its top left.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, color: [u8; 3]) {
        for (i, c) in s.chars().enumerate() {
            let rows = glyph(c);
            let left = x + i as i64 * 6 * scale;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        let (px, py) = (left + col * scale, y + r as i64 * scale);
                        self.rect(px, py, px + scale - 1, py + scale - 1, color);
                    }
                }
            }
        }
    }
}

/// Width in pixels of `s` in the font at `scale`.
fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 6 * scale - scale
}

/// A round step giving about `ticks` ticks up to `max`.
fn tick_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// The upper end of an axis holding `max`: the first tick at or above it.
fn axis_end(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let step = tick_step(max, 6.0);
    ((max / step).ceil().max(1.0) * step, step)
}

/// The chart as a PNG file's bytes.
pub(super) fn png(chart: &Chart) -> Vec<u8> {
    let mut c = Canvas::new();
    let finite = |v: f64| v.is_finite().then_some(v);
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(chart.marks.iter().map(|m| m.0))
        .filter_map(finite);
    let ys = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter_map(finite);
    let (x_end, x_step) = axis_end(xs.fold(0.0, f64::max) * 1.05);
    let (y_end, y_step) = axis_end(ys.fold(0.0, f64::max) * 1.05);
    let (x0, x1) = (LEFT as i64, (WIDTH - RIGHT) as i64);
    let (y0, y1) = ((HEIGHT - BOTTOM) as i64, TOP as i64);
    let px = |x: f64| x0 + ((x / x_end) * (x1 - x0) as f64).round() as i64;
    let py = |y: f64| y0 - ((y / y_end) * (y0 - y1) as f64).round() as i64;

    // grid and tick labels
    let mut t = 0.0;
    while t <= x_end + x_step / 2.0 {
        let x = px(t);
        c.rect(x, y1, x, y0, GRID);
        let label = tick_label(t, x_step);
        c.text(x - text_width(&label, 1) / 2, y0 + 8, &label, 1, INK);
        t += x_step;
    }
    let mut t = 0.0;
    while t <= y_end + y_step / 2.0 {
        let y = py(t);
        c.rect(x0, y, x1, y, GRID);
        let label = tick_label(t, y_step);
        c.text(x0 - 8 - text_width(&label, 1), y - 3, &label, 1, INK);
        t += y_step;
    }
    c.rect(x0, y1, x0 + 1, y0, INK);
    c.rect(x0, y0, x1, y0 + 1, INK);

    // marks: dashed vertical lines
    for (i, (x, label)) in chart.marks.iter().enumerate() {
        if !x.is_finite() {
            continue;
        }
        let at = px(*x);
        let mut y = y1;
        while y < y0 {
            c.rect(at, y, at, (y + 5).min(y0), MARK);
            y += 10;
        }
        // one line each, so that marks close together stay readable
        c.text(
            at - text_width(label, 1) - 4,
            y1 + 4 + 12 * i as i64,
            label,
            1,
            MARK,
        );
    }

    // series
    for s in &chart.series {
        for (&(x, y), label) in s.points.iter().zip(&s.labels) {
            if x.is_finite() && y.is_finite() {
                let (lx, ly) = (px(x), py(y));
                // left of points in the right half, so that it stays inside
                let at = if lx > (x0 + x1) / 2 {
                    lx - 8 - text_width(label, 1)
                } else {
                    lx + 8
                };
                c.text(at, ly - 3, label, 1, INK);
            }
        }
        let mut points: Vec<(i64, i64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        points.sort_unstable();
        if s.joined {
            for w in points.windows(2) {
                c.line(w[0], w[1], s.color);
            }
        }
        for &(x, y) in &points {
            c.rect(x - 3, y - 3, x + 3, y + 3, s.color);
        }
    }

    // title, axis labels, legend
    c.text(x0, 12, &chart.title, 2, INK);
    let xl = &chart.x_label;
    c.text((x0 + x1) / 2 - text_width(xl, 1) / 2, y0 + 28, xl, 1, INK);
    c.text(8, y1 - 16, &chart.y_label, 1, INK);
    // the legend, on one line above the plot, from the right
    let mut lx = x1;
    for s in chart.series.iter().rev() {
        lx -= text_width(&s.name, 1);
        c.text(lx, 30, &s.name, 1, INK);
        c.rect(lx - 12, 30, lx - 5, 36, s.color);
        lx -= 28;
    }
    encode(WIDTH, HEIGHT, &c.pixels)
}

/// A PNG file of RGB `pixels`, `width` × `height`.
fn encode(width: usize, height: usize, pixels: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((width * 3 + 1) * height);
    for row in pixels.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&(width as u32).to_be_bytes());
    header.extend_from_slice(&(height as u32).to_be_bytes());
    // 8 bits per channel, RGB, deflate, no filter method, no interlace
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &header);
    chunk(
        &mut out,
        b"IDAT",
        &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6),
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 as PNG chunks use it (ISO-HDLC: reflected, polynomial
/// 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rows of the 5×7 glyph of `c` (bit 4 is the leftmost column); capitals
/// are drawn as small letters, anything unknown as a blank.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1E, 0x01, 0x01, 0x0E, 0x01, 0x01, 0x1E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' | 'µ' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '/' => [0x01, 0x02, 0x02, 0x04, 0x08, 0x08, 0x10],
        '%' => [0x19, 0x1A, 0x02, 0x04, 0x08, 0x0B, 0x13],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut at = 8;
        let (mut width, mut height, mut data) = (0, 0, Vec::new());
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = &png[at + 4..at + 8];
            let body = &png[at + 8..at + 8 + len];
            let crc = u32::from_be_bytes(
                png[at + 8 + len..at + 12 + len]
                    .try_into()
                    .expect("4 bytes"),
            );
            assert_eq!(crc, crc32(&png[at + 4..at + 8 + len]), "chunk CRC");
            match kind {
                b"IHDR" => {
                    width = u32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
                    height = u32::from_be_bytes(body[4..8].try_into().expect("4 bytes"));
                    assert_eq!(&body[8..], &[8, 2, 0, 0, 0]);
                }
                b"IDAT" => data.extend_from_slice(body),
                b"IEND" => assert_eq!(at + 12 + len, png.len(), "IEND is last"),
                other => panic!("unexpected chunk {other:?}"),
            }
            at += 12 + len;
        }
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&data).expect("zlib stream");
        (width, height, raw)
    }

    #[test]
    fn crc32_matches_the_check_value() {
        // the standard check value of CRC-32/ISO-HDLC
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_chart_is_a_png_with_its_series_where_their_points_are() {
        let red = [200, 30, 30];
        let chart = Chart {
            title: "txn: p99".into(),
            x_label: "transactions/s".into(),
            y_label: "ms".into(),
            series: vec![Series {
                name: "p99".into(),
                color: red,
                points: vec![(0.0, 0.0), (100.0, 10.0)],
                joined: true,
                labels: Vec::new(),
            }],
            marks: vec![(100.0, "peak".into())],
        };
        let (width, height, raw) = decode(&png(&chart));
        assert_eq!((width as usize, height as usize), (WIDTH, HEIGHT));
        assert_eq!(raw.len(), (WIDTH * 3 + 1) * HEIGHT);
        let pixel = |x: usize, y: usize| {
            let at = y * (WIDTH * 3 + 1) + 1 + x * 3;
            [raw[at], raw[at + 1], raw[at + 2]]
        };
        // the axes end at the first ticks past 105 and 10.5: 120 and 12
        let px = |x: f64| LEFT + ((x / 120.0) * (WIDTH - RIGHT - LEFT) as f64).round() as usize;
        let py = |y: f64| {
            HEIGHT - BOTTOM - ((y / 12.0) * (HEIGHT - BOTTOM - TOP) as f64).round() as usize
        };
        assert_eq!(pixel(px(0.0), py(0.0)), red, "first point");
        assert_eq!(pixel(px(100.0), py(10.0)), red, "last point");
        let (mx, my) = (px(50.0), py(5.0));
        assert!(
            (my - 2..=my + 2).any(|y| pixel(mx, y) == red),
            "the line between, within rounding"
        );
        assert_eq!(pixel(px(50.0), py(9.0)), BACKGROUND, "above the line");
        assert_eq!(pixel(WIDTH - 2, HEIGHT - 2), BACKGROUND);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(axis_end(105.0), (120.0, 20.0));
        assert_eq!(axis_end(0.42), (0.5, 0.1));
        assert_eq!(axis_end(0.0), (1.0, 0.2));
        assert_eq!(tick_label(0.2, 0.1), "0.2");
        assert_eq!(tick_label(20000.0, 5000.0), "20000");
    }
}
