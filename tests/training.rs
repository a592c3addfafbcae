//! Training on tiny models built in code: the optimiser and schedules against hand-computed
//! values, GRPO advantages and losses on fixed numbers, overfitting four samples, bit-identical
//! resume, GRPO smoke runs, and config errors from the CLI.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use memgen::backbone::Arch;
use memgen::config::{
    GrpoConfig, IntervalStrategy, LossType, LrScheduler, SftConfig, TrainingArgs,
};
use memgen::memory::teacher::TfRow;
use memgen::memory::{Kind, MemGenModel, MemGenSpec};
use memgen::tasks::{Graded, Message, Sample, Split, Task};
use memgen::training::grpo::{self, advantages, seq_weights, sequence_loss, LossSpec};
use memgen::training::optim::{clip_grad_norm, AdamW, AdamWConfig};
use memgen::training::schedule::Schedule;
use memgen::training::sft::{self, SftRun};
use memgen::training::Session;
use rand::SeedableRng;

fn tiny_memgen(trigger: bool) -> MemGenModel {
    let reasoner = common::tiny(Arch::Qwen2, 21);
    let weaver_base = common::tiny(Arch::Qwen2, 22);
    let trig = common::tiny(Arch::Qwen2, 23);
    let mut spec = MemGenSpec::new("tiny");
    spec.prompt_latents_len = 2;
    spec.inference_latents_len = 2;
    spec.insertion.max_inference_aug_num = 2;
    // Dropout on, so the resume test covers the dropout RNG too.
    spec.weaver_lora.lora_dropout = 0.1;
    MemGenModel::assemble(
        spec,
        reasoner,
        common::tiny_tokenizer(),
        &weaver_base,
        trigger.then_some(&trig),
    )
    .unwrap()
}

/// Four rows: a short prompt, then an answer with delimiter tokens (ids ≡ 0, 3, 6 mod 9).
fn rows(m: &MemGenModel) -> Vec<TfRow> {
    let data: [(&[u32], &[u32]); 4] = [
        (&[5, 7, 8], &[10, 11, 12, 13, 14, 15, 16]),
        (&[4, 8, 2, 7], &[20, 21, 22, 23, 24, 25]),
        (&[7, 5], &[30, 31, 32, 33, 34, 35, 36, 37]),
        (&[2, 4, 5, 8], &[40, 41, 42, 43, 44]),
    ];
    data.iter()
        .map(|(p, a)| sft::sft_row(m, p.to_vec(), a.to_vec(), 64).unwrap())
        .collect()
}

fn sft_cfg(steps: usize, lr: f64) -> SftConfig {
    SftConfig {
        args: TrainingArgs {
            max_steps: Some(steps),
            per_device_train_batch_size: 2,
            per_device_eval_batch_size: 4,
            learning_rate: lr,
            warmup_ratio: 0.1,
            logging_steps: 1,
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: 3,
            save_strategy: IntervalStrategy::Steps,
            save_steps: 2,
            ..SftConfig::default().args
        },
        ..SftConfig::default()
    }
}

#[test]
fn adamw_matches_hand_computed_torch_update() {
    let p0 = [1.0f64, -2.0, 0.5];
    let grads = [[0.5f64, 0.1, -0.3], [0.2, -0.4, 0.0]];
    let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-8, 0.01);
    let var = Var::from_vec(p0.iter().map(|&x| x as f32).collect(), 3, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vec![var.clone()],
        AdamWConfig {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
        },
    )
    .unwrap();
    // torch.optim.AdamW, written out.
    let mut p = p0;
    let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..3 {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = m[i] / (1.0 - b1.powi(t));
            let vh = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + eps);
        }
        let gt = Tensor::from_vec(g.iter().map(|&x| x as f32).collect(), 3, &Device::Cpu).unwrap();
        opt.step(&[Some(gt)], lr).unwrap();
    }
    let got = var.as_tensor().to_vec1::<f32>().unwrap();
    for i in 0..3 {
        assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
    }
    // First step of Adam moves each coordinate by ~lr against the gradient's sign.
    assert!((p0[0] - got[0] as f64) > 0.15);

    // State round trip.
    let dir = tempfile::tempdir().unwrap();
    opt.save(&dir.path().join("opt.safetensors")).unwrap();
    let mut o2 = AdamW::new(vec![var.clone()], opt.cfg).unwrap();
    o2.load(&dir.path().join("opt.safetensors")).unwrap();
    assert_eq!(o2.t, 2);
}

