//! Speed of MemGen's memory paths (run through scripts/bench-memory.sh):
//!   decode   — tokens/s of plain decoding, of decoding with memory (nano trigger, 1 prompt + 5
//!              inference memories at least GAP tokens apart) and of the literal reference;
//!   sft      — seconds per teacher-forced forward + backward on 4 GSM8K samples (memgen);
//!   sft-ref  — the same with the literal reference (one insertion point at a time).
//! Usage: cargo bench --bench memory -- <decode|sft|sft-ref> [batch] [new-tokens] [ref-new-tokens]

#[path = "../tests/reference/mod.rs"]
mod reference;

mod common;

use std::time::Instant;

use candle_core::{Device, Tensor};
use memgen::backbone::generate::{generate, Sampler, SamplingConfig};
use memgen::backbone::Mode;
use memgen::memory::generate::MemoryOptions;
use memgen::memory::teacher::TfRow;
use memgen::memory::{MemGenModel, MemGenSpec};
use memgen::tasks::{render_chatml, Message};
use rand::SeedableRng;

fn gsm8k_rows(n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gsm8k/train.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let mut out = vec![];
    for line in text.lines().take(n) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let q = v["question"].as_str().unwrap_or_default();
        let a = v["answer"].as_str().unwrap_or_default();
        let (rat, ans) = a.split_once("\n####").unwrap_or((a, ""));
        out.push((
            format!("Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{{}}.Question: {q}\n"),
            format!("{rat}\\boxed{{{}}}", ans.trim()),
        ));
    }
    Ok(out)
}

fn model() -> anyhow::Result<MemGenModel> {
    let mut spec = MemGenSpec::new("default");
    spec.weaver_lora.lora_dropout = 0.1;
    let m = MemGenModel::build(&spec, &Device::Cpu)?;
    // A weaver that is not a no-op (non-zero LoRA B), with its output projection scaled down so
    // the untrained latents do not derail the reasoner: the text stays natural, so delimiters —
    // and with them the memories — are spread over the answer as with a trained weaver. The work
    // done per token is the same. The scale (0.003) is the one at which every one of the four
    // rows gets its prompt memory and all five inference memories (at 0.01 one row derailed into
    // a run without delimiters and got none, which made the memory run lighter than specified).
    // Seeded, so every run decodes the same text and inserts at the same points.
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (_, _, l) in m.weaver.backbone.lora.iter() {
        let v: Vec<f32> = (0..l.b.elem_count())
            .map(|_| rng.random_range(-0.035f32..0.035))
            .collect();
        l.b.set(&Tensor::from_vec(v, l.b.shape(), &Device::Cpu)?)?;
    }
    let w2r = &m.weaver.weaver_to_reasoner;
    w2r.weight.set(&(w2r.weight.as_tensor() * 0.003)?)?;
    if let Some(b) = &w2r.bias {
        b.set(&(b.as_tensor() * 0.003)?)?;
    }
    Ok(m)
}

