//! Hugging Face hub datasets, named `hf://OWNER/NAME[/CONFIG[/SPLIT]]`.
//!
//! A hub source resolves to the parquet shards of one config and split. The repo's file list comes
//! from the hub API (`GET {endpoint}/api/datasets/{id}/revision/{rev}`, through `hf-hub`), first on
//! `main` (layouts `{config}/{split}-*.parquet`, `data/{split}-*.parquet`, `{config}/{split}/*.parquet`),
//! then on the hub's automatic conversion branch `refs/convert/parquet` (`{config}/{split}/*.parquet`,
//! `{config}/partial-{split}/*.parquet`), which is where repos that ship CSV or JSON (GPQA) keep parquet.
//!
//! Files land in the hub's own cache layout under `$HF_HOME/hub` (`datasets--OWNER--NAME/blobs/{etag}`,
//! `snapshots/{commit}/{file}` links, `refs/{revision}`), so the Python tools share the cache. Once a
//! split is cached it is read without touching the network; `HF_HUB_OFFLINE=1` forbids the network
//! altogether. Downloads go to a temporary file in `blobs/` that is checked (complete, valid parquet)
//! before it takes its final name, and a split's snapshot links and ref are written only after all of
//! its shards are in, so a failed or interrupted fetch leaves nothing a later run could mistake for data.
//!
//! `hf-hub`'s own `download` cannot bound a stalled connection or check a short body, so the file
//! transfer itself is done here with `ureq` (read/connect timeouts, `MEMGEN_HUB_TIMEOUT_SECS`, 30 s by
//! default) following the same protocol: a non-redirecting `GET …/resolve/{rev}/{file}` whose answer
//! carries `x-repo-commit` and the `etag`/`x-linked-etag`, then the redirect target if any.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::{Cache, Repo, RepoType};

/// The conversion branch the hub fills with parquet exports of every dataset.
const CONVERT_REVISION: &str = "refs/convert/parquet";

/// Errors resolving or fetching a hub dataset. Every message starts with the `hf://` source and fits
/// on one line.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The source string is not `hf://OWNER/NAME[/CONFIG[/SPLIT]]`.
    #[error("{0}: a hub dataset is written hf://OWNER/NAME[/CONFIG[/SPLIT]]")]
    BadSource(String),
    /// `HF_HUB_OFFLINE` is set and the split is not in the cache.
    #[error(
        "{dataset}: not in the hub cache ({cache}) and HF_HUB_OFFLINE is set; fetch it once online"
    )]
    Offline { dataset: String, cache: String },
    /// The hub does not know the dataset (404).
    #[error("{dataset}: no such dataset on {endpoint}")]
    NotFound { dataset: String, endpoint: String },
    /// The dataset is gated or private (401/403).
    #[error("{dataset}: access denied ({status}); accept the dataset's terms on the hub and set HF_TOKEN")]
    Denied { dataset: String, status: u16 },
    /// The dataset exists but has no parquet files for that config and split.
    #[error("{dataset}: no parquet files for config `{config}` split `{split}` (available: {available})")]
    NoSplit {
        dataset: String,
        config: String,
        split: String,
        available: String,
    },
    /// Connection failures, timeouts, HTTP errors and short downloads.
    #[error("{dataset}: {message}")]
    Network { dataset: String, message: String },
    /// A downloaded file is not valid parquet.
    #[error("{dataset}: {file} is not valid parquet: {message}")]
    Corrupt {
        dataset: String,
        file: String,
        message: String,
    },
    /// Reading or writing the cache failed.
    #[error("{dataset}: cache {path}: {error}")]
    Io {
        dataset: String,
        path: String,
        error: std::io::Error,
    },
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// One config and split of a hub dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    /// `OWNER/NAME`.
    pub repo: String,
    /// Dataset config (`main`, `gpqa_diamond`, …); `default` when the repo has none.
    pub config: String,
    /// Split name as the hub spells it (`train`, `validation`, `test`).
    pub split: String,
}

impl HubSource {
    /// Whether `s` names a hub dataset (as opposed to a local file or directory).
    pub fn is_hub(s: &str) -> bool {
        s.starts_with("hf://")
    }

