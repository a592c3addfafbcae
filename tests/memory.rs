//! MemGen's memory against a literal reference implementation of docs/DESIGN.md (kept here, in test
//! code), on tiny models of every family (see `common::FAMILIES`): it recomputes the whole prefix
//! for every token and every weaver call, one insertion point at a time, through a literal decoder.
//! The fast paths — batched, KV-cached, rows with different insertion layouts — must give the same
//! tokens, the same insertion points and the same logits.

mod common;
mod reference;

use reference::{embed, full_forward, ref_generate, ref_tf_logits, ref_tf_logits_mode};

use candle_core::{DType, Device, IndexOp, Tensor};
use memgen::backbone::generate::{Sampler, SamplingConfig};
use memgen::backbone::{self, Arch, Mode};
use memgen::memory::generate::{MemGenerated, MemoryOptions};
use memgen::memory::teacher::TfRow;
use memgen::memory::{Kind, MemGenModel, MemGenSpec, Point};

/// A tiny MemGen whose reasoner, weaver and trigger are all of `family` (see `common::FAMILIES`).
fn tiny_memgen(family: &str, k_p: usize, k_i: usize, trigger: bool) -> MemGenModel {
    let reasoner = common::tiny_family(family, 21);
    let weaver_base = common::tiny_family(family, 22);
    let trig = common::tiny_family(family, 23);
    let mut spec = MemGenSpec::new("tiny");
    spec.prompt_latents_len = k_p;
    spec.inference_latents_len = k_i;
    spec.weaver_lora.lora_dropout = 0.0;
    let m = MemGenModel::assemble(
        spec,
        reasoner,
        common::tiny_tokenizer(),
        &weaver_base,
        trigger.then_some(&trig),
    )
    .unwrap();
    randomize_lora_b(&m, 0.2);
    m
}

