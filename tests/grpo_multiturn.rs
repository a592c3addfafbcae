//! GRPO on a multi-turn search task (triviaqa) with tiny models, against the built-in retrieval
//! server on loopback: rollouts keep observations out of the loss, one weaver and one trigger
//! step train end to end, and the weaver's gradient comes from the generated tokens alone.
//!
//! The tiny models sample from a word-level vocabulary in which some words are whole actions
//! (`<search>paris</search>`, `<answer>rome</answer>`), so random weights still search and answer.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use memgen::backbone::generate::SamplingConfig;
use memgen::backbone::{Arch, Mode, TextTokenizer};
use memgen::config::{GrpoConfig, IntervalStrategy, LossType, TrainingArgs};
use memgen::memory::checkpoint::Part;
use memgen::memory::{MemGenModel, MemGenSpec};
use memgen::retrieval::client::RetrievalConfig;
use memgen::retrieval::index::Bm25Index;
use memgen::retrieval::server::{BackgroundServer, ServerOptions};
use memgen::tasks::search::SearchEnv;
use memgen::tasks::{build_task, render_chatml, Message, Sample, Split, Task, TaskConfig};
use memgen::training::grpo::{self, LossSpec, Policy, Rollout};
use memgen::training::Session;

/// Words of the corpus below, one per search word (a vocabulary maps each word to one id).
const QUERIES: [&str; 12] = [
    "paris",
    "france",
    "rust",
    "language",
    "candle",
    "framework",
    "pavia",
    "cathedral",
    "iowa",
    "highway",
    "hale",
    "ethnologist",
];
const ANSWERS: [&str; 3] = ["paris", "rome", "iowa"];

/// 61 words (the tiny models' vocabulary): twelve searches (ids ≡ 2 mod 5), three answers (ids
/// ≡ 9 mod 20), other multiples of 3 end with `.` (memory boundaries), the rest plain; `w1` is
/// the unknown word. Searches outnumber answers so that episodes reach a second turn.
fn search_tokenizer() -> Arc<TextTokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab: std::collections::HashMap<String, u32> = (0..61u32)
        .map(|i| {
            let s = match i {
                _ if i % 5 == 2 => format!("<search>{}</search>", QUERIES[(i / 5) as usize]),
                _ if i % 20 == 9 => format!("<answer>{}</answer>", ANSWERS[(i / 20) as usize]),
                _ if i % 3 == 0 => format!("w{i}."),
                _ => format!("w{i}"),
            };
            (s, i)
        })
        .collect();
    assert_eq!(vocab.len(), 61, "every id has its own word");
    let wl = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w1".into())
        .build()
        .unwrap();
    let mut tk = tokenizers::Tokenizer::new(wl);
    tk.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    Arc::new(TextTokenizer {
        inner: tk,
        bos_token: None,
        eos_token: None,
        eos_ids: vec![],
        pad_id: 1,
        chat_template: None,
    })
}

fn tiny_memgen(trigger: bool) -> MemGenModel {
    let reasoner = common::tiny(Arch::Qwen2, 31);
    let weaver_base = common::tiny(Arch::Qwen2, 32);
    let trig = common::tiny(Arch::Qwen2, 33);
    let mut spec = MemGenSpec::new("tiny");
    spec.prompt_latents_len = 2;
    spec.inference_latents_len = 2;
    // One memory at the start of every turn, and inference memories for the trigger to decide on.
    spec.insertion.max_prompt_aug_num = 8;
    spec.insertion.max_inference_aug_num = 2;
    MemGenModel::assemble(
        spec,
        reasoner,
        search_tokenizer(),
        &weaver_base,
        trigger.then_some(&trig),
    )
    .unwrap()
}

