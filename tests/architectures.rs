//! Every backbone family against transformers 4.55.4 on tiny random checkpoints
//! (../shared/fixtures/tiny, bf16 weights upcast exactly to f32): the logits of the 20 best ids at
//! every position and the full last row within 2e-4, by the fused inference path and by the graph
//! (training) path and by the memory tests' literal reference decoder, and greedy continuations
//! (KV-cached) token for token.

mod common;
mod reference;

use candle_core::{DType, Device, IndexOp, Tensor};
use memgen::backbone::generate::{generate, Sampler, SamplingConfig};
use memgen::backbone::model::{positions_from_mask, positions_tensor};
use memgen::backbone::{self, Arch, LoadedModel, Mode};

const TOL: f32 = 2e-4;

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("a list of logits")
        .iter()
        .map(|x| x.as_f64().expect("a logit") as f32)
        .collect()
}

/// Logits (L × vocab) of one unpadded sequence, by the given mode's path.
fn logits(m: &LoadedModel, ids: &[u32], mode: &mut Mode) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let mask = vec![vec![1u8; ids.len()]];
    let pos = positions_tensor(&positions_from_mask(&mask, &[0]), &dev).unwrap();
    let x = m
        .backbone
        .embed(&Tensor::from_vec(ids.to_vec(), (1, ids.len()), &dev).unwrap())
        .unwrap();
    let h = m.backbone.forward(&x, &mask, &pos, None, mode).unwrap();
    let lg = match mode {
        Mode::Infer => m.backbone.logits_infer(&h),
        _ => m.backbone.logits(&h),
    };
    lg.unwrap().i(0).unwrap().to_vec2::<f32>().unwrap()
}

/// Worst |ours − transformers| over the top-20 ids of every position, and over the last row.
fn compare(name: &str, kind: &str, ours: &[Vec<f32>], p: &serde_json::Value) -> (f32, f32) {
    let topk = p["topk"].as_array().expect("topk");
    assert_eq!(
        ours.len(),
        topk.len(),
        "{name}: one top-k entry per position"
    );
    let mut worst_topk = 0f32;
    for (pos, (row, theirs)) in ours.iter().zip(topk).enumerate() {
        let (ids, want) = (u32s(&theirs["ids"]), f32s(&theirs["logits"]));
        for (&id, &l) in ids.iter().zip(&want) {
            let d = (row[id as usize] - l).abs();
            worst_topk = worst_topk.max(d);
            assert!(
                d <= TOL,
                "{name} {kind} pos {pos} id {id}: {} vs {l}",
                row[id as usize]
            );
        }
        // No id outside their top 20 may beat their best one.
        let best = row.iter().copied().fold(f32::MIN, f32::max);
        assert!(
            best <= want[0] + TOL,
            "{name} {kind} pos {pos}: our best logit {best} exceeds theirs {}",
            want[0]
        );
    }
    let last = f32s(&p["last_logits"]);
    let row = ours.last().unwrap();
    assert_eq!(row.len(), last.len(), "{name}: vocabulary size");
    let worst_last = row
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst_last <= TOL,
        "{name} {kind}: last row off by {worst_last}"
    );
    (worst_topk, worst_last)
}

fn check(name: &str, arch: Arch) {
    let dir = common::shared().join("fixtures/tiny").join(name);
    assert!(
        dir.join("model.safetensors").is_file(),
        "fixture {} is missing",
        dir.display()
    );
    let fx = common::fixture(&format!("tiny/{name}.dev.json"));
    let m = backbone::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.backbone.config().arch, arch, "{name}: architecture");
    let prompts = fx["prompts"].as_array().expect("prompts");
    assert!(!prompts.is_empty(), "{name}: no prompts in the fixture");
    let (mut infer, mut graph, mut literal) = ((0f32, 0f32), (0f32, 0f32), (0f32, 0f32));
    for p in prompts {
        let ids = u32s(&p["input_ids"]);
        let text = p["text"].as_str().unwrap();
        assert_eq!(m.tokenizer.encode(text).unwrap(), ids, "{name}: token ids");
        let (t, l) = compare(name, "infer", &logits(&m, &ids, &mut Mode::Infer), p);
        infer = (infer.0.max(t), infer.1.max(l));
        let (t, l) = compare(name, "graph", &logits(&m, &ids, &mut Mode::Grad), p);
        graph = (graph.0.max(t), graph.1.max(l));
        // The memory tests' yardstick, the literal decoder, must itself be right.
        let x = reference::embed_ids(&m.backbone, &ids);
        let h = reference::literal_forward(&m.backbone, &x);
        let lit = m.backbone.logits(&h).unwrap().to_vec2::<f32>().unwrap();
        let (t, l) = compare(name, "literal", &lit, p);
        literal = (literal.0.max(t), literal.1.max(l));
        let want = u32s(&p["greedy"]);
        let mut s = Sampler::new(SamplingConfig {
            max_new_tokens: want.len(),
            ..Default::default()
        });
        let out = generate(
            &m.backbone,
            &[ids],
            m.tokenizer.pad_id,
            &[],
            &mut s,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(out[0].tokens, want, "{name}: greedy continuation");
    }
    eprintln!(
        "{name}: max |Δlogit| infer top-20 {:.2e} last row {:.2e}; graph top-20 {:.2e} last row {:.2e}; literal reference top-20 {:.2e} last row {:.2e}; greedy equal ({} prompts)",
        infer.0,
        infer.1,
        graph.0,
        graph.1,
        literal.0,
        literal.1,
        prompts.len()
    );
}

