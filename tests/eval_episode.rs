//! The episode runner as training uses it: the recorded tokens, mask and memory points must be
//! exactly what the reasoner read, so teacher forcing at those points reproduces the rollout.

mod common;

use std::sync::Arc;

use candle_core::Device;
use memgen::backbone::generate::{argmax, Sampler, SamplingConfig};
use memgen::backbone::Mode;
use memgen::memory::{Kind, MemGenModel, MemGenSpec};
use memgen::retrieval::{Passage, Retriever};
use memgen::rollout::episode::{run_episodes, EpisodeOptions};
use memgen::tasks::search::{EnvConfig, SearchEnv};
use memgen::tasks::{render_chatml, Message, Sample};

fn model() -> MemGenModel {
    if std::env::var("MEMGEN_MODELS_DIR").is_err() {
        let dir = common::model("default").parent().unwrap().to_path_buf();
        std::env::set_var("MEMGEN_MODELS_DIR", dir);
    }
    let mut spec = MemGenSpec::new("default");
    spec.prompt_latents_len = 2;
    spec.inference_latents_len = 2;
    MemGenModel::build(&spec, &Device::Cpu).unwrap()
}

fn sample(id: &str, q: &str) -> Sample {
    Sample {
        id: id.into(),
        messages: vec![Message::user(q)],
        target: None,
        gold: serde_json::json!({}),
    }
}

fn greedy(n: usize) -> Sampler {
    Sampler::new(SamplingConfig {
        max_new_tokens: n,
        ..Default::default()
    })
}

struct Fixed;
impl Retriever for Fixed {
    fn retrieve(&self, queries: &[String], _topk: usize) -> anyhow::Result<Vec<Vec<Passage>>> {
        Ok(queries
            .iter()
            .map(|_| {
                vec![Passage {
                    id: "0".into(),
                    contents: "\"Paris\"\nParis is the capital of France.".into(),
                    score: None,
                }]
            })
            .collect())
    }
}

/// A search task's sample: a system message, then the question.
fn search_sample(system: &str, question: &str) -> Sample {
    Sample {
        id: "q".into(),
        messages: vec![Message::system(system), Message::user(question)],
        target: None,
        gold: serde_json::json!({}),
    }
}

/// The greedy token of the teacher-forced state that predicts token `i` of row `b`.
fn tf_argmax(m: &MemGenModel, out: &memgen::memory::teacher::TfOutput, b: usize, i: usize) -> u32 {
    let h = out
        .hidden
        .get(b)
        .unwrap()
        .get(i - 1)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = m.reasoner.logits(&h).unwrap().flatten_all().unwrap();
    argmax(&logits.to_vec1::<f32>().unwrap())
}

/// A search environment of at most two turns whose retriever always answers the same passage.
fn two_turn_env() -> SearchEnv {
    SearchEnv::new(
        Arc::new(Fixed),
        EnvConfig {
            max_turns: 2,
            topk: 3,
            use_information_tags: false,
            truncate: Arc::new(|s: &str| s.to_string()),
        },
    )
}

#[test]
fn single_turn_rollout_replays_under_teacher_forcing() {
    let m = model();
    let samples = vec![
        sample("a", "Count: one, two, three, four, five, six."),
        sample("b", "Say hello."),
    ];
    let opts = EpisodeOptions {
        max_turns: 1,
        max_prompt_aug_num: 1,
        max_inference_aug_num: 2,
        seed: 1,
        decision_temperature: None,
    };
    let eps = run_episodes(&m, &samples, None, &opts, &mut greedy(12)).unwrap();
    assert_eq!(eps.len(), 2);
    for (s, e) in samples.iter().zip(&eps) {
        assert_eq!(e.id, s.id);
        let prompt = m
            .tokenizer
            .encode(&render_chatml(&s.messages, true))
            .unwrap();
        assert_eq!(&e.tokens[..e.prompt_len], &prompt[..]);
        assert_eq!(e.tokens.len(), e.generated.len());
        assert!(e.generated[..e.prompt_len].iter().all(|&g| !g));
        assert!(e.generated[e.prompt_len..].iter().all(|&g| g));
        assert_eq!(e.tokens.len() - e.prompt_len, e.sampled_tokens);
        assert_eq!(e.turns.len(), 1);
        assert_eq!(
            e.points[0],
            memgen::memory::Point {
                pos: e.prompt_len,
                kind: Kind::Prompt
            }
        );
        assert!(e.points.len() <= 3);
        assert!(e.decisions.iter().all(|d| d.insert && d.pos > e.prompt_len));
    }
    assert!(
        eps[0].points.iter().any(|p| p.kind == Kind::Inference),
        "a comma-rich answer should get inference memories: {:?}",
        eps[0]
    );
    // Greedy: the teacher-forced argmax at every generated token is that token.
    let rows: Vec<_> = eps.iter().map(|e| e.tf_row()).collect();
    let out = m.teacher_forced(&rows, &mut Mode::Infer).unwrap();
    for (b, e) in eps.iter().enumerate() {
        for i in e.prompt_len..e.tokens.len() {
            assert_eq!(tf_argmax(&m, &out, b, i), e.tokens[i], "row {b}, token {i}");
        }
    }
}

