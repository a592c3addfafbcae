//! `memgen weaver-train` and `memgen trigger-train`: resolve the run config, build the model, load
//! the data, write `<output_dir>/config.yaml`, then hand over to `training::{sft, grpo}`.

use std::path::PathBuf;

use clap::Args;

use crate::config::{GrpoConfig, RunConfig, TrainMethod};
use crate::memory::checkpoint::{resolve_checkpoint, Part};
use crate::memory::limits::{self, Budget};
use crate::memory::MemGenModel;
use crate::retrieval::client::HttpRetriever;
use crate::tasks::search::{check_retriever, SearchEnv};
use crate::tasks::{build_task, Split};
use crate::training::{self, grpo, resume, sft};

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The run config (YAML, e.g. configs/quickstart.yaml or configs/latent_memory/gsm8k.yaml).
    #[arg(long)]
    pub config: PathBuf,
    /// Dotted overrides: `--options run.weaver.sft.learning_rate 2e-4 run.seed 7`.
    #[arg(long, num_args = 1..)]
    pub options: Vec<String>,
    /// Start from this checkpoint (`model.safetensors` or its directory); trigger-train needs one.
    #[arg(long)]
    pub load_model_path: Option<PathBuf>,
    /// Where checkpoints, metrics and the final model go (overrides run.output_dir).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Resume from a checkpoint directory (default: `<output_dir>/checkpoint-last` when present).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Resume even if the settings that shape the result (model, data, seed, optimiser,
    /// schedule, memory layout, batch shape, GRPO settings) differ from the checkpoint's run;
    /// the changed keys are logged. Without it such a resume is refused.
    #[arg(long)]
    pub resume_anyway: bool,
}

/// Which subcommand is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Weaver,
    Trigger,
}

/// Resolve the config with the command-line flags folded in as overrides, so validation sees them.
pub fn resolve_config(args: &TrainArgs, which: Which) -> anyhow::Result<RunConfig> {
    let mut opts = crate::config::parse_options(&args.options)?;
    if let Some(p) = &args.load_model_path {
        opts.push(("model.load_model_path".into(), p.display().to_string()));
    }
    if let Some(d) = &args.output_dir {
        opts.push(("run.output_dir".into(), d.display().to_string()));
    }
    if which == Which::Trigger {
        // Trigger training: validation then insists on a trained weaver.
        opts.push(("run.train_trigger".into(), "true".into()));
        opts.push(("model.trigger.active".into(), "true".into()));
    }
    RunConfig::load(&args.config, &opts)
}