#[test]
fn qwen3_tied_matches_transformers() {
    check("qwen3", Arch::Qwen3);
}

#[test]
fn qwen3_untied_matches_transformers() {
    check("qwen3-untied", Arch::Qwen3);
}

#[test]
fn smollm3_matches_transformers() {
    check("smollm3", Arch::SmolLM3);
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("llama3", Arch::Llama);
}

#[test]
fn qwen2_tied_matches_transformers() {
    check("qwen2-tied", Arch::Qwen2);
}

/// The fixtures really exercise what differs: without the llama3 rescaling, with RoPE on every
/// SmolLM3 layer, or without Qwen3's q/k norms, the logits move far outside the tolerance.
#[test]
fn dropping_a_family_feature_breaks_parity() {
    use memgen::backbone::{Backbone, BaseWeights};
    let cases: [(&str, fn(&mut BaseWeights)); 3] = [
        ("llama3", |w| w.config.rope_scaling = None),
        ("smollm3", |w| w.config.nope_layers.clear()),
        ("qwen3", |w| {
            w.config.qk_norm = false;
            for l in &mut w.layers {
                (l.q_norm, l.k_norm) = (None, None);
            }
        }),
    ];
    for (name, strip) in cases {
        let dir = common::shared().join("fixtures/tiny").join(name);
        let fx = common::fixture(&format!("tiny/{name}.dev.json"));
        let p = &fx["prompts"].as_array().expect("prompts")[0];
        let ids = u32s(&p["input_ids"]);
        let mut w = BaseWeights::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        strip(&mut w);
        let mut m = backbone::load(&dir, DType::F32, &Device::Cpu).unwrap();
        m.backbone = Backbone::new(std::sync::Arc::new(w));
        let last = f32s(&p["last_logits"]);
        let ours = logits(&m, &ids, &mut Mode::Infer);
        let off = ours
            .last()
            .unwrap()
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            off > 100.0 * TOL,
            "{name}: stripped model still within {off}"
        );
    }
}

/// Linear rope scaling (every inverse frequency divided by the factor) as the literal decoder
/// computes it, on the llama3 fixture's weights over its longest prompt.
#[test]
fn linear_rope_scaling_matches_the_literal_decoder() {
    use memgen::backbone::{Backbone, BaseWeights, RopeScaling};
    let dir = common::shared().join("fixtures/tiny/llama3");
    let mut w = BaseWeights::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    w.config.rope_scaling = Some(RopeScaling::Linear { factor: 4.0 });
    let plain = memgen::backbone::Config {
        rope_scaling: None,
        ..w.config.clone()
    };
    for (a, b) in w.config.inv_freq().iter().zip(plain.inv_freq()) {
        assert!((a * 4.0 - b).abs() <= 1e-6 * b, "{a} * 4 vs {b}");
    }
    let bb = Backbone::new(std::sync::Arc::new(w));
    let fx = common::fixture("tiny/llama3.dev.json");
    let ids = fx["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| u32s(&p["input_ids"]))
        .max_by_key(|v| v.len())
        .expect("a prompt");
    let x = reference::embed_ids(&bb, &ids);
    let want = reference::literal_forward(&bb, &x);
    let got = reference::full_forward_mode(&bb, &x, &mut Mode::Grad);
    let fast = bb.forward(
        &x.unsqueeze(0).unwrap(),
        &[vec![1u8; ids.len()]],
        &positions_tensor(
            &positions_from_mask(&[vec![1u8; ids.len()]], &[0]),
            &Device::Cpu,
        )
        .unwrap(),
        None,
        &mut Mode::Infer,
    );
    let fast = fast.unwrap().squeeze(0).unwrap();
    for (what, h) in [("graph", &got), ("infer", &fast)] {
        let d = common::max_abs_diff(&bb.logits(h).unwrap(), &bb.logits(&want).unwrap());
        assert!(d < 1e-4, "{what}: linear-scaled logits differ by {d}");
    }
}
