//! Prefill and decode throughput of the plain backbone (run through scripts/bench-backbone.sh).
//! Usage: cargo bench --bench backbone -- [model-path] [batch] [prompt-len] [new-tokens] [runs] [dtype]

mod common;

use std::time::Instant;

use candle_core::Device;
use memgen::backbone::generate::{generate, Sampler, SamplingConfig};
use memgen::backbone::{self, Mode};
use memgen::backbone::{Side, Stream};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    common::main(run)
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let model = args.first().cloned().unwrap_or_else(|| "default".into());
    let batch: usize = common::whole("batch", args.get(1).map(String::as_str), 1)?;
    let plen: usize = common::whole("prompt-len", args.get(2).map(String::as_str), 128)?;
    let new: usize = common::whole("new-tokens", args.get(3).map(String::as_str), 128)?;
    let runs: usize = common::whole("runs", args.get(4).map(String::as_str), 3)?;
    let dtype = backbone::parse_dtype(args.get(5).map(String::as_str).unwrap_or("f32"))?;
    let path = backbone::resolve_model(Some(&model))?;
    let m = backbone::load(&path, dtype, &Device::Cpu)?;
    let text =
        "The old lighthouse keeper climbed the stairs every evening to light the lamp. ".repeat(64);
    let mut ids = m.tokenizer.encode(&text)?;
    ids.truncate(plen);
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| ids.clone()).collect();
    let (mut pre, mut dec) = (vec![], vec![]);
    for _ in 0..runs {
        // Prefill alone.
        let t = Instant::now();
        let mut cache = m.backbone.new_cache(batch);
        let x = Stream::tokens(&m.backbone, &prompts, m.tokenizer.pad_id, Side::Left)?;
        let h = m.backbone.forward(&x, Some(&mut cache), &mut Mode::Infer)?;
        let l = h.dim(1)?;
        let _ = m.backbone.logits(&h.narrow(1, l - 1, 1)?)?;
        pre.push((batch * plen) as f64 / t.elapsed().as_secs_f64());
        // Full generation; decode rate = new tokens over (total - prefill).
        let t_pre = t.elapsed().as_secs_f64();
        let mut s = Sampler::new(SamplingConfig {
            max_new_tokens: new,
            ..Default::default()
        });
        let t = Instant::now();
        let out = generate(
            &m.backbone,
            &prompts,
            m.tokenizer.pad_id,
            &[],
            &mut s,
            |_, _| {},
        )?;
        let total = t.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|g| g.tokens.len()).sum();
        dec.push((n - batch) as f64 / (total - t_pre).max(1e-9));
    }
    println!(
        "model={} batch={batch} prompt={plen} new={new} dtype={dtype:?} prefill_tok_s={:.1} decode_tok_s={:.1} (median of {runs}; decode counts all rows)",
        path.file_name().unwrap().to_string_lossy(),
        median(pre),
        median(dec)
    );
    Ok(())
}
