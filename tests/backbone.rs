//! The decoder's machinery on tiny random models of every family (llama, qwen2, qwen3, smollm3,
//! llama with llama3 rope scaling): padding, positions, masks,
//! KV-cache equivalence, LoRA at zero, both forward modes, and finite-difference gradients.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::{max_abs_diff, tiny};
use memgen::backbone::generate::{argmax, generate, Sampler, SamplingConfig};
use memgen::backbone::stream::positions_from_mask;
use memgen::backbone::{Arch, Backbone, LoraConfig, LoraSet, Mode, Side, Stream};

fn hidden(m: &Backbone, rows: &[Vec<u32>], mode: &mut Mode) -> (Tensor, Vec<Vec<u8>>) {
    let x = Stream::tokens(m, rows, 0, Side::Left).unwrap();
    (m.forward(&x, None, mode).unwrap(), x.mask().to_vec())
}

/// Token ids with an explicit mask, positions by Hugging Face's rule.
fn stream(m: &Backbone, ids: &[Vec<u32>], mask: &[Vec<u8>]) -> Stream {
    let pos = positions_from_mask(mask, &vec![0; ids.len()]);
    Stream::from_ids(m, ids, mask.to_vec(), pos).unwrap()
}

#[test]
fn left_padding_does_not_change_real_positions() {
    for arch in common::FAMILIES {
        let m = common::tiny_family(arch, 1);
        let short = vec![5, 9, 2, 17];
        let long = vec![3, 1, 4, 1, 5, 9, 2, 6];
        let (batch, _) = hidden(&m, &[short.clone(), long.clone()], &mut Mode::Infer);
        let (alone, _) = hidden(&m, std::slice::from_ref(&short), &mut Mode::Infer);
        let padded_row = batch.i((0, 4.., ..)).unwrap();
        let d = max_abs_diff(&padded_row, &alone.i(0).unwrap());
        assert!(d < 1e-5, "{arch}: padded row differs by {d}");
        let (alone_long, _) = hidden(&m, &[long], &mut Mode::Infer);
        assert!(max_abs_diff(&batch.i(1).unwrap(), &alone_long.i(0).unwrap()) < 1e-5);
    }
}

#[test]
fn positions_follow_the_mask() {
    let mask = vec![vec![0, 0, 1, 1, 1], vec![1, 1, 1, 1, 1]];
    assert_eq!(
        positions_from_mask(&mask, &[0, 0]),
        vec![vec![0, 0, 0, 1, 2], vec![0, 1, 2, 3, 4]]
    );
    assert_eq!(
        positions_from_mask(&[vec![1, 0, 1]], &[7]),
        vec![vec![7, 0, 8]]
    );
}

#[test]
fn a_mask_hole_hides_that_token() {
    // Masking a token must make the output independent of its value.
    for arch in common::FAMILIES {
        let m = common::tiny_family(arch, 2);
        let run = |tok: u32| {
            let x = stream(&m, &[vec![4, tok, 8, 15]], &[vec![1, 0, 1, 1]]);
            m.forward(&x, None, &mut Mode::Infer)
                .unwrap()
                .i((0, 2.., ..))
                .unwrap()
        };
        assert!(max_abs_diff(&run(1), &run(30)) < 1e-6);
    }
}

