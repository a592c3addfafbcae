//! AdamW over candle `Var`s, computed like `torch.optim.AdamW`: decoupled weight decay applied to
//! the parameter first, then the bias-corrected Adam update. The moments and the step count can be
//! saved and restored, so a resumed run continues bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    vars: Vec<Var>,
    /// First and second moments, f32, one per var (zeros until the first step).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimiser steps taken (torch's `state["step"]`), used for bias correction.
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> anyhow::Result<AdamW> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            cfg,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// One update with `grads[i]` for `vars[i]` (None: no gradient, the var is left alone as torch
    /// skips params whose `.grad` is None) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> anyhow::Result<()> {
        anyhow::ensure!(grads.len() == self.vars.len(), "one gradient per var");
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let var = &self.vars[i];
            let g = g.to_dtype(DType::F32)?;
            let mut p = var.as_tensor().to_dtype(DType::F32)?;
            if c.weight_decay != 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            // torch: denom = sqrt(v) / sqrt(bc2) + eps; p -= (lr / bc1) * m / denom.
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let p = (p - ((m.div(&denom))? * (lr / bc1))?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Save the moments (`m.{i}`, `v.{i}`) and the step count to one safetensors file, atomically.
    pub fn save(&self, file: &Path) -> anyhow::Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for i in 0..self.vars.len() {
            map.insert(format!("m.{i}"), self.m[i].clone());
            map.insert(format!("v.{i}"), self.v[i].clone());
        }
        // The step count as a tensor too, so one file holds the whole state.
        map.insert(
            "t".into(),
            Tensor::new(&[self.t as i64], &candle_core::Device::Cpu)?,
        );
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::Builder::new()
            .prefix(".optimizer.")
            .tempfile_in(dir)?;
        candle_core::safetensors::save(&map, tmp.path())?;
        crate::util::persist(tmp, file)
    }

    pub fn load(&mut self, file: &Path) -> anyhow::Result<()> {
        let shown = file.display().to_string();
        let mut map = candle_core::safetensors::load(file, &candle_core::Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        let mut take = |k: &str, like: &Var| -> anyhow::Result<Tensor> {
            let t = map
                .remove(k)
                .ok_or_else(|| anyhow::anyhow!("{shown}: missing `{k}`"))?;
            anyhow::ensure!(
                t.dims() == like.dims(),
                "{shown}: `{k}` has shape {:?}, expected {:?} (a different model?)",
                t.dims(),
                like.dims()
            );
            Ok(t.to_device(like.device())?)
        };
        for i in 0..self.vars.len() {
            let var = self.vars[i].clone();
            self.m[i] = take(&format!("m.{i}"), &var)?;
            self.v[i] = take(&format!("v.{i}"), &var)?;
        }
        let t = map
            .remove("t")
            .ok_or_else(|| anyhow::anyhow!("{shown}: missing `t`"))?;
        self.t = t.to_vec1::<i64>()?[0] as u64;
        if map.keys().any(|k| k.starts_with("m.")) {
            anyhow::bail!("{shown}: holds more tensors than the model has trainables");
        }
        Ok(())
    }
}

/// Clip gradients to a global L2 norm (torch's `clip_grad_norm_`: scale by max/(norm+1e-6) when
/// that is below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> anyhow::Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// Add one backward pass's gradients into an accumulator (one slot per var).
pub fn accumulate(
    acc: &mut [Option<Tensor>],
    vars: &[Var],
    grads: &candle_core::backprop::GradStore,
) -> anyhow::Result<()> {
    for (slot, var) in acc.iter_mut().zip(vars) {
        if let Some(g) = grads.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}
