//! Does training help? Held-out accuracy (greedy) and answer NLL of the plain reasoner vs the
//! reasoner with a trained weaver (nano trigger: always insert), and optionally with a trained
//! trigger (accuracy and memories per answer). Used by scripts/bench-learning.sh.
//!
//!   cargo bench --bench learning -- --config configs/quickstart.yaml --weaver runs/q/weaver \
//!       [--trigger runs/q-trigger/trigger] [--rows 50] [--no-vanilla] [--trigger-sample] \
//!       [--nano-delimiters '[",", ".", "\n"]']
//!
//! The weaver alone (the nano trigger: a memory at every boundary) uses the delimiters its
//! checkpoint was trained with, or `--nano-delimiters` (a YAML list); each line names them.
//! Tokens are greedy. The trigger's decisions take the argmax, and with `--trigger-sample` they
//! are also sampled at temperature 1 (seeded): the policy GRPO trained, rather than its mode.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use memgen::backbone::generate::{Sampler, SamplingConfig};
use memgen::backbone::Mode;
use memgen::config::RunConfig;
use memgen::memory::checkpoint::Part;
use memgen::memory::generate::MemoryOptions;
use memgen::memory::{Kind, MemGenModel, MemGenSpec};
use memgen::tasks::{build_task, render_chatml, Sample, Split, Task};
use memgen::training::sft;

struct Args {
    config: PathBuf,
    weaver: Option<PathBuf>,
    trigger: Option<PathBuf>,
    rows: usize,
    max_new: usize,
    vanilla: bool,
    trigger_sample: bool,
    nano_delimiters: Option<Vec<String>>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        config: "configs/quickstart.yaml".into(),
        weaver: None,
        trigger: None,
        rows: 50,
        max_new: 200,
        vanilla: true,
        trigger_sample: false,
        nano_delimiters: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = || {
            v.get(i + 1)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{} needs a value", v[i]))
        };
        match v[i].as_str() {
            "--config" => a.config = next()?.into(),
            "--weaver" => a.weaver = Some(next()?.into()),
            "--trigger" => a.trigger = Some(next()?.into()),
            "--rows" => a.rows = common::whole("--rows", Some(&next()?), a.rows)?,
            "--nano-delimiters" => {
                let v = next()?;
                a.nano_delimiters = Some(
                    serde_yaml::from_str(&v)
                        .map_err(|e| anyhow::anyhow!("--nano-delimiters {v:?}: {e}"))?,
                )
            }
            "--max-new-tokens" => {
                a.max_new = common::whole("--max-new-tokens", Some(&next()?), a.max_new)?
            }
            "--no-vanilla" => {
                a.vanilla = false;
                i += 1;
                continue;
            }
            "--trigger-sample" => {
                a.trigger_sample = true;
                i += 1;
                continue;
            }
            "--bench" => {
                i += 1;
                continue;
            }
            other => anyhow::bail!(
                "unknown argument {other} (expected --config, --weaver, --trigger, --rows, \
                 --max-new-tokens, --nano-delimiters, --no-vanilla, --trigger-sample)"
            ),
        }
        i += 2;
    }
    Ok(a)
}

/// Greedy accuracy and mean inference memories per answer; `memory` off = the plain reasoner.
fn accuracy(
    m: &MemGenModel,
    task: &dyn Task,
    rows: &[Sample],
    memory: bool,
    max_new: usize,
    decision_temperature: Option<f64>,
) -> anyhow::Result<(f64, f64)> {
    let (mut acc, mut ins) = (0f64, 0usize);
    for chunk in rows.chunks(8) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|s| m.tokenizer.encode(&render_chatml(&s.messages, true)))
            .collect::<anyhow::Result<_>>()?;
        let opts = MemoryOptions {
            prompt_memory: memory && m.spec.insertion.max_prompt_aug_num > 0,
            max_inference: if memory {
                m.spec.insertion.max_inference_aug_num
            } else {
                0
            },
            stop_ids: m.tokenizer.eos_ids.clone(),
            decision_temperature,
            min_gap: 0,
        };
        let mut sampler = Sampler::new(SamplingConfig {
            max_new_tokens: max_new,
            ..Default::default()
        });
        let gens = m.generate(&prompts, &opts, &mut sampler, |_, _| {})?;
        for (s, g) in chunk.iter().zip(gens) {
            let text = m.tokenizer.decode_skip_special(&g.tokens)?;
            acc += task.grade(&text, &s.gold).reward;
            ins += g
                .insertions
                .iter()
                .filter(|i| i.kind == Kind::Inference)
                .count();
        }
    }
    let n = rows.len().max(1) as f64;
    Ok((acc / n, ins as f64 / n))
}

