//! Every backbone family against transformers 4.55.4 on tiny random checkpoints
//! (../shared/fixtures/tiny, bf16 weights upcast exactly to f32): the logits of the 20 best ids at
//! every position and the full last row within 2e-4, by the fused inference path and by the graph
//! (training) path and by the memory tests' literal reference decoder, and greedy continuations
//! (KV-cached) token for token.

mod common;
mod reference;

use common::sequence_logits as logits;

use candle_core::{DType, Device, Tensor};
use memgen::backbone::generate::{generate, Sampler, SamplingConfig};
use memgen::backbone::{self, Arch, Mode, Stream};

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
    type Strip = fn(&mut BaseWeights);
    let cases: [(&str, Strip); 3] = [
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
    let one = Stream::from_mask(x.unsqueeze(0).unwrap(), vec![vec![1u8; ids.len()]], &[0]);
    let fast = bb.forward(&one.unwrap(), None, &mut Mode::Infer);
    let fast = fast.unwrap().squeeze(0).unwrap();
    for (what, h) in [("graph", &got), ("infer", &fast)] {
        let d = common::max_abs_diff(&bb.logits(h).unwrap(), &bb.logits(&want).unwrap());
        assert!(d < 1e-4, "{what}: linear-scaled logits differ by {d}");
    }
}

/// The GGUF llama.cpp would write for `w` (f32 tensors, llama.cpp's names and metadata): Q/K
/// rows permuted for llama-converted families, llama3 rope scaling as `rope_freqs.weight`
/// (convert_hf_to_gguf's per-frequency factors), Qwen3's norms as `attn_q_norm`/`attn_k_norm`.
/// `extra` metadata is appended (for files that ask for what memgen does not implement).
fn write_gguf(
    w: &memgen::backbone::BaseWeights,
    path: &std::path::Path,
    extra: Vec<(String, candle_core::quantized::gguf_file::Value)>,
) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use memgen::backbone::RopeScaling;
    let c = &w.config;
    let arch = c.arch.hf_names().0;
    let permute = matches!(c.arch, Arch::Llama | Arch::SmolLM3);
    let hd = c.head_dim;
    let perm = |t: &Tensor, heads: usize| -> Tensor {
        let (out, inp) = t.dims2().unwrap();
        t.reshape((heads, 2, hd / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap()
    };
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), w.embed_tokens.clone()),
        ("output_norm.weight".into(), w.norm.clone()),
    ];
    if !c.tie_word_embeddings {
        tensors.push(("output.weight".into(), w.lm_head.clone()));
    }
    if let Some(RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: old,
    }) = &c.rope_scaling
    {
        let factors: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let f = 1.0 / c.rope_theta.powf(2.0 * i as f64 / hd as f64);
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    *factor as f32
                } else {
                    let s = (old / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - s) / factor + s)) as f32
                }
            })
            .collect();
        let n = factors.len();
        tensors.push((
            "rope_freqs.weight".into(),
            Tensor::from_vec(factors, n, &Device::Cpu).unwrap(),
        ));
    }
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("blk.{i}");
        let (q, k) = if permute {
            (
                perm(&l.q_proj, c.num_attention_heads),
                perm(&l.k_proj, c.num_key_value_heads),
            )
        } else {
            (l.q_proj.clone(), l.k_proj.clone())
        };
        let mut put =
            |n: &str, t: &Tensor| tensors.push((format!("{p}.{n}"), t.contiguous().unwrap()));
        put("attn_q.weight", &q);
        put("attn_k.weight", &k);
        put("attn_v.weight", &l.v_proj);
        put("attn_output.weight", &l.o_proj);
        for (n, b) in [
            ("attn_q", &l.q_bias),
            ("attn_k", &l.k_bias),
            ("attn_v", &l.v_bias),
        ] {
            if let Some(b) = b {
                put(&format!("{n}.bias"), b);
            }
        }
        for (n, t) in [("attn_q_norm", &l.q_norm), ("attn_k_norm", &l.k_norm)] {
            if let Some(t) = t {
                put(&format!("{n}.weight"), t);
            }
        }
        put("ffn_gate.weight", &l.gate_proj);
        put("ffn_up.weight", &l.up_proj);
        put("ffn_down.weight", &l.down_proj);
        put("attn_norm.weight", &l.input_layernorm);
        put("ffn_norm.weight", &l.post_attention_layernorm);
    }
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            // A fresh buffer: the fused projections' views start at an offset, which
            // QTensor::quantize does not honour.
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
            (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let u = |x: usize| gguf_file::Value::U32(x as u32);
    let md: Vec<(String, gguf_file::Value)> = vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(arch.into()),
        ),
        (format!("{arch}.embedding_length"), u(c.hidden_size)),
        (format!("{arch}.block_count"), u(c.num_hidden_layers)),
        (
            format!("{arch}.feed_forward_length"),
            u(c.intermediate_size),
        ),
        (
            format!("{arch}.attention.head_count"),
            u(c.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u(c.num_key_value_heads),
        ),
        (format!("{arch}.attention.key_length"), u(hd)),
        (format!("{arch}.rope.dimension_count"), u(hd)),
        (
            format!("{arch}.context_length"),
            u(c.max_position_embeddings),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(c.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            gguf_file::Value::F32(c.rope_theta as f32),
        ),
    ];
    let md: Vec<(String, gguf_file::Value)> = md.into_iter().chain(extra).collect();
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &q_refs).unwrap();
}

