//! A literal reference implementation of docs/DESIGN.md, kept as test code: it recomputes the whole
//! prefix for every token and every weaver call, one insertion point at a time. Tests compare the
//! fast paths against it; `benches/memory.rs` times it as the baseline.
#![allow(dead_code)]

use candle_core::{Device, IndexOp, Tensor};
use memgen::backbone::generate::argmax;
use memgen::backbone::{Backbone, Config, Mode, RopeScaling, Stream, Target};
use memgen::memory::generate::Insertion;
use memgen::memory::teacher::TfRow;
use memgen::memory::{Kind, MemGenModel};

pub fn full_forward(bb: &Backbone, x: &Tensor) -> Tensor {
    full_forward_mode(bb, x, &mut Mode::Infer)
}

/// The decoder over one unpadded sequence `x` (n × d). Without gradients it is the literal
/// decoder below (so the new math of every family is checked against an independent
/// implementation); with them, the backbone's own graph path (dropout and gradients live there).
pub fn full_forward_mode(bb: &Backbone, x: &Tensor, mode: &mut Mode) -> Tensor {
    if matches!(mode, Mode::Infer) {
        return literal_forward(bb, x);
    }
    let n = x.dim(0).unwrap();
    let pos = vec![(0..n as u32).collect::<Vec<_>>()];
    let x = Stream::new(x.unsqueeze(0).unwrap(), vec![vec![1u8; n]], pos).unwrap();
    bb.forward(&x, None, mode).unwrap().squeeze(0).unwrap()
}

/// docs/DESIGN.md "Weaving a memory", literally: the whole context, then the K queries.
pub fn ref_weave(m: &MemGenModel, stream: &Tensor, kind: Kind) -> Tensor {
    ref_weave_mode(m, stream, kind, &mut Mode::Infer)
}

pub fn ref_weave_mode(m: &MemGenModel, stream: &Tensor, kind: Kind, mode: &mut Mode) -> Tensor {
    let n = stream.dim(0).unwrap();
    let x = m.weaver.reasoner_to_weaver.forward(stream).unwrap();
    let q = m.weaver.queries(kind).as_tensor().clone();
    let k = q.dim(0).unwrap();
    let h = full_forward_mode(&m.weaver.backbone, &Tensor::cat(&[x, q], 0).unwrap(), mode);
    m.weaver
        .weaver_to_reasoner
        .forward(&h.i(n..n + k).unwrap())
        .unwrap()
}

pub fn embed(m: &MemGenModel, ids: &[u32]) -> Tensor {
    embed_ids(&m.reasoner, ids)
}