/// Non-zero LoRA B everywhere so adapters matter (seeded: the tests are reproducible).
fn randomize_lora_b(m: &MemGenModel, scale: f32) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let sets = [
        Some(&m.weaver.backbone.lora),
        m.trigger.as_ref().map(|t| &t.backbone.lora),
    ];
    for set in sets.into_iter().flatten() {
        for (_, _, l) in set.iter() {
            let n = l.b.elem_count();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            l.b.set(&Tensor::from_vec(v, l.b.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

// ---------------- tests ----------------

fn tf_rows() -> Vec<TfRow> {
    let mk = |tokens: Vec<u32>, prompt: usize, pts: Vec<Point>| TfRow {
        loss_mask: (0..tokens.len()).map(|i| i >= prompt).collect(),
        tokens,
        points: pts,
    };
    let p = |pos, kind| Point { pos, kind };
    vec![
        // Prompt memory and three inference memories.
        mk(
            (2..20).collect(),
            5,
            vec![
                p(5, Kind::Prompt),
                p(7, Kind::Inference),
                p(8, Kind::Inference),
                p(13, Kind::Inference),
            ],
        ),
        // No memory at all.
        mk(vec![4, 8, 15, 16, 23, 42, 7, 9], 3, vec![]),
        // Only a prompt memory, shorter prompt.
        mk(vec![30, 31, 32, 33, 34, 35], 2, vec![p(2, Kind::Prompt)]),
        // Two prompt memories (multi-turn) around an inference one.
        mk(
            (10..30).rev().collect(),
            4,
            vec![
                p(4, Kind::Prompt),
                p(9, Kind::Inference),
                p(12, Kind::Prompt),
            ],
        ),
    ]
}

#[test]
fn teacher_forced_logits_equal_the_reference() {
    for arch in common::FAMILIES {
        for (k_p, k_i) in [(8, 8), (3, 5)] {
            let m = tiny_memgen(arch, k_p, k_i, false);
            let rows = tf_rows();
            let out = m.teacher_forced(&rows, &mut Mode::Grad).unwrap();
            for (r, row) in rows.iter().enumerate() {
                let n = row.tokens.len();
                let fast = m
                    .reasoner
                    .logits(&out.hidden.i((r, 0..n)).unwrap())
                    .unwrap();
                let want = ref_tf_logits(&m, row);
                let d = common::max_abs_diff(&fast, &want);
                assert!(d < 1e-4, "{arch} K=({k_p},{k_i}) row {r}: {d}");
            }
            // The loss is the mean NLL of the answer tokens under those logits.
            let (loss, count) = m.sft_loss(&rows, &mut Mode::Grad).unwrap();
            let mut sum = 0f64;
            let mut cnt = 0;
            for row in &rows {
                let lsm =
                    candle_nn::ops::log_softmax(&ref_tf_logits(&m, row), candle_core::D::Minus1)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap();
                for i in 0..row.tokens.len() - 1 {
                    if row.loss_mask[i + 1] {
                        sum -= lsm[i][row.tokens[i + 1] as usize] as f64;
                        cnt += 1;
                    }
                }
            }
            assert_eq!(count, cnt);
            let l = loss.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (l - sum / cnt as f64).abs() < 1e-4,
                "{arch}: loss {l} vs {}",
                sum / cnt as f64
            );
        }
    }
}

fn greedy(n: usize) -> Sampler {
    Sampler::new(SamplingConfig {
        max_new_tokens: n,
        ..Default::default()
    })
}

/// Greedy generation with memory (prompt memory, the model's trigger, up to `cap` inference
/// memories) beside the literal one-row-at-a-time reference: every row's tokens and insertion
/// points must be the reference's.
fn generate_as_the_reference(
    m: &MemGenModel,
    prompts: &[Vec<u32>],
    new: usize,
    cap: usize,
    what: &str,
) -> Vec<MemGenerated> {
    let opts = MemoryOptions {
        prompt_memory: true,
        max_inference: cap,
        stop_ids: vec![],
        decision_temperature: None,
        min_gap: 0,
    };
    let got = m
        .generate(prompts, &opts, &mut greedy(new), |_, _| {})
        .unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let (toks, ins) = ref_generate(m, p, new, cap);
        assert_eq!(got[r].tokens, toks, "{what} row {r}: tokens");
        assert_eq!(got[r].insertions, ins, "{what} row {r}: insertions");
    }
    got
}

#[test]
fn generation_equals_the_reference() {
    for arch in common::FAMILIES {
        for trigger in [false, true] {
            let m = tiny_memgen(arch, 8, 8, trigger);
            let prompts = vec![
                vec![5, 9, 2, 17],
                vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
                vec![40],
            ];
            let got = generate_as_the_reference(&m, &prompts, 24, 3, &format!("{arch} {trigger}"));
            let mut total_inf = 0;
            for g in &got {
                let ins = &g.insertions;
                total_inf += ins.iter().filter(|i| i.kind == Kind::Inference).count();
                // Every boundary under the cap was put to the trigger.
                assert!(g.decisions.len() >= ins.len() - 1);
            }
            if !trigger {
                assert!(total_inf > 0, "the test must exercise inference insertions");
            }
        }
    }
}

#[test]
fn rows_past_their_last_memory_leave_the_others_as_the_reference_has_them() {
    // The weaver stops reading a row once it has had all its memories; the rows still getting
    // memories must come out as the reference (one row at a time) has them. Six prompts and caps
    // 1–3 make sure some row reaches its cap while another gets a memory later.
    let m = tiny_memgen("qwen2", 8, 8, false);
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 9, 2, 17],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        vec![40],
        vec![33, 12, 7],
        vec![50, 51, 2, 9, 14, 3],
        vec![21, 22],
    ];
    let mut exercised = 0;
    for cap in 1..=3 {
        let got = generate_as_the_reference(&m, &prompts, 24, cap, &format!("cap {cap}"));
        let last = |r: usize| got[r].insertions.last().map_or(0, |i| i.token_index);
        let capped = |r: usize| {
            got[r]
                .insertions
                .iter()
                .filter(|i| i.kind == Kind::Inference)
                .count()
                == cap
        };
        exercised += (0..prompts.len())
            .filter(|&r| capped(r) && (0..prompts.len()).any(|o| last(o) > last(r)))
            .count();
    }
    assert!(
        exercised > 0,
        "no row reached its cap before another row's last memory"
    );
}

#[test]
fn zero_length_weaver_is_the_plain_reasoner() {
    for arch in common::FAMILIES {
        let m = tiny_memgen(arch, 0, 0, false);
        let prompts = vec![vec![5, 9, 2, 17], vec![1, 2, 3, 4, 5, 6, 7]];
        let opts = MemoryOptions {
            prompt_memory: true,
            max_inference: 5,
            stop_ids: vec![],
            decision_temperature: None,
            min_gap: 0,
        };
        let got = m
            .generate(&prompts, &opts, &mut greedy(16), |_, _| {})
            .unwrap();
        let plain =
            backbone::generate::generate(&m.reasoner, &prompts, 1, &[], &mut greedy(16), |_, _| {})
                .unwrap();
        for (g, p) in got.iter().zip(&plain) {
            assert_eq!(g.tokens, p.tokens);
            assert!(g.insertions.is_empty());
        }
        let rows = tf_rows();
        let out = m.teacher_forced(&rows, &mut Mode::Infer).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let n = row.tokens.len();
            let h = full_forward(&m.reasoner, &embed(&m, &row.tokens));
            assert!(common::max_abs_diff(&out.hidden.i((r, 0..n)).unwrap(), &h) < 1e-5);
        }
    }
}

