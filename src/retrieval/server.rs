//! The built-in `/retrieve` server (Search-R1's API) over a [`Bm25Index`].
//!
//! Bad requests get a 4xx with `{"error": "..."}` (and `"limit"`, naming the flag, when one of
//! the [`ServerLimits`] refused it); nothing a client sends can take it down or hold it up: the
//! connection handling in `listener.rs` bounds connections and every phase of a request.

use super::index::Bm25Index;
use super::limits::ServerLimits;
use super::listener;
use super::protocol::{parse_request, response_body};
use super::{Passage, RetrievalError, DEFAULT_TOPK};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rayon::prelude::*;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;

/// What the server answers with and within.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `topk` when a request leaves it out or sends 0.
    pub default_topk: usize,
    pub limits: ServerLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            default_topk: DEFAULT_TOPK,
            limits: ServerLimits::DEFAULT,
        }
    }
}

impl ServerOptions {
    /// Check the limits, and that a request leaving `topk` out can be answered.
    pub fn validate(&self) -> Result<(), RetrievalError> {
        self.limits.validate()?;
        let topk = self.default_topk;
        if topk == 0 || topk > self.limits.max_topk || topk > self.limits.max_results {
            return Err(RetrievalError::InvalidLimit(format!(
                "the default topk must be between 1 and max_topk ({}) and max_results ({}), \
                 got {topk}",
                self.limits.max_topk, self.limits.max_results
            )));
        }
        Ok(())
    }
}

struct AppState {
    index: Arc<Bm25Index>,
    default_topk: usize,
    limits: ServerLimits,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A refusal because of one of the [`ServerLimits`]: the body names it (`"limit"`) besides the
/// message, so a client can tell which flag to raise.
fn limit_error(status: StatusCode, limit: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": message.into(), "limit": limit })),
    )
        .into_response()
}

/// The router: `POST /retrieve`, and JSON 404s elsewhere.
pub fn router(index: Arc<Bm25Index>, options: ServerOptions) -> Router {
    let limit = options.limits.max_body_bytes;
    let state = Arc::new(AppState {
        index,
        default_topk: options.default_topk,
        limits: options.limits,
    });
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
    closing(limit_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "max_body_bytes",
        format!("request body larger than {limit} bytes (--max-body-bytes)"),
    ))
}

/// Mark an answer given before the whole body was read: the rest of the body may still be on
/// its way, so this connection cannot carry another request.
fn closing(mut answer: Response) -> Response {
    answer
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    answer
}

async fn retrieve(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let limits = &state.limits;
    // One deadline for the body and the search, from the end of the headers.
    let deadline = tokio::time::Instant::now() + limits.request_timeout;
    // Refuse a declared oversize body up front, before reading any of it (the body extractor
    // alone would read up to the limit first).
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large(limits.max_body_bytes);
    }
    let body = match tokio::time::timeout_at(deadline, Bytes::from_request(request, &())).await {
        Ok(Ok(b)) => b,
        Ok(Err(rejection)) => {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                return too_large(limits.max_body_bytes);
            }
            return error(status, rejection.body_text());
        }
        Err(_) => {
            return closing(limit_error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "request body not received within {} s (--request-timeout)",
                    limits.request_timeout.as_secs_f64()
                ),
            ))
        }
    };
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let topk = req.topk.unwrap_or(state.default_topk);
    if let Some((limit, msg)) = limits.check_work(req.queries.len(), topk) {
        return limit_error(StatusCode::BAD_REQUEST, limit, msg);
    }
    let index = state.index.clone();
    let queries = req.queries;
    let search = tokio::task::spawn_blocking(move || search_all(&index, &queries, topk));
    match tokio::time::timeout_at(deadline, search).await {
        Ok(Ok(Ok(results))) => (
            [(header::CONTENT_TYPE, "application/json")],
            response_body(&results, req.return_scores),
        )
            .into_response(),
        Ok(Ok(Err(e))) => {
            tracing::error!("search failed: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Ok(Err(e)) => {
            tracing::error!("search task failed: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "search task failed")
        }
        // The search runs on to completion on the blocking pool (it cannot be interrupted),
        // but the client is answered now; the work limits bound what it can cost.
        Err(_) => limit_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            format!(
                "search did not finish within {} s (--request-timeout)",
                limits.request_timeout.as_secs_f64()
            ),
        ),
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

/// Serve on `listener` within `options.limits` until `shutdown` resolves, then let requests in
/// progress finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    index: Arc<Bm25Index>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RetrievalError> {
    options.validate()?;
    let limits = options.limits;
    listener::run(listener, router(index, options), limits, shutdown).await;
    Ok(())
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
    ) -> Result<Self, RetrievalError> {
        // Refuse bad limits here, not on the server thread where nobody would see the error.
        options.validate()?;
        let io = |what: String| move |source| RetrievalError::Serve { what, source };
        let std_listener =
            std::net::TcpListener::bind(addr).map_err(io(format!("binding {addr}")))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io("setting the listener non-blocking".into()))?;
        let addr = std_listener
            .local_addr()
            .map_err(io("reading the bound address".into()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(io("starting the tokio runtime".into()))?;
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
            })
            .map_err(io("starting the server thread".into()))?;
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