fn tf_rows(m: &MemGenModel) -> anyhow::Result<Vec<TfRow>> {
    let mut rows = vec![];
    for (q, a) in gsm8k_rows(4)? {
        let prompt = render_chatml(
            &[Message {
                role: "user".into(),
                content: q,
            }],
            true,
        );
        let p = m.tokenizer.encode(&prompt)?;
        let mut tokens = p.clone();
        tokens.extend(m.tokenizer.encode(&format!("{a}<|im_end|>\n"))?);
        let mask: Vec<bool> = (0..tokens.len()).map(|i| i >= p.len()).collect();
        let points = m.boundary.training_points(&tokens, &mask, &[p.len()], 5);
        rows.push(TfRow {
            tokens,
            loss_mask: mask,
            points,
        });
    }
    Ok(rows)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn main() {
    common::main(run)
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let what = args.first().map(String::as_str).unwrap_or("decode");
    let batch: usize = common::whole("batch", args.get(1).map(String::as_str), 1)?;
    let new: usize = common::whole("new-tokens", args.get(2).map(String::as_str), 256)?;
    let ref_new: usize = common::whole("ref-new-tokens", args.get(3).map(String::as_str), 48)?;
    let m = model()?;
    match what {
        "decode" => {
            let qs = gsm8k_rows(batch)?;
            let prompts: Vec<Vec<u32>> = qs
                .iter()
                .map(|(q, _)| {
                    m.tokenizer.encode(&render_chatml(
                        &[Message {
                            role: "user".into(),
                            content: q.clone(),
                        }],
                        true,
                    ))
                })
                .collect::<anyhow::Result<_>>()?;
            let cfg = SamplingConfig {
                max_new_tokens: new,
                ..Default::default()
            };
            // Plain and memory runs alternate, REPS pairs (default 3): a drift in the machine's
            // speed then hits both sides alike; the medians and the per-pair ratios are reported.
            let reps: usize =
                common::whole("REPS", std::env::var("REPS").ok().as_deref(), 3)?.max(1);
            // The nano trigger takes the first boundaries; GAP (default 40) spaces them out so the
            // five memories spread over the answer and the weaver reads most of it.
            let gap: usize = common::whole("GAP", std::env::var("GAP").ok().as_deref(), 40)?;
            let opts = MemoryOptions {
                prompt_memory: true,
                max_inference: 5,
                stop_ids: vec![],
                decision_temperature: None,
                min_gap: gap,
            };
            let (mut plain_rates, mut mem_rates, mut ratios) = (vec![], vec![], vec![]);
            let mut mem = vec![];
            for _ in 0..reps {
                let t = Instant::now();
                let plain = generate(
                    &m.reasoner,
                    &prompts,
                    m.tokenizer.pad_id,
                    &[],
                    &mut Sampler::new(cfg.clone()),
                    |_, _| {},
                )?;
                let n: usize = plain.iter().map(|g| g.tokens.len()).sum();
                let plain_rate = n as f64 / t.elapsed().as_secs_f64();
                let t = Instant::now();
                mem = m.generate(&prompts, &opts, &mut Sampler::new(cfg.clone()), |_, _| {})?;
                let n: usize = mem.iter().map(|g| g.tokens.len()).sum();
                let mem_rate = n as f64 / t.elapsed().as_secs_f64();
                plain_rates.push(plain_rate);
                mem_rates.push(mem_rate);
                ratios.push(100.0 * mem_rate / plain_rate);
            }
            let plain_rate = median(&plain_rates);
            let mem_rate = median(&mem_rates);
            if std::env::var("MEMGEN_BENCH_SHOW").is_ok() {
                for g in &mem {
                    eprintln!("--- {:?}", m.tokenizer.decode(&g.tokens)?);
                }
            }
            let spots: Vec<Vec<usize>> = mem
                .iter()
                .map(|g| g.insertions.iter().map(|i| i.token_index).collect())
                .collect();
            for (r, s) in spots.iter().enumerate() {
                if s.len() < 1 + opts.max_inference {
                    println!(
                        "  note: row {r} got {} of its {} memories; the memory run did less work than specified",
                        s.len(),
                        1 + opts.max_inference
                    );
                }
            }
            // The literal reference, row by row, on fewer tokens (it is quadratic).
            let t = Instant::now();
            let mut rn = 0;
            for p in &prompts {
                let (toks, _) = reference::ref_generate(&m, p, ref_new, 5);
                rn += toks.len();
            }
            let ref_rate = rn as f64 / t.elapsed().as_secs_f64();
            let pct: Vec<String> = ratios.iter().map(|r| format!("{r:.0}%")).collect();
            println!(
                "decode batch={batch} new={new} gap={gap}: plain {plain_rate:.1} tok/s | with memory {mem_rate:.1} tok/s ({:.0}% of plain, median of {reps} alternating pairs: {}; insertions at {spots:?}) | literal reference {ref_rate:.2} tok/s (first {ref_new} tokens)",
                median(&ratios),
                pct.join(" ")
            );
        }
        "sft" | "sft-ref" => {
            let rows = tf_rows(&m)?;
            let lens: Vec<usize> = rows.iter().map(|r| r.tokens.len()).collect();
            let pts: Vec<usize> = rows.iter().map(|r| r.points.len()).collect();
            let mut times = vec![];
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            for _ in 0..2 {
                let t = Instant::now();
                if what == "sft" {
                    let (loss, _) = m.sft_loss(&rows, &mut Mode::Train(&mut rng))?;
                    let g = loss.backward()?;
                    drop(g);
                } else {
                    let mut total: Option<Tensor> = None;
                    let mut count = 0usize;
                    for row in &rows {
                        let logits =
                            reference::ref_tf_logits_mode(&m, row, &mut Mode::Train(&mut rng));
                        let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
                        let idx: Vec<u32> = (0..row.tokens.len() - 1)
                            .filter(|&i| row.loss_mask[i + 1])
                            .map(|i| i as u32)
                            .collect();
                        let tg: Vec<u32> =
                            idx.iter().map(|&i| row.tokens[i as usize + 1]).collect();
                        let n = idx.len();
                        let sel = lsm.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, 0)?;
                        let lp = sel
                            .gather(&Tensor::from_vec(tg, (n, 1), &Device::Cpu)?, 1)?
                            .sum_all()?;
                        count += n;
                        total = Some(match total {
                            Some(t) => (t + lp)?,
                            None => lp,
                        });
                    }
                    let loss = (total.unwrap().neg()? / count as f64)?;
                    let g = loss.backward()?;
                    drop(g);
                }
                times.push(t.elapsed().as_secs_f64());
            }
            println!(
                "{what}: forward+backward, batch of 4 GSM8K samples (tokens {lens:?}, memories {pts:?}): {:.2} s (best of {})",
                times.iter().cloned().fold(f64::INFINITY, f64::min),
                times.len()
            );
        }
        other => anyhow::bail!("unknown benchmark `{other}` (decode, sft, sft-ref)"),
    }
    Ok(())
}
