//! The device-generic path (Candle ops only, what CUDA and bf16/f16 run) against the fused f32
//! CPU kernels, forced on the CPU by `Kernels::Generic`, on a tiny model of every family: logits
//! with padding, with a KV cache and past positions, and with LoRA adapters; the weaver's
//! teacher-forced loss gradients (LoRA, query latents, projections); and one AdamW step.

mod common;

use candle_core::{Device, Tensor, Var};
use memgen::backbone::{Backbone, Kernels, LoraConfig, LoraSet, Mode, Stream, Target};
use memgen::memory::teacher::TfRow;
use memgen::memory::{MemGenModel, MemGenSpec};
use memgen::training::optim::{AdamW, AdamWConfig};
use memgen::training::sft;
use rand::{Rng, SeedableRng};

const TOL: f32 = 1e-5;

/// Overwrite every variable with small seeded random values: fresh LoRA B matrices are zero, and
/// a zero adapter would hide both its own path and A's gradient.
fn randomise(vars: &[Var], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for v in vars {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-0.2..0.2))
            .collect();
        let t = Tensor::from_vec(vals, v.shape(), v.device()).unwrap();
        v.set(&t).unwrap();
    }
}

/// The tiny model of `family` with LoRA on every projection (non-zero), set to `kernels`.
fn tiny_with_lora(family: &str, kernels: Kernels) -> Backbone {
    let mut bb = common::tiny_family(family, 5);
    let cfg = LoraConfig {
        r: 3,
        lora_dropout: 0.0,
        target_modules: Target::ALL.iter().map(|t| t.name().to_string()).collect(),
        ..LoraConfig::default()
    };
    let n = bb.config().num_hidden_layers;
    bb.lora = LoraSet::new(&cfg, |t| bb.proj_dims(t), n, 9, &Device::Cpu).unwrap();
    randomise(&bb.lora.vars(), 17);
    bb.kernels = kernels;
    bb
}