/// Token embeddings (n × d) of one sequence.
pub fn embed_ids(bb: &Backbone, ids: &[u32]) -> Tensor {
    bb.embed(&Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
}

pub fn ref_generate(
    m: &MemGenModel,
    prompt: &[u32],
    max_new: usize,
    max_inf: usize,
) -> (Vec<u32>, Vec<Insertion>) {
    let mut stream = embed(m, prompt);
    let mut ins = vec![];
    if m.weaver.k(Kind::Prompt) > 0 {
        let lat = ref_weave(m, &stream, Kind::Prompt);
        stream = Tensor::cat(&[stream, lat], 0).unwrap();
        ins.push(Insertion {
            token_index: 0,
            kind: Kind::Prompt,
        });
    }
    let mut toks: Vec<u32> = vec![];
    loop {
        let h = full_forward(&m.reasoner, &stream);
        let n = h.dim(0).unwrap();
        let logits = m
            .reasoner
            .logits(&h.i(n - 1..n).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let t = argmax(&logits[0]);
        toks.push(t);
        if toks.len() >= max_new {
            break;
        }
        stream = Tensor::cat(&[stream, embed(m, &[t])], 0).unwrap();
        let full: Vec<u32> = prompt.iter().chain(toks.iter()).copied().collect();
        let used = ins.iter().filter(|i| i.kind == Kind::Inference).count();
        if m.weaver.k(Kind::Inference) > 0 && used < max_inf && m.boundary.is_boundary(&full) {
            let go = match &m.trigger {
                None => true,
                Some(tr) => {
                    let pos = vec![(0..full.len() as u32).collect::<Vec<_>>()];
                    let mask = vec![vec![1u8; full.len()]];
                    let ids =
                        Stream::from_ids(&tr.backbone, std::slice::from_ref(&full), mask, pos)
                            .unwrap();
                    let lg = tr.logits(&ids, None, &mut Mode::Infer).unwrap();
                    let last = lg.i((0, full.len() - 1)).unwrap().to_vec1::<f32>().unwrap();
                    argmax(&last) == 1
                }
            };
            if go {
                let lat = ref_weave(m, &stream, Kind::Inference);
                stream = Tensor::cat(&[stream, lat], 0).unwrap();
                ins.push(Insertion {
                    token_index: toks.len(),
                    kind: Kind::Inference,
                });
            }
        }
    }
    (toks, ins)
}

/// Teacher forcing, literally: weave at each point in turn, then one reasoner pass; logits aligned.
pub fn ref_tf_logits(m: &MemGenModel, row: &TfRow) -> Tensor {
    ref_tf_logits_mode(m, row, &mut Mode::Infer)
}

pub fn ref_tf_logits_mode(m: &MemGenModel, row: &TfRow, mode: &mut Mode) -> Tensor {
    let mut parts: Vec<Tensor> = vec![];
    let mut at: Vec<usize> = vec![];
    let mut len = 0;
    for (i, &t) in row.tokens.iter().enumerate() {
        if let Some(p) = row.points.iter().find(|p| p.pos == i) {
            let stream = Tensor::cat(&parts, 0).unwrap();
            let lat = ref_weave_mode(m, &stream, p.kind, mode);
            len += lat.dim(0).unwrap();
            parts.push(lat);
            if len > 0 && m.weaver.k(p.kind) > 0 {
                at[i - 1] = len - 1;
            }
        }
        parts.push(embed(m, &[t]));
        at.push(len);
        len += 1;
    }
    let h = full_forward_mode(&m.reasoner, &Tensor::cat(&parts, 0).unwrap(), mode);
    let idx = Tensor::from_vec(
        at.iter().map(|&x| x as u32).collect::<Vec<_>>(),
        at.len(),
        &Device::Cpu,
    )
    .unwrap();
    m.reasoner
        .logits(&h.index_select(&idx, 0).unwrap())
        .unwrap()
}

// ---------------- the decoder, literally ----------------

/// Rotary inverse frequencies as transformers' rope init functions define them, in f64:
/// `theta^(-2i/d)`, then linear (÷ factor) or Llama 3.1's bands (wavelength above
/// original/low_freq_factor: ÷ factor; below original/high_freq_factor: kept; between: blended).
pub fn literal_inv_freq(c: &Config) -> Vec<f32> {
    let d = c.head_dim as f64;
    (0..c.head_dim / 2)
        .map(|i| {
            let f = 1.0 / c.rope_theta.powf(2.0 * i as f64 / d);
            let f = match &c.rope_scaling {
                None => f,
                Some(RopeScaling::Linear { factor }) => f / factor,
                Some(RopeScaling::Freqs { factors }) => f / factors[i] as f64,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: old,
                }) => {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / high {
                        f
                    } else if wavelen > old / low {
                        f / factor
                    } else {
                        let s = (old / wavelen - low) / (high - low);
                        (1.0 - s) * f / factor + s * f
                    }
                }
            };
            f as f32
        })
        .collect()
}

/// `x / sqrt(mean(x²) + eps) * w` over each row of x (rows × width).
fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(1).unwrap();
    x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
}

