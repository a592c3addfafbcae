//! bf16 and f16 against f32 on the tiny fixtures (../shared/fixtures/tiny): logits of every
//! prompt, and one SFT step of the weaver (loss, gradients, updated tensors) — within bounds set
//! from measured drift, each stated beside its measurement. Mixed precision: under bf16 the
//! trainable tensors, their gradients, the optimiser state and the checkpoints stay f32 while the
//! frozen weights are bf16; bf16 storage loads as a bit-for-bit copy.

mod common;

use common::sequence_logits as logits;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use memgen::backbone::{self, Mode, Side, Stream};
use memgen::memory::checkpoint::Part;
use memgen::memory::{MemGenModel, MemGenSpec};
use memgen::training::optim::{clip_grad_norm, AdamW, AdamWConfig};
use memgen::training::sft;
use rand::SeedableRng;

const FIXTURES: [&str; 5] = ["qwen3", "qwen3-untied", "smollm3", "llama3", "qwen2-tied"];

fn fixture_dir(name: &str) -> PathBuf {
    let dir = common::shared().join("fixtures/tiny").join(name);
    assert!(
        dir.join("model.safetensors").is_file(),
        "fixture {} is missing",
        dir.display()
    );
    dir
}

/// The token ids of every prompt of a fixture.
fn prompts(name: &str) -> Vec<Vec<u32>> {
    let fx = common::fixture(&format!("tiny/{name}.dev.json"));
    let prompts = fx["prompts"].as_array().expect("prompts");
    assert!(!prompts.is_empty(), "{name}: no prompts in the fixture");
    prompts
        .iter()
        .map(|p| {
            p["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|x| x.as_u64().expect("an id") as u32)
                .collect()
        })
        .collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap()
}

/// How far a half-precision model's logits are from the f32 model's, over every fixture.
#[derive(Debug, Default)]
struct Drift {
    /// Worst |Δlogit| over every position and the whole vocabulary.
    worst: f32,
    /// Positions whose argmax is the f32 argmax, of all positions.
    top1_equal: usize,
    positions: usize,
    /// Where the argmax differs: the widest f32 gap between the two ids (a near-tie flips).
    widest_flipped_gap: f32,
}

fn drift(dtype: DType) -> Drift {
    let mut d = Drift::default();
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let full = backbone::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let half = backbone::load(&dir, dtype, &Device::Cpu).unwrap();
        assert_eq!(half.backbone.dtype(), dtype, "{name}");
        for ids in prompts(name) {
            let want = logits(&full, &ids, &mut Mode::Infer);
            // Inference and the differentiable path (training, scoring under a gradient).
            for mode in [Mode::Infer, Mode::Grad] {
                let mut mode = mode;
                let got = logits(&half, &ids, &mut mode);
                for (w, g) in want.iter().zip(&got) {
                    for (a, b) in w.iter().zip(g) {
                        d.worst = d.worst.max((a - b).abs());
                    }
                    let (i, j) = (argmax(w), argmax(g));
                    d.positions += 1;
                    if i == j {
                        d.top1_equal += 1;
                    } else {
                        d.widest_flipped_gap = d.widest_flipped_gap.max(w[i] - w[j]);
                    }
                }
            }
        }
    }
    eprintln!("{dtype:?} vs f32 on {} fixtures: {d:?}", FIXTURES.len());
    d
}

/// Asserts the drift stays within `worst` (|Δlogit| over everything), that at least `top1` of
/// the positions keep their f32 argmax, and that any other position was a near-tie in f32 (its
/// two ids within `flip_gap`): precision may break ties, never pick a clearly worse token.
fn assert_drift(d: &Drift, worst: f32, top1: f64, flip_gap: f32) {
    // Every prompt position of every fixture, by both paths.
    assert!(
        d.positions >= 1000,
        "only {} positions compared",
        d.positions
    );
    assert!(d.worst <= worst, "worst |Δlogit| {} > {worst}", d.worst);
    let equal = d.top1_equal as f64 / d.positions as f64;
    assert!(
        equal >= top1,
        "top-1 equal at {equal:.4} of positions < {top1}"
    );
    assert!(
        d.widest_flipped_gap <= flip_gap,
        "an argmax moved off a token {} ahead in f32",
        d.widest_flipped_gap
    );
}