pub fn run(args: TrainArgs, which: Which) -> anyhow::Result<()> {
    let cfg = resolve_config(&args, which)?;
    cfg.warn_ignored_keys();
    let ds = cfg.dataset()?;
    let task = build_task(&ds.task)?;
    let method = match which {
        Which::Weaver => cfg.run.train_weaver_method,
        Which::Trigger => TrainMethod::Grpo,
    };
    if which == Which::Weaver && !cfg.run.train_weaver {
        anyhow::bail!("run.train_weaver is false: nothing for weaver-train to do");
    }
    // GRPO on a search task rolls out against the retrieval server: fail now, not mid-run.
    let search = method == TrainMethod::Grpo && task.multi_turn();
    if search {
        check_retriever(&HttpRetriever::new(cfg.retrieval.clone())?)?;
    }
    let out = cfg.output_dir();
    std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    crate::util::write_atomic(&out.join("config.yaml"), cfg.to_yaml()?.as_bytes())?;

    let device = cfg.model.device.open()?;
    let spec = cfg.memgen_spec(which == Which::Trigger);
    let model = MemGenModel::build(&spec, &device)?;
    if let Some(t) = model.trigger.as_ref().filter(|_| which == Which::Trigger) {
        t.init_head(
            cfg.run
                .trigger
                .grpo
                .initial_insertion_probability
                .unwrap_or(0.5),
        )?;
    }
    if let Some(p) = &cfg.model.load_model_path {
        let (file, _) = resolve_checkpoint(p)?;
        let missing = model.load_weights(&file, &[Part::Weaver])?;
        anyhow::ensure!(
            missing.len()
                < model
                    .named_vars()
                    .iter()
                    .filter(|v| v.2 == Part::Weaver)
                    .count(),
            "{}: holds no weaver tensors",
            file.display()
        );
        if !missing.is_empty() {
            eprintln!(
                "warning: {} weaver tensors not in {} (left at their initial values), e.g. {}",
                missing.len(),
                file.display(),
                missing[0]
            );
        }
    }
    training::install_signal_handlers();
    let limit = |mut v: Vec<crate::tasks::Sample>, n: Option<usize>| {
        if let Some(n) = n {
            v.truncate(n);
        }
        v
    };
    let train_samples = task.load(Split::Train)?;
    let valid_samples = task.load(Split::Valid).unwrap_or_default();

    let session = |kind: &str| -> anyhow::Result<training::Session> {
        Ok(training::Session {
            resume: args.resume.clone(),
            settings: Some(resume::settings(&cfg, kind)?),
            resume_anyway: args.resume_anyway,
            ..training::Session::new(cfg.run.seed, out.clone())
        })
    };
    match (which, method) {
        (Which::Weaver, TrainMethod::Sft) => {
            let s = &cfg.run.weaver.sft;
            let train = limit(train_samples, s.args.max_train_samples);
            let valid = limit(valid_samples, s.args.max_eval_samples);
            let (tr, n1) = sft::sft_rows(&model, &train, s.max_length)?;
            let (va, n2) = sft::sft_rows(&model, &valid, s.max_length)?;
            sft_row_notes(&model, s.max_length, n1, n2);
            eprintln!(
                "weaver sft on {}: {} train rows, {} validation rows → {}",
                ds.name,
                tr.len(),
                va.len(),
                out.display()
            );
            let run = sft::SftRun {
                cfg: s.clone(),
                session: session("sft")?,
            };
            let o = sft::train_sft(&model, &run, &tr, &va)?;
            println!(
                "weaver sft: {} steps, train loss {:.4} → {:.4}{}; weaver saved to {}",
                o.steps,
                o.first_loss,
                o.last_loss,
                o.best_eval
                    .map(|b| format!(", best validation loss {b:.4}"))
                    .unwrap_or_default(),
                o.final_dir.unwrap_or_default().display()
            );
        }
        (w, _) => {
            let g = match w {
                Which::Weaver => &cfg.run.weaver.grpo,
                Which::Trigger => &cfg.run.trigger.grpo,
            };
            let train = limit(train_samples, g.args.max_train_samples);
            let valid = limit(valid_samples, g.args.max_eval_samples);
            let target = if w == Which::Weaver {
                grpo::Target::Weaver
            } else {
                grpo::Target::Trigger
            };
            let total = train.len() + valid.len();
            let multi = task.multi_turn();
            let (train, sk1) = grpo_fitting(&model, train, g, multi)?;
            let (valid, sk2) = grpo_fitting(&model, valid, g, multi)?;
            let why = format!(
                "the contexts (reasoner {} positions) as prompt + max_completion_length {} + memory latents",
                limits::context(&model.reasoner),
                g.max_completion_length
            );
            if let Some(w) = limits::skipped_rows_warning(sk1 + sk2, total, &why) {
                eprintln!("{w}");
            }
            if train.is_empty() {
                anyhow::bail!(
                    "no training prompt fits the model's context (see the warning above)"
                );
            }
            let run = grpo::GrpoRun {
                cfg: g.clone(),
                target,
                session: session(target.kind())?,
            };
            eprintln!(
                "{} grpo on {}: {} train prompts, {} validation prompts → {}",
                if w == Which::Weaver {
                    "weaver"
                } else {
                    "trigger"
                },
                ds.name,
                train.len(),
                valid.len(),
                out.display()
            );
            // The episodes run as `memgen eval` runs them (run.generation's turn and observation
            // caps, the retrieval section's server).
            let env = if search {
                let gen = &cfg.run.generation;
                eprintln!(
                    "rollouts: search episodes of up to {} turns against {}",
                    gen.max_turns, cfg.retrieval.url
                );
                Some(SearchEnv::over_http(
                    &cfg.retrieval,
                    &ds.task,
                    gen.max_turns,
                    gen.max_obs_tokens,
                    model.tokenizer.clone(),
                )?)
            } else {
                None
            };
            let o = grpo::train_grpo(&model, &run, task.as_ref(), env.as_ref(), &train, &valid)?;
            println!(
                "{} grpo: {} steps, reward {:.3} → {:.3}; saved to {}",
                if w == Which::Weaver {
                    "weaver"
                } else {
                    "trigger"
                },
                o.steps,
                o.first_reward,
                o.last_reward,
                o.final_dir.unwrap_or_default().display()
            );
        }
    }
    Ok(())
}

/// The one-line notes on SFT rows: cut to `max_length` (the original's truncation), left out
/// because nothing remains to learn, left out because they cannot fit the contexts.
fn sft_row_notes(model: &MemGenModel, max_length: usize, a: sft::RowCounts, b: sft::RowCounts) {
    let total = a.total + b.total;
    if a.cut + b.cut > 0 {
        eprintln!(
            "note: cut {} of {total} training rows to max_length {max_length} tokens (answer side, as the original's truncation)",
            a.cut + b.cut
        );
    }
    let why = format!("max_length {max_length} in their prompt alone (or without a target)");
    if let Some(w) = limits::skipped_rows_warning(a.unusable + b.unusable, total, &why) {
        eprintln!("{w}");
    }
    let why = format!(
        "the reasoner's context of {} positions with their memory latents",
        limits::context(&model.reasoner)
    );
    if let Some(w) = limits::skipped_rows_warning(a.over_context + b.over_context, total, &why) {
        eprintln!("{w}");
    }
}

/// GRPO prompts that can run: single-turn prompts are first cut to `max_prompt_length` from the
/// left (as the rollouts cut them, and as the original's TRL trainer does), then a prompt is kept
/// when it, `max_completion_length` and the latents its memories may insert fit every backbone's
/// context; the rest are skipped (counted in the second value). A multi-turn prompt is its first
/// turn, uncut: its later turns grow with observations and are checked as they are generated.
fn grpo_fitting(
    model: &MemGenModel,
    samples: Vec<crate::tasks::Sample>,
    g: &GrpoConfig,
    multi_turn: bool,
) -> anyhow::Result<(Vec<crate::tasks::Sample>, usize)> {
    let ins = &model.spec.insertion;
    let latents = model.latent_budget(ins.max_prompt_aug_num > 0, ins.max_inference_aug_num);
    let mut kept = Vec::with_capacity(samples.len());
    let mut skipped = 0;
    for s in samples {
        let tokens = if multi_turn {
            model
                .tokenizer
                .encode(&crate::tasks::render_chatml(&s.messages, true))?
                .len()
        } else {
            grpo::prompt_ids(model, &s, g.max_prompt_length)?.len()
        };
        let budget = Budget {
            tokens,
            new_tokens: g.max_completion_length,
            latents,
        };
        if model.check_fits(&s.id, budget).is_ok() {
            kept.push(s);
        } else {
            skipped += 1;
        }
    }
    Ok((kept, skipped))
}
