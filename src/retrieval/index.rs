//! A BM25 index over a Search-R1 corpus (JSON lines `{"id": ..., "contents": "Title\ntext"}`), on
//! tantivy.
//!
//! Text is split on non-alphanumerics, lowercased, English stop words dropped and Porter-stemmed
//! (close to Pyserini's default analyzer, which Search-R1's BM25 uses). Queries go through the
//! same analyzer and become a bag of terms (repeated terms weigh more), so arbitrary user text
//! (quotes, colons, parentheses, ...) never reaches a query parser.
//!
//! An on-disk index carries a manifest naming the corpus (canonical path, size, mtime) and the
//! analyzer version; when it does not match, the index is rebuilt.

use super::{Passage, RetrievalError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
};
use tantivy::{doc, Index, IndexReader, ReloadPolicy, TantivyDocument, Term};

/// The analyzer's registered name.
const ANALYZER: &str = "memgen_en";
/// Bump when the schema or analyzer changes: old indexes are then rebuilt.
const FORMAT_VERSION: u32 = 1;
/// The manifest file inside an index directory.
const MANIFEST: &str = "memgen-index.json";
/// Indexing memory budget.
const WRITER_HEAP: usize = 128 << 20;

/// What an on-disk index was built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    corpus: String,
    size: u64,
    mtime_ns: u128,
    docs: u64,
}

impl Manifest {
    fn for_corpus(corpus: &Path) -> Result<Self, RetrievalError> {
        let io = |source| RetrievalError::CorpusIo {
            path: corpus.display().to_string(),
            source,
        };
        let canonical = corpus.canonicalize().map_err(io)?;
        let meta = std::fs::metadata(&canonical).map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(Self {
            format_version: FORMAT_VERSION,
            corpus: canonical.display().to_string(),
            size: meta.len(),
            mtime_ns,
            docs: 0,
        })
    }

    /// Same corpus file, same analyzer (the doc count is informational).
    fn matches(&self, other: &Manifest) -> bool {
        self.format_version == other.format_version
            && self.corpus == other.corpus
            && self.size == other.size
            && self.mtime_ns == other.mtime_ns
    }
}

/// How [`Bm25Index::open_or_build`] got its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexOrigin {
    /// A matching index was found in the directory.
    Reused,
    /// The index was (re)built from the corpus.
    Built,
}

/// A searchable BM25 index.
pub struct Bm25Index {
    reader: IndexReader,
    analyzer: TextAnalyzer,
    id: Field,
    contents: Field,
    docs: u64,
    /// Keeps a temporary index directory alive (and removes it on drop).
    _tmp: Option<tempfile::TempDir>,
}

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(StopWordFilter::new(Language::English).expect("tantivy ships English stop words"))
        .filter(Stemmer::new(Language::English))
        .build()
}

fn schema() -> (Schema, Field, Field) {
    let mut b = Schema::builder();
    let id = b.add_text_field("id", STRING | STORED);
    let text = TextOptions::default().set_stored().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqs),
    );
    let contents = b.add_text_field("contents", text);
    (b.build(), id, contents)
}

