//! A self-contained HTML report: inline CSS and SVG plots, no scripts, no network. The evaluation contributes
//! its sections ([`eval_sections`]); callers such as the sandbox pipeline add their own before rendering.

use std::fmt::Write;

use crate::evaluate::Summary;
use crate::stats::Estimate;

pub struct Section {
    /// Anchor id (also what tests look for).
    pub id: String,
    pub heading: String,
    /// Trusted HTML built with [`esc`] and the plot helpers.
    pub html: String,
}

pub struct Report {
    pub title: String,
    /// Trusted HTML under the title.
    pub intro: String,
    pub sections: Vec<Section>,
}

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn fmt_est(e: &Estimate) -> String {
    format!(
        "{:.3} <span class=ci>[{:.3}, {:.3}]</span>",
        e.mean, e.ci_low, e.ci_high
    )
}

const CSS: &str = "body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;color:#222;max-width:1000px;margin:2em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0 1em;font-variant-numeric:tabular-nums;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}.ci{color:#777;font-size:.9em}
.note{background:#fffbe6;border-left:4px solid #e6b800;padding:.4em .8em;margin:.6em 0}
.ok{background:#eef8ee;border-left:4px solid #3a3;padding:.4em .8em;margin:.6em 0}
code,pre,td.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em}
td.mono,td.wrap{white-space:pre-wrap;max-width:420px;word-break:break-word}nav a{margin-right:1em}svg{display:block;margin:.4em 0 1em;max-width:100%;height:auto}";

pub fn render(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{}</title><style>{CSS}</style></head><body>",
        esc(&r.title)
    );
    let _ = write!(h, "<h1>{}</h1>{}<nav>", esc(&r.title), r.intro);
    for s in &r.sections {
        let _ = write!(h, "<a href=\"#{}\">{}</a>", s.id, esc(&s.heading));
    }
    h.push_str("</nav>");
    for s in &r.sections {
        let _ = write!(
            h,
            "<section id=\"{}\"><h2>{}</h2>{}</section>",
            s.id,
            esc(&s.heading),
            s.html
        );
    }
    h.push_str("</body></html>\n");
    h
}

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

/// "Nice" tick positions covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    (0..=((hi - start) / step).ceil() as usize)
        .map(|i| start + i as f64 * step)
        .collect()
}

fn tick_label(v: f64) -> String {
    // Ticks are multiples of a round step: two decimals suffice; "-0" from rounding reads as 0.
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A horizontal grid line at height `y` from `x0` to `x1`, labelled left of `x0`.
fn grid_line(s: &mut String, x0: f64, x1: f64, y: f64, label: &str) {
    let _ = write!(
        s,
        "<line x1='{x0}' x2='{x1}' y1='{y:.1}' y2='{y:.1}' stroke='#e5e5e5'/><text x='{tx}' y='{ty:.1}' font-size='11' text-anchor='end'>{label}</text>",
        tx = x0 - 5.0,
        ty = y + 4.0
    );
}

/// Bars with 95 % whiskers, one per label.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, Estimate)]) -> String {
    let (w, h, left, top, bottom) = (620.0, 280.0, 60.0, 30.0, 50.0);
    let lo = bars
        .iter()
        .map(|b| b.1.ci_low.min(b.1.mean))
        .fold(0.0f64, f64::min);
    let hi = bars
        .iter()
        .map(|b| b.1.ci_high.max(b.1.mean))
        .fold(0.0f64, f64::max)
        .max(lo + 1e-6);
    let t = ticks(lo, hi);
    let (y0, y1) = (t[0], *t.last().expect("ticks"));
    let ph = h - top - bottom;
    let y = |v: f64| top + ph * (1.0 - (v - y0) / (y1 - y0));
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' aria-label='{}'>",
        esc(title)
    );
    let _ = write!(
        s,
        "<text x='{}' y='18' font-size='14' text-anchor='middle' font-weight='bold'>{}</text>",
        w / 2.0,
        esc(title)
    );
    for v in &t {
        grid_line(&mut s, left, w - 10.0, y(*v), &tick_label(*v));
    }
    let _ = write!(
        s,
        "<line x1='{left}' x2='{}' y1='{1:.1}' y2='{1:.1}' stroke='#888'/>",
        w - 10.0,
        y(0.0f64.clamp(y0, y1))
    );
    let _ = write!(
        s,
        "<text transform='translate(14,{}) rotate(-90)' font-size='12' text-anchor='middle'>{}</text>",
        top + ph / 2.0,
        esc(y_label)
    );
    let slot = (w - left - 10.0) / bars.len().max(1) as f64;
    for (i, (label, e)) in bars.iter().enumerate() {
        let x = left + slot * i as f64 + slot * 0.2;
        let bw = slot * 0.6;
        let (ya, yb) = (y(e.mean), y(0.0f64.clamp(y0, y1)));
        let _ = write!(
            s,
            "<rect x='{x:.1}' y='{:.1}' width='{bw:.1}' height='{:.1}' fill='{}'/>",
            ya.min(yb),
            (ya - yb).abs(),
            PALETTE[i % PALETTE.len()]
        );
        let cx = x + bw / 2.0;
        let _ = write!(
            s,
            "<line x1='{cx:.1}' x2='{cx:.1}' y1='{:.1}' y2='{:.1}' stroke='#222' stroke-width='1.5'/>",
            y(e.ci_low),
            y(e.ci_high)
        );
        for v in [e.ci_low, e.ci_high] {
            let _ = write!(
                s,
                "<line x1='{:.1}' x2='{:.1}' y1='{2:.1}' y2='{2:.1}' stroke='#222' stroke-width='1.5'/>",
                cx - 6.0,
                cx + 6.0,
                y(v)
            );
        }
        let _ = write!(
            s,
            "<text x='{cx:.1}' y='{:.1}' font-size='12' text-anchor='middle'>{}</text>",
            h - bottom + 18.0,
            esc(label)
        );
        let _ = write!(
            s,
            "<text x='{cx:.1}' y='{:.1}' font-size='11' text-anchor='middle' fill='#444'>{:.3}</text>",
            h - bottom + 34.0,
            e.mean
        );
    }
    s.push_str("</svg>");
    s
}

