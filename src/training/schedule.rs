//! Learning-rate schedules with Hugging Face semantics: `warmup_steps = ceil(warmup_ratio ·
//! total)`, a linear ramp from 0, then cosine / linear decay to 0 or a constant. The rate used for
//! optimiser step `s` (0-based) is `lr · factor(s)`, as `get_*_schedule_with_warmup` gives it.

use crate::config::LrScheduler;

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: LrScheduler,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn new(kind: LrScheduler, base_lr: f64, warmup_ratio: f64, total_steps: usize) -> Schedule {
        Schedule {
            kind,
            base_lr,
            warmup_steps: (warmup_ratio * total_steps as f64).ceil() as usize,
            total_steps,
        }
    }

    pub fn factor(&self, step: usize) -> f64 {
        let (w, n) = (self.warmup_steps, self.total_steps);
        if self.kind != LrScheduler::Constant && step < w {
            return step as f64 / w.max(1) as f64;
        }
        match self.kind {
            LrScheduler::Cosine => {
                let progress = (step - w) as f64 / (n.saturating_sub(w)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            LrScheduler::Linear => {
                ((n as f64 - step as f64) / (n.saturating_sub(w)).max(1) as f64).max(0.0)
            }
            LrScheduler::Constant | LrScheduler::ConstantWithWarmup => 1.0,
        }
    }

    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}
