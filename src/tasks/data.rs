//! Dataset sources: local files (JSON lines, optionally gzipped; JSON arrays; HF parquet exports;
//! the open-QA TSVs), local directories of such shards, and hub datasets `hf://OWNER/NAME/CONFIG/SPLIT`
//! ([`super::hub`]); row locations for error messages; seeded train/valid splits.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::{Map, Value};

use super::{Result, TaskConfig, TaskError};

/// One raw row and where it came from (`file:line` for text files, `file:row N` otherwise).
#[derive(Debug, Clone)]
pub struct RawRow {
    pub location: String,
    /// Short id: `{file stem}:{line or row}`.
    pub default_id: String,
    pub value: Map<String, Value>,
}

/// File extensions a data directory's shards may have.
const DATA_EXTENSIONS: &[&str] = &[
    ".parquet",
    ".jsonl",
    ".jsonl.gz",
    ".ndjson",
    ".json",
    ".json.gz",
    ".tsv",
    ".txt",
];

/// Read every row of a dataset source: a hub dataset `hf://OWNER/NAME[/CONFIG[/SPLIT]]` (its split
/// defaults to `default_split`), a directory (every data file in it, by name), or one local file.
pub fn read_source(source: &Path, default_split: &str) -> Result<Vec<RawRow>> {
    if let Some(s) = source.to_str().filter(|s| super::hub::HubSource::is_hub(s)) {
        let hub = super::hub::HubSource::parse(s, default_split)?;
        let mut rows = Vec::new();
        for file in super::hub::fetch(&hub)? {
            rows.extend(read_rows(&file)?);
        }
        return Ok(rows);
    }
    if source.is_dir() {
        let shown = source.display();
        let entries = std::fs::read_dir(source).map_err(|e| TaskError::Io {
            path: shown.to_string(),
            source: e,
        })?;
        let mut files: Vec<std::path::PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_lowercase())
                    .unwrap_or_default();
                p.is_file()
                    && !name.starts_with('.')
                    && DATA_EXTENSIONS.iter().any(|x| name.ends_with(x))
            })
            .collect();
        if files.is_empty() {
            return Err(TaskError::Config(format!(
                "{shown}: directory has no data files ({})",
                DATA_EXTENSIONS.join(", ")
            )));
        }
        files.sort();
        let mut rows = Vec::new();
        for file in files {
            rows.extend(read_rows(&file)?);
        }
        return Ok(rows);
    }
    read_rows(source)
}

/// Read every row of a local data file. The format follows the extension (`.jsonl`, `.json`,
/// `.parquet`, `.tsv`/`.txt`; `.gz` for the text formats). A `.json` file that is not one JSON
/// document is read as JSON lines (AQuA ships that way).
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let shown = path.display().to_string();
    if !path.exists() {
        if looks_like_hub_id(&shown) {
            return Err(TaskError::Config(format!(
                "{shown}: no such file (a hub dataset is written hf://{shown})"
            )));
        }
        return Err(TaskError::Config(format!("{shown}: no such file")));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let (base, gz) = match name.strip_suffix(".gz") {
        Some(b) => (b.to_string(), true),
        None => (name.clone(), false),
    };
    let stem = base.split('.').next().unwrap_or("row").to_string();
    let io = |source| TaskError::Io {
        path: shown.clone(),
        source,
    };
    if base.ends_with(".parquet") {
        return read_parquet(path, &stem);
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    if base.ends_with(".tsv") || base.ends_with(".txt") {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(io)?;
        return super::qa::parse_qa_tsv(&text, &shown, &stem);
    }
    if base.ends_with(".json") {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(io)?;
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            let items = match v {
                Value::Array(a) => a,
                Value::Object(mut o) if o.get("data").is_some_and(Value::is_array) => {
                    match o.remove("data") {
                        Some(Value::Array(a)) => a,
                        _ => unreachable!("checked above"),
                    }
                }
                Value::Object(o) => vec![Value::Object(o)],
                _ => {
                    return Err(TaskError::Config(format!(
                        "{shown}: expected a JSON array of objects or {{\"data\": [...]}}"
                    )))
                }
            };
            return items
                .into_iter()
                .enumerate()
                .map(|(i, item)| object_row(item, format!("{shown}: item {i}"), &stem, i))
                .collect();
        }
        return json_lines(BufReader::new(text.as_bytes()), &shown, &stem);
    }
    if base.ends_with(".jsonl") || base.ends_with(".ndjson") {
        return json_lines(BufReader::new(reader), &shown, &stem);
    }
    Err(TaskError::Config(format!(
        "{shown}: unknown data format (expected .jsonl, .jsonl.gz, .json, .parquet, .tsv or .txt)"
    )))
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && !s.starts_with('.') && !parts[1].contains('.')
}

fn object_row(item: Value, location: String, stem: &str, i: usize) -> Result<RawRow> {
    match item {
        Value::Object(value) => Ok(RawRow {
            location,
            default_id: format!("{stem}:{i}"),
            value,
        }),
        other => Err(TaskError::BadRow {
            location,
            message: format!("expected a JSON object, got {}", type_name(&other)),
        }),
    }
}

