//! [`Stream`]: what a decoder reads in one forward pass — B rows of L input embeddings, which of
//! them are real, and the position id of each.
//!
//! MemGen's input is not a plain token sequence: latent embeddings from the weaver are spliced
//! between tokens, rows are padded to a common length (left for prompts, right for teacher-forced
//! continuations), and a pass often continues a KV cache. A `Stream` keeps the three pieces that
//! describe such an input together, so every caller builds them the same way:
//!
//! - `embeds`: B × L × d, the inputs themselves (token embeddings or latents);
//! - `mask`: B rows of L bytes, 1 = real input, 0 = padding (or a slot the row does not take);
//! - `positions`: B rows of L position ids; padding gets 0, as Hugging Face gives it.
//!
//! Latents take positions like tokens (docs/DESIGN.md, "Weaving a memory", step 5).

use candle_core::{DType, Device, Tensor};

use super::model::{Backbone, KvCache};

/// Errors building a [`Stream`]: pieces whose shapes disagree, or a tensor operation failing.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The embeddings, mask and positions do not describe the same B × L grid, or rows being
    /// joined differ in batch or width.
    #[error("stream shape: {0}")]
    Shape(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, StreamError>;

/// Which end of a row padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Padding first: every row's last input is at L − 1 (prompts, before generating).
    Left,
    /// Padding last: every row starts at 0 (continuations after a left-padded prefix).
    Right,
}

/// B rows of L input embeddings with their mask and position ids (see the module docs).
#[derive(Debug, Clone)]
pub struct Stream {
    embeds: Tensor,
    mask: Vec<Vec<u8>>,
    positions: Vec<Vec<u32>>,
}

impl Stream {
    /// A stream from its three pieces: `embeds` B × L × d, `mask` and `positions` B rows of L.
    pub fn new(embeds: Tensor, mask: Vec<Vec<u8>>, positions: Vec<Vec<u32>>) -> Result<Stream> {
        let (b, l, _) = embeds.dims3()?;
        if !is_grid(&mask, b, l) || !is_grid(&positions, b, l) {
            return Err(StreamError::Shape(format!(
                "embeddings are {b} × {l}, mask and positions must be {b} rows of {l}"
            )));
        }
        Ok(Stream {
            embeds,
            mask,
            positions,
        })
    }

    /// A stream whose positions follow the mask by Hugging Face's rule (see
    /// [`positions_from_mask`]), counted from `start[row]`.
    pub fn from_mask(embeds: Tensor, mask: Vec<Vec<u8>>, start: &[u32]) -> Result<Stream> {
        if start.len() != mask.len() {
            return Err(StreamError::Shape(format!(
                "{} start positions for {} rows",
                start.len(),
                mask.len()
            )));
        }
        let positions = positions_from_mask(&mask, start);
        Stream::new(embeds, mask, positions)
    }

    /// [`Stream::from_mask`] continuing `cache`: each row counts on from the real positions the
    /// cache holds for it (0 without a cache).
    pub fn continuing(
        embeds: Tensor,
        mask: Vec<Vec<u8>>,
        cache: Option<&KvCache>,
    ) -> Result<Stream> {
        let start: Vec<u32> = match cache {
            Some(c) => c.mask().iter().map(|r| real_count(r)).collect(),
            None => vec![0; mask.len()],
        };
        Stream::from_mask(embeds, mask, &start)
    }

    /// Token ids (B rows of L, all the same length) embedded by `bb`, with the given mask and
    /// positions.
    pub fn from_ids(
        bb: &Backbone,
        ids: &[Vec<u32>],
        mask: Vec<Vec<u8>>,
        positions: Vec<Vec<u32>>,
    ) -> Result<Stream> {
        let l = ids.first().map_or(0, Vec::len);
        if ids.iter().any(|r| r.len() != l) {
            return Err(StreamError::Shape("token rows differ in length".into()));
        }
        let t = Tensor::from_vec(ids.concat(), (ids.len(), l), bb.device())?;
        Stream::new(bb.embed(&t)?, mask, positions)
    }