#[test]
fn grad_clipping_uses_the_global_norm() {
    let a = Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap();
    let b = Tensor::new(&[4f32], &Device::Cpu).unwrap();
    let mut g = vec![Some(a), None, Some(b)];
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((n - 5.0).abs() < 1e-6);
    let a = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
    assert!((a[0] - 0.6).abs() < 1e-5);
}

#[test]
fn schedules_follow_hugging_face() {
    let c = Schedule::new(LrScheduler::Cosine, 1.0, 0.1, 10);
    assert_eq!(c.warmup_steps, 1);
    assert_eq!(c.factor(0), 0.0);
    assert!((c.factor(1) - 1.0).abs() < 1e-12);
    let want = 0.5 * (1.0 + (std::f64::consts::PI * 5.0 / 9.0).cos());
    assert!((c.factor(6) - want).abs() < 1e-12);
    assert!(c.factor(10).abs() < 1e-12);
    let l = Schedule::new(LrScheduler::Linear, 2.0, 0.15, 10);
    assert_eq!(l.warmup_steps, 2);
    assert!((l.lr(1) - 1.0).abs() < 1e-12);
    assert!((l.lr(5) - 2.0 * 5.0 / 8.0).abs() < 1e-12);
    let k = Schedule::new(LrScheduler::Constant, 3.0, 0.5, 10);
    assert_eq!(k.lr(0), 3.0);
    let kw = Schedule::new(LrScheduler::ConstantWithWarmup, 3.0, 0.5, 10);
    assert!((kw.lr(1) - 0.6).abs() < 1e-12);
    assert_eq!(kw.lr(7), 3.0);
}

#[test]
fn grpo_advantages_by_hand() {
    let a = advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 2, true);
    let s = (0.5f64).sqrt() + 1e-4; // std with n−1 of {1, 0} is √0.5
    assert!((a[0] - 0.5 / s).abs() < 1e-12);
    assert!((a[1] + 0.5 / s).abs() < 1e-12);
    assert!((a[2] + 0.5 / s).abs() < 1e-12);
    assert_eq!(&a[4..], &[0.0, 0.0]);
    let u = advantages(&[3.0, 1.0, 2.0], 3, false);
    assert_eq!(u, vec![1.0, -1.0, 0.0]);
}

/// The GRPO loss of a batch of policy tokens as training computes it: token i belongs to sequence
/// `seq[i]` (advantage `adv[seq[i]]`), and each sequence adds its [`sequence_loss`] term with its
/// [`seq_weights`] weight.
fn batch_loss(
    new: &[f64],
    old: &[f64],
    refl: Option<&[f64]>,
    adv: &[f64],
    seq: &[usize],
    spec: &LossSpec,
) -> f64 {
    let t = |v: Vec<f64>| {
        let n = v.len();
        Tensor::from_vec(v.into_iter().map(|x| x as f32).collect(), n, &Device::Cpu).unwrap()
    };
    let of = |v: &[f64], s: usize| -> Vec<f64> {
        (0..v.len())
            .filter(|&i| seq[i] == s)
            .map(|i| v[i])
            .collect()
    };
    let lens: Vec<usize> = (0..adv.len()).map(|s| of(new, s).len()).collect();
    let w = seq_weights(&lens, spec);
    (0..adv.len())
        .map(|s| {
            let reference = refl.map(|r| t(of(r, s)));
            sequence_loss(
                &t(of(new, s)),
                Some(&t(of(old, s))),
                reference.as_ref(),
                adv[s],
                w[s],
                spec,
            )
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
        })
        .sum()
}