fn index_err(path: &Path, e: impl std::fmt::Display) -> RetrievalError {
    RetrievalError::Index {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

impl Bm25Index {
    /// Open the index in `dir` if it was built from this very corpus file, else (re)build it there.
    /// Without `dir`, build in a temporary directory that lives as long as the index.
    pub fn open_or_build(
        corpus: &Path,
        dir: Option<&Path>,
        progress: bool,
    ) -> Result<(Self, IndexOrigin), RetrievalError> {
        let want = Manifest::for_corpus(corpus)?;
        let Some(dir) = dir else {
            let tmp = tempfile::Builder::new()
                .prefix("memgen-bm25-")
                .tempdir()
                .map_err(|e| index_err(Path::new("<temp dir>"), e))?;
            let mut index = Self::build(corpus, tmp.path(), want, progress)?;
            index._tmp = Some(tmp);
            return Ok((index, IndexOrigin::Built));
        };
        if let Some(have) = read_manifest(dir) {
            if have.matches(&want) {
                match Self::open(dir, have.docs) {
                    Ok(index) => return Ok((index, IndexOrigin::Reused)),
                    Err(e) => {
                        tracing::warn!("index in {} unusable, rebuilding: {e}", dir.display())
                    }
                }
            } else {
                tracing::info!("index in {} is stale, rebuilding", dir.display());
            }
        }
        clear_index_dir(dir)?;
        Ok((
            Self::build(corpus, dir, want, progress)?,
            IndexOrigin::Built,
        ))
    }

    fn open(dir: &Path, docs: u64) -> Result<Self, RetrievalError> {
        let index = Index::open_in_dir(dir).map_err(|e| index_err(dir, e))?;
        Self::from_index(dir, index, docs)
    }

    fn from_index(dir: &Path, index: Index, docs: u64) -> Result<Self, RetrievalError> {
        let (expected, _, _) = schema();
        if index.schema() != expected {
            return Err(index_err(dir, "schema mismatch"));
        }
        index.tokenizers().register(ANALYZER, analyzer());
        let schema = index.schema();
        let id = schema.get_field("id").map_err(|e| index_err(dir, e))?;
        let contents = schema
            .get_field("contents")
            .map_err(|e| index_err(dir, e))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| index_err(dir, e))?;
        Ok(Self {
            reader,
            analyzer: analyzer(),
            id,
            contents,
            docs,
            _tmp: None,
        })
    }

    fn build(
        corpus: &Path,
        dir: &Path,
        mut manifest: Manifest,
        progress: bool,
    ) -> Result<Self, RetrievalError> {
        let (schema, id_f, contents_f) = schema();
        std::fs::create_dir_all(dir).map_err(|e| index_err(dir, e))?;
        let index = Index::create_in_dir(dir, schema).map_err(|e| index_err(dir, e))?;
        index.tokenizers().register(ANALYZER, analyzer());
        // One indexing thread: documents keep corpus order, so equal BM25 scores break ties the
        // same way on every build (reproducible retrieval across machines and rebuilds).
        let mut writer: tantivy::IndexWriter = index
            .writer_with_num_threads(1, WRITER_HEAP)
            .map_err(|e| index_err(dir, e))?;

        let path_str = corpus.display().to_string();
        let io = |source| RetrievalError::CorpusIo {
            path: path_str.clone(),
            source,
        };
        let file = std::fs::File::open(corpus).map_err(io)?;
        let bar = if progress {
            let bar = indicatif::ProgressBar::new(manifest.size);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "indexing {msg} [{bar:30}] {bytes}/{total_bytes} ({eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(
                corpus
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };

        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line = String::new();
        let mut lineno = 0usize;
        let mut docs = 0u64;
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => RetrievalError::CorpusLine {
                    path: path_str.clone(),
                    line: lineno + 1,
                    detail: "not valid UTF-8".into(),
                },
                _ => io(e),
            })?;
            if n == 0 {
                break;
            }
            lineno += 1;
            bar.inc(n as u64);
            if line.trim().is_empty() {
                continue;
            }
            let (id, contents) =
                parse_corpus_line(&line).map_err(|detail| RetrievalError::CorpusLine {
                    path: path_str.clone(),
                    line: lineno,
                    detail,
                })?;
            writer
                .add_document(doc!(id_f => id, contents_f => contents))
                .map_err(|e| index_err(dir, e))?;
            docs += 1;
        }
        bar.set_message("committing");
        writer.commit().map_err(|e| index_err(dir, e))?;
        writer
            .wait_merging_threads()
            .map_err(|e| index_err(dir, e))?;
        bar.finish_and_clear();

        manifest.docs = docs;
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        crate::util::write_atomic(&dir.join(MANIFEST), &json).map_err(|e| index_err(dir, e))?;
        let this = Self::from_index(dir, index, docs)?;
        this.reader.reload().map_err(|e| index_err(dir, e))?;
        Ok(this)
    }

    /// Number of passages in the index.
    pub fn num_docs(&self) -> u64 {
        self.docs
    }

    /// The analyzed terms of a query, with their counts.
    fn terms(&self, query: &str) -> BTreeMap<String, u32> {
        let mut analyzer = self.analyzer.clone();
        let mut stream = analyzer.token_stream(query);
        let mut terms = BTreeMap::new();
        while let Some(tok) = stream.next() {
            *terms.entry(tok.text.clone()).or_insert(0) += 1;
        }
        terms
    }

    /// The `topk` best passages for `query` by BM25 (fewer if fewer match; none for a query with
    /// no indexable words).
    pub fn search(&self, query: &str, topk: usize) -> Result<Vec<Passage>, RetrievalError> {
        let terms = self.terms(query);
        if topk == 0 || terms.is_empty() {
            return Ok(Vec::new());
        }
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .into_iter()
            .map(|(text, count)| {
                let tq: Box<dyn Query> = Box::new(TermQuery::new(
                    Term::from_field_text(self.contents, &text),
                    IndexRecordOption::WithFreqs,
                ));
                let q = if count > 1 {
                    Box::new(BoostQuery::new(tq, count as f32))
                } else {
                    tq
                };
                (Occur::Should, q)
            })
            .collect();
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let err = |e: tantivy::TantivyError| RetrievalError::Index {
            path: "<search>".into(),
            detail: e.to_string(),
        };
        let hits = searcher
            .search(&query, &TopDocs::with_limit(topk))
            .map_err(err)?;
        hits.into_iter()
            .map(|(score, addr)| {
                let doc: TantivyDocument = searcher.doc(addr).map_err(err)?;
                let text = |f| {
                    doc.get_first(f)
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                };
                Ok(Passage {
                    id: text(self.id),
                    contents: text(self.contents),
                    score: Some(score),
                })
            })
            .collect()
    }
}