/// The loopback server over a six-passage corpus, the triviaqa task over four questions, and the
/// search environment as training builds it (three turns, observations cut to 24 tokens).
struct Setup {
    _dir: tempfile::TempDir,
    _server: BackgroundServer,
    url: String,
    task: Box<dyn Task>,
    train: Vec<Sample>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let passages = [
            ("Paris", "Paris is the capital of France."),
            ("Rust", "Rust is a systems programming language."),
            (
                "Candle",
                "Candle is a machine learning framework written in Rust.",
            ),
            ("Pavia", "The cathedral of Pavia was begun in 1488."),
            (
                "Iowa",
                "Iowa Highway 17 is a state highway in central Iowa.",
            ),
            ("Hale", "Horatio Hale was an ethnologist and philologist."),
        ];
        let mut corpus = String::new();
        for (i, (title, text)) in passages.iter().enumerate() {
            let contents = format!("\"{title}\"\n{text}");
            corpus.push_str(
                &serde_json::json!({"id": i.to_string(), "contents": contents}).to_string(),
            );
            corpus.push('\n');
        }
        let corpus_path = dir.path().join("corpus.jsonl");
        std::fs::write(&corpus_path, corpus).unwrap();
        let (index, _) = Bm25Index::open_or_build(&corpus_path, None, false).unwrap();
        let server = BackgroundServer::start(
            Arc::new(index),
            ServerOptions::default(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let data = dir.path().join("train.txt");
        std::fs::write(
            &data,
            "What is the capital of France?\t['Paris']\n\
             Which language is Candle written in?\t['Rust']\n\
             Where is Highway 17?\t['Iowa']\n\
             Where was the cathedral begun in 1488?\t['Pavia']\n",
        )
        .unwrap();
        let mut cfg = TaskConfig::named("triviaqa");
        cfg.train_path = Some(data);
        cfg.val_ratio = 0.0;
        cfg.use_information_tags = true;
        let task = build_task(&cfg).unwrap();
        assert!(task.multi_turn());
        let train = task.load(Split::Train).unwrap();
        assert_eq!(train.len(), 4);
        Setup {
            url: server.url(),
            _server: server,
            _dir: dir,
            task,
            train,
        }
    }

    fn env(&self, m: &MemGenModel) -> SearchEnv {
        let retrieval = RetrievalConfig {
            url: self.url.clone(),
            retries: 0,
            timeout_secs: 5.0,
            ..Default::default()
        };
        let mut cfg = TaskConfig::named("triviaqa");
        cfg.use_information_tags = true;
        cfg.topk = 2;
        SearchEnv::over_http(&retrieval, &cfg, 3, 24, m.tokenizer.clone()).unwrap()
    }
}

fn sampling(seed: u64) -> SamplingConfig {
    SamplingConfig {
        temperature: 1.0,
        max_new_tokens: 6,
        seed,
        ..Default::default()
    }
}

/// The token ids and loss mask a conversation must have, rebuilt from its messages: the prompt
/// and every observation (a user message with the next assistant header) are read, each assistant
/// turn and the `<|im_end|>\n` closing it before an observation are generated.
fn expected(tok: &TextTokenizer, messages: &[Message]) -> (Vec<u32>, Vec<bool>) {
    let first = messages.iter().position(|m| m.role == "assistant").unwrap();
    let mut tokens = tok
        .encode(&render_chatml(&messages[..first], true))
        .unwrap();
    let mut mask = vec![false; tokens.len()];
    let mut push = |ids: Vec<u32>, generated: bool| {
        mask.extend(std::iter::repeat_n(generated, ids.len()));
        tokens.extend(ids);
    };
    for (i, m) in messages.iter().enumerate().skip(first) {
        if m.role == "assistant" {
            push(tok.encode(&m.content).unwrap(), true);
            if i + 1 < messages.len() {
                push(tok.encode("<|im_end|>\n").unwrap(), true);
            }
        } else {
            push(
                tok.encode(&render_chatml(std::slice::from_ref(m), true))
                    .unwrap(),
                false,
            );
        }
    }
    (tokens, mask)
}

fn multi_turn_rollouts(setup: &Setup, m: &MemGenModel, seed: u64) -> Vec<Rollout> {
    let env = setup.env(m);
    let refs: Vec<&Sample> = setup.train[..2].iter().collect();
    grpo::rollouts(
        m,
        setup.task.as_ref(),
        Some(&env),
        &refs,
        4,
        sampling(seed),
        1024,
        grpo::TriggerRollout::default(),
    )
    .unwrap()
}

#[test]
fn multi_turn_rollouts_keep_observations_out_of_the_loss() {
    let setup = Setup::new();
    let m = tiny_memgen(true);
    let rs = multi_turn_rollouts(&setup, &m, 3);
    assert_eq!(rs.len(), 8);
    let spec = LossSpec {
        loss_type: LossType::Bnpo,
        eps_low: 0.2,
        eps_high: 0.2,
        beta: 0.0,
        max_completion_length: 6,
    };
    let weaver = Policy {
        model: &m,
        target: grpo::Target::Weaver,
        temperature: 1.0,
        spec: &spec,
    };
    let trigger = Policy {
        target: grpo::Target::Trigger,
        ..weaver
    };
    let (mut retrieved, mut later_decisions) = (0, 0);
    for (i, r) in rs.iter().enumerate() {
        let (tokens, mask) = expected(&m.tokenizer, &r.messages);
        assert_eq!(r.tokens, tokens, "rollout {i}: {:?}", &r.messages[2..]);
        assert_eq!(r.loss_mask, mask, "rollout {i}: {:?}", r.messages);
        let observations: Vec<&Message> = r.messages[2..]
            .iter()
            .filter(|m| m.role == "user")
            .collect();
        retrieved += observations
            .iter()
            .filter(|o| o.content.starts_with("<information>Doc 1(Title: \""))
            .count();
        // The weaver's policy tokens are exactly the generated ones.
        let n_gen = mask.iter().filter(|&&g| g).count();
        assert_eq!(r.generated_tokens(), n_gen);
        assert_eq!(weaver.len(r), n_gen);
        let (lp, seq) = weaver
            .logprobs(std::slice::from_ref(r), &mut Mode::Infer)
            .unwrap();
        assert_eq!(lp.dims1().unwrap(), n_gen);
        assert_eq!(seq, vec![0; n_gen]);
        // One prompt memory at the start of every turn; decisions inside generated tokens.
        let turns = r.messages.iter().filter(|m| m.role == "assistant").count();
        let prompt_points = r
            .points
            .iter()
            .filter(|p| p.kind == memgen::memory::Kind::Prompt)
            .count();
        assert_eq!(prompt_points, turns);
        for p in &r.points {
            assert!(r.loss_mask[p.pos], "rollout {i}: memory at a read token");
        }
        for d in &r.decisions {
            assert!(r.loss_mask[d.pos] && r.loss_mask[d.pos - 1], "rollout {i}");
        }
        // Re-reading the whole episode, the trigger gives each decision the log-prob it had
        // when the rollout sampled it (it reads token ids only, so the contexts are the same).
        let (lp, _) = trigger
            .logprobs(std::slice::from_ref(r), &mut Mode::Infer)
            .unwrap();
        let lp = lp.to_vec1::<f32>().unwrap();
        assert_eq!(lp.len(), r.decisions.len());
        for (d, l) in r.decisions.iter().zip(&lp) {
            assert!((d.logprob - l).abs() < 1e-4, "rollout {i}: {d:?} vs {l}");
        }
        later_decisions += r.decisions.iter().filter(|d| d.turn > 0).count();
        // The reward is the task's GRPO reward on the whole episode.
        let completion: Vec<&str> = r
            .messages
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| m.content.as_str())
            .collect();
        let gold = &setup.train[i / 4].gold;
        assert_eq!(
            r.task_reward,
            setup.task.reward(&completion.join("\n"), gold)
        );
        assert_eq!(r.reward, r.task_reward);
    }
    assert!(
        retrieved > 0,
        "no rollout searched the server: {:?}",
        rs.iter().map(|r| &r.messages).collect::<Vec<_>>()
    );
    assert!(
        later_decisions > 0,
        "no trigger decision after an observation"
    );
    // Seeded: the same seed gives the same rollouts.
    let again = multi_turn_rollouts(&setup, &m, 3);
    for (a, b) in rs.iter().zip(&again) {
        assert_eq!(
            (&a.tokens, &a.points, &a.decisions),
            (&b.tokens, &b.points, &b.decisions)
        );
    }
}