fn json_lines(reader: impl BufRead, shown: &str, stem: &str) -> Result<Vec<RawRow>> {
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| TaskError::Io {
            path: shown.to_string(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("{shown}:{}", i + 1);
        let v: Value = serde_json::from_str(&line).map_err(|e| TaskError::BadRow {
            location: location.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
        let mut row = object_row(v, location, stem, i + 1)?;
        row.default_id = format!("{stem}:{}", i + 1);
        rows.push(row);
    }
    Ok(rows)
}

fn read_parquet(path: &Path, stem: &str) -> Result<Vec<RawRow>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TaskError::Io {
        path: shown.clone(),
        source,
    })?;
    let bad = |e: parquet::errors::ParquetError| TaskError::Config(format!("{shown}: {e}"));
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let mut rows = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let row = row.map_err(bad)?;
        rows.push(object_row(
            row_to_json(&row),
            format!("{shown}: row {i}"),
            stem,
            i,
        )?);
    }
    Ok(rows)
}

fn row_to_json(row: &parquet::record::Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(k, v)| (k.clone(), field_to_json(v)))
            .collect(),
    )
}

fn field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(x) => (*x).into(),
        F::Short(x) => (*x).into(),
        F::Int(x) => (*x).into(),
        F::Long(x) => (*x).into(),
        F::UByte(x) => (*x).into(),
        F::UShort(x) => (*x).into(),
        F::UInt(x) => (*x).into(),
        F::ULong(x) => (*x).into(),
        F::Float16(x) => serde_json::json!(f32::from(*x)),
        F::Float(x) => serde_json::json!(x),
        F::Double(x) => serde_json::json!(x),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|&x| x.into()).collect()),
        },
        F::Group(r) => row_to_json(r),
        F::ListInternal(l) => Value::Array(l.elements().iter().map(field_to_json).collect()),
        F::MapInternal(m) => Value::Object(
            m.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        F::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        // Dates, timestamps and decimals as their display form.
        other => Value::String(other.to_string()),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Read a string field (numbers are printed) or say which column is missing.
pub fn field_str(row: &RawRow, column: &str) -> std::result::Result<String, String> {
    match row.value.get(column) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v @ Value::Number(_)) | Some(v @ Value::Bool(_)) => Ok(v.to_string()),
        Some(Value::Null) | None => Err(format!("missing field `{column}`")),
        Some(other) => Err(format!(
            "field `{column}` should be a string, got {}",
            type_name(other)
        )),
    }
}

/// Turn rows into samples with `build`; a row `build` rejects is fatal unless `skip_bad_rows`, in
/// which case it is logged and skipped.
pub fn build_samples<T>(
    cfg: &TaskConfig,
    rows: Vec<RawRow>,
    mut build: impl FnMut(usize, &RawRow) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut skipped = 0usize;
    for (i, row) in rows.iter().enumerate() {
        match build(i, row) {
            Ok(s) => out.push(s),
            Err(message) if cfg.skip_bad_rows => {
                tracing::warn!("skipping {}: {}", row.location, message);
                skipped += 1;
            }
            Err(message) => {
                return Err(TaskError::BadRow {
                    location: row.location.clone(),
                    message: format!("{message} (set skip_bad_rows to skip such rows)"),
                })
            }
        }
    }
    if skipped > 0 {
        tracing::warn!("skipped {skipped} bad rows of {}", rows.len());
    }
    Ok(out)
}