#[test]
fn gradients_reach_latents_projections_and_lora() {
    let m = tiny_memgen("qwen2", 4, 4, false);
    let rows = tf_rows();
    let (loss, _) = m.sft_loss(&rows, &mut Mode::Grad).unwrap();
    let grads = loss.backward().unwrap();
    let f = || {
        m.sft_loss(&rows, &mut Mode::Grad)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap()
    };
    let lora = m.weaver.backbone.lora.iter().next().unwrap().2.clone();
    let checks = [
        ("prompt latents", m.weaver.prompt_query_latents.clone()),
        (
            "inference latents",
            m.weaver.inference_query_latents.clone(),
        ),
        (
            "reasoner_to_weaver.weight",
            m.weaver.reasoner_to_weaver.weight.clone(),
        ),
        (
            "weaver_to_reasoner.bias",
            m.weaver.weaver_to_reasoner.bias.clone().unwrap(),
        ),
        ("lora A", lora.a.clone()),
        ("lora B", lora.b.clone()),
    ];
    for (name, var) in checks {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        common::fd_check(name, &var, g, &f, &[0, 2, 3], 3e-2, 1e-3);
    }
}

#[test]
fn checkpoints_round_trip_and_report_problems() {
    let m = tiny_memgen("llama", 4, 4, true);
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path()).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "only model.safetensors and memgen.json, no temp files: {names:?}"
    );
    // The original's key names.
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    for k in [
        "weaver.prompt_query_latents",
        "weaver.inference_query_latents",
        "reasoner_to_weaver.weight",
        "weaver_to_reasoner.bias",
        "weaver.model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "weaver.model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight",
        "trigger.model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "trigger.model.base_model.model.lm_head.weight",
    ] {
        assert!(st.contains_key(k), "missing {k}");
    }
    // A model with other random values becomes identical after loading.
    let mut other = tiny_memgen("llama", 4, 4, true);
    other.spec.seed = 7;
    let other = MemGenModel::assemble(
        other.spec.clone(),
        common::tiny(Arch::Llama, 21),
        common::tiny_tokenizer(),
        &common::tiny(Arch::Llama, 22),
        Some(&common::tiny(Arch::Llama, 23)),
    )
    .unwrap();
    use memgen::memory::checkpoint::Part;
    let missing = other
        .load_weights(
            &dir.path().join("model.safetensors"),
            &[Part::Weaver, Part::Trigger],
        )
        .unwrap();
    assert!(missing.is_empty());
    let rows = tf_rows();
    let a = m.teacher_forced(&rows, &mut Mode::Infer).unwrap().hidden;
    let b = other
        .teacher_forced(&rows, &mut Mode::Infer)
        .unwrap()
        .hidden;
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    // Extra (frozen) keys are ignored, missing ones reported, shape mismatches are errors.
    let mut extra = st.clone();
    extra.insert(
        "reasoner.model.embed_tokens.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    extra.remove("trigger.model.base_model.model.lm_head.weight");
    let f = dir.path().join("full.safetensors");
    candle_core::safetensors::save(&extra, &f).unwrap();
    let missing = other
        .load_weights(&f, &[Part::Weaver, Part::Trigger])
        .unwrap();
    assert_eq!(
        missing,
        vec!["trigger.model.base_model.model.lm_head.weight".to_string()]
    );
    extra.insert(
        "weaver.prompt_query_latents".into(),
        Tensor::zeros((5, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&extra, &f).unwrap();
    let err = other
        .load_weights(&f, &[Part::Weaver])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("weaver.prompt_query_latents")
            && err.contains("[5, 32]")
            && err.contains("[4, 32]"),
        "{err}"
    );
}

#[test]
fn smollm2_with_a_random_weaver_equals_the_reference() {
    let path = common::model("smollm2");
    let mut spec = MemGenSpec::new(path.to_str().unwrap());
    spec.weaver_lora.lora_dropout = 0.0;
    let m = MemGenModel::build(&spec, &Device::Cpu).unwrap();
    randomize_lora_b(&m, 0.05);
    let tk = &m.tokenizer;
    let p1 = tk
        .encode("<|im_start|>user\nWhat is 3+4? Answer briefly.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let p2 = tk
        .encode("<|im_start|>user\nList two colors, then stop.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    generate_as_the_reference(&m, &[p1.clone(), p2.clone()], 20, 5, "smollm2");
    // Teacher forcing on prompt + answer with SFT's points.
    let rows: Vec<TfRow> = [
        (&p1, "3 + 4 = 7. So, the answer is 7.\n"),
        (&p2, "Red, blue."),
    ]
    .iter()
    .map(|(p, a)| {
        let mut tokens = (*p).clone();
        tokens.extend(tk.encode(&format!("{a}<|im_end|>\n")).unwrap());
        let mask: Vec<bool> = (0..tokens.len()).map(|i| i >= p.len()).collect();
        let points = m.boundary.training_points(&tokens, &mask, &[p.len()], 5);
        TfRow {
            tokens,
            loss_mask: mask,
            points,
        }
    })
    .collect();
    assert!(rows[0].points.len() >= 3, "{:?}", rows[0].points);
    // Logits: f32 summation order alone moves SmolLM2's logits by ~7e-5 between a full pass and
    // the same tokens in two cached chunks (no memory involved), and latents from a random weaver
    // amplify that; so logits and per-token log-probs are held to 5e-4 and the loss — what training sees — to 1e-4.
    // Each path is checked against the reference run in its own mode: without gradients the
    // reference is the literal decoder (plain matmuls, head by head), with them the graph path;
    // measured worst logit differences: 3.9e-4 (infer), 1.9e-4 (grad).
    for mode in ["infer", "grad"] {
        let out = if mode == "infer" {
            m.teacher_forced(&rows, &mut Mode::Infer)
        } else {
            m.teacher_forced(&rows, &mut Mode::Grad)
        }
        .unwrap();
        let (lp, at) = m.target_logprobs(&rows, &out).unwrap();
        let lp = lp.to_vec1::<f32>().unwrap();
        let mut worst_lp = 0f32;
        let (mut sum_fast, mut sum_ref) = (0f64, 0f64);
        for (r, row) in rows.iter().enumerate() {
            let n = row.tokens.len();
            let fast = m
                .reasoner
                .logits(&out.hidden.i((r, 0..n)).unwrap())
                .unwrap();
            let want = if mode == "infer" {
                ref_tf_logits(&m, row)
            } else {
                ref_tf_logits_mode(&m, row, &mut Mode::Grad)
            };
            let d = common::max_abs_diff(&fast, &want);
            eprintln!("{mode} row {r}: max logit difference {d:.2e}");
            assert!(d < 5e-4, "{mode} row {r}: {d}");
            let lsm = candle_nn::ops::log_softmax(&want, candle_core::D::Minus1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (j, &(rr, i)) in at.iter().enumerate() {
                if rr == r {
                    let want_lp = lsm[i - 1][row.tokens[i] as usize];
                    worst_lp = worst_lp.max((lp[j] - want_lp).abs());
                    sum_fast += lp[j] as f64;
                    sum_ref += want_lp as f64;
                }
            }
        }
        let dl = ((sum_fast - sum_ref) / at.len() as f64).abs();
        eprintln!("{mode}: loss difference {dl:.2e}, worst answer-token log-prob difference {worst_lp:.2e}");
        assert!(dl < 1e-4, "{mode}: loss differs by {dl}");
        assert!(worst_lp < 5e-4, "{mode}: {worst_lp}");
    }
}

#[test]
fn min_gap_spaces_the_memories_out() {
    let m = tiny_memgen("qwen2", 2, 2, false);
    let prompts = vec![vec![5, 9, 2, 17], vec![1, 2, 3, 4, 5, 6, 7]];
    let run = |gap: usize| {
        let opts = MemoryOptions {
            prompt_memory: true,
            max_inference: 5,
            stop_ids: vec![],
            decision_temperature: None,
            min_gap: gap,
        };
        m.generate(&prompts, &opts, &mut greedy(40), |_, _| {})
            .unwrap()
    };
    let dense = run(0);
    let sparse = run(6);
    let mut spaced = 0;
    for (d, s) in dense.iter().zip(&sparse) {
        let at: Vec<usize> = s.insertions.iter().map(|i| i.token_index).collect();
        for w in at.windows(2) {
            assert!(w[1] >= w[0] + 6, "memories at {at:?}");
        }
        spaced += at.len() - 1;
        // Identical up to the first memory that only the dense run made.
        let first = d
            .insertions
            .iter()
            .enumerate()
            .find(|(i, a)| s.insertions.get(*i) != Some(*a))
            .map(|(_, a)| a.token_index)
            .unwrap_or(d.tokens.len());
        assert_eq!(d.tokens[..first], s.tokens[..first]);
    }
    assert!(
        spaced > 0,
        "the test must exercise spaced inference memories"
    );
    let dense_n: usize = dense.iter().map(|g| g.insertions.len()).sum();
    assert!(dense_n > 0);
}
