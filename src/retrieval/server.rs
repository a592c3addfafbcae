//! The built-in `/retrieve` server (Search-R1's API) over a [`Bm25Index`].
//!
//! Bad requests get a 4xx with `{"error": "..."}`; nothing a client sends can take it down.

use super::index::Bm25Index;
use super::protocol::{parse_request, response_body};
use super::{Passage, RetrievalError, DEFAULT_TOPK};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rayon::prelude::*;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `topk` when a request leaves it out or sends 0.
    pub default_topk: usize,
    /// Largest `topk` accepted.
    pub max_topk: usize,
    /// Most queries in one request.
    pub max_queries: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            default_topk: DEFAULT_TOPK,
            max_topk: 100,
            max_queries: 8192,
            max_body_bytes: 1 << 20,
        }
    }
}

struct AppState {
    index: Arc<Bm25Index>,
    options: ServerOptions,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The router: `POST /retrieve`, and JSON 404s elsewhere.
pub fn router(index: Arc<Bm25Index>, options: ServerOptions) -> Router {
    let limit = options.max_body_bytes;
    let state = Arc::new(AppState { index, options });
    Router::new()
        .route("/retrieve", post(retrieve))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found; use POST /retrieve") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed; use POST /retrieve",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn too_large(limit: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {limit} bytes"),
    )
}

async fn retrieve(State(state): State<Arc<AppState>>, request: Request) -> Response {
    // Refuse a declared oversize body up front, before reading any of it (the body extractor
    // alone would read up to the limit first).
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.options.max_body_bytes as u64) {
        return too_large(state.options.max_body_bytes);
    }
    let body = match Bytes::from_request(request, &()).await {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                return too_large(state.options.max_body_bytes);
            }
            return error(status, rejection.body_text());
        }
    };
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let opts = &state.options;
    let topk = req.topk.unwrap_or(opts.default_topk);
    if topk > opts.max_topk {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`topk` must be at most {}, got {topk}", opts.max_topk),
        );
    }
    if req.queries.len() > opts.max_queries {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "at most {} queries per request, got {}",
                opts.max_queries,
                req.queries.len()
            ),
        );
    }
    let index = state.index.clone();
    let queries = req.queries;
    let searched = tokio::task::spawn_blocking(move || search_all(&index, &queries, topk)).await;
    match searched {
        Ok(Ok(results)) => (
            [(header::CONTENT_TYPE, "application/json")],
            response_body(&results, req.return_scores),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!("search failed: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => {
            tracing::error!("search task failed: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "search task failed")
        }
    }
}

fn search_all(
    index: &Bm25Index,
    queries: &[String],
    topk: usize,
) -> Result<Vec<Vec<Passage>>, RetrievalError> {
    if queries.len() <= 1 {
        queries.iter().map(|q| index.search(q, topk)).collect()
    } else {
        queries.par_iter().map(|q| index.search(q, topk)).collect()
    }
}

/// Serve on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    index: Arc<Bm25Index>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(index, options))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A server running on its own thread and tokio runtime; stops when dropped.
pub struct BackgroundServer {
    addr: std::net::SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundServer {
    /// Bind `addr` (port 0 picks a free port) and serve `index` in the background.
    pub fn start(
        index: Arc<Bm25Index>,
        options: ServerOptions,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("memgen-retriever".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("retrieval server: {e}");
                            return;
                        }
                    };
                    // Resolves on a stop message or when the handle is dropped.
                    let waiter = tokio::task::spawn_blocking(move || stopped.recv());
                    let shutdown = async move {
                        let _ = waiter.await;
                    };
                    if let Err(e) = serve(listener, index, options, shutdown).await {
                        tracing::error!("retrieval server: {e}");
                    }
                })
            })?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://ADDR/retrieve`.
    pub fn url(&self) -> String {
        format!("http://{}/retrieve", self.addr)
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