/// Measured (2 × 920 positions, |logit| up to ~20, bf16's 8-bit mantissa): worst |Δlogit|
/// 0.298, top-1 equal at 1812 of 1840 (0.985), the flips all within an f32 gap of 0.133.
/// Bounds: 0.4, 0.975, 0.2.
#[test]
fn bf16_logits_track_f32_on_every_fixture() {
    assert_drift(&drift(DType::BF16), 0.4, 0.975, 0.2);
}

/// Measured (f16's 11-bit mantissa): worst |Δlogit| 0.039, top-1 equal at all 1840 positions.
/// Bounds: 0.06, 0.995 (a handful of near-ties may flip on another CPU's summation order), 0.06.
#[test]
fn f16_logits_track_f32_on_every_fixture() {
    assert_drift(&drift(DType::F16), 0.06, 0.995, 0.06);
}

/// bf16 storage loaded as bf16 is a bit-for-bit copy, and loaded as f32 it is the exact upcast
/// (rounding the f32 weights back to bf16 gives the stored bits).
#[test]
fn bf16_storage_loads_exactly() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let file = dir.join("model.safetensors");
        let stored = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let half = backbone::BaseWeights::from_hf_dir(&dir, DType::BF16, &Device::Cpu).unwrap();
        let full = backbone::BaseWeights::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        let bits = |t: &Tensor| -> Vec<half::bf16> {
            t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap()
        };
        let pairs = [
            (
                "model.embed_tokens.weight",
                &half.embed_tokens,
                &full.embed_tokens,
            ),
            ("model.norm.weight", &half.norm, &full.norm),
            (
                "model.layers.0.mlp.down_proj.weight",
                &half.layers[0].down_proj,
                &full.layers[0].down_proj,
            ),
            (
                "model.layers.0.self_attn.q_proj.weight",
                &half.layers[0].q_proj,
                &full.layers[0].q_proj,
            ),
        ];
        for (key, h, f) in pairs {
            let s = &stored[key];
            assert_eq!(
                s.dtype(),
                DType::BF16,
                "{name}: {key} is not stored in bf16"
            );
            assert_eq!(bits(h), bits(s), "{name}: {key} loaded as bf16");
            assert_eq!(f.dtype(), DType::F32);
            assert_eq!(
                bits(&f.to_dtype(DType::BF16).unwrap()),
                bits(s),
                "{name}: {key} loaded as f32"
            );
        }
    }
}

/// One weaver SFT step on a fixture in `dtype`: the loss, each trainable's gradient and update.
struct Step {
    model: MemGenModel,
    opt: AdamW,
    loss: f32,
    grads: Vec<Tensor>,
    updates: Vec<Tensor>,
}

fn sft_step(name: &str, dtype: &str) -> Step {
    let dir = fixture_dir(name);
    let mut spec = MemGenSpec::new(dir.to_str().unwrap());
    spec.trigger_model = Some(dir.to_str().unwrap().into());
    spec.dtype = dtype.into();
    spec.prompt_latents_len = 4;
    spec.inference_latents_len = 4;
    spec.insertion.max_inference_aug_num = 2;
    let model = MemGenModel::build(&spec, &Device::Cpu).unwrap();
    // Rows of different lengths and insertion counts: padding and latent holes are exercised.
    let rows = vec![
        sft::text_row(&model, "What is 12 + 7?", "12 + 7 = 19. The answer is 19.").unwrap(),
        sft::text_row(&model, "Add 3 and 4.", "7, since 3 + 4 = 7.\nSo 7.").unwrap(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (loss, _) = model.sft_loss(&rows, &mut Mode::Train(&mut rng)).unwrap();
    let vars = model.weaver_vars();
    let before: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let store = loss.backward().unwrap();
    let mut grads: Vec<Option<Tensor>> = vars
        .iter()
        .map(|v| store.get(v.as_tensor()).cloned())
        .collect();
    clip_grad_norm(&mut grads, 1.0).unwrap();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    opt.step(&grads, 1e-3).unwrap();
    let updates = vars
        .iter()
        .zip(&before)
        .map(|(v, b)| (v.as_tensor() - b).unwrap())
        .collect();
    Step {
        loss: loss.to_scalar::<f32>().unwrap(),
        grads: grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.unwrap_or_else(|| v.as_tensor().zeros_like().unwrap()))
            .collect(),
        updates,
        model,
        opt,
    }
}

/// ‖a − b‖ / ‖b‖ over a list of tensors taken as one vector.
fn rel_l2(a: &[Tensor], b: &[Tensor]) -> f32 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in x.iter().zip(&y) {
            num += ((p - q) as f64).powi(2);
            den += (*q as f64).powi(2);
        }
    }
    (num / den).sqrt() as f32
}

