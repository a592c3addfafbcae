//! `memgen generate` and `memgen score`: the plain backbone from the shell.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, IndexOp};
use clap::Args;

use super::memory_args::{build_memgen, MemoryArgs};
use super::ModelArgs;
use crate::backbone::generate::{generate as run_generate, Sampler, SamplingConfig};
use crate::backbone::{self, LoadedModel, Mode, Side, TextTokenizer};
use crate::memory::generate::MemoryOptions;
use crate::memory::limits::{check_backbone, check_context, Budget};
use crate::memory::teacher::TfRow;
use crate::memory::MemGenModel;
use crate::tasks::Message;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub memory: MemoryArgs,
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
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Score this answer teacher-forced after the text (the prompt), with memories inserted as in
    /// SFT; prints {"loss", "insertion_points"}.
    #[arg(long)]
    pub answer: Option<String>,
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

/// Check a request against the reasoner's context from the model's header alone, before any
/// weights load, so a prompt far too long for the model fails at once. Only when the reasoner is
/// known without reading a checkpoint (a checkpoint may name its own); the latents of memories
/// are counted once the model is built, by the generation guard.
fn early_check(
    model: &ModelArgs,
    mem: &MemoryArgs,
    text: &str,
    chat: bool,
    new_tokens: usize,
    what: &str,
) -> anyhow::Result<()> {
    if mem.load_model_path.is_some() && !mem.no_memory && model.model.is_none() {
        return Ok(());
    }
    let (tok, config) = backbone::peek(&backbone::resolve_model(model.model.as_deref())?)?;
    let tokens = tok.encode(&chat_wrap(&tok, text, chat)?)?.len();
    let budget = Budget {
        tokens,
        new_tokens,
        latents: 0,
    };
    check_context(config.max_position_embeddings, "model", what, budget)?;
    Ok(())
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    early_check(
        &a.model,
        &a.memory,
        &a.prompt,
        a.chat,
        a.max_new_tokens,
        "the prompt",
    )?;
    if let Some(mg) = build_memgen(&a.model, &a.memory)? {
        return generate_with_memory(&a, &mg);
    }
    let m = load_model(&a.model)?;
    let text = chat_wrap(&m.tokenizer, &a.prompt, a.chat)?;
    let prompt_ids = m.tokenizer.encode(&text)?;
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let mut sampler = sampler_for(&a);
    let stop = stop_ids(&a, &m.tokenizer);
    let mut stream = Stream::new(m.tokenizer.clone(), &stop, !a.json);
    let out = run_generate(
        &m.backbone,
        std::slice::from_ref(&prompt_ids),
        m.tokenizer.pad_id,
        &stop,
        &mut sampler,
        |_, t| stream.token(t),
    )?;
    let g = &out[0];
    if a.json {
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "token_ids": g.tokens,
            "text": m.tokenizer.decode(&without_stop(&g.tokens, g.stopped, &stop))?,
        });
        println!("{obj}");
    } else {
        println!();
    }
    Ok(())
}

fn sampler_for(a: &GenerateArgs) -> Sampler {
    Sampler::new(SamplingConfig {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
    })
}

fn stop_ids(a: &GenerateArgs, tok: &TextTokenizer) -> Vec<u32> {
    if a.ignore_eos {
        vec![]
    } else {
        tok.eos_ids.clone()
    }
}

/// The generated tokens without the stop token that ended them.
fn without_stop(tokens: &[u32], stopped: bool, stop: &[u32]) -> Vec<u32> {
    tokens
        .iter()
        .copied()
        .filter(|t| !(stopped && stop.contains(t)))
        .collect()
}

/// Prints text to stdout as tokens arrive.
struct Stream {
    tok: Arc<TextTokenizer>,
    stop: Vec<u32>,
    on: bool,
    so_far: Vec<u32>,
    printed: usize,
}

impl Stream {
    fn new(tok: Arc<TextTokenizer>, stop: &[u32], on: bool) -> Stream {
        Stream {
            tok,
            stop: stop.to_vec(),
            on,
            so_far: vec![],
            printed: 0,
        }
    }

    fn token(&mut self, t: u32) {
        if !self.on || self.stop.contains(&t) {
            return;
        }
        self.so_far.push(t);
        if let Ok(s) = self.tok.decode(&self.so_far) {
            // Hold back an incomplete UTF-8 sequence until its last byte arrives.
            if !s.ends_with('\u{FFFD}') && s.len() > self.printed {
                let mut lock = std::io::stdout().lock();
                let _ = lock.write_all(&s.as_bytes()[self.printed..]);
                let _ = lock.flush();
                self.printed = s.len();
            }
        }
    }
}

