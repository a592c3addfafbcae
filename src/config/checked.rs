//! Rules about one value, applied while it is read (`#[serde(deserialize_with = …)]`), so the
//! error names the key it came from. Rules that relate several keys stay in `validate.rs`.
//!
//! The fields keep their plain types (`usize`, `f64`): the training code reads them as numbers,
//! and a value that got past loading already satisfies the rule.

use serde::{de::Error, Deserialize, Deserializer};

/// Read a `T` and reject it with `why` (one line, no key: the caller's path names it) unless `ok`.
fn check<'de, D, T>(d: D, ok: impl Fn(&T) -> bool, why: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + std::fmt::Display,
{
    let v = T::deserialize(d)?;
    if ok(&v) {
        Ok(v)
    } else {
        Err(D::Error::custom(format!("must be {why}, got {v}")))
    }
}

/// Batch sizes, accumulation and iteration counts.
pub(crate) fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    check(d, |&n| n >= 1, "at least 1")
}

/// `num_generations`: advantages compare the completions of a group.
pub(crate) fn at_least_two<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    check(d, |&n| n >= 2, "at least 2 (advantages compare a group)")
}

/// A probability, 0 and 1 included.
pub(crate) fn probability<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check(d, |p: &f64| (0.0..=1.0).contains(p), "between 0 and 1")
}

/// Learning rates.
pub(crate) fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check(d, |&v: &f64| v > 0.0 && v.is_finite(), "positive")
}

/// An optional value that, when set, obeys `ok`.
fn optional<'de, D: Deserializer<'de>>(
    d: D,
    ok: impl Fn(f64) -> bool,
    why: &str,
) -> Result<Option<f64>, D::Error> {
    match Option::<f64>::deserialize(d)? {
        Some(v) if !ok(v) => Err(D::Error::custom(format!("must be {why}, got {v}"))),
        v => Ok(v),
    }
}

/// `reasoner_temperature`: unset, or a temperature (0 = greedy).
pub(crate) fn optional_temperature<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<f64>, D::Error> {
    optional(d, |t| t >= 0.0 && t.is_finite(), "a finite number ≥ 0")
}

/// `initial_insertion_probability`: unset, or a probability both actions keep some of.
pub(crate) fn optional_open_probability<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<f64>, D::Error> {
    optional(d, |p| p > 0.0 && p < 1.0, "strictly between 0 and 1")
}

/// `model.weaver.use_peft`: memgen trains the weaver as LoRA adapters, never the full model.
pub(crate) fn lora_only<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    if bool::deserialize(d)? {
        Ok(true)
    } else {
        Err(D::Error::custom(
            "false is not supported (memgen trains LoRA adapters)",
        ))
    }
}