/// Largest difference of `a` and `b` over the real (mask 1) positions of B × L × V logits.
fn real_diff(a: &Tensor, b: &Tensor, mask: &[Vec<u8>]) -> f32 {
    let (a, b) = (a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
    let mut worst = 0f32;
    for (bi, row) in mask.iter().enumerate() {
        for (i, &m) in row.iter().enumerate() {
            if m != 0 {
                for (x, y) in a[bi][i].iter().zip(&b[bi][i]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

/// Logits of a left-padded batch of two, then of three more tokens per row through the cache
/// (row 0 with a padded slot among them), in `mode`.
fn logits_with_cache(bb: &Backbone, grad: bool) -> (Vec<Tensor>, Vec<Vec<Vec<u8>>>) {
    let ids = |v: &[u32], l: usize| Tensor::from_vec(v.to_vec(), (2, l), &Device::Cpu).unwrap();
    let steps: [(Vec<u32>, Vec<Vec<u8>>); 2] = [
        (
            vec![3, 14, 15, 9, 26, 1, 1, 5, 35, 8],
            vec![vec![1, 1, 1, 1, 1], vec![0, 0, 1, 1, 1]],
        ),
        (
            vec![7, 1, 31, 40, 41, 42],
            vec![vec![1, 0, 1], vec![1, 1, 1]],
        ),
    ];
    let mut cache = bb.new_cache(2);
    let mut start = vec![0u32; 2];
    let (mut out, mut masks) = (vec![], vec![]);
    for (tok, mask) in steps {
        let l = mask[0].len();
        let x = bb.embed(&ids(&tok, l)).unwrap();
        let stream = Stream::from_mask(x, mask.clone(), &start).unwrap();
        for (s, row) in start.iter_mut().zip(&mask) {
            *s += row.iter().map(|&m| m as u32).sum::<u32>();
        }
        let mut mode = if grad { Mode::Grad } else { Mode::Infer };
        let h = bb.forward(&stream, Some(&mut cache), &mut mode).unwrap();
        out.push(if grad {
            bb.logits(&h).unwrap()
        } else {
            bb.logits_infer(&h).unwrap()
        });
        masks.push(mask);
    }
    (out, masks)
}

#[test]
fn generic_logits_match_the_fused_kernels_on_every_family() {
    let mut fused_worst = 0f32;
    for family in common::FAMILIES {
        let generic = logits_with_cache(&tiny_with_lora(family, Kernels::Generic), false);
        for kernels in [Kernels::Fused, Kernels::FusedUnpacked] {
            for grad in [false, true] {
                let (got, masks) = logits_with_cache(&tiny_with_lora(family, kernels), grad);
                for (step, (g, w)) in got.iter().zip(&generic.0).enumerate() {
                    let d = real_diff(g, w, &masks[step]);
                    assert!(
                        d < TOL,
                        "{family} {kernels:?} grad {grad} step {step}: logits differ by {d}"
                    );
                    if !grad {
                        fused_worst = fused_worst.max(d);
                    }
                }
            }
        }
        // The model is not trivially flat: its logits differ between positions.
        let l = generic.0[0].to_vec3::<f32>().unwrap();
        assert!(
            (l[0][0][0] - l[0][1][0]).abs() > 1e-4,
            "{family}: flat logits"
        );
    }
    // The kernels round differently (a vectorised exp, other summation orders): identical
    // logits everywhere would mean the setting was ignored.
    assert!(fused_worst > 0.0, "Kernels::Generic changed nothing");
}

/// `memgen --kernels` on the real model: generic and fused score a text alike; a misspelt
/// setting is a one-line error.
#[test]
fn the_cli_switch_selects_the_generic_path() {
    common::model("smollm2");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_memgen"))
            .args(args)
            .output()
            .unwrap()
    };
    let score = |k: &str| -> serde_json::Value {
        let text = "The capital of France is Paris, and the capital of Italy is Rome.";
        let out = run(&["--kernels", k, "score", "--text", text, "--top-k", "3"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (f, g) = (score("fused"), score("generic"));
    let (tf, tg) = (
        f["top_logits"].as_array().unwrap(),
        g["top_logits"].as_array().unwrap(),
    );
    assert_eq!(tf.len(), tg.len());
    let mut worst = 0f64;
    for (rf, rg) in tf.iter().zip(tg) {
        for (x, y) in rf.as_array().unwrap().iter().zip(rg.as_array().unwrap()) {
            assert_eq!(x[0], y[0], "top tokens differ: {rf} vs {rg}");
            worst = worst.max((x[1].as_f64().unwrap() - y[1].as_f64().unwrap()).abs());
        }
    }
    assert!(worst < 1e-3, "logits differ by {worst}");
    let out = run(&["--kernels", "fastest", "score", "--text", "hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("fused, fused-unpacked or generic"), "{err}");
}

/// A tiny MemGen model of `family` (reasoner and weaver on the same tiny base), every weaver
/// variable randomised, all ops set to `kernels`.
fn tiny_memgen(family: &str, kernels: Kernels) -> MemGenModel {
    let mut reasoner = common::tiny_family(family, 21);
    reasoner.kernels = kernels;
    let mut weaver_base = common::tiny_family(family, 22);
    weaver_base.kernels = kernels;
    let mut spec = MemGenSpec::new("tiny");
    spec.prompt_latents_len = 2;
    spec.inference_latents_len = 2;
    spec.insertion.max_inference_aug_num = 2;
    spec.weaver_lora.lora_dropout = 0.0;
    let m = MemGenModel::assemble(spec, reasoner, common::tiny_tokenizer(), &weaver_base, None)
        .unwrap();
    randomise(&m.weaver_vars(), 3);
    m
}

fn tf_rows(m: &MemGenModel) -> Vec<TfRow> {
    let data: [(&[u32], &[u32]); 2] = [
        (&[5, 7, 8], &[10, 11, 12, 13, 14, 15, 16]),
        (&[4, 8, 2, 7, 9], &[20, 21, 22, 23, 24]),
    ];
    data.iter()
        .map(|(p, a)| sft::sft_row(m, p.to_vec(), a.to_vec(), 64).unwrap())
        .collect()
}

/// The weaver's teacher-forced loss, its gradients, and the variables after one AdamW step.
fn loss_grads_step(m: &MemGenModel) -> (f32, Vec<Tensor>, Vec<Tensor>) {
    let rows = tf_rows(m);
    let (loss, _) = m.sft_loss(&rows, &mut Mode::Grad).unwrap();
    let vars = m.weaver_vars();
    let store = loss.backward().unwrap();
    let grads: Vec<Option<Tensor>> = vars.iter().map(|v| store.get(v).cloned()).collect();
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
    opt.step(&grads, 1e-2).unwrap();
    let grads = grads
        .into_iter()
        .map(|g| g.expect("every weaver variable gets a gradient"))
        .collect();
    let after = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    (loss.to_scalar::<f32>().unwrap(), grads, after)
}

#[test]
fn generic_gradients_and_an_adamw_step_match_the_fused_kernels_on_every_family() {
    for family in common::FAMILIES {
        let (lf, gf, af) = loss_grads_step(&tiny_memgen(family, Kernels::Fused));
        let (lg, gg, ag) = loss_grads_step(&tiny_memgen(family, Kernels::Generic));
        assert!((lf - lg).abs() < TOL, "{family}: loss {lf} vs {lg}");
        assert_eq!(gf.len(), gg.len());
        for (i, (a, b)) in gf.iter().zip(&gg).enumerate() {
            let d = common::max_abs_diff(a, b);
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(scale > 0.0, "{family}: gradient {i} is zero");
            assert!(
                d < TOL * scale.max(1.0),
                "{family}: gradient {i} differs by {d}"
            );
        }
        for (i, (a, b)) in af.iter().zip(&ag).enumerate() {
            let d = common::max_abs_diff(a, b);
            assert!(
                d < TOL,
                "{family}: variable {i} after the step differs by {d}"
            );
        }
    }
}