pub fn score(a: ScoreArgs) -> anyhow::Result<()> {
    early_check(&a.model, &a.memory, &a.text, a.chat, 0, "the text")?;
    if let Some(answer) = &a.answer {
        let mg = match build_memgen(&a.model, &a.memory)? {
            Some(mg) => mg,
            None => {
                // The plain reasoner is MemGen with zero-length memories.
                let mut spec =
                    crate::memory::MemGenSpec::new(a.model.model.as_deref().unwrap_or("default"));
                spec.dtype = a.model.dtype.clone();
                spec.prompt_latents_len = 0;
                spec.inference_latents_len = 0;
                MemGenModel::build(&spec, &backbone::parse_device(&a.model.device)?)?
            }
        };
        return score_answer(&mg, &a.text, answer, a.chat);
    }
    let m = load_model(&a.model)?;
    let text = chat_wrap(&m.tokenizer, &a.text, a.chat)?;
    let ids = m.tokenizer.encode(&text)?;
    if ids.is_empty() {
        anyhow::bail!("the text is empty");
    }
    let budget = Budget {
        tokens: ids.len(),
        new_tokens: 0,
        latents: 0,
    };
    check_backbone(&m.backbone, "model", "the text", budget, false)?;
    let top = top_logits(&m, &ids, a.top_k)?;
    let obj = serde_json::json!({ "token_ids": ids, "top_logits": top });
    println!("{obj}");
    Ok(())
}

/// For each position, the `k` highest logits as (id, logit), sorted descending.
pub fn top_logits(m: &LoadedModel, ids: &[u32], k: usize) -> anyhow::Result<Vec<Vec<(u32, f32)>>> {
    let x = backbone::Stream::tokens(&m.backbone, &[ids.to_vec()], m.tokenizer.pad_id, Side::Left)?;
    let h = m
        .backbone
        .forward(&x, None, &mut Mode::Infer)
        .context("forward pass")?;
    let logits = m
        .backbone
        .logits_infer(&h)?
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

fn chat_wrap(
    tok: &crate::backbone::TextTokenizer,
    text: &str,
    chat: bool,
) -> anyhow::Result<String> {
    if chat {
        tok.apply_chat_template(
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

fn generate_with_memory(a: &GenerateArgs, mg: &MemGenModel) -> anyhow::Result<()> {
    let tok = mg.tokenizer.clone();
    let text = chat_wrap(&tok, &a.prompt, a.chat)?;
    let prompt_ids = tok.encode(&text)?;
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let mut sampler = sampler_for(a);
    let stop = stop_ids(a, &tok);
    let opts = MemoryOptions {
        prompt_memory: mg.spec.insertion.max_prompt_aug_num > 0,
        max_inference: mg.spec.insertion.max_inference_aug_num,
        stop_ids: stop.clone(),
        decision_temperature: None,
        min_gap: 0,
    };
    let mut stream = Stream::new(tok.clone(), &stop, !a.json);
    let out = mg.generate(
        std::slice::from_ref(&prompt_ids),
        &opts,
        &mut sampler,
        |_, t| stream.token(t),
    )?;
    let g = &out[0];
    if a.json {
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "token_ids": g.tokens,
            "text": tok.decode(&without_stop(&g.tokens, g.stopped, &stop))?,
            "insertions": g.insertions,
            "trigger_decisions": g.decisions,
        });
        println!("{obj}");
    } else {
        println!();
    }
    Ok(())
}

/// `score --answer`: the answer's mean NLL (its tokens and the eos that ends it) with memories at
/// SFT's points: the prompt point, then the first delimiter boundaries inside the answer.
fn score_answer(mg: &MemGenModel, text: &str, answer: &str, chat: bool) -> anyhow::Result<()> {
    let tok = &mg.tokenizer;
    let prompt = tok.encode(&chat_wrap(tok, text, chat)?)?;
    if prompt.is_empty() {
        anyhow::bail!("the text is empty");
    }
    let mut ans = tok.encode(answer)?;
    let eos = tok
        .eos_ids
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the tokenizer has no end-of-sequence token"))?;
    ans.push(eos);
    let mut tokens = prompt.clone();
    tokens.extend_from_slice(&ans);
    let loss_mask: Vec<bool> = (0..tokens.len()).map(|i| i >= prompt.len()).collect();
    let prompt_points = if mg.spec.insertion.max_prompt_aug_num > 0
        && mg.weaver.k(crate::memory::Kind::Prompt) > 0
    {
        vec![prompt.len()]
    } else {
        vec![]
    };
    let max_inf = if mg.weaver.k(crate::memory::Kind::Inference) > 0 {
        mg.spec.insertion.max_inference_aug_num
    } else {
        0
    };
    let points = mg
        .boundary
        .training_points(&tokens, &loss_mask, &prompt_points, max_inf);
    // The latents at these points are known exactly: check before the forward pass.
    let budget = Budget {
        tokens: tokens.len(),
        new_tokens: 0,
        latents: mg.latents_at(&points),
    };
    mg.check_fits("the text and answer", budget)?;
    let row = TfRow {
        tokens,
        loss_mask,
        points: points.clone(),
    };
    let (loss, _) = mg.sft_loss(std::slice::from_ref(&row), &mut Mode::Infer)?;
    let pts: Vec<serde_json::Value> = points
        .iter()
        .map(|p| serde_json::json!({"token_index": p.pos - prompt.len(), "kind": p.kind}))
        .collect();
    let obj = serde_json::json!({
        "loss": loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        "answer_tokens": ans.len(),
        "insertion_points": pts,
    });
    println!("{obj}");
    Ok(())
}
