//! Loading models from every supported source, and the one-line errors bad files produce.

mod common;

use std::process::Command;

use candle_core::{DType, Device};
use memgen::backbone;

fn memgen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_memgen"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bad input: non-zero exit, exactly one line on stderr starting with `error:` that mentions `needle`.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, _, err) = memgen(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {err:?} does not mention {needle:?}"
    );
}

#[test]
fn missing_model_path() {
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ],
        "/nonexistent/model.gguf",
    );
}

#[test]
fn truncated_gguf() {
    let src = common::model("smollm2");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let p = bad.to_str().unwrap();
    assert_one_line_error(&["score", "--model", p, "--text", "hi"], "truncated");
    // A file cut inside the header.
    std::fs::write(&bad, &bytes[..1000]).unwrap();
    assert_one_line_error(&["score", "--model", p, "--text", "hi"], "cut.gguf");
    // Not a GGUF at all.
    std::fs::write(&bad, b"hello world, not a model").unwrap();
    assert_one_line_error(&["score", "--model", p, "--text", "hi"], "cut.gguf");
}

#[test]
fn hf_directory_loads_and_matches() {
    for family in common::FAMILIES {
        let (dir, w) = common::tiny_hf_dir(family);
        let m = backbone::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.backbone.config(), &w.config, "{family}");
        let d = common::max_abs_diff(&m.backbone.weights.layers[1].q_proj, &w.layers[1].q_proj);
        assert_eq!(d, 0.0);
        if let Some(qn) = &w.layers[1].q_norm {
            let got = m.backbone.weights.layers[1]
                .q_norm
                .as_ref()
                .expect("q_norm");
            assert_eq!(common::max_abs_diff(got, qn), 0.0, "{family}");
        }
        assert_eq!(m.tokenizer.encode("Hello world 123").unwrap().len(), 6);
        let (code, out, err) = memgen(&[
            "score",
            "--model",
            dir.path().to_str().unwrap(),
            "--text",
            "Hello",
            "--top-k",
            "3",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["top_logits"][0].as_array().unwrap().len(), 3);
    }
}

/// A copy of the tiny `fixture` directory whose config.json has been edited by `edit`.
fn edited_fixture(fixture: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = common::shared().join("fixtures/tiny").join(fixture);
    assert!(src.is_dir(), "fixture {} is missing", src.display());
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f))
            .unwrap_or_else(|e| panic!("{}: {e}", src.join(f).display()));
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    dir
}

/// Every config field that changes the math and that memgen does not implement is refused, by
/// the library and by `memgen score`, with one line naming the field and the file.
#[test]
fn unsupported_math_is_refused_naming_the_field() {
    type Edit = fn(&mut serde_json::Value);
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("llama3", "`gemma2`", |v| v["model_type"] = "gemma2".into()),
        ("llama3", "rope_scaling.rope_type: yarn", |v| {
            v["rope_scaling"]["rope_type"] = "yarn".into()
        }),
        ("llama3", "rope_scaling.type: dynamic", |v| {
            let r = v["rope_scaling"].as_object_mut().unwrap();
            r.remove("rope_type");
            r.insert("type".into(), "dynamic".into());
        }),
        ("llama3", "rope_scaling.rope_type: longrope", |v| {
            v["rope_scaling"]["rope_type"] = "longrope".into()
        }),
        ("llama3", "rope_scaling.low_freq_factor", |v| {
            v["rope_scaling"]
                .as_object_mut()
                .unwrap()
                .remove("low_freq_factor");
        }),
        ("llama3", "attention_bias", |v| {
            v["attention_bias"] = true.into()
        }),
        ("llama3", "mlp_bias", |v| v["mlp_bias"] = true.into()),
        ("llama3", "partial_rotary_factor", |v| {
            v["partial_rotary_factor"] = 0.5.into()
        }),
        ("llama3", "hidden_act: gelu", |v| {
            v["hidden_act"] = "gelu".into()
        }),
        ("llama3", "quantization_config", |v| {
            v["quantization_config"] = serde_json::json!({"quant_method": "gptq"})
        }),
        ("qwen3", "layer_types", |v| {
            v["use_sliding_window"] = true.into();
            v["sliding_window"] = 16.into();
            v["layer_types"][3] = "sliding_attention".into();
        }),
        ("qwen3", "use_sliding_window", |v| {
            v["use_sliding_window"] = true.into();
            v["sliding_window"] = 16.into();
            v.as_object_mut().unwrap().remove("layer_types");
        }),
        ("qwen3", "attention_bias", |v| {
            v["attention_bias"] = true.into()
        }),
        ("qwen2-tied", "rope_scaling.rope_type: yarn", |v| {
            v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
        }),
        ("smollm3", "no_rope_layers", |v| {
            v["no_rope_layers"] = serde_json::json!([1, 1, 0])
        }),
        // A qwen3 config over weights without q/k norms: the norm tensor is named.
        ("llama3", "q_norm", |v| v["model_type"] = "qwen3".into()),
        // An untied config over a tied checkpoint: the missing head is named.
        ("qwen3", "lm_head.weight", |v| {
            v["tie_word_embeddings"] = false.into()
        }),
    ];
    for (fixture, needle, edit) in cases {
        let dir = edited_fixture(fixture, edit);
        let err = match backbone::load(dir.path(), DType::F32, &Device::Cpu) {
            Ok(_) => panic!("{fixture} with {needle}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(needle) && !err.contains('\n'),
            "{fixture}: {err:?} should be one line naming {needle:?}"
        );
        let file = if needle.ends_with("weight") || needle == "q_norm" {
            "model.safetensors"
        } else {
            "config.json"
        };
        assert!(err.contains(file), "{err:?} does not name {file}");
        let p = dir.path().to_str().unwrap();
        assert_one_line_error(&["score", "--model", p, "--text", "hi"], needle);
    }
}