/// SplitMix64: a tiny, stable PRNG, so splits and shuffles never change with a dependency bump.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Seed derived from a base seed and a string (e.g. a sample id), stable across platforms.
    pub fn keyed(seed: u64, key: &str) -> Self {
        // FNV-1a over the key, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut s = Self(seed ^ h);
        s.next_u64();
        s
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Split `items` into (train, valid): a seeded shuffle, then the first `ceil(n * val_ratio)` items
/// are validation (as HF `train_test_split(test_size=val_ratio)` sizes it).
pub fn split_train_valid<T>(mut items: Vec<T>, val_ratio: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n_valid = ((items.len() as f64) * val_ratio).ceil() as usize;
    let n_valid = n_valid.min(items.len());
    SplitMix64::new(seed).shuffle(&mut items);
    let train = items.split_off(n_valid);
    (train, items)
}

/// Load a split of a file-backed task: rows of `train_path` (split into train/valid unless
/// `valid_path` is set) or of `test_path`, built into samples, limited.
pub fn load_split<T>(
    cfg: &TaskConfig,
    split: super::Split,
    build: impl FnMut(usize, &RawRow) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    use super::Split;
    let need = |p: &Option<std::path::PathBuf>, key: &str| {
        p.clone().ok_or_else(|| {
            TaskError::Config(format!(
                "task `{}` needs `{key}` to load the {split} split",
                cfg.name
            ))
        })
    };
    // A hub source without an explicit split takes the one its key names.
    let mut samples = match split {
        Split::Test => build_samples(
            cfg,
            read_source(&need(&cfg.test_path, "test_path")?, "test")?,
            build,
        )?,
        Split::Valid if cfg.valid_path.is_some() => build_samples(
            cfg,
            read_source(&need(&cfg.valid_path, "valid_path")?, "validation")?,
            build,
        )?,
        Split::Train if cfg.valid_path.is_some() => build_samples(
            cfg,
            read_source(&need(&cfg.train_path, "train_path")?, "train")?,
            build,
        )?,
        Split::Train | Split::Valid => {
            let rows = read_source(&need(&cfg.train_path, "train_path")?, "train")?;
            let all = build_samples(cfg, rows, build)?;
            let (train, valid) = split_train_valid(all, cfg.val_ratio, cfg.seed);
            if split == Split::Train {
                train
            } else {
                valid
            }
        }
    };
    if let Some(limit) = cfg.limit {
        samples.truncate(limit);
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_stable() {
        let mut r = SplitMix64::new(42);
        let a: Vec<u64> = (0..3).map(|_| r.below(100)).collect();
        let mut r = SplitMix64::new(42);
        let b: Vec<u64> = (0..3).map(|_| r.below(100)).collect();
        assert_eq!(a, b);
        let (t, v) = split_train_valid((0..100).collect::<Vec<_>>(), 0.1, 42);
        assert_eq!((t.len(), v.len()), (90, 10));
        let mut all: Vec<i32> = t.iter().chain(v.iter()).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let (t, v) = split_train_valid((0..7).collect::<Vec<_>>(), 0.1, 1);
        assert_eq!((t.len(), v.len()), (6, 1));
    }

    #[test]
    fn formats() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, r#"{"data": [{"q": 1}, {"q": 2}]}"#).unwrap();
        assert_eq!(read_rows(&p).unwrap().len(), 2);
        std::fs::write(&p, r#"[{"q": 1}]"#).unwrap();
        assert_eq!(read_rows(&p).unwrap().len(), 1);
        std::fs::write(&p, "{\"q\": 1}\n{\"q\": 2}\n\n{\"q\": 3}\n").unwrap();
        let rows = read_rows(&p).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(
            rows[2].location.ends_with("a.json:4"),
            "{}",
            rows[2].location
        );
        let p = dir.path().join("b.jsonl");
        std::fs::write(&p, "{\"q\": 1}\nnot json\n").unwrap();
        let e = read_rows(&p).unwrap_err().to_string();
        assert!(e.contains("b.jsonl:2") && e.contains("invalid JSON"), "{e}");
        let e = read_rows(Path::new("openai/gsm8k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hf://openai/gsm8k"), "{e}");
        let e = read_source(Path::new("hf://gsm8k"), "train")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hf://OWNER/NAME"), "{e}");
        let d = dir.path().join("shards");
        std::fs::create_dir(&d).unwrap();
        assert!(read_source(&d, "train")
            .unwrap_err()
            .to_string()
            .contains("no data files"));
        std::fs::write(d.join("b.jsonl"), "{\"q\": 2}\n").unwrap();
        std::fs::write(d.join("a.jsonl"), "{\"q\": 1}\n").unwrap();
        std::fs::write(d.join("notes.md"), "not data").unwrap();
        let rows = read_source(&d, "train").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].value["q"], 1);
        let p = dir.path().join("c.csv");
        std::fs::write(&p, "a,b\n").unwrap();
        assert!(read_rows(&p)
            .unwrap_err()
            .to_string()
            .contains("unknown data format"));
    }
}

#[cfg(test)]
mod parquet_tests {
    use super::*;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;

    /// A two-column parquet file as HF exports them (`question`, `answer` UTF-8 strings).
    fn write_parquet(path: &Path, rows: &[(&str, &str)]) {
        let schema = parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
        )
        .unwrap();
        let file = std::fs::File::create(path).unwrap();
        let props = Arc::new(WriterProperties::builder().build());
        let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        for col in 0..2 {
            let mut c = group.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = rows
                .iter()
                .map(|r| ByteArray::from(if col == 0 { r.0 } else { r.1 }))
                .collect();
            c.typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
            c.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn reads_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train-00000-of-00001.parquet");
        write_parquet(&p, &[("q1", "a\n#### 1"), ("q2", "b\n#### 2")]);
        let rows = read_rows(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].value["question"], "q2");
        assert_eq!(rows[1].value["answer"], "b\n#### 2");
        assert!(rows[1].location.ends_with("row 1"));
        let mut cfg = TaskConfig::named("gsm8k");
        cfg.test_path = Some(p);
        let s = super::super::build_task(&cfg)
            .unwrap()
            .load(super::super::Split::Test)
            .unwrap();
        assert_eq!(s[0].target.as_deref(), Some("a\\boxed{1}"));
    }
}
