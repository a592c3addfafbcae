//! `memgen generate` and `memgen score`: the plain backbone from the shell.

use std::io::Write;

use anyhow::Context;
use candle_core::{DType, IndexOp};
use clap::Args;

use super::ModelArgs;
use crate::backbone::generate::{generate as run_generate, ids_tensor, Sampler, SamplingConfig};
use crate::backbone::model::{positions_from_mask, positions_tensor};
use crate::backbone::{self, LoadedModel, Mode};
use crate::tasks::Message;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (raw text; special tokens such as <|im_start|> are recognised).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's own chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object {"prompt_ids", "token_ids", "text"} instead of streaming.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score (raw; special tokens are recognised).
    #[arg(long)]
    pub text: String,
    /// Wrap the text as a user turn with the model's chat template (with generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// How many of the highest logits to print per position.
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
}

pub fn load_model(a: &ModelArgs) -> anyhow::Result<LoadedModel> {
    let device = backbone::parse_device(&a.device)?;
    let dtype = backbone::parse_dtype(&a.dtype)?;
    let path = backbone::resolve_model(a.model.as_deref())?;
    backbone::load(&path, dtype, &device)
}

fn prompt_text(m: &LoadedModel, text: &str, chat: bool) -> anyhow::Result<String> {
    if chat {
        m.tokenizer.apply_chat_template(
            &[Message {
                role: "user".into(),
                content: text.into(),
            }],
            true,
        )
    } else {
        Ok(text.to_string())
    }
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let m = load_model(&a.model)?;
    let text = prompt_text(&m, &a.prompt, a.chat)?;
    let prompt_ids = m.tokenizer.encode(&text)?;
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let mut sampler = Sampler::new(SamplingConfig {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
    });
    let stop: Vec<u32> = if a.ignore_eos {
        vec![]
    } else {
        m.tokenizer.eos_ids.clone()
    };
    let tok = m.tokenizer.clone();
    let mut so_far: Vec<u32> = vec![];
    let mut printed = 0usize;
    let stdout = std::io::stdout();
    let stream = !a.json;
    let out = run_generate(
        &m.backbone,
        std::slice::from_ref(&prompt_ids),
        m.tokenizer.pad_id,
        &stop,
        &mut sampler,
        |_, t| {
            if !stream || stop.contains(&t) {
                return;
            }
            so_far.push(t);
            if let Ok(s) = tok.decode(&so_far) {
                // Hold back an incomplete UTF-8 sequence until its last byte arrives.
                if !s.ends_with('\u{FFFD}') && s.len() > printed {
                    let mut lock = stdout.lock();
                    let _ = lock.write_all(&s.as_bytes()[printed..]);
                    let _ = lock.flush();
                    printed = s.len();
                }
            }
        },
    )?;
    let g = &out[0];
    if a.json {
        let shown: Vec<u32> = g
            .tokens
            .iter()
            .copied()
            .filter(|t| !(g.stopped && stop.contains(t)))
            .collect();
        let text = m.tokenizer.decode(&shown)?;
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "token_ids": g.tokens,
            "text": text,
        });
        println!("{obj}");
    } else {
        println!();
    }
    Ok(())
}

pub fn score(a: ScoreArgs) -> anyhow::Result<()> {
    let m = load_model(&a.model)?;
    let text = prompt_text(&m, &a.text, a.chat)?;
    let ids = m.tokenizer.encode(&text)?;
    if ids.is_empty() {
        anyhow::bail!("the text is empty");
    }
    let top = top_logits(&m, &ids, a.top_k)?;
    let obj = serde_json::json!({ "token_ids": ids, "top_logits": top });
    println!("{obj}");
    Ok(())
}

/// For each position, the `k` highest logits as (id, logit), sorted descending.
pub fn top_logits(m: &LoadedModel, ids: &[u32], k: usize) -> anyhow::Result<Vec<Vec<(u32, f32)>>> {
    let dev = m.backbone.device().clone();
    let mask = vec![vec![1u8; ids.len()]];
    let pos = positions_tensor(&positions_from_mask(&mask, &[0]), &dev)?;
    let x = m.backbone.embed(&ids_tensor(&[ids.to_vec()], &dev)?)?;
    let h = m
        .backbone
        .forward(&x, &mask, &pos, None, &mut Mode::Infer)
        .context("forward pass")?;
    let logits = m
        .backbone
        .logits(&h)?
        .i(0)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    Ok(logits
        .iter()
        .map(|row| {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            let k = k.min(row.len());
            idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
                row[b as usize].total_cmp(&row[a as usize])
            });
            let mut best: Vec<(u32, f32)> =
                idx[..k].iter().map(|&i| (i, row[i as usize])).collect();
            best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            best
        })
        .collect())
}
