//! How work is split across ranks, and the one gradient exchange per optimiser step.
//!
//! The rules (docs/DESIGN.md, "Data parallelism"):
//! - **Training batches.** Every rank walks the same global plan (seeded by step, as in one
//!   process), whose micro-batches hold `per_device_train_batch_size × world` items. Rank `r` of
//!   `W` takes items `[⌊n·r/W⌋, ⌊n·(r+1)/W⌋)` of each micro-batch of `n` items ([`share`]): the
//!   per-device count when the batch is full, an even split of a short last batch. For GRPO the
//!   items are prompts, so a prompt's whole group of generations stays on one rank.
//! - **Eval batches.** Whole generation batches go round-robin: batch `b` to rank `b mod W`
//!   ([`owns_batch`]), so each batch holds the same rows and seed as in a one-rank run.
//! - **Gradients.** Each rank scales its loss by its share of the global normaliser (tokens or
//!   sequences of the whole micro-batch), so the summed gradients are the global batch's
//!   ([`all_reduce_grads`]).

use std::ops::Range;

use candle_core::{DType, Tensor, Var};

use super::World;

/// The index range of rank `rank`'s share of `n` items split over `size` ranks.
pub fn share_range(n: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    (n * rank / size)..(n * (rank + 1) / size)
}

/// Rank `rank`'s share of one global micro-batch `items` (see the module rules).
pub fn share<T: Clone>(items: &[T], rank: usize, size: usize) -> Vec<T> {
    items[share_range(items.len(), rank, size)].to_vec()
}

/// Does rank `rank` of `size` run eval batch `batch`?
pub fn owns_batch(batch: usize, rank: usize, size: usize) -> bool {
    batch % size.max(1) == rank
}

/// Sum the gradients of `vars` over all ranks, once per optimiser step: flattened into one f32
/// host buffer (at 1–20 M trainable parameters the copy costs little next to the step), reduced,
/// and put back with each tensor's shape, dtype and device. A var without a gradient on every
/// rank stays `None`, as in one process (AdamW then leaves it alone); one with a gradient on some
/// ranks gets the sum (zeros elsewhere). One process: nothing happens.
pub fn all_reduce_grads(
    world: &World,
    vars: &[Var],
    grads: &mut [Option<Tensor>],
) -> anyhow::Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    anyhow::ensure!(grads.len() == vars.len(), "one gradient slot per var");
    // One presence flag per var first, then every var's elements.
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut buf = Vec::with_capacity(vars.len() + total);
    buf.extend(grads.iter().map(|g| f32::from(u8::from(g.is_some()))));
    for (g, v) in grads.iter().zip(vars) {
        match g {
            Some(g) => buf.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => buf.extend(std::iter::repeat_n(0f32, v.elem_count())),
        }
    }
    world.all_reduce_sum(&mut buf)?;
    let (flags, mut rest) = buf.split_at(vars.len());
    for ((slot, v), &present) in grads.iter_mut().zip(vars).zip(flags) {
        let n = v.elem_count();
        let (mine, tail) = rest.split_at(n);
        rest = tail;
        *slot = if present > 0.0 {
            let dtype = slot.as_ref().map_or(v.dtype(), |g| g.dtype());
            Some(Tensor::from_slice(mine, v.shape(), v.device())?.to_dtype(dtype)?)
        } else {
            None
        };
    }
    Ok(())
}

/// Make every rank start from rank 0's trainable weights (after a fresh initialisation or a
/// resume), so all ranks hold one model even if their starting files or initialisers differed.
pub fn broadcast_vars(world: &World, vars: &[Var]) -> anyhow::Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    for v in vars {
        let mut buf = v
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        world.broadcast(&mut buf, 0)?;
        let t = Tensor::from_slice(&buf, v.shape(), v.device())?.to_dtype(v.dtype())?;
        v.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_item_once_and_fill_full_batches_evenly() {
        for n in 0..9 {
            for size in 1..4 {
                let all: Vec<usize> = (0..size)
                    .flat_map(|r| share(&(0..n).collect::<Vec<_>>(), r, size))
                    .collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} size {size}");
            }
        }
        // A full global micro-batch of 2 ranks × 2 per device: two each, in order.
        assert_eq!(share(&[7, 8, 9, 10], 0, 2), vec![7, 8]);
        assert_eq!(share(&[7, 8, 9, 10], 1, 2), vec![9, 10]);
        assert_eq!(share(&[7], 0, 2), Vec::<i32>::new());
        assert_eq!(share(&[7], 1, 2), vec![7]);
        assert!(owns_batch(4, 0, 2) && owns_batch(5, 1, 2) && owns_batch(5, 0, 1));
    }

    #[test]
    fn one_process_leaves_gradients_alone() {
        let dev = candle_core::Device::Cpu;
        let v = Var::new(&[1f32, 2.0][..], &dev).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25][..], &dev).unwrap();
        let mut grads = vec![Some(g.clone()), None];
        let vars = [v.clone(), v];
        all_reduce_grads(&World::single(), &vars, &mut grads).unwrap();
        assert_eq!(
            grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5, 0.25]
        );
        assert!(grads[1].is_none());
    }
}
