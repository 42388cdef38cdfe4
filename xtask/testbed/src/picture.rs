//! A picture of one run, as SVG: every destination's progress over time (against the
//! floor's pace), and every link direction's utilisation over time as a heat strip, from
//! the in-kernel byte counters the daemons report each second.

use std::fmt::Write;

use crate::topology::Topology;

/// Samples of a counter over time: (seconds into the run, value).
pub type Series = Vec<(f64, u64)>;

/// Consecutive samples of a byte counter as (from s, to s, bit/s), empty intervals skipped.
pub fn intervals(samples: &[(f64, u64)]) -> impl Iterator<Item = (f64, f64, f64)> + '_ {
    samples.windows(2).filter_map(|w| {
        let ((t0, b0), (t1, b1)) = (w[0], w[1]);
        (t1 > t0).then(|| (t0, t1, b1.saturating_sub(b0) as f64 * 8.0 / (t1 - t0)))
    })
}

/// What the picture is drawn from.
pub struct Timeline<'a> {
    pub topo: &'a Topology,
    pub bytes: u64,
    pub u_min_s: f64,
    pub u_s: Option<f64>,
    /// Per destination (node index): (t, bytes held).
    pub progress: Vec<(usize, Series)>,
    /// Per link direction (from node, to node): (t, cumulative bytes sent).
    pub tx: Vec<((usize, usize), Series)>,
}

const W: f64 = 900.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const PLOT_H: f64 = 260.0;
const ROW_H: f64 = 14.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document.
pub fn render(tl: &Timeline) -> String {
    let end = tl
        .progress
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .chain(tl.u_s)
        .fold(tl.u_min_s, f64::max)
        .max(1.0)
        * 1.05;
    let plot_w = W - LEFT - RIGHT;
    let x = |t: f64| LEFT + plot_w * (t / end).clamp(0.0, 1.0);
    let rows = tl.tx.len();
    let heat_top = 40.0 + PLOT_H + 50.0;
    let height = heat_top + rows as f64 * ROW_H + 50.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "{}: {:.1} MiB   U = {}   U_min = {:.2} s{}",
        tl.topo.name,
        tl.bytes as f64 / (1u64 << 20) as f64,
        tl.u_s.map_or("-".into(), |u| format!("{u:.2} s")),
        tl.u_min_s,
        tl.u_s
            .map_or(String::new(), |u| format!("   ratio {:.3}", u / tl.u_min_s))
    );
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14">{}</text>"#,
        esc(&title)
    );
    // Progress panel.
    let top = 40.0;
    let y = |frac: f64| top + PLOT_H * (1.0 - frac.clamp(0.0, 1.0));
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PLOT_H}" fill="none" stroke="#999"/>"##
    );
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{:.0}%</text><line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#eee"/>"##,
            LEFT - 6.0,
            y(f) + 4.0,
            f * 100.0,
            LEFT + plot_w,
            y(f),
            y(f)
        );
    }
    let ticks = 8;
    for k in 0..=ticks {
        let t = end * k as f64 / ticks as f64;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{t:.1}s</text>"#,
            x(t),
            top + PLOT_H + 14.0
        );
    }
    // The floor's pace: the slowest destination's max-flow rate.
    let _ = write!(
        s,
        r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#000" stroke-dasharray="4 3"/><text x="{}" y="{}">U_min</text>"##,
        x(0.0),
        y(0.0),
        x(tl.u_min_s),
        y(1.0),
        x(tl.u_min_s) + 3.0,
        y(1.0) + 12.0
    );
    for (k, (node, points)) in tl.progress.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let mut path = format!("M{} {}", x(0.0), y(0.0));
        for &(t, b) in points {
            let frac = if tl.bytes == 0 {
                1.0
            } else {
                b as f64 / tl.bytes as f64
            };
            let _ = write!(path, " L{:.1} {:.1}", x(t), y(frac));
        }
        let _ = write!(
            s,
            r#"<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>"#
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
            LEFT + 8.0 + (k % 8) as f64 * 60.0,
            top + 14.0 + (k / 8) as f64 * 13.0,
            esc(&tl.topo.nodes[*node].name)
        );
    }
    // Utilisation heat strips: one row per link direction, one cell per sample interval;
    // a red underline where the direction idled while a member beyond it starved.
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="{}">link utilisation (sent / capacity), white 0% to dark 100%; red: idle while a member beyond starved</text>"#,
        heat_top - 8.0
    );
    let idle = crate::idle::idle_intervals(tl);
    for (row, ((from, to), samples)) in tl.tx.iter().enumerate() {
        let ry = heat_top + row as f64 * ROW_H;
        let label = format!("{}>{}", tl.topo.nodes[*from].name, tl.topo.nodes[*to].name);
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            ry + ROW_H - 3.0,
            esc(&label)
        );
        for (t0, t1, bps) in intervals(samples) {
            let cap = tl.topo.capacity_bps(*from, *to, (t0 + t1) / 2.0);
            let u = if cap > 0.0 { (bps / cap).min(1.0) } else { 0.0 };
            let shade = (255.0 * (1.0 - u)) as u8;
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{ry}" width="{:.1}" height="{}" fill="rgb({shade},{shade},255)"><title>{} {:.1}-{:.1}s: {:.1} Mbit/s ({:.0}%)</title></rect>"#,
                x(t0),
                (x(t1) - x(t0)).max(0.5),
                ROW_H - 2.0,
                esc(&label),
                t0,
                t1,
                bps / 1e6,
                u * 100.0
            );
        }
        let marks = idle.iter().filter(|(dir, _)| *dir == (*from, *to));
        for &(t0, t1) in marks.flat_map(|(_, spans)| spans) {
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="3" fill="#d62728"><title>{} idle while needed {:.1}-{:.1}s</title></rect>"##,
                x(t0),
                ry + ROW_H - 4.0,
                (x(t1) - x(t0)).max(0.5),
                esc(&label),
                t0,
                t1
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_progress_and_utilisation() {
        let topo = Topology::parse(
            "t",
            r#"node = [{name="s",role="source"},{name="d",role="dest"}]
               link = [{a="s",b="d",mbit=8}]
               event = [{at_s=1.0,link=["s","d"],mbit=4}]"#,
        )
        .unwrap();
        assert_eq!(topo.capacity_bps(0, 1, 0.5), 8e6);
        assert_eq!(topo.capacity_bps(1, 0, 1.5), 4e6);
        let tl = Timeline {
            topo: &topo,
            bytes: 1_000_000,
            u_min_s: 1.0,
            u_s: Some(1.2),
            progress: vec![(1, vec![(0.5, 500_000), (1.2, 1_000_000)])],
            tx: vec![((0, 1), vec![(0.0, 0), (1.0, 1_000_000)])],
        };
        let svg = render(&tl);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("ratio 1.200"));
        // 8 Mbit in 1 s on an 8 Mbit/s link: fully used.
        assert!(svg.contains("s&gt;d 0.0-1.0s: 8.0 Mbit/s (100%)"), "{svg}");
    }
}