/// The legacy `type` key and linear scaling load (the math is checked in tests/architectures.rs).
#[test]
fn linear_rope_scaling_under_the_legacy_type_key_loads() {
    let dir = edited_fixture("llama3", |v| {
        v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 4.0})
    });
    let m = backbone::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        m.backbone.config().rope_scaling,
        Some(backbone::RopeScaling::Linear { factor: 4.0 })
    );
}

#[test]
fn bad_hf_directories() {
    let (dir, _) = common::tiny_hf_dir("qwen2");
    let p = dir.path().to_str().unwrap().to_string();
    let st = dir.path().join("model.safetensors");
    let cfg = dir.path().join("config.json");
    let good_cfg = std::fs::read_to_string(&cfg).unwrap();
    // Missing field.
    let mut v: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg, v.to_string()).unwrap();
    assert_one_line_error(&["score", "--model", &p, "--text", "hi"], "hidden_size");
    // Unknown architecture.
    let mut v: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    v["model_type"] = "gpt_neox".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    assert_one_line_error(&["score", "--model", &p, "--text", "hi"], "gpt_neox");
    // Malformed JSON.
    std::fs::write(&cfg, "{ not json").unwrap();
    assert_one_line_error(&["score", "--model", &p, "--text", "hi"], "config.json");
    std::fs::write(&cfg, &good_cfg).unwrap();
    // Truncated safetensors.
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(
        &["score", "--model", &p, "--text", "hi"],
        "model.safetensors",
    );
    std::fs::remove_file(&st).unwrap();
    assert_one_line_error(
        &["score", "--model", &p, "--text", "hi"],
        "model.safetensors",
    );
}

#[test]
fn unknown_gguf_architecture_and_bad_device() {
    assert_one_line_error(&["generate", "--device", "tpu", "--prompt", "x"], "tpu");
    assert_one_line_error(&["generate", "--device", "cuda:0", "--prompt", "x"], "cuda");
    assert_one_line_error(&["generate", "--dtype", "f8", "--prompt", "x"], "f8");
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "no-such-org/no-such-model",
            "--prompt",
            "x",
        ],
        "no-such-org/no-such-model",
    );
}

#[test]
fn generate_and_score_json() {
    common::model("smollm2");
    let (code, out, err) = memgen(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{out}");
    let (code, out, _) = memgen(&["score", "--text", "<|im_start|>user\nhi", "--top-k", "4"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["token_ids"][0], 1,
        "<|im_start|> must tokenize as the special token"
    );
    let top = v["top_logits"].as_array().unwrap();
    assert_eq!(top.len(), v["token_ids"].as_array().unwrap().len());
    let row = top[0].as_array().unwrap();
    assert_eq!(row.len(), 4);
    assert!(row[0][1].as_f64().unwrap() >= row[3][1].as_f64().unwrap());
}

#[test]
fn generation_is_the_same_with_the_packed_weights_turned_off() {
    common::model("smollm2");
    let run = |packed: bool, args: &[&str]| -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_memgen"));
        if !packed {
            cmd.env("MEMGEN_PACKED_WEIGHTS", "0");
        }
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Greedy, so the tokens must agree exactly.
    let gen = [
        "generate",
        "--prompt",
        "Name three facts about Paris.",
        "--chat",
        "--max-new-tokens",
        "24",
        "--json",
    ];
    let (a, b) = (run(true, &gen), run(false, &gen));
    assert_eq!(a, b, "packed and in-place weights generated different text");
    // Logits of a 60-token text (past the row-major kernel's 48-row limit) agree to f32 rounding.
    let text = "Counting: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen, fifteen, sixteen, seventeen, eighteen, nineteen, twenty, twenty-one, twenty-two.";
    let score = ["score", "--text", text, "--top-k", "3"];
    let (a, b) = (run(true, &score), run(false, &score));
    let (ta, tb) = (
        a["top_logits"].as_array().unwrap(),
        b["top_logits"].as_array().unwrap(),
    );
    assert!(ta.len() > 48, "{} tokens", ta.len());
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0f64;
    for (ra, rb) in ta.iter().zip(tb) {
        for (x, y) in ra.as_array().unwrap().iter().zip(rb.as_array().unwrap()) {
            assert_eq!(x[0], y[0], "top tokens differ: {ra} vs {rb}");
            worst = worst.max((x[1].as_f64().unwrap() - y[1].as_f64().unwrap()).abs());
        }
    }
    assert!(worst < 1e-3, "logits differ by {worst}");
    // The kernels round differently, so identical logits would mean the setting was ignored.
    assert!(worst > 0.0, "MEMGEN_PACKED_WEIGHTS=0 changed nothing");
}