/// Mean NLL of the held-out targets, with memories at the training points or without any.
fn nll(m: &MemGenModel, rows: &[Sample], memory: bool) -> anyhow::Result<f64> {
    let (mut tf, _) = sft::sft_rows(m, rows, 1024)?;
    if !memory {
        for r in &mut tf {
            r.points.clear();
        }
    }
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in tf.chunks(8) {
        let (l, c) = m.sft_loss(chunk, &mut Mode::Infer)?;
        sum += l.to_scalar::<f32>()? as f64 * c as f64;
        n += c;
    }
    Ok(sum / n.max(1) as f64)
}

fn load(spec: &MemGenSpec, dir: &std::path::Path, parts: &[Part]) -> anyhow::Result<MemGenModel> {
    let m = MemGenModel::build(spec, &candle_core::Device::Cpu)?;
    let missing = m.load_weights(&dir.join("model.safetensors"), parts)?;
    anyhow::ensure!(missing.is_empty(), "{}: missing {missing:?}", dir.display());
    Ok(m)
}

fn main() {
    common::main(run)
}

fn run() -> anyhow::Result<()> {
    let a = args()?;
    let cfg = RunConfig::load(&a.config, &[])?;
    let task = build_task(&cfg.dataset()?.task)?;
    let mut rows = task.load(Split::Test)?;
    rows.truncate(a.rows);
    println!("held-out rows: {}", rows.len());
    if a.vanilla {
        let t = Instant::now();
        let spec = cfg.memgen_spec(false);
        let base = MemGenModel::build(&spec, &candle_core::Device::Cpu)?;
        let (va, _) = accuracy(&base, task.as_ref(), &rows, false, a.max_new, None)?;
        let vn = nll(&base, &rows, false)?;
        println!(
            "vanilla:        accuracy {va:.3}  answer NLL {vn:.4}  ({:.0} s)",
            t.elapsed().as_secs_f64()
        );
    }
    let mut nano = None;
    if let Some(w) = &a.weaver {
        let t = Instant::now();
        let mut ws = MemGenSpec::read(&w.join("memgen.json"))?;
        if let Some(d) = &a.nano_delimiters {
            ws.insertion.delimiters = d.clone();
        }
        let m = load(&ws, w, &[Part::Weaver])?;
        let (wa, wi) = accuracy(&m, task.as_ref(), &rows, true, a.max_new, None)?;
        let wn = nll(&m, &rows, true)?;
        println!(
            "weaver (nano):  accuracy {wa:.3}  answer NLL {wn:.4}  memories/answer {wi:.2}  boundaries {:?}  ({:.0} s)",
            ws.insertion.delimiters,
            t.elapsed().as_secs_f64()
        );
        nano = Some((wa, wi));
    }
    if let Some(tr) = &a.trigger {
        let ts = MemGenSpec::read(&tr.join("memgen.json"))?;
        anyhow::ensure!(ts.trigger_model.is_some(), "{}: no trigger", tr.display());
        let m = load(&ts, tr, &[Part::Weaver, Part::Trigger])?;
        let modes: &[(&str, Option<f64>)] = if a.trigger_sample {
            &[("argmax", None), ("sampled", Some(1.0))]
        } else {
            &[("argmax", None)]
        };
        for &(how, temp) in modes {
            let t = Instant::now();
            let (ta, ti) = accuracy(&m, task.as_ref(), &rows, true, a.max_new, temp)?;
            println!(
                "weaver+trigger ({how}): accuracy {ta:.3}  memories/answer {ti:.2}  boundaries {:?}  ({:.0} s)",
                ts.insertion.delimiters,
                t.elapsed().as_secs_f64()
            );
            if let Some((wa, wi)) = nano {
                println!(
                    "  vs nano: accuracy {:+.1} points, {:.0}% of nano's memories",
                    100.0 * (ta - wa),
                    100.0 * ti / wi.max(1e-9)
                );
            }
        }
    }
    Ok(())
}