#[test]
fn cached_chunks_equal_one_full_pass() {
    for arch in common::FAMILIES {
        let m = common::tiny_family(arch, 3);
        let rows = vec![
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            vec![0, 0, 0, 11, 12, 13, 14, 15, 16, 17],
        ];
        let mask = vec![vec![1u8; 10], [vec![0u8; 3], vec![1u8; 7]].concat()];
        let x = stream(&m, &rows, &mask);
        let full = m.forward(&x, None, &mut Mode::Infer).unwrap();
        let mut cache = m.new_cache(2);
        let mut parts = vec![];
        for (s, e) in [(0, 4), (4, 5), (5, 10)] {
            let xm = x.embeds().narrow(1, s, e - s).unwrap();
            let mm: Vec<Vec<u8>> = mask.iter().map(|r| r[s..e].to_vec()).collect();
            let pm: Vec<Vec<u32>> = x.positions().iter().map(|r| r[s..e].to_vec()).collect();
            // A chunk continuing the cache counts on from the real positions it holds.
            let chunk = Stream::continuing(xm, mm, Some(&cache)).unwrap();
            assert_eq!(chunk.positions(), &pm[..]);
            parts.push(
                m.forward(&chunk, Some(&mut cache), &mut Mode::Infer)
                    .unwrap(),
            );
        }
        let chunked = Tensor::cat(&parts, 1).unwrap();
        let d = max_abs_diff(
            &full.i((.., 3.., ..)).unwrap(),
            &chunked.i((.., 3.., ..)).unwrap(),
        );
        assert!(d < 1e-5, "{arch}: {d}");
        assert_eq!(cache.len(), 10);
    }
}

/// Greedy decoding that recomputes the whole sequence every step (no cache).
fn greedy_no_cache(m: &Backbone, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![vec![]; prompts.len()];
    for _ in 0..n {
        let (h, _) = hidden(m, &seqs, &mut Mode::Infer);
        let l = h.dim(1).unwrap();
        let logits = m
            .logits(&h.i((.., l - 1, ..)).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in logits.iter().enumerate() {
            let t = argmax(row);
            seqs[r].push(t);
            out[r].push(t);
        }
    }
    out
}

#[test]
fn cached_generation_equals_recomputing() {
    for arch in common::FAMILIES {
        let m = common::tiny_family(arch, 4);
        let prompts = vec![vec![7, 3, 9], vec![1, 2, 3, 4, 5, 6, 7], vec![42]];
        let mut s = Sampler::new(SamplingConfig {
            max_new_tokens: 12,
            ..Default::default()
        });
        let got = generate(&m, &prompts, 0, &[], &mut s, |_, _| {}).unwrap();
        let want = greedy_no_cache(&m, &prompts, 12);
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.tokens, w, "{arch}");
        }
    }
}