/// Lines (or points when `points`), one per named series, with a legend.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    points: bool,
) -> String {
    let (w, h, left, top, bottom, right) = (620.0, 300.0, 60.0, 30.0, 45.0, 150.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if all.is_empty() {
        return format!("<p class=note>{}: no data.</p>", esc(title));
    }
    let (xmin, xmax) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0), a.1.max(p.0))
    });
    let (ymin, ymax) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.1), a.1.max(p.1))
    });
    let (tx, ty) = (
        ticks(xmin, xmax.max(xmin + 1e-6)),
        ticks(ymin, ymax.max(ymin + 1e-6)),
    );
    let (x0, x1, y0, y1) = (
        tx[0],
        *tx.last().expect("ticks"),
        ty[0],
        *ty.last().expect("ticks"),
    );
    let (pw, ph) = (w - left - right, h - top - bottom);
    let px = |v: f64| left + pw * (v - x0) / (x1 - x0);
    let py = |v: f64| top + ph * (1.0 - (v - y0) / (y1 - y0));
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' aria-label='{}'>",
        esc(title)
    );
    let _ = write!(
        s,
        "<text x='{}' y='18' font-size='14' text-anchor='middle' font-weight='bold'>{}</text>",
        left + pw / 2.0,
        esc(title)
    );
    for v in &ty {
        grid_line(&mut s, left, left + pw, py(*v), &tick_label(*v));
    }
    for v in &tx {
        let _ = write!(
            s,
            "<text x='{:.1}' y='{:.1}' font-size='11' text-anchor='middle'>{}</text>",
            px(*v),
            top + ph + 15.0,
            tick_label(*v)
        );
    }
    let _ = write!(
        s,
        "<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#888'/>"
    );
    let _ = write!(
        s,
        "<text x='{}' y='{}' font-size='12' text-anchor='middle'>{}</text>",
        left + pw / 2.0,
        h - 8.0,
        esc(x_label)
    );
    let _ = write!(
        s,
        "<text transform='translate(14,{}) rotate(-90)' font-size='12' text-anchor='middle'>{}</text>",
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let coords: Vec<String> = pts
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        if points || coords.len() == 1 {
            for c2 in &coords {
                let (cx, cy) = c2.split_once(',').expect("x,y");
                let _ = write!(s, "<circle cx='{cx}' cy='{cy}' r='4' fill='{c}'/>");
            }
        }
        if !points {
            let _ = write!(
                s,
                "<polyline points='{}' fill='none' stroke='{c}' stroke-width='2'/>",
                coords.join(" ")
            );
        }
        let ly = top + 14.0 + 18.0 * i as f64;
        let _ = write!(
            s,
            "<rect x='{}' y='{}' width='12' height='12' fill='{c}'/><text x='{}' y='{}' font-size='12'>{}</text>",
            left + pw + 10.0,
            ly - 10.0,
            left + pw + 27.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// The evaluation's own sections: rewards, indicators, win rates, KL/length/diversity, examples.
pub fn eval_sections(sum: &Summary) -> Vec<Section> {
    let mut out = Vec::new();
    let sources: Vec<String> = sum
        .models
        .first()
        .map(|m| m.rewards.iter().map(|r| r.source.clone()).collect())
        .unwrap_or_default();
    let mut h = format!(
        "<p>{} held-out prompts, one completion per prompt and model (temperature {}, at most {} new tokens, seed {}); the same sampling seeds for every model. Intervals: 95 % percentile bootstrap.</p>",
        sum.prompts, sum.config.temperature, sum.config.max_new_tokens, sum.config.seed
    );
    for (s, source) in sources.iter().enumerate() {
        let _ = write!(
            h,
            "<h3>reward <code>{}</code></h3><table><tr><th class=l>model</th><th>mean [95 % CI]</th><th>n</th></tr>",
            esc(source)
        );
        let mut bars = Vec::new();
        for m in &sum.models {
            let e = m.rewards[s].reward;
            let _ = write!(
                h,
                "<tr><td class=l>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&m.name),
                fmt_est(&e),
                e.n
            );
            bars.push((m.name.clone(), e));
        }
        h.push_str("</table>");
        h.push_str(&bar_chart(
            &format!("mean reward ({source})"),
            "reward",
            &bars,
        ));
    }
    out.push(Section {
        id: "rewards".into(),
        heading: "Reward".into(),
        html: h,
    });

    let mut h = String::new();
    for (s, source) in sources.iter().enumerate() {
        let keys: Vec<&String> = sum.models[0].rewards[s].indicators.keys().collect();
        if keys.is_empty() {
            continue;
        }
        let _ = write!(h, "<h3>indicators of <code>{}</code> (mean over the prompts each applies to)</h3><table><tr><th class=l>indicator</th>", esc(source));
        for m in &sum.models {
            let _ = write!(h, "<th>{}</th>", esc(&m.name));
        }
        h.push_str("<th>n</th></tr>");
        for k in keys {
            let _ = write!(h, "<tr><td class=l>{}</td>", esc(k));
            for m in &sum.models {
                let cell = m.rewards[s]
                    .indicators
                    .get(k)
                    .map(fmt_est)
                    .unwrap_or_else(|| "–".into());
                let _ = write!(h, "<td>{cell}</td>");
            }
            let n = sum.models[0].rewards[s].indicators[k].n;
            let _ = write!(h, "<td>{n}</td></tr>");
        }
        h.push_str("</table>");
    }
    if !h.is_empty() {
        out.push(Section {
            id: "indicators".into(),
            heading: "Behaviour".into(),
            html: h,
        });
    }

    if sum.models.len() > 1 {
        let mut h = String::from("<p>Row model against column model: share of prompts where the row's completion scores higher, ties counting half; in brackets the share of ties.</p>");
        for source in &sources {
            let _ = write!(
                h,
                "<h3><code>{}</code></h3><table><tr><th class=l>row vs column</th>",
                esc(source)
            );
            for m in &sum.models {
                let _ = write!(h, "<th>{}</th>", esc(&m.name));
            }
            h.push_str("</tr>");
            for a in &sum.models {
                let _ = write!(h, "<tr><td class=l>{}</td>", esc(&a.name));
                for b in &sum.models {
                    let w = sum
                        .win_rates
                        .iter()
                        .find(|w| &w.source == source && w.model == a.name && w.versus == b.name);
                    match w {
                        Some(w) => {
                            let shade = (w.win_rate - 0.5).clamp(-0.5, 0.5);
                            let bg = if shade >= 0.0 {
                                format!("rgba(89,161,79,{:.2})", shade * 1.2)
                            } else {
                                format!("rgba(225,87,89,{:.2})", -shade * 1.2)
                            };
                            let _ = write!(
                                h,
                                "<td style='background:{bg}'>{:.0} % <span class=ci>(ties {:.0} %)</span></td>",
                                100.0 * w.win_rate,
                                100.0 * w.ties
                            );
                        }
                        None => h.push_str("<td>–</td>"),
                    }
                }
                h.push_str("</tr>");
            }
            h.push_str("</table>");
        }
        out.push(Section {
            id: "win-rates".into(),
            heading: "Win rates".into(),
            html: h,
        });
    }

    let mut h = String::from("<table><tr><th class=l>model</th>");
    let kl = sum.reference.is_some();
    if kl {
        h.push_str("<th>KL to reference (nats / sequence)</th>");
    }
    h.push_str("<th>length (tokens)</th><th>length (characters)</th><th>distinct-1</th><th>distinct-2</th><th>token entropy (nats)</th></tr>");
    for m in &sum.models {
        let _ = write!(h, "<tr><td class=l>{}</td>", esc(&m.name));
        if let Some(k) = &m.kl_to_reference {
            let _ = write!(h, "<td>{}</td>", fmt_est(k));
        }
        let _ = write!(
            h,
            "<td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
            fmt_est(&m.length_tokens),
            fmt_est(&m.length_chars),
            m.distinct_1,
            m.distinct_2,
            m.token_entropy
        );
    }
    h.push_str("</table>");
    if let Some(r) = &sum.reference {
        let _ = write!(h, "<p>KL: mean over prompts of Σ log p<sub>model</sub> − log p<sub>reference</sub> over the model's own sampled tokens; reference <code>{}</code>.</p>", esc(r));
    }
    let ent: Vec<(String, Vec<(f64, f64)>)> = sum
        .models
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                vec![(m.length_tokens.mean, m.token_entropy)],
            )
        })
        .collect();
    h.push_str(&line_chart(
        "entropy against length",
        "mean length (tokens)",
        "token entropy (nats)",
        &ent,
        true,
    ));
    out.push(Section {
        id: "diversity".into(),
        heading: "KL, length and diversity".into(),
        html: h,
    });

    let first = sources.first().map_or("reward".into(), |s| s.clone());
    let mut h = format!("<p>The first prompts of the evaluation, each model's sampled completion and its <code>{}</code> reward.</p><table><tr><th class=l>prompt</th>", esc(&first));
    for m in &sum.models {
        let _ = write!(h, "<th class=l>{}</th>", esc(&m.name));
    }
    h.push_str("</tr>");
    let shown = sum
        .models
        .iter()
        .map(|m| m.examples.len())
        .min()
        .unwrap_or(0);
    for i in 0..shown {
        let _ = write!(
            h,
            "<tr><td class='l mono'>{}</td>",
            esc(&sum.models[0].examples[i].prompt)
        );
        for m in &sum.models {
            let e = &m.examples[i];
            let r = e
                .rewards
                .first()
                .copied()
                .flatten()
                .map_or("–".into(), |v| format!("{v:.2}"));
            let _ = write!(
                h,
                "<td class='l mono'>{}<br><span class=ci>{r}</span></td>",
                esc(&e.completion)
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    out.push(Section {
        id: "examples".into(),
        heading: "Examples".into(),
        html: h,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range() {
        let t = ticks(-0.37, 0.82);
        assert!(t[0] <= -0.37 && *t.last().unwrap() >= 0.82, "{t:?}");
        assert!(t.len() <= 8);
    }

    #[test]
    fn charts_escape_and_draw_every_bar() {
        let e = Estimate {
            mean: 0.5,
            ci_low: 0.4,
            ci_high: 0.6,
            n: 10,
        };
        let svg = bar_chart("a<b", "r", &[("x&y".into(), e), ("z".into(), e)]);
        assert!(svg.contains("a&lt;b") && svg.contains("x&amp;y"));
        assert_eq!(svg.matches("<rect").count(), 2);
        let lines = line_chart(
            "t",
            "x",
            "y",
            &[("s".into(), vec![(0.0, 1.0), (1.0, 2.0)])],
            false,
        );
        assert_eq!(lines.matches("<polyline").count(), 1);
    }
}