    /// Token rows of different lengths, padded with `pad_id` on `side` to the longest and embedded
    /// by `bb`; real tokens take positions 0, 1, … and padding 0.
    pub fn tokens(bb: &Backbone, rows: &[Vec<u32>], pad_id: u32, side: Side) -> Result<Stream> {
        let l = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len());
        let mut mask = Vec::with_capacity(rows.len());
        for r in rows {
            let hole = l - r.len();
            ids.push(padded(r, hole, pad_id, side));
            mask.push(padded(&vec![1u8; r.len()], hole, 0, side));
        }
        let positions = positions_from_mask(&mask, &vec![0; rows.len()]);
        Stream::from_ids(bb, &ids, mask, positions)
    }

    /// Rows of embeddings of different lengths, padded with zeros on `side` to the longest. Row r
    /// is its `pieces` (each n × d) one after another, converted to `dtype`; its real inputs take
    /// positions `start[r]`, `start[r] + 1`, … and padding 0. Every row may be empty (L = 0).
    pub fn from_rows(
        pieces: &[Vec<Tensor>],
        side: Side,
        start: &[u32],
        width: (usize, DType),
        device: &Device,
    ) -> Result<Stream> {
        let (d, dtype) = width;
        if start.len() != pieces.len() {
            return Err(StreamError::Shape(format!(
                "{} start positions for {} rows",
                start.len(),
                pieces.len()
            )));
        }
        let mut lens = Vec::with_capacity(pieces.len());
        for row in pieces {
            let mut n = 0;
            for p in row {
                n += p.dim(0)?;
            }
            lens.push(n);
        }
        let l = lens.iter().copied().max().unwrap_or(0);
        let mut xs = Vec::with_capacity(pieces.len());
        let mut mask = Vec::with_capacity(pieces.len());
        let mut positions = Vec::with_capacity(pieces.len());
        for ((row, &n), &s) in pieces.iter().zip(&lens).zip(start) {
            let hole = l - n;
            let mut parts: Vec<Tensor> = row
                .iter()
                .map(|p| p.to_dtype(dtype))
                .collect::<candle_core::Result<_>>()?;
            if hole > 0 {
                let zeros = Tensor::zeros((hole, d), dtype, device)?;
                match side {
                    Side::Left => parts.insert(0, zeros),
                    Side::Right => parts.push(zeros),
                }
            }
            xs.push(match parts.len() {
                0 => Tensor::zeros((0, d), dtype, device)?,
                1 => parts.pop().expect("one part"),
                _ => Tensor::cat(&parts, 0)?,
            });
            mask.push(padded(&vec![1u8; n], hole, 0, side));
            let real: Vec<u32> = (0..n as u32).map(|i| s + i).collect();
            positions.push(padded(&real, hole, 0, side));
        }
        let embeds = if xs.is_empty() {
            Tensor::zeros((0, l, d), dtype, device)?
        } else {
            Tensor::stack(&xs, 0)?
        };
        Stream::new(embeds, mask, positions)
    }

    /// A block of latents `lat` (B × K × d) for the rows with `take[r]`, at positions
    /// `start[r]`, `start[r] + 1`, …; the other rows' slots are masked (position 0).
    pub fn latents(lat: &Tensor, take: &[bool], start: &[u32]) -> Result<Stream> {
        let (b, k, _) = lat.dims3()?;
        if take.len() != b || start.len() != b {
            return Err(StreamError::Shape(format!(
                "{b} rows of latents, {} choices and {} start positions",
                take.len(),
                start.len()
            )));
        }
        let mask = take.iter().map(|&t| vec![t as u8; k]).collect();
        let positions = take
            .iter()
            .zip(start)
            .map(|(&t, &s)| match t {
                true => (s..s + k as u32).collect(),
                false => vec![0; k],
            })
            .collect();
        Stream::new(lat.clone(), mask, positions)
    }

    /// This stream followed by a block of latents (see [`Stream::latents`]): row r's latents go
    /// right after its last input, where the row takes them.
    pub fn append_latents(&self, lat: &Tensor, take: &[bool], start: &[u32]) -> Result<Stream> {
        let lat = lat.to_dtype(self.embeds.dtype())?;
        Stream::cat(&[self.clone(), Stream::latents(&lat, take, start)?])
    }

    /// The streams one after another in time: B × (L₁ + L₂ + …) × d.
    pub fn cat(parts: &[Stream]) -> Result<Stream> {
        let Some(first) = parts.first() else {
            return Err(StreamError::Shape("nothing to concatenate".into()));
        };
        let b = first.batch();
        if parts.iter().any(|p| p.batch() != b) {
            return Err(StreamError::Shape("streams differ in batch size".into()));
        }
        if parts.len() == 1 {
            return Ok(first.clone());
        }
        let embeds: Vec<&Tensor> = parts.iter().map(|p| &p.embeds).collect();
        let mask = (0..b)
            .map(|r| {
                parts
                    .iter()
                    .flat_map(|p| p.mask[r].iter().copied())
                    .collect()
            })
            .collect();
        let positions = (0..b)
            .map(|r| {
                parts
                    .iter()
                    .flat_map(|p| p.positions[r].iter().copied())
                    .collect()
            })
            .collect();
        Stream::new(Tensor::cat(&embeds, 1)?, mask, positions)
    }

    /// Pad every row to `len` on `side`: zero embeddings, mask 0, position 0.
    pub fn pad(&self, len: usize, side: Side) -> Result<Stream> {
        let (b, l, d) = self.embeds.dims3()?;
        if len < l {
            return Err(StreamError::Shape(format!(
                "cannot pad {l} inputs to {len}"
            )));
        }
        if len == l {
            return Ok(self.clone());
        }
        let hole = len - l;
        let zeros = Stream {
            embeds: Tensor::zeros((b, hole, d), self.embeds.dtype(), self.embeds.device())?,
            mask: vec![vec![0; hole]; b],
            positions: vec![vec![0; hole]; b],
        };
        match side {
            Side::Left => Stream::cat(&[zeros, self.clone()]),
            Side::Right => Stream::cat(&[self.clone(), zeros]),
        }
    }

    /// Keep only the given rows, in that order (as [`KvCache::select_rows`] does for a cache).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Stream> {
        let b = self.batch();
        if let Some(&r) = rows.iter().find(|&&r| r >= b) {
            return Err(StreamError::Shape(format!("row {r} of a {b}-row stream")));
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), self.embeds.device())?;
        Ok(Stream {
            embeds: self.embeds.index_select(&idx, 0)?,
            mask: rows.iter().map(|&r| self.mask[r].clone()).collect(),
            positions: rows.iter().map(|&r| self.positions[r].clone()).collect(),
        })
    }

    /// The same inputs with row r masked out entirely where `keep[r]` is false (positions stay).
    pub fn mask_rows(&self, keep: &[bool]) -> Result<Stream> {
        if keep.len() != self.batch() {
            return Err(StreamError::Shape(format!(
                "{} choices for {} rows",
                keep.len(),
                self.batch()
            )));
        }
        let mask = self
            .mask
            .iter()
            .zip(keep)
            .map(|(m, &k)| m.iter().map(|&x| x * k as u8).collect())
            .collect();
        Ok(Stream {
            embeds: self.embeds.clone(),
            mask,
            positions: self.positions.clone(),
        })
    }

    /// The same mask and positions over `f(embeddings)` (e.g. a projection into another width).
    pub fn map_embeds(
        &self,
        f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Stream> {
        Stream::new(f(&self.embeds)?, self.mask.clone(), self.positions.clone())
    }

    pub fn embeds(&self) -> &Tensor {
        &self.embeds
    }

    pub fn mask(&self) -> &[Vec<u8>] {
        &self.mask
    }

    pub fn positions(&self) -> &[Vec<u32>] {
        &self.positions
    }

    /// Position ids as a B × L u32 tensor on the embeddings' device.
    pub fn positions_tensor(&self) -> candle_core::Result<Tensor> {
        let (b, l) = (self.positions.len(), self.len());
        Tensor::from_vec(self.positions.concat(), (b, l), self.embeds.device())
    }

    /// B, the number of rows.
    pub fn batch(&self) -> usize {
        self.mask.len()
    }

    /// L, the number of inputs per row (padding included).
    pub fn len(&self) -> usize {
        self.embeds.dims().get(1).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many of row r's inputs are real.
    pub fn real_len(&self, row: usize) -> usize {
        real_count(&self.mask[row]) as usize
    }
}

/// Position ids for a padded batch, as Hugging Face derives them: cumsum(mask) − 1, counted
/// from `start[row]` (the number of real positions already cached for that row); padding gets 0.
pub fn positions_from_mask(mask: &[Vec<u8>], start: &[u32]) -> Vec<Vec<u32>> {
    mask.iter()
        .zip(start)
        .map(|(row, &s)| {
            let mut n = s;
            row.iter()
                .map(|&m| {
                    if m != 0 {
                        n += 1;
                        n - 1
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect()
}

/// `rows` is `b` rows of `l`.
fn is_grid<T>(rows: &[Vec<T>], b: usize, l: usize) -> bool {
    rows.len() == b && rows.iter().all(|r| r.len() == l)
}

fn real_count(mask: &[u8]) -> u32 {
    mask.iter().map(|&m| (m != 0) as u32).sum()
}

/// `real` with `hole` copies of `fill` on `side`.
fn padded<T: Copy>(real: &[T], hole: usize, fill: T, side: Side) -> Vec<T> {
    let mut v = Vec::with_capacity(real.len() + hole);
    if side == Side::Left {
        v.extend(std::iter::repeat_n(fill, hole));
    }
    v.extend_from_slice(real);
    if side == Side::Right {
        v.extend(std::iter::repeat_n(fill, hole));
    }
    v
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
