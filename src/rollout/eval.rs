//! Evaluation: roll out every test sample (batched, with memory), grade, and write
//! `<dir>/answers.jsonl` (one row per sample, appended and fsynced as batches finish, so an
//! interrupted run resumes without redoing rows) and `<dir>/metrics.json` (atomically, at the end).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::episode::{run_episodes, EpisodeDecision, EpisodeOptions, EpisodeResult, Turn};
use crate::backbone::chat::render_chatml;
use crate::backbone::generate::{Sampler, SamplingConfig};
use crate::memory::{MemGenModel, Point};
use crate::tasks::grade::{summarize, AnswerRow};
use crate::tasks::search::SearchEnv;
use crate::tasks::{Graded, Sample, Task};

/// One row of `answers.jsonl`: the grade file's schema plus what the rollout did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    #[serde(flatten)]
    pub row: AnswerRow,
    #[serde(default)]
    pub prompt_tokens: usize,
    /// Tokens the reasoner sampled (all turns).
    #[serde(default)]
    pub completion_tokens: usize,
    /// Memories, as positions in the conversation's token ids (prompt tokens first).
    #[serde(default)]
    pub insertion_points: Vec<Point>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<EpisodeDecision>,
    /// Multi-turn tasks: every assistant turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turns: Option<Vec<Turn>>,
}

/// What to run and where to write.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub batch_size: usize,
    pub sampling: SamplingConfig,
    pub episode: EpisodeOptions,
    /// `answers.jsonl` and `metrics.json` go here.
    pub dir: PathBuf,
    /// Extra fields for `metrics.json` (model, task, …).
    pub info: BTreeMap<String, serde_json::Value>,
}

/// Read finished rows; a torn last line (a kill mid-write) is cut off so appends stay valid JSONL.
pub fn read_answers(path: &Path) -> anyhow::Result<Vec<EvalRow>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let mut rows = vec![];
    let mut good_len = 0usize;
    let mut offset = 0usize;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        offset += line.len();
        if line.trim().is_empty() {
            good_len = offset;
            continue;
        }
        if !line.ends_with('\n') {
            // Only the last line can lack its newline: a write cut short; that row is redone.
            tracing::warn!("{}: dropping a torn last line", path.display());
            break;
        }
        let r: EvalRow = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not an answers row ({e}); move the file away to start over",
                path.display(),
                i + 1
            )
        })?;
        rows.push(r);
        good_len = offset;
    }
    if good_len < text.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(good_len as u64)?;
        f.sync_all()?;
    }
    Ok(rows)
}

fn to_row(sample: &Sample, ep: EpisodeResult, graded: Graded, multi_turn: bool) -> EvalRow {
    let prompt = render_chatml(&sample.messages, true);
    EvalRow {
        row: AnswerRow::new(sample, prompt, ep.completion, graded),
        prompt_tokens: ep.prompt_len,
        completion_tokens: ep.sampled_tokens,
        insertion_points: ep.points,
        decisions: ep.decisions,
        turns: multi_turn.then_some(ep.turns),
    }
}

fn graded_of(r: &EvalRow) -> Graded {
    Graded {
        reward: r.row.reward,
        extracted: r.row.extracted.clone(),
        metrics: r.row.metrics.clone(),
    }
}

/// Resuming must not mix rows made with different settings: `settings.json` records `info` (the
/// model and generation settings; not the sample count or batch size, which may change).
fn check_settings(
    dir: &Path,
    info: &BTreeMap<String, serde_json::Value>,
    have_rows: bool,
) -> anyhow::Result<()> {
    let path = dir.join("settings.json");
    if have_rows {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let old: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            if let Some((k, v)) = info.iter().find(|(k, v)| old.get(*k) != Some(*v)) {
                anyhow::bail!(
                    "{} holds answers made with {k} = {}, not {v}; pass another --output-dir or remove it",
                    dir.display(),
                    old.get(k).map_or("(unset)".to_string(), |o| o.to_string())
                );
            }
        }
    }
    crate::util::write_atomic(&path, serde_json::to_string_pretty(info)?.as_bytes())
}

