//! Run records: `<output_dir>/metrics.jsonl` (one JSON object per logged step or evaluation) and
//! `<output_dir>/curves.svg`, a hand-drawn plot of the training loss (or reward) and the
//! validation metric against the step, redrawn at every save.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub struct Metrics {
    /// None: records are kept but not written (ranks other than 0 under MPI).
    file: Option<PathBuf>,
    svg: PathBuf,
    /// Every record written so far (reloaded on resume), for the plot.
    pub records: Vec<Value>,
}

impl Metrics {
    /// Open `<dir>/metrics.jsonl`. When resuming from `step`, records after it are dropped: the
    /// resumed run writes them again.
    pub fn open(dir: &Path, resume_step: Option<usize>) -> anyhow::Result<Metrics> {
        let file = dir.join("metrics.jsonl");
        let mut records = vec![];
        if let Some(s) = resume_step {
            if let Ok(text) = std::fs::read_to_string(&file) {
                for line in text.lines() {
                    if let Ok(v) = serde_json::from_str::<Value>(line) {
                        if v["step"].as_u64().is_some_and(|x| x as usize <= s) {
                            records.push(v);
                        }
                    }
                }
            }
        }
        let mut body = String::new();
        for r in &records {
            body.push_str(&r.to_string());
            body.push('\n');
        }
        crate::util::write_atomic(&file, body.as_bytes())?;
        Ok(Metrics {
            file: Some(file),
            svg: dir.join("curves.svg"),
            records,
        })
    }

    /// Records kept in memory only: rank 0 alone writes the run's files (crate::distributed).
    pub fn unwritten() -> Metrics {
        Metrics {
            file: None,
            svg: PathBuf::new(),
            records: vec![],
        }
    }

    pub fn log(&mut self, rec: Value) -> anyhow::Result<()> {
        let Some(file) = &self.file else {
            self.records.push(rec);
            return Ok(());
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(file)?;
        // One write of the whole line, not aborted by a second signal: no torn records.
        let _hold = crate::signals::critical();
        f.write_all(format!("{rec}\n").as_bytes())?;
        self.records.push(rec);
        Ok(())
    }

    /// Redraw `curves.svg`: one panel per series present (train loss, reward, validation).
    pub fn plot(&self) -> anyhow::Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let series: Vec<(&str, &str, &str)> = vec![
            ("loss", "train loss", "#1f77b4"),
            ("reward", "train reward", "#2ca02c"),
            ("eval_loss", "validation loss", "#d62728"),
            ("eval_reward", "validation reward", "#9467bd"),
        ];
        let mut panels = vec![];
        for (key, label, color) in series {
            let pts: Vec<(f64, f64)> = self
                .records
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            if !pts.is_empty() {
                panels.push((label, color, pts));
            }
        }
        crate::util::write_atomic(&self.svg, svg(&panels).as_bytes())
    }
}

type Panel<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Stacked panels, each a polyline scaled to its own range, with min/max labels.
fn svg(panels: &[Panel]) -> String {
    let (w, ph, pad) = (640.0, 200.0, 40.0);
    let h = (panels.len().max(1) as f64) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, (label, color, pts)) in panels.iter().enumerate() {
        let top = i as f64 * ph;
        let (x0, x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
        let (y0, y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
        let xs = (x1 - x0).max(1e-9);
        let ys = (y1 - y0).max(1e-9);
        let px = |x: f64| pad + (x - x0) / xs * (w - 2.0 * pad);
        let py = |y: f64| top + ph - pad + -(y - y0) / ys * (ph - 2.0 * pad);
        s.push_str(&format!(
            "<text x=\"{pad}\" y=\"{}\">{label} (steps {x0}–{x1})</text>\n",
            top + 15.0
        ));
        s.push_str(&format!(
            "<rect x=\"{pad}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#ccc\"/>\n",
            top + pad,
            w - 2.0 * pad,
            ph - 2.0 * pad
        ));
        s.push_str(&format!(
            "<text x=\"2\" y=\"{}\">{:.3}</text><text x=\"2\" y=\"{}\">{:.3}</text>\n",
            top + pad + 4.0,
            y1,
            top + ph - pad,
            y0
        ));
        let line: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if pts.len() == 1 {
            s.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                px(pts[0].0),
                py(pts[0].1)
            ));
        } else {
            s.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                line.join(" ")
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}

/// A record with the fields every log line has.
pub fn record(step: usize, epoch: f64, elapsed: f64) -> Value {
    json!({"step": step, "epoch": (epoch * 1000.0).round() / 1000.0, "elapsed": (elapsed * 10.0).round() / 10.0})
}