/// One AdamW step (lr 1e-3, gradients clipped to norm 1) from the same initial tensors and the
/// same dropout draws, bf16 against f32. Measured per fixture: relative |Δloss| ≤ 9.3e-4 (qwen3:
/// 19.499 vs 19.517), gradient relative L2 error ≤ 2.73e-2, update relative L2 error ≤ 0.187 —
/// Adam's first step moves each element by about ±lr whatever the gradient's size, so the tiny
/// gradients whose sign bf16 flips dominate it; the updated tensors themselves are within
/// 2·lr of f32 by construction. Bounds: 1.5e-3, 4e-2, 0.25.
#[test]
fn bf16_sft_step_tracks_f32() {
    for name in FIXTURES {
        let full = sft_step(name, "f32");
        let half = sft_step(name, "bf16");
        let dl = (half.loss - full.loss).abs() / full.loss;
        let dg = rel_l2(&half.grads, &full.grads);
        let du = rel_l2(&half.updates, &full.updates);
        eprintln!(
            "{name}: loss f32 {} bf16 {} relative {dl:.2e}; grads {dg:.3e}; updates {du:.3e}",
            full.loss, half.loss
        );
        assert!(full.loss.is_finite() && full.loss > 0.0, "{name}: f32 loss");
        assert!(dl <= 1.5e-3, "{name}: relative |Δloss| {dl}");
        assert!(dg <= 4e-2, "{name}: gradient relative error {dg}");
        assert!(du <= 0.25, "{name}: update relative error {du}");
        // The step moved the weaver (the comparison is not of two untouched copies).
        let moved: f32 = full
            .updates
            .iter()
            .map(|u| {
                u.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .fold(0.0, f32::max);
        assert!(moved > 5e-4, "{name}: the step moved nothing ({moved})");
    }
}

/// Under bf16 the frozen weights are bf16; every trainable, its gradient, the optimiser's moments
/// and the saved checkpoint are f32.
#[test]
fn bf16_keeps_trainables_optimiser_and_checkpoints_f32() {
    let step = sft_step("qwen3", "bf16");
    let m = &step.model;
    assert_eq!(m.reasoner.dtype(), DType::BF16);
    assert_eq!(m.reasoner.weights.embed_tokens.dtype(), DType::BF16);
    assert_eq!(m.weaver.backbone.dtype(), DType::BF16);
    let vars: Vec<Var> = m.named_vars().into_iter().map(|(_, v, _)| v).collect();
    let trigger_vars: Vec<Var> = m
        .named_vars()
        .into_iter()
        .filter(|(_, _, p)| *p == Part::Trigger)
        .map(|(_, v, _)| v)
        .collect();
    assert!(m.trigger.is_some() && vars.len() > m.weaver_vars().len());
    for v in &vars {
        assert_eq!(
            v.dtype(),
            DType::F32,
            "a trainable of shape {:?}",
            v.shape()
        );
    }
    for g in &step.grads {
        assert_eq!(g.dtype(), DType::F32, "a gradient of shape {:?}", g.shape());
    }
    // The trigger's gradients too (its head and LoRA), through a bf16 backbone.
    let trig = m.trigger.as_ref().unwrap();
    let tokens = Stream::tokens(&trig.backbone, &[vec![1u32, 2, 3]], 0, Side::Left).unwrap();
    let lg = trig.logits(&tokens, None, &mut Mode::Grad).unwrap();
    assert_eq!(lg.dtype(), DType::F32);
    let store = lg.sum_all().unwrap().backward().unwrap();
    for v in &trigger_vars {
        let g = store.get(v.as_tensor()).expect("a trigger gradient");
        assert_eq!(
            g.dtype(),
            DType::F32,
            "a trigger gradient of shape {:?}",
            g.shape()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let opt_file = dir.path().join("optimizer.safetensors");
    step.opt.save(&opt_file).unwrap();
    let state = candle_core::safetensors::load(&opt_file, &Device::Cpu).unwrap();
    let moments: Vec<_> = state.iter().filter(|(k, _)| k.as_str() != "t").collect();
    assert_eq!(moments.len(), 2 * m.weaver_vars().len());
    for (k, t) in moments {
        assert_eq!(t.dtype(), DType::F32, "optimiser state {k}");
    }
    m.save(&dir.path().join("ckpt")).unwrap();
    let saved =
        candle_core::safetensors::load(dir.path().join("ckpt/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(saved.len(), vars.len());
    for (k, t) in &saved {
        assert_eq!(t.dtype(), DType::F32, "checkpoint tensor {k}");
    }
}

fn run(cmd: &mut std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("running a command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of `text` that are not blank.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// `--device cuda:0`: a CPU-only build says in one line to rebuild with `--features cuda`; a CUDA
/// build either runs (a GPU is present) or fails in one line naming the device, never a panic.
#[test]
fn cuda_device_is_one_line_or_runs() {
    let dir = fixture_dir("qwen3");
    let (code, out, err) = run(
        std::process::Command::new(env!("CARGO_BIN_EXE_memgen")).args([
            "score",
            "--model",
            dir.to_str().unwrap(),
            "--device",
            "cuda:0",
            "--text",
            "hi",
        ]),
    );
    assert!(!err.contains("panicked"), "{err}");
    if cfg!(feature = "cuda") && code == 0 {
        let v: serde_json::Value = serde_json::from_str(&out).expect("score's JSON");
        assert!(v["top_logits"].is_array(), "{out}");
        return;
    }
    assert_ne!(code, 0, "{out}");
    let l = lines(&err);
    assert_eq!(l.len(), 1, "{err:?}");
    assert!(
        l[0].starts_with("error: ") && l[0].contains("cuda:0"),
        "{err}"
    );
    if !cfg!(feature = "cuda") {
        assert!(l[0].contains("--features cuda"), "{err}");
    }
}

/// Whether the NVIDIA kernel driver lists a GPU on this machine.
fn gpu_present() -> bool {
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.count() > 0)
        .unwrap_or(false)
}

/// scripts/gpu-check.sh where CUDA sees no GPU ends at once, in one line saying "no CUDA device",
/// with its documented exit status 3 and nothing built. Run as this machine is when it has no
/// GPU, and with CUDA_VISIBLE_DEVICES=-1 (which hides every GPU from CUDA) everywhere.
#[test]
fn gpu_check_without_a_device_says_so() {
    let mut envs: Vec<Option<&str>> = vec![Some("-1")];
    if !gpu_present() {
        envs.push(None);
    }
    for hide in envs {
        let target = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(common::root().join("scripts/gpu-check.sh"))
            .env("MEMGEN_CUDA_TARGET_DIR", target.path());
        match hide {
            Some(v) => cmd.env("CUDA_VISIBLE_DEVICES", v),
            None => cmd.env_remove("CUDA_VISIBLE_DEVICES"),
        };
        let t = std::time::Instant::now();
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 3, "CUDA_VISIBLE_DEVICES={hide:?}: {out}{err}");
        let l = lines(&out);
        assert!(
            l.len() == 1 && l[0].contains("no CUDA device") && err.is_empty(),
            "{out:?} {err:?}"
        );
        assert!(t.elapsed().as_secs() < 30, "it took {:?}", t.elapsed());
        assert_eq!(
            std::fs::read_dir(target.path()).unwrap().count(),
            0,
            "it built"
        );
    }
}