#[test]
fn grpo_losses_by_hand() {
    // Three policy tokens: two of sequence 0 (A = 1), one of sequence 1 (A = −0.5), plus a fourth
    // of sequence 1 whose ratio is clipped from above.
    let new = [-1.0f64, -2.0, -0.5, -1.0];
    let old = [-1.1f64, -1.5, -0.5, -1.5];
    let seq = [0usize, 0, 1, 1];
    let adv = [1.0f64, -0.5];
    let eps = 0.2;
    let per: Vec<f64> = (0..4)
        .map(|i| {
            let r = (new[i] - old[i]).exp();
            let a = adv[seq[i]];
            -(r * a).min(r.clamp(1.0 - eps, 1.0 + eps) * a)
        })
        .collect();
    // Token 3: r = e^0.5 ≈ 1.65, A < 0: min(r·A, 1.2·A) = r·A (unclipped, pessimistic side).
    assert!((per[3] - 0.5 * 0.5f64.exp()).abs() < 1e-12);
    let loss = |ty: &str, beta: f64, refl: Option<&[f64]>| {
        let spec = LossSpec {
            loss_type: ty.parse().unwrap(),
            eps_low: eps,
            eps_high: eps,
            beta,
            max_completion_length: 5,
        };
        batch_loss(&new, &old, refl, &adv, &seq, &spec)
    };
    let sum: f64 = per.iter().sum();
    assert!((loss("bnpo", 0.0, None) - sum / 4.0).abs() < 1e-6);
    let grpo_want = ((per[0] + per[1]) / 2.0 + (per[2] + per[3]) / 2.0) / 2.0;
    assert!((loss("grpo", 0.0, None) - grpo_want).abs() < 1e-6);
    assert!((loss("dr_grpo", 0.0, None) - sum / (2.0 * 5.0)).abs() < 1e-6);
    // β·KL (k3) to a reference.
    let refv = [-1.2f64, -1.8, -0.4, -1.0];
    let kl: f64 = (0..4)
        .map(|i| {
            let d = refv[i] - new[i];
            d.exp() - d - 1.0
        })
        .sum();
    let got = loss("bnpo", 0.1, Some(&refv[..]));
    assert!((got - (sum + 0.1 * kl) / 4.0).abs() < 1e-6);
    // Asymmetric clip: ε_high = 0.28 changes the clipped value of an A > 0 token with r > 1.2.
    let spec = LossSpec {
        loss_type: LossType::Bnpo,
        eps_low: 0.2,
        eps_high: 0.28,
        beta: 0.0,
        max_completion_length: 5,
    };
    let l = batch_loss(&[0.0], &[-0.5], None, &[1.0], &[0], &spec);
    assert!((l + 1.28).abs() < 1e-6);
}

#[test]
fn tiny_model_overfits_four_samples() {
    let m = tiny_memgen(false);
    let r = rows(&m);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sft_cfg(80, 3e-2);
    cfg.args.per_device_train_batch_size = 4;
    cfg.args.logging_steps = 10;
    cfg.args.warmup_ratio = 0.0;
    let before = sft::eval_loss(&m, &r, 4).unwrap();
    let run = SftRun {
        cfg,
        session: Session::new(1, dir.path()),
    };
    let o = sft::train_sft(&m, &run, &r, &r).unwrap();
    let after = sft::eval_loss(&m, &r, 4).unwrap();
    assert!(after < 0.7 * before, "loss {before} → {after}");
    assert!(o.last_loss < o.first_loss);
    // The run's artefacts.
    for f in [
        "weaver/model.safetensors",
        "weaver/memgen.json",
        "metrics.jsonl",
        "curves.svg",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    let svg = std::fs::read_to_string(dir.path().join("curves.svg")).unwrap();
    assert!(svg.contains("<polyline"));
}

#[test]
fn sft_resume_is_bit_identical() {
    // Also with thinned insertion points, whose draws must resume too.
    for q in [1.0, 0.5] {
        sft_resume_case(q);
    }
}

fn sft_resume_case(q: f64) {
    let straight = tempfile::tempdir().unwrap();
    let resumed = tempfile::tempdir().unwrap();
    let run = |out: &Path, stop: Option<usize>| {
        let m = tiny_memgen(false);
        let r = rows(&m);
        let run = SftRun {
            cfg: SftConfig {
                insertion_probability: q,
                ..sft_cfg(6, 5e-3)
            },
            session: Session {
                stop_after: stop,
                ..Session::new(3, out)
            },
        };
        sft::train_sft(&m, &run, &r, &r[..2]).unwrap()
    };
    let a = run(straight.path(), None);
    let b1 = run(resumed.path(), Some(3));
    assert_eq!(b1.steps, 3);
    assert!(b1.final_dir.is_none());
    // A fresh model picks up <out>/checkpoint-last automatically.
    let b2 = run(resumed.path(), None);
    assert_eq!((a.steps, b2.steps), (6, 6));
    for f in [
        "checkpoint-last/model.safetensors",
        "checkpoint-last/optimizer.safetensors",
        "weaver/model.safetensors",
    ] {
        assert_eq!(
            common::read_tensors(&straight.path().join(f)),
            common::read_tensors(&resumed.path().join(f)),
            "{f} differs"
        );
    }
    // The resumed run's metrics are the straight run's (up to wall-clock fields).
    let strip = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("elapsed");
                o.remove("tokens_per_s");
                v.to_string()
            })
            .collect()
    };
    assert_eq!(strip(straight.path()), strip(resumed.path()));
}

