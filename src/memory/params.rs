//! Small trainable pieces: linear layers and latent matrices held as Candle `Var`s, initialised
//! as PyTorch does (nn.Linear: U(±1/sqrt(in)) for weight and bias; latents: standard normal).

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// A seeded source of the initial values of trainable tensors.
pub struct Init {
    rng: rand::rngs::StdRng,
}

impl Init {
    pub fn new(seed: u64) -> Init {
        Init {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    pub fn uniform(
        &mut self,
        shape: &[usize],
        bound: f32,
        dev: &Device,
    ) -> candle_core::Result<Var> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..=bound))
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
    }

    /// Standard normal via Box–Muller.
    pub fn normal(&mut self, shape: &[usize], dev: &Device) -> candle_core::Result<Var> {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let u1: f64 = self.rng.random::<f64>().max(1e-300);
            let u2: f64 = self.rng.random();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            v.push((r * t.cos()) as f32);
            if v.len() < n {
                v.push((r * t.sin()) as f32);
            }
        }
        Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
    }
}

/// A trainable `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl Linear {
    pub fn new(
        init: &mut Init,
        inp: usize,
        out: usize,
        bias: bool,
        dev: &Device,
    ) -> candle_core::Result<Linear> {
        let bound = 1.0 / (inp as f32).sqrt();
        Ok(Linear {
            weight: init.uniform(&[out, inp], bound, dev)?,
            bias: if bias {
                Some(init.uniform(&[out], bound, dev)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.as_tensor().to_dtype(x.dtype())?;
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap();
        let n = x.elem_count() / k.max(1);
        let y = x.contiguous()?.reshape((n, k))?.matmul(&w.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().to_dtype(x.dtype())?)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = w.dim(0)?;
        y.reshape(out)
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        v
    }
}