/// One generation batch (`b`: its index, which seeds it), rolled out and graded.
fn run_batch(
    model: &MemGenModel,
    task: &dyn Task,
    env: Option<&SearchEnv>,
    settings: &EvalSettings,
    b: usize,
    chunk: &[&Sample],
) -> anyhow::Result<Vec<EvalRow>> {
    let batch: Vec<Sample> = chunk.iter().map(|s| (*s).clone()).collect();
    let mut sampling = settings.sampling.clone();
    // A per-batch seed keeps sampled runs reproducible across resumes of the same batching.
    sampling.seed = sampling.seed.wrapping_add(b as u64);
    let mut sampler = Sampler::new(sampling);
    let mut ep_opts = settings.episode.clone();
    ep_opts.seed = ep_opts.seed.wrapping_add(b as u64);
    let eps = run_episodes(model, &batch, env, &ep_opts, &mut sampler)?;
    let grades: Vec<Graded> = batch
        .par_iter()
        .zip(eps.par_iter())
        .map(|(s, e)| task.grade(&e.completion, &s.gold))
        .collect();
    Ok(batch
        .iter()
        .zip(eps)
        .zip(grades)
        .map(|((s, e), g)| to_row(s, e, g, env.is_some()))
        .collect())
}

/// Evaluate `samples`, resuming from `<dir>/answers.jsonl`. Returns the metrics written.
///
/// Under MPI (crate::distributed) the generation batches go round-robin to the ranks, batch
/// `b` to rank `b mod N` with its one-rank seed; after each round rank 0 gathers the rows and
/// appends them in batch order, so `answers.jsonl` is the one a single process writes. Rank 0
/// alone reads and writes `dir`; the others learn the finished rows' ids from it.
pub fn evaluate(
    model: &MemGenModel,
    task: &dyn Task,
    samples: &[Sample],
    env: Option<&SearchEnv>,
    settings: &EvalSettings,
) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let world = crate::distributed::world();
    let root = world.is_root();
    let dir = &settings.dir;
    let answers = dir.join("answers.jsonl");
    let mut done = vec![];
    let mut file = None;
    if root {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        check_settings(dir, &settings.info, answers.is_file())?;
        done = read_answers(&answers)?;
    }
    let mut done_ids: Vec<String> = done.iter().map(|r| r.row.id.clone()).collect();
    world.broadcast_json(&mut done_ids, 0)?;
    let done_ids: HashSet<&str> = done_ids.iter().map(String::as_str).collect();
    let todo: Vec<&Sample> = samples
        .iter()
        .filter(|s| !done_ids.contains(s.id.as_str()))
        .collect();
    let ids: HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    let mut rows: Vec<EvalRow> = done
        .iter()
        .filter(|r| ids.contains(r.row.id.as_str()))
        .cloned()
        .collect();
    if root {
        eprintln!(
            "eval: {} samples, {} already in {}, {} to generate",
            samples.len(),
            samples.len() - todo.len(),
            answers.display(),
            todo.len()
        );
        file = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&answers)
                .with_context(|| format!("opening {}", answers.display()))?,
        );
        // A new answers file is a new directory entry: sync it so the rows appended later are findable.
        crate::util::sync_dir(dir)?;
    }

    let bar = if root {
        indicatif::ProgressBar::new(todo.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("template"),
    );
    let started = Instant::now();
    let mut new_tokens = 0usize;
    let mut new_rows = 0usize;
    let mut reward_sum: f64 = rows.iter().map(|r| r.row.reward).sum();
    let batches: Vec<&[&Sample]> = todo.chunks(settings.batch_size.max(1)).collect();
    let mut stopped = false;
    for round in (0..batches.len()).step_by(world.size()) {
        // SIGINT/SIGTERM (crate::signals), on any rank: stop between batches; the rows so far
        // are on disk.
        if world.agree_on_signal()?.is_some() {
            stopped = true;
            break;
        }
        let b = round + world.rank();
        let mine = match batches.get(b) {
            Some(chunk) => run_batch(model, task, env, settings, b, chunk)?,
            None => vec![],
        };
        let mut out = String::new();
        for row in &mine {
            out.push_str(&serde_json::to_string(row)?);
            out.push('\n');
        }
        // Rank 0 gathers the round's rows in batch order (rank r ran batch round + r).
        let texts = if world.size() == 1 {
            vec![out.into_bytes()]
        } else {
            world.all_gather_bytes(out.as_bytes())?
        };
        let Some(file) = file.as_mut() else {
            continue;
        };
        let mut round_rows = mine;
        for text in &texts[1..] {
            for line in std::str::from_utf8(text)?.lines() {
                round_rows.push(serde_json::from_str(line)?);
            }
        }
        for row in round_rows {
            new_tokens += row.completion_tokens;
            reward_sum += row.row.reward;
            rows.push(row);
            new_rows += 1;
        }
        // One write per round, then fsync, not aborted midway by a second signal: the file only
        // ever gains whole rows (a SIGKILL can still tear the last line; read_answers cuts it).
        {
            let _hold = crate::signals::critical();
            for text in &texts {
                file.write_all(text)?;
            }
            file.sync_data()?;
        }
        bar.set_position(new_rows as u64);
        crate::signals::pause_for_test(round + world.size().min(batches.len() - round));
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "acc {:.3}  {:.1} tok/s",
            reward_sum / rows.len().max(1) as f64,
            new_tokens as f64 / secs
        ));
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    if root {
        eprintln!("eval: generated {new_rows} rows in {wall:.1}s");
    }
    if stopped {
        let sig = crate::signals::requested().unwrap_or(crate::signals::SIGTERM);
        return Err(crate::signals::Interrupted {
            signal: sig,
            message: format!(
                "stopped by {} after {} of {} rows (kept in {}); run the same command again to resume",
                crate::signals::name(sig),
                rows.len(),
                samples.len(),
                answers.display()
            ),
        }
        .into());
    }
    if !root {
        // The metrics are rank 0's to compute and write; waiting for them keeps every rank alive
        // until the run is complete (an error on rank 0 then aborts this one).
        let mut metrics = BTreeMap::new();
        world.broadcast_json(&mut metrics, 0)?;
        return Ok(metrics);
    }
    anyhow::ensure!(
        rows.len() == samples.len(),
        "{} holds {} of {} rows after the run",
        answers.display(),
        rows.len(),
        samples.len()
    );
    let multi_turn = env.is_some();

    let grades: Vec<Graded> = rows.iter().map(graded_of).collect();
    let mut metrics: BTreeMap<String, serde_json::Value> = summarize(&grades)
        .into_iter()
        .map(|(k, v)| (k, serde_json::json!(v)))
        .collect();
    let n = rows.len().max(1) as f64;
    let ins: usize = rows.iter().map(|r| r.insertion_points.len()).sum();
    let toks: usize = rows.iter().map(|r| r.completion_tokens).sum();
    metrics.insert("n".into(), serde_json::json!(rows.len()));
    metrics.insert(
        "insertions_per_answer".into(),
        serde_json::json!(ins as f64 / n),
    );
    metrics.insert(
        "completion_tokens_mean".into(),
        serde_json::json!(toks as f64 / n),
    );
    metrics.insert("generated_rows".into(), serde_json::json!(new_rows));
    metrics.insert("generated_tokens".into(), serde_json::json!(new_tokens));
    metrics.insert("wall_time_secs".into(), serde_json::json!(wall));
    metrics.insert(
        "tokens_per_sec".into(),
        serde_json::json!(if wall > 0.0 {
            new_tokens as f64 / wall
        } else {
            0.0
        }),
    );
    if multi_turn {
        let turns: usize = rows
            .iter()
            .map(|r| r.turns.as_ref().map_or(0, Vec::len))
            .sum();
        metrics.insert(
            "turns_per_answer".into(),
            serde_json::json!(turns as f64 / n),
        );
    }
    for (k, v) in &settings.info {
        metrics.insert(k.clone(), v.clone());
    }
    let text = serde_json::to_string_pretty(&metrics)?;
    crate::util::write_atomic(&dir.join("metrics.json"), text.as_bytes())?;
    world.broadcast_json(&mut metrics, 0)?;
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("answers.jsonl");
        assert!(read_answers(&p).unwrap().is_empty());
        let row = r#"{"id":"a","prompt":"p","completion":"c","gold":{},"extracted":null,"reward":1.0,"metrics":{},"insertion_points":[{"pos":3,"kind":"prompt"}]}"#;
        std::fs::write(&p, format!("{row}\n{{\"id\":\"b\",\"compl")).unwrap();
        let rows = read_answers(&p).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].row.id, "a");
        assert_eq!(rows[0].insertion_points.len(), 1);
        // The torn tail is cut so the next append starts on a fresh line.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{row}\n"));
        std::fs::write(&p, "not json\n").unwrap();
        assert!(read_answers(&p).is_err());
    }
}