/// `x Wᵀ (+ b)` plus the layer's LoRA update `x Aᵀ · scale · Bᵀ` on that target, if any.
fn linear(
    bb: &Backbone,
    li: usize,
    t: Target,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Tensor {
    let mut y = x.matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        y = y.broadcast_add(b).unwrap();
    }
    if let Some(l) = bb.lora.get(li, t) {
        let d = (x.matmul(&l.a.as_tensor().t().unwrap()).unwrap() * l.scale)
            .unwrap()
            .matmul(&l.b.as_tensor().t().unwrap())
            .unwrap();
        y = (y + d).unwrap();
    }
    y
}

/// rotate_half RoPE of one head (n × hd) at positions 0..n.
fn rope(x: &Tensor, inv_freq: &[f32]) -> Tensor {
    let (n, hd) = x.dims2().unwrap();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (n, half), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(sin, (n, half), &Device::Cpu).unwrap();
    let (x1, x2) = (
        x.narrow(1, 0, half).unwrap(),
        x.narrow(1, half, half).unwrap(),
    );
    let r1 = ((&x1 * &cos).unwrap() - (&x2 * &sin).unwrap()).unwrap();
    let r2 = ((&x2 * &cos).unwrap() + (&x1 * &sin).unwrap()).unwrap();
    Tensor::cat(&[r1, r2], 1).unwrap()
}

/// The decoder of any family, written out head by head: RMSNorm, q/k/v (+ biases, + LoRA),
/// Qwen3's per-head q/k norms, RoPE unless the layer is NoPE, causal softmax attention with
/// query head h reading kv head h / (heads / kv_heads), o; RMSNorm, SwiGLU MLP; final RMSNorm.
pub fn literal_forward(bb: &Backbone, x: &Tensor) -> Tensor {
    let c = bb.config();
    let w = &bb.weights;
    let n = x.dim(0).unwrap();
    let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let inv_freq = literal_inv_freq(c);
    let mut causal = vec![0f32; n * n];
    for i in 0..n {
        for j in i + 1..n {
            causal[i * n + j] = f32::NEG_INFINITY;
        }
    }
    let causal = Tensor::from_vec(causal, (n, n), &Device::Cpu).unwrap();
    let mut h = x.clone();
    for (li, lw) in w.layers.iter().enumerate() {
        let a = rms(&h, &lw.input_layernorm, c.rms_norm_eps);
        let q = linear(bb, li, Target::Q, &a, &lw.q_proj, lw.q_bias.as_ref());
        let k = linear(bb, li, Target::K, &a, &lw.k_proj, lw.k_bias.as_ref());
        let v = linear(bb, li, Target::V, &a, &lw.v_proj, lw.v_bias.as_ref());
        let mut heads = vec![];
        for head in 0..nh {
            let kvh = head / (nh / nkv);
            let mut qh = q.narrow(1, head * hd, hd).unwrap();
            let mut kh = k.narrow(1, kvh * hd, hd).unwrap();
            let vh = v.narrow(1, kvh * hd, hd).unwrap();
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                qh = rms(&qh, qn, c.rms_norm_eps);
                kh = rms(&kh, kn, c.rms_norm_eps);
            }
            if c.uses_rope(li) {
                qh = rope(&qh, &inv_freq);
                kh = rope(&kh, &inv_freq);
            }
            let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (hd as f64).sqrt())
                .unwrap()
                .add(&causal)
                .unwrap();
            let p = candle_nn::ops::softmax(&scores, 1).unwrap();
            heads.push(p.matmul(&vh).unwrap());
        }
        let attn = Tensor::cat(&heads, 1).unwrap();
        h = (h + linear(bb, li, Target::O, &attn, &lw.o_proj, None)).unwrap();
        let a = rms(&h, &lw.post_attention_layernorm, c.rms_norm_eps);
        let gate = linear(bb, li, Target::Gate, &a, &lw.gate_proj, None);
        let up = linear(bb, li, Target::Up, &a, &lw.up_proj, None);
        let act = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        h = (h + linear(bb, li, Target::Down, &act, &lw.down_proj, None)).unwrap();
    }
    rms(&h, &w.norm, c.rms_norm_eps)
}