    /// Parse `hf://OWNER/NAME[/CONFIG[/SPLIT]]`; a missing config is `default`, a missing split is
    /// `default_split` (the split the caller's key implies: train, validation or test).
    pub fn parse(s: &str, default_split: &str) -> Result<Self> {
        let bad = || HubError::BadSource(s.to_string());
        let rest = s.strip_prefix("hf://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !(2..=4).contains(&parts.len()) || !parts.iter().all(|p| ok(p)) {
            return Err(bad());
        }
        Ok(Self {
            repo: format!("{}/{}", parts[0], parts[1]),
            config: parts.get(2).unwrap_or(&"default").to_string(),
            split: parts.get(3).copied().unwrap_or(default_split).to_string(),
        })
    }

    /// The canonical source string (every part spelled out).
    pub fn name(&self) -> String {
        format!("hf://{}/{}/{}", self.repo, self.config, self.split)
    }
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only operation.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Per-request connect/read timeout: a stalled server fails after this long without progress.
fn timeout() -> Duration {
    let secs = std::env::var("MEMGEN_HUB_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// The parquet files of `files` (repo-relative paths) that hold `config`/`split`, sorted.
pub fn select_files(files: &[String], config: &str, split: &str) -> Vec<String> {
    let shard = |name: &str| {
        name.ends_with(".parquet")
            && (name == format!("{split}.parquet") || name.starts_with(&format!("{split}-")))
    };
    let mut dirs = vec![config.to_string()];
    if config == "default" {
        dirs.push("data".into());
        dirs.push(String::new());
    }
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| {
            let parts: Vec<&str> = f.split('/').collect();
            match parts.as_slice() {
                [name] => dirs.iter().any(String::is_empty) && shard(name),
                [dir, name] => dirs.iter().any(|d| d == dir) && shard(name),
                [dir, sub, name] => {
                    dir == &config
                        && (*sub == split || *sub == format!("partial-{split}"))
                        && name.ends_with(".parquet")
                }
                _ => false,
            }
        })
        .cloned()
        .collect();
    out.sort();
    out
}

/// `config/split` pairs the parquet files in `files` provide (for error messages).
fn available(files: &[String]) -> Vec<String> {
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .filter_map(|f| {
            let parts: Vec<&str> = f.split('/').collect();
            let split_of = |name: &str| {
                let stem = name.trim_end_matches(".parquet");
                stem.split('-').next().unwrap_or(stem).to_string()
            };
            match parts.as_slice() {
                [name] => Some(format!("default/{}", split_of(name))),
                [dir, name] => {
                    let config = if *dir == "data" { "default" } else { dir };
                    Some(format!("{config}/{}", split_of(name)))
                }
                [dir, sub, _] => Some(format!("{dir}/{}", sub.trim_start_matches("partial-"))),
                _ => None,
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Local paths of `src`'s parquet shards: from the cache when it has them, else downloaded (unless
/// offline).
pub fn fetch(src: &HubSource) -> Result<Vec<PathBuf>> {
    let cache = Cache::from_env();
    for rev in ["main", CONVERT_REVISION] {
        if let Some(files) = cached(&cache, src, rev) {
            return Ok(files);
        }
    }
    if offline() {
        return Err(HubError::Offline {
            dataset: src.name(),
            cache: cache.path().display().to_string(),
        });
    }
    Fetcher::new(cache, src)?.fetch()
}

/// The cached shards of `src` on revision `rev`, if that revision's snapshot has any.
fn cached(cache: &Cache, src: &HubSource, rev: &str) -> Option<Vec<PathBuf>> {
    let repo = Repo::with_revision(src.repo.clone(), RepoType::Dataset, rev.to_string());
    let root = cache.path().join(repo.folder_name());
    let commit = std::fs::read_to_string(root.join("refs").join(rev)).ok()?;
    let snapshot = root.join("snapshots").join(commit.trim());
    let mut files = Vec::new();
    list_files(&snapshot, "", &mut files);
    let chosen = select_files(&files, &src.config, &src.split);
    (!chosen.is_empty()).then(|| chosen.iter().map(|f| snapshot.join(f)).collect())
}

/// Every file under `dir`, as `/`-joined paths relative to it.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let path = e.path();
        if path.is_dir() {
            list_files(&path, &rel, out);
        } else if path.exists() {
            // `exists` follows the link: a dangling snapshot link is not a cached file.
            out.push(rel);
        }
    }
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

#[derive(serde::Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

/// One fetch of one source: the hub client, the cache and the source's name for messages.
struct Fetcher<'a> {
    src: &'a HubSource,
    cache: Cache,
    api: hf_hub::api::sync::Api,
    endpoint: String,
    token: Option<String>,
    /// Does not follow redirects, so the hub's own headers (commit, etag) can be read.
    direct: ureq::Agent,
    /// Follows redirects (to the CDN).
    follow: ureq::Agent,
    timeout: Duration,
}

impl<'a> Fetcher<'a> {
    fn new(cache: Cache, src: &'a HubSource) -> Result<Self> {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| cache.token());
        let endpoint = std::env::var("HF_ENDPOINT")
            .unwrap_or_else(|_| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_endpoint(endpoint.clone())
            .with_token(token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| HubError::Network {
                dataset: src.name(),
                message: e.to_string(),
            })?;
        let timeout = timeout();
        let agent = |redirects| {
            ureq::AgentBuilder::new()
                .try_proxy_from_env(true)
                .timeout_connect(timeout)
                .timeout_read(timeout)
                .timeout_write(timeout)
                .redirects(redirects)
                .build()
        };
        Ok(Self {
            src,
            cache,
            api,
            endpoint,
            token,
            direct: agent(0),
            follow: agent(5),
            timeout,
        })
    }

    fn repo(&self, rev: &str) -> Repo {
        Repo::with_revision(self.src.repo.clone(), RepoType::Dataset, rev.to_string())
    }

    fn net(&self, message: impl Into<String>) -> HubError {
        HubError::Network {
            dataset: self.src.name(),
            message: message.into(),
        }
    }

    /// fsync directory `dir`, so the renames and links made in it survive a crash.
    fn sync(&self, dir: &Path) -> Result<()> {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(dir, e))
    }

    fn io(&self, path: &Path, error: std::io::Error) -> HubError {
        HubError::Io {
            dataset: self.src.name(),
            path: path.display().to_string(),
            error,
        }
    }

    /// A ureq failure as a one-line error (404/401/403 get their own variants).
    fn http_error(&self, what: &str, e: ureq::Error) -> HubError {
        match e {
            ureq::Error::Status(404, _) if what == "info" => HubError::NotFound {
                dataset: self.src.name(),
                endpoint: self.endpoint.clone(),
            },
            ureq::Error::Status(s @ (401 | 403), _) => HubError::Denied {
                dataset: self.src.name(),
                status: s,
            },
            ureq::Error::Status(s, r) => self.net(format!("{what}: HTTP {s} from {}", r.get_url())),
            ureq::Error::Transport(t) => {
                let timed_out = std::error::Error::source(&t)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                        )
                    });
                if timed_out {
                    self.net(format!(
                        "{what}: no answer within {:.0?} (MEMGEN_HUB_TIMEOUT_SECS)",
                        self.timeout
                    ))
                } else {
                    self.net(format!("{what}: {}", one_line(&t.to_string())))
                }
            }
        }
    }

    /// The repo's commit and file list at `rev`; `None` when the revision does not exist.
    fn info(&self, rev: &str) -> Result<Option<RepoInfo>> {
        let request = self
            .api
            .repo(self.repo(rev))
            .info_request()
            .timeout(self.timeout);
        match request.call() {
            Ok(r) => r
                .into_json::<RepoInfo>()
                .map(Some)
                .map_err(|e| self.net(format!("info: unreadable answer: {e}"))),
            // The conversion branch is optional: its absence only means no parquet export.
            Err(ureq::Error::Status(404, _)) if rev != "main" => Ok(None),
            Err(e) => Err(self.http_error("info", e)),
        }
    }

    fn fetch(&self) -> Result<Vec<PathBuf>> {
        let mut seen: Vec<String> = Vec::new();
        for rev in ["main", CONVERT_REVISION] {
            let Some(info) = self.info(rev)? else {
                continue;
            };
            let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
            let chosen = select_files(&files, &self.src.config, &self.src.split);
            if chosen.is_empty() {
                seen.extend(available(&files));
                continue;
            }
            return self.download_all(rev, &info.sha, &chosen);
        }
        seen.sort();
        seen.dedup();
        let available = if seen.is_empty() {
            "no parquet files".to_string()
        } else {
            seen.join(", ")
        };
        Err(HubError::NoSplit {
            dataset: self.src.name(),
            config: self.src.config.clone(),
            split: self.src.split.clone(),
            available,
        })
    }

    /// Download every file into `blobs/`, then link them into the snapshot and write the ref.
    fn download_all(&self, rev: &str, commit: &str, files: &[String]) -> Result<Vec<PathBuf>> {
        if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(self.net(format!("info: bad commit id `{commit}`")));
        }
        let repo = self.repo(rev);
        let root = self.cache.path().join(repo.folder_name());
        let blobs = root.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| self.io(&blobs, e))?;
        let mut blob_names = Vec::with_capacity(files.len());
        for file in files {
            blob_names.push(self.download(&repo, file, &blobs)?);
        }
        // The ref written last marks the split as cached: the blobs' renames and the snapshot's
        // links must be on disk before it, or a crash could leave a ref over dangling links.
        self.sync(&blobs)?;
        let snapshot = root.join("snapshots").join(commit);
        let mut out = Vec::with_capacity(files.len());
        let mut link_dirs: Vec<PathBuf> = Vec::new();
        for (file, blob) in files.iter().zip(&blob_names) {
            let pointer = snapshot.join(file);
            if let Some(parent) = pointer.parent() {
                std::fs::create_dir_all(parent).map_err(|e| self.io(parent, e))?;
                if !link_dirs.iter().any(|d| d == parent) {
                    link_dirs.push(parent.to_path_buf());
                }
            }
            if !pointer.exists() {
                let _ = std::fs::remove_file(&pointer); // a dangling link from an older blob
                link(&blobs.join(blob), &pointer, file).map_err(|e| self.io(&pointer, e))?;
            }
            out.push(pointer);
        }
        for d in &link_dirs {
            self.sync(d)?;
        }
        self.cache
            .repo(repo)
            .create_ref(commit)
            .map_err(|e| self.io(&root.join("refs"), e))?;
        Ok(out)
    }

    /// Download one file to `blobs/{etag}` (kept if already there); returns the blob's name.
    fn download(&self, repo: &Repo, file: &str, blobs: &Path) -> Result<String> {
        let url = self.api.repo(repo.clone()).url(file);
        let mut request = self.direct.get(&url);
        if let Some(t) = &self.token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        let first = request
            .call()
            .map_err(|e| self.http_error(&format!("download {file}"), e))?;
        let header = |r: &ureq::Response, k: &str| r.header(k).map(str::to_string);
        let etag = header(&first, "x-linked-etag")
            .or_else(|| header(&first, "etag"))
            .map(|e| e.trim_start_matches("W/").replace('"', ""))
            .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .ok_or_else(|| self.net(format!("download {file}: the hub sent no usable etag")))?;
        let linked_size = header(&first, "x-linked-size").and_then(|s| s.parse::<u64>().ok());
        let blob = blobs.join(&etag);
        if blob.is_file() {
            return Ok(etag);
        }
        let response = if (300..400).contains(&first.status()) {
            let location = first
                .header("location")
                .ok_or_else(|| self.net(format!("download {file}: redirect without a location")))?;
            let target = if location.starts_with("http://") || location.starts_with("https://") {
                location.to_string()
            } else {
                format!("{}/{}", origin(&url), location.trim_start_matches('/'))
            };
            // The redirect target (a CDN) gets no token: it is signed already.
            self.follow
                .get(&target)
                .call()
                .map_err(|e| self.http_error(&format!("download {file}"), e))?
        } else {
            first
        };
        let expected = linked_size.or_else(|| {
            response
                .header("content-length")
                .and_then(|s| s.parse::<u64>().ok())
        });
        let mut tmp = tempfile::Builder::new()
            .prefix(".incomplete-")
            .tempfile_in(blobs)
            .map_err(|e| self.io(blobs, e))?;
        let bar = progress_bar(expected, file);
        let mut reader = response.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut got: u64 = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    bar.abandon();
                    let what = if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) {
                        format!("stalled for {:.0?} (MEMGEN_HUB_TIMEOUT_SECS)", self.timeout)
                    } else {
                        one_line(&e.to_string())
                    };
                    return Err(self.net(format!(
                        "download {file}: {what} after {got} bytes; nothing was cached"
                    )));
                }
            };
            tmp.write_all(&buf[..n])
                .map_err(|e| self.io(tmp.path(), e))?;
            got += n as u64;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        if let Some(want) = expected {
            if got != want {
                return Err(self.net(format!(
                    "download {file}: truncated, got {got} of {want} bytes; nothing was cached"
                )));
            }
        }
        tmp.as_file()
            .sync_all()
            .map_err(|e| self.io(tmp.path(), e))?;
        check_parquet(tmp.path()).map_err(|message| HubError::Corrupt {
            dataset: self.src.name(),
            file: file.to_string(),
            message,
        })?;
        tmp.persist(&blob).map_err(|e| self.io(&blob, e.error))?;
        Ok(etag)
    }
}

