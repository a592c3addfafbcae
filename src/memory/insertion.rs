//! Where memories go: delimiter boundaries (docs/DESIGN.md, "Where memories go").
//!
//! A boundary is a prefix whose decoded text (special tokens kept) ends with a delimiter. For
//! single-byte ASCII delimiters that depends only on the prefix's last token — an ASCII byte is
//! never part of a multi-byte character — so a per-token table answers in O(1); other delimiters
//! fall back to decoding the prefix.

use std::sync::Arc;

use super::{Kind, Point};
use crate::backbone::TextTokenizer;

#[derive(Clone)]
pub struct BoundaryDetector {
    table: Option<Vec<bool>>,
    tokenizer: Arc<TextTokenizer>,
    delimiters: Vec<String>,
}

impl BoundaryDetector {
    pub fn new(tokenizer: Arc<TextTokenizer>, delimiters: &[String]) -> BoundaryDetector {
        let ascii = delimiters.iter().all(|d| d.len() == 1 && d.is_ascii());
        let table = ascii.then(|| {
            (0..tokenizer.vocab_size() as u32)
                .map(|id| {
                    tokenizer
                        .decode(&[id])
                        .map(|s| delimiters.iter().any(|d| s.ends_with(d.as_str())))
                        .unwrap_or(false)
                })
                .collect()
        });
        BoundaryDetector {
            table,
            tokenizer,
            delimiters: delimiters.to_vec(),
        }
    }

    /// Does the decoded text of `prefix` end with a delimiter?
    pub fn is_boundary(&self, prefix: &[u32]) -> bool {
        let Some(&last) = prefix.last() else {
            return false;
        };
        match &self.table {
            Some(t) => t.get(last as usize).copied().unwrap_or(false),
            None => self
                .tokenizer
                .decode(prefix)
                .map(|s| self.delimiters.iter().any(|d| s.ends_with(d.as_str())))
                .unwrap_or(false),
        }
    }

    /// Teacher-forcing points of one sequence: a prompt point at the start of each assistant span
    /// in `prompt_spans` (already chosen), then the first `max_inference` delimiter boundaries whose
    /// neighbouring tokens are both answer tokens (`loss_mask`).
    pub fn training_points(
        &self,
        tokens: &[u32],
        loss_mask: &[bool],
        prompt_points: &[usize],
        max_inference: usize,
    ) -> Vec<Point> {
        let mut pts: Vec<Point> = prompt_points
            .iter()
            .map(|&pos| Point {
                pos,
                kind: Kind::Prompt,
            })
            .collect();
        let mut n = 0;
        for p in 1..tokens.len() {
            if n >= max_inference {
                break;
            }
            if loss_mask[p - 1] && loss_mask[p] && self.is_boundary(&tokens[..p]) {
                if !prompt_points.contains(&p) {
                    pts.push(Point {
                        pos: p,
                        kind: Kind::Inference,
                    });
                }
                n += 1;
            }
        }
        pts.sort_by_key(|p| p.pos);
        pts
    }
}
