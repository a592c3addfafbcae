//! `memgen retriever serve|query`.

use crate::retrieval::client::{HttpRetriever, RetrievalConfig};
use crate::retrieval::index::{Bm25Index, IndexOrigin};
use crate::retrieval::limits::{parse_secs, ServerLimits};
use crate::retrieval::server::{serve, shutdown_signal, ServerOptions};
use crate::retrieval::{format_passages, DEFAULT_TOPK, DEFAULT_URL};
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct RetrieverArgs {
    #[command(subcommand)]
    pub command: RetrieverCommand,
}

#[derive(Subcommand, Debug)]
pub enum RetrieverCommand {
    /// Serve BM25 search over a Search-R1 corpus with Search-R1's `/retrieve` API.
    Serve(ServeArgs),
    /// Ask a `/retrieve` server and print the passages as the model sees them.
    Query(QueryArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Corpus: JSON lines `{"id": ..., "contents": "Title\ntext"}`.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Index directory, built once and reused while the corpus is unchanged (default: a temp dir).
    #[arg(long)]
    pub index: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port; 0 picks a free one (the address is printed on stderr when ready).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// `topk` when a request leaves it out.
    #[arg(long, default_value_t = DEFAULT_TOPK)]
    pub default_topk: usize,
    /// Largest `topk` a request may ask for (more: 400).
    #[arg(long, default_value_t = ServerLimits::DEFAULT.max_topk)]
    pub max_topk: usize,
    /// Most queries in one request (more: 400).
    #[arg(long, default_value_t = ServerLimits::DEFAULT.max_queries)]
    pub max_queries: usize,
    /// Most passages one request may ask for, queries × topk (more: 400).
    #[arg(long, default_value_t = ServerLimits::DEFAULT.max_results)]
    pub max_results: usize,
    /// Largest request body in bytes (more: 413).
    #[arg(long, default_value_t = ServerLimits::DEFAULT.max_body_bytes)]
    pub max_body_bytes: usize,
    /// Connections served at once; beyond it the longest-idle one is closed, or (all busy) the
    /// new one waits --connection-wait, then gets 503.
    #[arg(long, default_value_t = ServerLimits::DEFAULT.max_connections)]
    pub max_connections: usize,
    // The duration defaults are spelled out for clap; a test checks they are ServerLimits'.
    /// Seconds a connection may wait for a free slot.
    #[arg(long, value_parser = parse_secs, default_value = "2")]
    pub connection_wait: Duration,
    /// Seconds to receive a request's headers (from connection open or the previous answer).
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub header_timeout: Duration,
    /// Seconds to receive a request's body and search (408/503 past it); also the longest a
    /// write of the answer may stall.
    #[arg(long, value_parser = parse_secs, default_value = "30")]
    pub request_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// Server endpoint or base URL.
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    #[arg(long, default_value_t = DEFAULT_TOPK)]
    pub topk: usize,
    /// Read timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Retries on connection errors and HTTP 5xx.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Print the passages as JSON instead of the model's format.
    #[arg(long)]
    pub json: bool,
    /// The question(s); several are sent in one batch.
    #[arg(required = true)]
    pub queries: Vec<String>,
}

pub fn run(args: RetrieverArgs) -> anyhow::Result<()> {
    match args.command {
        RetrieverCommand::Serve(a) => run_serve(a),
        RetrieverCommand::Query(a) => run_query(a),
    }
}

impl ServeArgs {
    /// The server limits these flags set.
    pub fn limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections,
            connection_wait: self.connection_wait,
            header_timeout: self.header_timeout,
            request_timeout: self.request_timeout,
            max_body_bytes: self.max_body_bytes,
            max_queries: self.max_queries,
            max_topk: self.max_topk,
            max_results: self.max_results,
        }
    }
}

fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.default_topk == 0 || a.default_topk > a.max_topk {
        anyhow::bail!(
            "--default-topk must be between 1 and --max-topk ({}), got {}",
            a.max_topk,
            a.default_topk
        );
    }
    let options = ServerOptions {
        default_topk: a.default_topk,
        limits: a.limits(),
    };
    // Before the (possibly long) index build: a bad flag should fail at once.
    options.validate()?;
    let started = std::time::Instant::now();
    let (index, origin) = Bm25Index::open_or_build(&a.corpus, a.index.as_deref(), true)?;
    eprintln!(
        "memgen retriever: {} index of {} passages in {:.1}s",
        match origin {
            IndexOrigin::Reused => "reused",
            IndexOrigin::Built => "built",
        },
        index.num_docs(),
        started.elapsed().as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!("memgen retriever: listening on http://{addr}/retrieve");
        serve(listener, Arc::new(index), options, shutdown_signal())
            .await
            .map_err(anyhow::Error::from)
    })
}

fn run_query(a: QueryArgs) -> anyhow::Result<()> {
    let client = HttpRetriever::new(RetrievalConfig {
        url: a.url,
        topk: a.topk,
        timeout_secs: a.timeout,
        retries: a.retries,
        ..RetrievalConfig::default()
    })?;
    let results = client.search(&a.queries, a.topk)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for (i, passages) in results.iter().enumerate() {
            if a.queries.len() > 1 {
                println!("# {}", a.queries[i]);
            }
            print!("{}", format_passages(passages));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn serve_flags_default_to_server_limits() {
        let cli = Cli::try_parse_from(["serve", "--corpus", "c.jsonl"]).unwrap();
        assert_eq!(cli.serve.limits(), ServerLimits::DEFAULT);
        let cli = Cli::try_parse_from([
            "serve",
            "--corpus",
            "c.jsonl",
            "--header-timeout",
            "0.5",
            "--max-results",
            "7",
        ])
        .unwrap();
        assert_eq!(cli.serve.header_timeout, Duration::from_millis(500));
        assert_eq!(cli.serve.max_results, 7);
        assert!(Cli::try_parse_from(["serve", "--corpus", "c", "--request-timeout", "0"]).is_err());
    }
}