#[test]
fn multi_turn_records_the_conversation() {
    let m = model();
    let env = two_turn_env();
    let samples = vec![search_sample(
        "Answer inside <answer> and </answer>, or search with <search> query </search>.",
        "What is the capital of France?",
    )];
    let opts = EpisodeOptions {
        max_turns: 2,
        max_prompt_aug_num: 8,
        max_inference_aug_num: 0,
        seed: 1,
        decision_temperature: None,
    };
    let e = run_episodes(&m, &samples, Some(&env), &opts, &mut greedy(10))
        .unwrap()
        .pop()
        .unwrap();
    assert!(!e.turns.is_empty() && e.turns.len() <= 2);
    assert_eq!(e.points.len(), e.turns.len());
    for (p, t) in e.points.iter().zip(&e.turns) {
        assert_eq!((p.pos, p.kind), (t.start, Kind::Prompt));
        assert!(e.generated[t.start..t.start + t.len].iter().all(|&g| g));
        assert!(!e.generated[t.start - 1]);
    }
    let assistants = e.messages.iter().filter(|m| m.role == "assistant").count();
    assert_eq!(assistants, e.turns.len());
    if e.turns.len() == 2 {
        // The observation between the turns is masked out and is what the model read.
        let t0 = &e.turns[0];
        let obs = t0.observation.as_ref().expect("observation");
        let between = &e.tokens[t0.start + t0.len..e.turns[1].start];
        let text = m.tokenizer.decode(between).unwrap();
        assert_eq!(
            text,
            format!("<|im_end|>\n<|im_start|>user\n{obs}<|im_end|>\n<|im_start|>assistant\n")
        );
        let masked = e.generated[t0.start + t0.len..e.turns[1].start]
            .iter()
            .filter(|&&g| !g)
            .count();
        assert_eq!(
            masked,
            between.len() - 2,
            "only <|im_end|>\\n is the model's"
        );
    }
    assert_eq!(
        e.completion,
        e.turns
            .iter()
            .map(|t| t.response.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_later_turn_reads_the_earlier_turns_memories_as_teacher_forcing_does() {
    // Two turns, each with a prompt memory and up to two inference memories. Turn 2's prefill
    // replays turn 1's latents, so under teacher forcing at the recorded points the greedy argmax
    // at every sampled token of every turn is that token.
    let m = model();
    let env = two_turn_env();
    let samples = vec![search_sample(
        "Search with <search> query </search>, or answer in <answer></answer>.",
        "Count: one, two, three, four, five. Then name a capital.",
    )];
    let opts = EpisodeOptions {
        max_turns: 2,
        max_prompt_aug_num: 8,
        max_inference_aug_num: 4,
        seed: 1,
        decision_temperature: None,
    };
    let e = run_episodes(&m, &samples, Some(&env), &opts, &mut greedy(14))
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        e.turns.len(),
        2,
        "the fixed retriever keeps the episode going: {e:?}"
    );
    let out = m.teacher_forced(&[e.tf_row()], &mut Mode::Infer).unwrap();
    let mut checked = 0;
    for t in &e.turns {
        // A turn cut at `</search>` is re-tokenised; check the turns kept as sampled.
        if t.len + usize::from(t.stopped) != t.generated_tokens {
            continue;
        }
        for i in t.start..t.start + t.len {
            assert_eq!(
                tf_argmax(&m, &out, 0, i),
                e.tokens[i],
                "turn at {}, token {i}",
                t.start
            );
            checked += 1;
        }
    }
    assert!(
        e.turns[1].len + usize::from(e.turns[1].stopped) == e.turns[1].generated_tokens,
        "the second turn should be kept as sampled: {e:?}"
    );
    assert!(checked > 14, "{checked}");
    assert!(e.points.iter().filter(|p| p.kind == Kind::Prompt).count() == 2);
}

#[test]
fn replayed_memories_out_of_place_are_errors() {
    use memgen::memory::generate::MemoryOptions;
    let m = model();
    let prompt = m.tokenizer.encode("Say hello.").unwrap();
    let d = m.reasoner.hidden_size();
    let lat = candle_core::Tensor::zeros((2, d), candle_core::DType::F32, &Device::Cpu).unwrap();
    let opts = MemoryOptions {
        prompt_memory: true,
        max_inference: 0,
        stop_ids: vec![],
        min_gap: 0,
        decision_temperature: None,
    };
    let run = |replay: Vec<(usize, candle_core::Tensor)>| {
        m.generate_with_replay(
            std::slice::from_ref(&prompt),
            &[replay],
            &opts,
            &mut greedy(2),
            |_, _| {},
        )
        .map(|g| g[0].tokens.len())
    };
    // Past the prompt's end, out of order, or the wrong width: one-line errors.
    let past = run(vec![(prompt.len() + 1, lat.clone())]).unwrap_err();
    assert!(
        past.to_string().contains("replayed memory at token"),
        "{past}"
    );
    let order = run(vec![(2, lat.clone()), (1, lat.clone())]).unwrap_err();
    assert!(order.to_string().contains("after 2"), "{order}");
    let wide =
        candle_core::Tensor::zeros((2, d + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let width = run(vec![(1, wide)]).unwrap_err();
    assert!(width.to_string().contains("wide"), "{width}");
    // In place (including right after the last token) they are read, and generation goes on.
    assert_eq!(run(vec![(1, lat.clone()), (prompt.len(), lat)]).unwrap(), 2);
}