#[test]
fn weaver_gradient_comes_from_generated_tokens_only() {
    let setup = Setup::new();
    let m = tiny_memgen(false);
    let rs = multi_turn_rollouts(&setup, &m, 3);
    // A rollout with an observation between two turns.
    let r = rs
        .iter()
        .find(|r| r.loss_mask.iter().skip_while(|&&g| !g).any(|&g| !g))
        .expect("a rollout with an observation");
    let spec = LossSpec {
        loss_type: LossType::Bnpo,
        eps_low: 0.2,
        eps_high: 0.2,
        beta: 0.0,
        max_completion_length: 6,
    };
    let policy = Policy {
        model: &m,
        target: grpo::Target::Weaver,
        temperature: 1.0,
        spec: &spec,
    };
    let vars = m.weaver_vars();
    let grads = |loss: &Tensor| -> Vec<Vec<f32>> {
        let g = loss.backward().unwrap();
        vars.iter()
            .map(|v: &Var| match g.get(v) {
                Some(t) => t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                None => vec![0.0; v.elem_count()],
            })
            .collect()
    };
    let (adv, weight) = (0.7, 0.05);
    let loss = policy
        .loss(r, adv, weight, None, None, &mut Mode::Grad)
        .unwrap()
        .expect("policy tokens");
    let got = grads(&loss);

    // Reference: score every token teacher-forced with the same memories, then keep the
    // generated ones. At ratio 1 the clipped loss has gradient −A·weight·Σ ∇log p.
    let mut row = r.tf_row();
    row.loss_mask = vec![true; row.tokens.len()];
    let out = m
        .teacher_forced(std::slice::from_ref(&row), &mut Mode::Grad)
        .unwrap();
    let (lp, at) = m.target_logprobs(std::slice::from_ref(&row), &out).unwrap();
    let keep: Vec<u32> = at
        .iter()
        .enumerate()
        .filter(|(_, (_, i))| r.loss_mask[*i])
        .map(|(k, _)| k as u32)
        .collect();
    let kept = lp
        .index_select(&Tensor::new(keep.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let want = grads(&(kept.sum_all().unwrap() * (-adv * weight)).unwrap());
    let everything = grads(&(lp.sum_all().unwrap() * (-adv * weight)).unwrap());

    let diff = |a: &[Vec<f32>], b: &[Vec<f32>]| -> (f32, f32) {
        let mut d = 0f32;
        let mut scale = 0f32;
        for (x, y) in a.iter().zip(b) {
            for (p, q) in x.iter().zip(y) {
                d = d.max((p - q).abs());
                scale = scale.max(q.abs());
            }
        }
        (d, scale)
    };
    let (d, scale) = diff(&got, &want);
    assert!(scale > 0.0, "the weaver gets a gradient");
    assert!(
        d <= 1e-4 * scale,
        "GRPO gradient differs from the generated-token gradient: {d} (scale {scale})"
    );
    // Including the prompt and observation tokens would give another gradient.
    let (d_all, _) = diff(&got, &everything);
    assert!(
        d_all > 1e-2 * scale,
        "observation tokens would not change the gradient: {d_all}"
    );
}

fn trainable(m: &MemGenModel, part: Part) -> Vec<Vec<f32>> {
    m.named_vars()
        .into_iter()
        .filter(|(_, _, p)| *p == part)
        .map(|(_, v, _)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn one_step(target: grpo::Target, out: &Path) {
    let setup = Setup::new();
    let m = tiny_memgen(target == grpo::Target::Trigger);
    let env = setup.env(&m);
    let before = (trainable(&m, Part::Weaver), trainable(&m, Part::Trigger));
    let cfg = GrpoConfig {
        args: TrainingArgs {
            max_steps: Some(1),
            per_device_train_batch_size: 8,
            learning_rate: 1e-2,
            warmup_ratio: 0.0,
            eval_strategy: IntervalStrategy::No,
            save_strategy: IntervalStrategy::No,
            ..GrpoConfig::default().args
        },
        num_generations: 4,
        max_completion_length: 6,
        ..GrpoConfig::default()
    };
    let run = grpo::GrpoRun {
        cfg,
        target,
        // Each prompt's group is now sampled with its own seed (data parallelism, docs/DESIGN.md):
        // seed 3's new draws gave both groups equal rewards (no advantage, no gradient); 4 does not.
        session: Session::new(4, out),
    };
    let o = grpo::train_grpo(&m, &run, setup.task.as_ref(), Some(&env), &setup.train, &[]).unwrap();
    assert_eq!(o.steps, 1);
    assert!(o.first_reward.is_finite());
    let rec = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(rec.lines().last().unwrap()).unwrap();
    assert!(rec["grad_norm"].as_f64().unwrap() > 0.0, "{rec}");
    let after = (trainable(&m, Part::Weaver), trainable(&m, Part::Trigger));
    match target {
        grpo::Target::Weaver => {
            assert_ne!(before.0, after.0, "weaver GRPO moved no weaver weight");
            assert_eq!(before.1, after.1);
        }
        grpo::Target::Trigger => {
            assert_ne!(before.1, after.1, "trigger GRPO moved no trigger weight");
            assert_eq!(
                before.0, after.0,
                "trigger GRPO must leave the weaver frozen"
            );
        }
    }
    let name = if target == grpo::Target::Weaver {
        "weaver"
    } else {
        "trigger"
    };
    assert!(out.join(name).join("model.safetensors").is_file());
}

#[test]
fn one_weaver_grpo_step_on_search() {
    let dir = tempfile::tempdir().unwrap();
    one_step(grpo::Target::Weaver, dir.path());
}

#[test]
fn one_trigger_grpo_step_on_search() {
    let dir = tempfile::tempdir().unwrap();
    one_step(grpo::Target::Trigger, dir.path());
}

#[test]
fn grpo_without_the_search_environment_is_an_error() {
    let setup = Setup::new();
    let m = tiny_memgen(false);
    let dir = tempfile::tempdir().unwrap();
    let run = grpo::GrpoRun {
        cfg: GrpoConfig {
            args: TrainingArgs {
                max_steps: Some(1),
                per_device_train_batch_size: 4,
                ..GrpoConfig::default().args
            },
            num_generations: 4,
            ..GrpoConfig::default()
        },
        target: grpo::Target::Weaver,
        session: Session::new(1, dir.path()),
    };
    let err = grpo::train_grpo(&m, &run, setup.task.as_ref(), None, &setup.train, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("search environment"), "{err}");
}

#[test]
fn weaver_train_on_search_with_the_server_down_is_a_one_line_error() {
    // Port 1 on loopback refuses connections.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memgen"))
        .args(["weaver-train", "--config"])
        .arg(common::root().join("configs/latent_memory/triviaqa.yaml"))
        .arg("--output-dir")
        .arg(tmp.path())
        .args(["--options", "datasets.triviaqa.train_path"])
        .arg(common::shared().join("data/triviaqa/topics.dpr.trivia.dev.txt"))
        .args(["datasets.triviaqa.test_path"])
        .arg(common::shared().join("data/triviaqa/topics.dpr.trivia.test.txt"))
        .args([
            "retrieval.url",
            "http://127.0.0.1:1/retrieve",
            "retrieval.retries",
            "0",
        ])
        // The shipped config names hub datasets; a test passes local files and never fetches.
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(common::root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("retrieval server does not answer") && err.contains("127.0.0.1:1"),
        "{err}"
    );
}