/// `scheme://host[:port]` of `url`.
fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A byte progress bar on stderr, only when stderr is a terminal.
fn progress_bar(len: Option<u64>, file: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(file.to_string());
    bar
}

/// Check that `path` is a readable parquet file (magic bytes and footer metadata).
fn check_parquet(path: &Path) -> std::result::Result<(), String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| one_line(&e.to_string()))?;
    let _ = reader.metadata().file_metadata().num_rows();
    Ok(())
}

/// Link the snapshot entry `pointer` (repo path `file`) to its blob: a relative symlink as the hub
/// cache uses, or a copy where symlinks are unavailable.
fn link(blob: &Path, pointer: &Path, file: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        // snapshots/{commit}/{file} -> ../../{..per directory of file}/blobs/{etag}
        let depth = file.split('/').count() + 1;
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(rel, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        let s = HubSource::parse("hf://openai/gsm8k/main/train", "test").unwrap();
        assert_eq!(
            (s.repo.as_str(), s.config.as_str()),
            ("openai/gsm8k", "main")
        );
        assert_eq!(s.split, "train");
        let s = HubSource::parse("hf://KodCode/KodCode-Light-RL-10K", "test").unwrap();
        assert_eq!((s.config.as_str(), s.split.as_str()), ("default", "test"));
        let s = HubSource::parse(
            "hf://mandarjoshi/trivia_qa/rc.wikipedia.nocontext",
            "validation",
        )
        .unwrap();
        assert_eq!(
            s.name(),
            "hf://mandarjoshi/trivia_qa/rc.wikipedia.nocontext/validation"
        );
        for bad in [
            "hf://gsm8k",
            "hf://a/b/c/d/e",
            "hf://a//b",
            "hf://a/../b",
            "openai/gsm8k",
        ] {
            let e = HubSource::parse(bad, "train").unwrap_err().to_string();
            assert!(e.starts_with(bad) && e.contains("hf://OWNER/NAME"), "{e}");
        }
    }

    #[test]
    fn layouts() {
        let files: Vec<String> = [
            "README.md",
            "main/train-00000-of-00001.parquet",
            "main/test-00000-of-00001.parquet",
            "socratic/train-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "gpqa_diamond/train/0000.parquet",
            "big/partial-train/0000.parquet",
            "validation-00000.parquet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            select_files(&files, "main", "train"),
            ["main/train-00000-of-00001.parquet"]
        );
        assert_eq!(
            select_files(&files, "default", "train"),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            select_files(&files, "default", "validation"),
            ["validation-00000.parquet"]
        );
        assert_eq!(
            select_files(&files, "gpqa_diamond", "train"),
            ["gpqa_diamond/train/0000.parquet"]
        );
        assert_eq!(
            select_files(&files, "big", "train"),
            ["big/partial-train/0000.parquet"]
        );
        assert!(select_files(&files, "main", "validation").is_empty());
        let a = available(&files);
        assert!(a.contains(&"main/test".to_string()) && a.contains(&"default/train".to_string()));
        assert_eq!(
            origin("http://127.0.0.1:9/datasets/a/b"),
            "http://127.0.0.1:9"
        );
    }
}