#[test]
fn insertion_probability_thins_every_boundary_then_applies_the_cap() {
    let m = tiny_memgen(false);
    // Answer boundaries after 12, 15, 18, 21 and 24 (delimiter ids ≡ 0, 3, 6 mod 9); cap 2.
    let answer = [10, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25];
    let row = sft::sft_row(&m, vec![5, 7, 8], answer.to_vec(), 64).unwrap();
    let pos =
        |r: &TfRow| -> Vec<(usize, Kind)> { r.points.iter().map(|p| (p.pos, p.kind)).collect() };
    let p0 = (3, Kind::Prompt);
    assert_eq!(
        pos(&row),
        vec![p0, (5, Kind::Inference), (7, Kind::Inference)]
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // q = 1 is the original: the first `cap` boundaries. q = 0 keeps the prompt memory only.
    assert_eq!(pos(&sft::thin_points(&m, &row, 1.0, &mut rng)), pos(&row));
    assert_eq!(pos(&sft::thin_points(&m, &row, 0.0, &mut rng)), vec![p0]);
    // q = 0.5: each boundary kept with probability ½, then at most 2 of them — so the first
    // boundary appears half the time and the third ½ · (1 − ¼) = 3/8 of the time.
    let boundaries = [5, 7, 9, 11, 13];
    let mut seen = [0usize; 5];
    let n = 4000;
    for _ in 0..n {
        let t = sft::thin_points(&m, &row, 0.5, &mut rng);
        assert_eq!(t.tokens, row.tokens);
        assert_eq!(t.points[0], row.points[0]);
        let inf: Vec<usize> = t.points[1..].iter().map(|p| p.pos).collect();
        assert!(inf.len() <= 2, "{inf:?}");
        for p in inf {
            seen[boundaries.iter().position(|&b| b == p).unwrap()] += 1;
        }
    }
    let f = |i: usize| seen[i] as f64 / n as f64;
    assert!((f(0) - 0.5).abs() < 0.03, "{seen:?}");
    assert!((f(2) - 0.375).abs() < 0.03, "{seen:?}");
    assert!(seen[4] > 0, "the last boundary is reachable: {seen:?}");
}

/// A toy single-turn task: reward 1 when the completion mentions `w7`.
struct Toy;
impl Task for Toy {
    fn name(&self) -> &str {
        "toy"
    }
    fn load(&self, _: Split) -> memgen::tasks::Result<Vec<Sample>> {
        Ok((0..4)
            .map(|i| Sample {
                id: i.to_string(),
                messages: vec![Message::user(format!("w{} w{} w{}", 2 + i, 4 + i, 10 + i))],
                target: None,
                gold: serde_json::json!({}),
            })
            .collect())
    }
    fn grade(&self, completion: &str, _: &serde_json::Value) -> Graded {
        Graded::new(completion.contains("w7") as u8 as f64, None)
    }
    fn check_gold(&self, _: &serde_json::Value) -> memgen::tasks::Result<()> {
        Ok(())
    }
}

fn grpo_cfg() -> GrpoConfig {
    GrpoConfig {
        args: TrainingArgs {
            max_steps: Some(4),
            per_device_train_batch_size: 4,
            learning_rate: 1e-2,
            eval_strategy: IntervalStrategy::No,
            save_strategy: IntervalStrategy::Steps,
            save_steps: 1,
            ..GrpoConfig::default().args
        },
        num_generations: 4,
        num_iterations: 2,
        max_completion_length: 6,
        beta: 0.05,
        loss_type: LossType::Grpo,
        insertion_penalty: 0.5,
        ..GrpoConfig::default()
    }
}

#[test]
fn grpo_runs_and_resumes_bit_identically() {
    for target in [grpo::Target::Weaver, grpo::Target::Trigger] {
        let straight = tempfile::tempdir().unwrap();
        let resumed = tempfile::tempdir().unwrap();
        let run = |out: &Path, stop: Option<usize>| {
            let m = tiny_memgen(target == grpo::Target::Trigger);
            let data = Toy.load(Split::Train).unwrap();
            let run = grpo::GrpoRun {
                cfg: grpo_cfg(),
                target,
                session: Session {
                    stop_after: stop,
                    ..Session::new(5, out)
                },
            };
            grpo::train_grpo(&m, &run, &Toy, None, &data, &[]).unwrap()
        };
        let a = run(straight.path(), None);
        assert_eq!(a.steps, 4);
        assert!(a.first_reward.is_finite());
        run(resumed.path(), Some(2));
        run(resumed.path(), None);
        let name = if target == grpo::Target::Weaver {
            "weaver"
        } else {
            "trigger"
        };
        let f = format!("{name}/model.safetensors");
        assert_eq!(
            common::read_tensors(&straight.path().join(&f)),
            common::read_tensors(&resumed.path().join(&f)),
            "{target:?}: {f} differs"
        );
        // Training moved the policy.
        let m0 = tiny_memgen(target == grpo::Target::Trigger);
        let init = straight.path().join("init");
        m0.save(&init).unwrap();
        assert_ne!(
            common::read_tensors(&init.join("model.safetensors")),
            common::read_tensors(&straight.path().join(&f))
        );
        let rec = std::fs::read_to_string(straight.path().join("metrics.jsonl")).unwrap();
        assert!(rec.contains("insertions_per_sample") && rec.contains("reward_std"));
    }
}

#[test]
fn trigger_train_without_weaver_is_a_one_line_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memgen"))
        .args(["trigger-train", "--config"])
        .arg(common::root().join("configs/quickstart.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("trained weaver"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memgen"))
        .args(["weaver-train", "--config"])
        .arg(common::root().join("configs/quickstart.yaml"))
        .args(["--options", "run.weaver.sft.lr_scheduler_type", "warp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("lr_scheduler_type"), "{err}");
}

#[test]
fn trigger_rollouts_with_a_greedy_reasoner_differ_only_where_decisions_do() {
    let m = tiny_memgen(true);
    m.trigger.as_ref().unwrap().init_head(0.5).unwrap();
    let data = Toy.load(Split::Train).unwrap();
    let refs: Vec<&Sample> = data[..1].iter().collect();
    let sampling = memgen::backbone::generate::SamplingConfig {
        temperature: 0.0,
        max_new_tokens: 12,
        seed: 3,
        ..Default::default()
    };
    let trig = grpo::TriggerRollout {
        insertion_penalty: 0.0,
        decision_temperature: Some(1.0),
    };
    let rs = grpo::rollouts(&m, &Toy, None, &refs, 8, sampling.clone(), 1024, trig).unwrap();
    let decisions: Vec<Vec<(usize, bool)>> = rs
        .iter()
        .map(|r| r.decisions.iter().map(|d| (d.pos, d.insert)).collect())
        .collect();
    assert!(
        decisions.iter().any(|d| !d.is_empty()),
        "no boundary visited"
    );
    // A zero head: both actions at probability 1/2, so the decisions were sampled, not argmax.
    for d in rs.iter().flat_map(|r| &r.decisions) {
        assert!((d.logprob - 0.5f32.ln()).abs() < 1e-5, "{}", d.logprob);
    }
    assert!(
        decisions.iter().any(|d| d != &decisions[0]),
        "8 rollouts made identical sampled decisions: {decisions:?}"
    );
    // Greedy tokens: two rollouts agree up to the first decision where they differ.
    for a in &rs {
        for b in &rs {
            let split = a
                .decisions
                .iter()
                .zip(&b.decisions)
                .find(|(x, y)| x.insert != y.insert)
                .map(|(x, _)| x.pos)
                .unwrap_or(usize::MAX);
            let n = a.tokens.len().min(b.tokens.len()).min(split);
            assert_eq!(a.tokens[..n], b.tokens[..n]);
            if split == usize::MAX {
                assert_eq!(a.tokens, b.tokens, "same decisions, different answers");
            }
        }
    }
    // The recorded log-probs are the ones GRPO scores.
    let (lp, _) = grpo::trigger_logprobs(&m, &rs, 1.0, &mut memgen::backbone::Mode::Infer).unwrap();
    let recorded: Vec<f32> = rs
        .iter()
        .flat_map(|r| r.decisions.iter().map(|d| d.logprob))
        .collect();
    for (x, y) in lp.to_vec1::<f32>().unwrap().iter().zip(&recorded) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    // A head started at insertion probability 0.9 samples each action at exactly that rate.
    m.trigger.as_ref().unwrap().init_head(0.9).unwrap();
    let rs = grpo::rollouts(&m, &Toy, None, &refs, 8, sampling, 1024, trig).unwrap();
    for d in rs.iter().flat_map(|r| &r.decisions) {
        let p: f32 = if d.insert { 0.9 } else { 0.1 };
        assert!(
            (d.logprob - p.ln()).abs() < 1e-5,
            "{} at {}",
            d.logprob,
            d.insert
        );
    }
}