/// `(id, contents)` of a corpus line; the id may be a string or a number.
fn parse_corpus_line(line: &str) -> Result<(String, String), String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let id = match obj.get("id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(_) => return Err("`id` must be a string or a number".into()),
        None => return Err("missing field `id`".into()),
    };
    let contents = obj
        .get("contents")
        .and_then(|c| c.as_str())
        .ok_or("missing string field `contents`")?
        .to_string();
    Ok((id, contents))
}

fn read_manifest(dir: &Path) -> Option<Manifest> {
    let bytes = std::fs::read(dir.join(MANIFEST)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Empty `dir` for a rebuild, but only if it is empty or holds an index (ours or any tantivy
/// index): never wipe a directory of unrelated files given by mistake.
fn clear_index_dir(dir: &Path) -> Result<(), RetrievalError> {
    let entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| index_err(dir, e))?
            .into_iter()
            .map(|e| e.path())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(index_err(dir, e)),
    };
    if entries.is_empty() {
        return Ok(());
    }
    let is_index = dir.join(MANIFEST).exists() || dir.join("meta.json").exists();
    if !is_index {
        return Err(index_err(
            dir,
            "directory is not empty and holds no index; refusing to overwrite it",
        ));
    }
    for p in entries {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| index_err(&p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_lines() {
        assert_eq!(
            parse_corpus_line(r#"{"id": "3", "contents": "\"T\"\nx"}"#).unwrap(),
            ("3".to_string(), "\"T\"\nx".to_string())
        );
        assert_eq!(
            parse_corpus_line(r#"{"id": 3, "contents": "x"}"#)
                .unwrap()
                .0,
            "3"
        );
        assert!(parse_corpus_line(r#"{"id": "3"}"#).is_err());
        assert!(parse_corpus_line(r#"{"contents": "x"}"#).is_err());
        assert!(parse_corpus_line("{oops").is_err());
    }

    #[test]
    fn analyzer_stems_and_drops_stop_words() {
        let mut a = analyzer();
        let mut s = a.token_stream("The Cathedrals of \"Pavia\": (built) in 1488?");
        let mut toks = Vec::new();
        while let Some(t) = s.next() {
            toks.push(t.text.clone());
        }
        assert_eq!(toks, vec!["cathedr", "pavia", "built", "1488"]);
    }
}
