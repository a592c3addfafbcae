//! A literal reference implementation of docs/DESIGN.md, kept as test code: it recomputes the whole
//! prefix for every token and every weaver call, one insertion point at a time. Tests compare the
//! fast paths against it; `benches/memory.rs` times it as the baseline.
#![allow(dead_code)]

use candle_core::{Device, IndexOp, Tensor};
use memgen::backbone::generate::argmax;
use memgen::backbone::{Backbone, Mode};
use memgen::memory::generate::Insertion;
use memgen::memory::teacher::TfRow;
use memgen::memory::{Kind, MemGenModel};

pub fn full_forward(bb: &Backbone, x: &Tensor) -> Tensor {
    full_forward_mode(bb, x, &mut Mode::Infer)
}

pub fn full_forward_mode(bb: &Backbone, x: &Tensor, mode: &mut Mode) -> Tensor {
    let n = x.dim(0).unwrap();
    let pos = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), (1, n), &Device::Cpu).unwrap();
    bb.forward(&x.unsqueeze(0).unwrap(), &[vec![1u8; n]], &pos, None, mode)
        .unwrap()
        .squeeze(0)
        .unwrap()
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
    m.reasoner
        .embed(&Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap())
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
                    let ids =
                        Tensor::from_vec(full.clone(), (1, full.len()), &Device::Cpu).unwrap();
                    let pos = Tensor::from_vec(
                        (0..full.len() as u32).collect::<Vec<_>>(),
                        (1, full.len()),
                        &Device::Cpu,
                    )
                    .unwrap();
                    let lg = tr
                        .logits(&ids, &[vec![1u8; full.len()]], &pos, None, &mut Mode::Infer)
                        .unwrap();
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
