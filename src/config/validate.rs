//! Rules that relate several keys, checked once the whole config is read. A rule about one value
//! (a range, a closed set of spellings) is part of how that value is read instead
//! (`checked.rs`, `enums.rs`), so its error names the key.

use super::RunConfig;

impl RunConfig {
    /// Contradictions between settings, before any work starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        let r = &self.run;
        for (name, g) in [
            ("run.weaver.grpo", &r.weaver.grpo),
            ("run.trigger.grpo", &r.trigger.grpo),
        ] {
            if !g
                .args
                .per_device_train_batch_size
                .is_multiple_of(g.num_generations)
            {
                anyhow::bail!(
                    "{name}.per_device_train_batch_size ({}) must be a multiple of num_generations ({})",
                    g.args.per_device_train_batch_size,
                    g.num_generations
                );
            }
        }
        if r.weaver.grpo.initial_insertion_probability.is_some() {
            anyhow::bail!(
                "run.weaver.grpo.initial_insertion_probability applies to trigger GRPO only"
            );
        }
        if r.weaver.grpo.reasoner_temperature.is_some() {
            // The weaver's policy is the reasoner's token distribution: it must be sampled.
            anyhow::bail!("run.weaver.grpo.reasoner_temperature applies to trigger GRPO only (weaver GRPO samples at temperature)");
        }
        if r.train_trigger && self.model.load_model_path.is_none() {
            anyhow::bail!(
                "trigger training needs a trained weaver: set model.load_model_path (or --load-model-path)"
            );
        }
        if self.datasets.len() > 1 {
            anyhow::bail!("datasets: one dataset per run, got {}", self.datasets.len());
        }
        if self.model.max_prompt_aug_num == 0
            && self.model.max_inference_aug_num == 0
            && r.train_weaver
        {
            anyhow::bail!("model: max_prompt_aug_num and max_inference_aug_num are both 0, so the weaver would never be used");
        }
        self.dataset()?;
        Ok(())
    }
}