#[test]
fn generation_stops_on_eos_and_sampling_is_seeded() {
    let m = tiny(Arch::Qwen2, 5);
    let prompts = vec![vec![7, 3, 9], vec![2, 2]];
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 20,
        max_new_tokens: 30,
        seed: 7,
    };
    let a = generate(
        &m,
        &prompts,
        0,
        &[],
        &mut Sampler::new(cfg.clone()),
        |_, _| {},
    )
    .unwrap();
    let b = generate(
        &m,
        &prompts,
        0,
        &[],
        &mut Sampler::new(cfg.clone()),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(a, b, "same seed, same samples");
    let c = generate(
        &m,
        &prompts,
        0,
        &[],
        &mut Sampler::new(SamplingConfig {
            seed: 8,
            ..cfg.clone()
        }),
        |_, _| {},
    )
    .unwrap();
    assert_ne!(a, c, "another seed, other samples");
    // Stop on the first token that row 0 produced at step 3.
    let stop = a[0].tokens[3];
    let d = generate(&m, &prompts, 0, &[stop], &mut Sampler::new(cfg), |_, _| {}).unwrap();
    let first = a[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(d[0].tokens, a[0].tokens[..=first].to_vec());
    assert!(d[0].stopped);
}

#[test]
fn lora_at_zero_equals_base_and_grad_mode_equals_infer() {
    for arch in common::FAMILIES {
        let base = common::tiny_family(arch, 6);
        let mut with = base.clone();
        let cfg = LoraConfig {
            target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            ..Default::default()
        };
        with.lora = LoraSet::new(&cfg, |t| base.proj_dims(t), 2, 0, &Device::Cpu).unwrap();
        let rows = vec![vec![1, 5, 9, 13], vec![0, 2, 4, 6]];
        let (a, _) = hidden(&base, &rows, &mut Mode::Infer);
        let (b, _) = hidden(&with, &rows, &mut Mode::Infer);
        assert!(
            max_abs_diff(&a, &b) < 1e-6,
            "{arch}: zero-B LoRA changed the output"
        );
        let (c, _) = hidden(&with, &rows, &mut Mode::Grad);
        assert!(
            max_abs_diff(&a, &c) < 1e-5,
            "{arch}: grad-mode ops differ from fused ones"
        );
        // A non-zero B must change it.
        for (_, _, l) in with.lora.iter() {
            l.b.set(&Tensor::ones(l.b.shape(), DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        }
        let (d, _) = hidden(&with, &rows, &mut Mode::Infer);
        assert!(max_abs_diff(&a, &d) > 1e-3);
    }
}

#[test]
fn fused_inference_with_adapters_equals_the_graph_path() {
    // Adapters on every kind of projection, with non-zero B: inference runs one product per
    // fused matrix (q/k/v, gate/up) and adds the adapters' updates to their columns, on the
    // weight-streaming kernel for a few rows and on the packed weights past 48 rows. The graph
    // path (`Mode::Grad`) computes each projection separately.
    use rand::{Rng, SeedableRng};
    for arch in common::FAMILIES {
        let base = common::tiny_family(arch, 8);
        let mut with = base.clone();
        let cfg = LoraConfig {
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        };
        with.lora = LoraSet::new(&cfg, |t| base.proj_dims(t), 2, 0, &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for (_, _, l) in with.lora.iter() {
            let v: Vec<f32> = (0..l.b.elem_count())
                .map(|_| rng.random_range(-0.2..0.2))
                .collect();
            l.b.set(&Tensor::from_vec(v, l.b.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let few = vec![vec![1, 5, 9, 13], vec![0, 2, 4]];
        let many: Vec<Vec<u32>> = (0..3)
            .map(|r| {
                (0..30 + 7 * r)
                    .map(|i| ((i * 7 + r * 3) % 60) as u32 + 1)
                    .collect()
            })
            .collect();
        for rows in [few, many] {
            // Padding positions' outputs are never read (and differ between the paths).
            let real = |h: Tensor, mask: &[Vec<u8>]| {
                let idx: Vec<u32> = mask
                    .iter()
                    .flatten()
                    .enumerate()
                    .filter(|(_, &m)| m == 1)
                    .map(|(i, _)| i as u32)
                    .collect();
                let d = h.dim(2).unwrap();
                let n = idx.len();
                let flat = h.reshape(((), d)).unwrap();
                flat.index_select(&Tensor::from_vec(idx, n, &Device::Cpu).unwrap(), 0)
                    .unwrap()
            };
            let (plain, mask) = hidden(&base, &rows, &mut Mode::Infer);
            let plain = real(plain, &mask);
            let a = real(hidden(&with, &rows, &mut Mode::Infer).0, &mask);
            let b = real(hidden(&with, &rows, &mut Mode::Grad).0, &mask);
            assert!(
                max_abs_diff(&a, &b) < 1e-4,
                "{arch}, {} rows: fused inference differs from the graph path by {}",
                rows.iter().map(Vec::len).sum::<usize>(),
                max_abs_diff(&a, &b)
            );
            assert!(max_abs_diff(&a, &plain) > 1e-3, "the adapters must matter");
        }
    }
}

/// A smooth scalar loss of the model's logits at the real (unpadded) positions, as training uses.
fn loss(m: &Backbone, x: &Tensor, mask: &[Vec<u8>], pos: &[Vec<u32>]) -> Tensor {
    let x = Stream::new(x.clone(), mask.to_vec(), pos.to_vec()).unwrap();
    let h = m.forward(&x, None, &mut Mode::Grad).unwrap();
    let logits = m.logits(&h).unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
    let w: Vec<f32> = mask.concat().iter().map(|&v| v as f32).collect();
    let w = Tensor::from_vec(w, (mask.len(), mask[0].len()), &Device::Cpu).unwrap();
    (lsm.i((.., .., 3)).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn gradients_reach_lora_and_input_embeddings() {
    for arch in common::FAMILIES {
        let mut m = common::tiny_family(arch, 7);
        let cfg = LoraConfig {
            lora_dropout: 0.0,
            ..Default::default()
        };
        m.lora = LoraSet::new(&cfg, |t| m.proj_dims(t), 2, 1, &Device::Cpu).unwrap();
        // Non-zero B so that the gradient w.r.t. A is not trivially zero.
        for (_, _, l) in m.lora.iter() {
            let r = Tensor::randn(0f32, 0.3, l.b.shape(), &Device::Cpu).unwrap();
            l.b.set(&r).unwrap();
        }
        let rows = vec![vec![0, 3, 5, 8], vec![9, 1, 2, 6]];
        let mask = vec![vec![0, 1, 1, 1], vec![1, 1, 1, 1]];
        let tokens = stream(&m, &rows, &mask);
        let pos = tokens.positions();
        // Input embeddings as a trainable variable (as latents are).
        let x = Var::from_tensor(tokens.embeds()).unwrap();
        let l = loss(&m, x.as_tensor(), &mask, pos);
        let grads = l.backward().unwrap();
        let first = m.lora.iter().next().unwrap().2.clone();
        let last = m.lora.iter().last().unwrap().2.clone();
        let f = || {
            loss(&m, x.as_tensor(), &mask, pos)
                .to_scalar::<f32>()
                .unwrap()
        };
        common::fd_check(
            "lora A",
            &first.a,
            grads.get(&first.a).expect("grad for A"),
            &f,
            &[0, 1, 2, 3],
            2e-2,
            2e-3,
        );
        common::fd_check(
            "lora B",
            &last.b,
            grads.get(&last.b).expect("grad for B"),
            &f,
            &[0, 1, 2, 3],
            2e-2,
            2e-3,
        );
        common::fd_check(
            "input embeddings",
            &x,
            grads.get(&x).expect("grad for x"),
            &f,
            &[0, 1, 2, 3],
            2e-2,
            2e-3,
        );
        // The frozen weights got no gradient.
        assert!(grads.get(&m.weights.layers[0].q_proj).is_none());
    }
}

#[test]
fn kv_cache_truncate_and_select_rows() {
    let m = tiny(Arch::Llama, 8);
    let rows = vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]];
    let mut cache = m.new_cache(2);
    m.forward(
        &stream(&m, &rows, &vec![vec![1u8; 4]; 2]),
        Some(&mut cache),
        &mut Mode::Infer,
    )
    .unwrap();
    // Extra junk positions, then truncate: the next step must equal a fresh continuation.
    let ones = |n: usize| vec![vec![1u8; n]; 2];
    let junk = Stream::continuing(
        stream(&m, &[vec![9, 9], vec![9, 9]], &ones(2))
            .embeds()
            .clone(),
        ones(2),
        Some(&cache),
    )
    .unwrap();
    assert_eq!(junk.positions(), &[vec![4, 5], vec![4, 5]]);
    let mut c2 = cache.clone();
    m.forward(&junk, Some(&mut c2), &mut Mode::Infer).unwrap();
    c2.truncate(4);
    let next =
        Stream::from_ids(&m, &[vec![11], vec![12]], ones(1), vec![vec![4], vec![4]]).unwrap();
    let a = m
        .forward(&next, Some(&mut cache.clone()), &mut Mode::Infer)
        .unwrap();
    let b = m.forward(&next, Some(&mut c2), &mut Mode::Infer).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
    // Selecting row 1 alone (of the cache and of the stream) gives row 1's result.
    let mut c3 = cache.clone();
    c3.select_rows(&[1]).unwrap();
    let c = m
        .forward(
            &next.select_rows(&[1]).unwrap(),
            Some(&mut c3),
            &mut Mode::Infer,
        )
        .unwrap();
    assert!(max_abs_diff(&a.i(1..2).unwrap(), &c) < 1e-6);
}
