//! The training loop's data-parallel seam ([`DataParallel`]) over the process group.

use candle_core::{Tensor, Var};

use super::{shard, World};
use crate::training::trainer::DataParallel;

/// This process as one rank of [`super::world`]: its share of every micro-batch
/// ([`shard::share_range`]) and the gradient all-reduce ([`shard::all_reduce_grads`]). With one
/// process every method is the single-process default.
pub(crate) struct Ranks {
    world: &'static World,
    /// The trainable vars, in the loop's order (the shapes of gradients a rank lacks).
    vars: Vec<Var>,
}

impl Ranks {
    pub(crate) fn new(vars: Vec<Var>) -> Ranks {
        Ranks {
            world: super::world(),
            vars,
        }
    }
}

impl DataParallel for Ranks {
    fn size(&self) -> usize {
        self.world.size()
    }

    fn share(&self, n: usize) -> std::ops::Range<usize> {
        shard::share_range(n, self.world.rank(), self.world.size())
    }

    fn reduce_grads(&mut self, grads: &mut [Option<Tensor>], any: bool) -> anyhow::Result<bool> {
        if self.world.size() == 1 {
            return Ok(any);
        }
        let t = std::time::Instant::now();
        shard::all_reduce_grads(self.world, &self.vars, grads)?;
        let any = self.world.any(any)?;
        // scripts/bench-distributed.sh reads these (MEMGEN_LOG=memgen::distributed=debug).
        tracing::debug!(
            seconds = t.elapsed().as_secs_f64(),
            values = self.vars.iter().map(|v| v.elem_count()).sum::<usize>(),
            "gradient all-reduce"
        );
        Ok(any)
    }

    fn sum(&self, values: &mut [f64]) -> anyhow::Result<()> {
        Ok(self.world.all_reduce_sum_f64(values)?)
    }
}