/// Each family loads from a GGUF written with llama.cpp's conventions and matches transformers
/// as the Hugging Face directory does (SmolLM3's NoPE layout comes from llama.cpp's fixed
/// interval of 4, which is the fixture's `no_rope_layers`).
#[test]
fn gguf_of_each_family_matches_transformers() {
    use memgen::backbone::{Backbone, BaseWeights};
    for name in ["qwen3", "qwen3-untied", "smollm3", "llama3", "qwen2-tied"] {
        let dir = common::shared().join("fixtures/tiny").join(name);
        let hf = BaseWeights::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(format!("{name}.gguf"));
        write_gguf(&hf, &path, vec![]);
        let g = BaseWeights::from_gguf(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(g.config.arch, hf.config.arch, "{name}");
        assert_eq!(g.config.nope_layers, hf.config.nope_layers, "{name}");
        assert_eq!(g.config.qk_norm, hf.config.qk_norm, "{name}");
        assert_eq!(
            g.config.rope_scaling.is_some(),
            hf.config.rope_scaling.is_some(),
            "{name}"
        );
        let mut m = backbone::load(&dir, DType::F32, &Device::Cpu).unwrap();
        m.backbone = Backbone::new(std::sync::Arc::new(g));
        let fx = common::fixture(&format!("tiny/{name}.dev.json"));
        let mut worst = (0f32, 0f32);
        for p in fx["prompts"].as_array().expect("prompts") {
            let ids = u32s(&p["input_ids"]);
            let (t, l) = compare(name, "gguf", &logits(&m, &ids, &mut Mode::Infer), p);
            worst = (worst.0.max(t), worst.1.max(l));
        }
        eprintln!(
            "{name} from GGUF: max |Δlogit| top-20 {:.2e} last row {:.2e}",
            worst.0, worst.1
        );
    }
}

/// GGUF metadata asking for math memgen does not implement is refused in one line naming the key.
#[test]
fn gguf_with_unsupported_math_is_refused_naming_the_key() {
    use candle_core::quantized::gguf_file::Value;
    use memgen::backbone::BaseWeights;
    let dir = common::shared().join("fixtures/tiny/qwen3");
    let hf = BaseWeights::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let cases = [
        ("qwen3.rope.scaling.type", Value::String("yarn".into())),
        ("qwen3.attention.sliding_window", Value::U32(16)),
        ("qwen3.expert_count", Value::U32(8)),
    ];
    for (key, value) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.gguf");
        write_gguf(&hf, &path, vec![(key.to_string(), value)]);
        let err = BaseWeights::from_gguf(&path, DType::F32, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{key}: loaded"))
            .to_string();
        assert!(
            err.contains(key) && err.contains("m.gguf") && !err.contains('\n'),
            "{key}: {err:?}"
        );
    }
    // Partial rotary: a rope dimension below head_dim (the later duplicate key wins on read).
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    write_gguf(
        &hf,
        &path,
        vec![("qwen3.rope.dimension_count".into(), Value::U32(8))],
    );
    let err = BaseWeights::from_gguf(&path, DType::F32, &Device::Cpu)
        .expect_err("partial rotary loaded")
        .to_string();
    assert!(err.contains("rope.dimension_count"), "{err}");
}
