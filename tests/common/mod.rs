//! Shared test helpers: locating the real models (fetched on demand) and the shared fixtures.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Mutex;

static FETCH: Mutex<()> = Mutex::new(());

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn shared() -> PathBuf {
    root().join("..").join("shared")
}

/// Path to a real model, running scripts/fetch-model.sh the first time (tests fetch what they need).
pub fn model(which: &str) -> PathBuf {
    let file = match which {
        "qwen" => memgen::backbone::QWEN_MODEL_FILE,
        _ => memgen::backbone::DEFAULT_MODEL_FILE,
    };
    let path = root().join("models").join(file);
    let _g = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !path.is_file() {
        let st = std::process::Command::new("bash")
            .arg(root().join("scripts/fetch-model.sh"))
            .arg(which)
            .env("MEMGEN_MODELS_DIR", root().join("models"))
            .status()
            .expect("running scripts/fetch-model.sh");
        assert!(st.success(), "scripts/fetch-model.sh {which} failed");
    }
    path
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = shared().join("fixtures").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}
