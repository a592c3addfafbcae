//! Connection handling for the `/retrieve` server: a bounded number of connection slots, timeouts
//! on every phase of a request, and eviction of idle connections when the slots run out.
//!
//! `axum::serve` has no header timeout and no connection limit, so one client sending half a
//! request holds a connection forever and a flood of silent connections holds file descriptors
//! without bound. Here each phase is bounded (see [`ServerLimits`]):
//! - waiting for headers: hyper's header-read timeout (`header_timeout`), which also covers an
//!   idle keep-alive connection and a client trickling its headers a byte at a time;
//! - reading the body and searching: the handler's deadline (`request_timeout`, in `server.rs`);
//! - writing the answer: [`StallLimited`] fails a write that makes no progress for
//!   `request_timeout`, so a client that never reads cannot pin the connection.
//!
//! When every slot is taken, a new connection evicts the connection idle longest (no request in
//! its handler), because an idle connection costs its client nothing to reopen while a new one
//! may carry a request; only when every slot is mid-request does it wait, then get a 503.

use super::limits::ServerLimits;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

/// How long the accept loop pauses after an accept error that is not about one connection
/// (e.g. out of file descriptors), so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Longest a finished connection is kept to read what its client still sends (see [`linger`]).
const LINGER: Duration = Duration::from_secs(1);
/// At most this much of a refused connection's request is read (and dropped) before the 503,
/// so that closing does not reset the connection and hide the answer from the client.
const REFUSED_DRAIN_BYTES: usize = 64 << 10;

/// Serve `router` on `listener` within `limits` until `shutdown` resolves; then stop accepting,
/// let requests in progress finish (each is bounded by the timeouts) and return.
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Slots::new(limits));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections so the set does not grow with every connection served.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(serve_connection(
                        stream,
                        router.clone(),
                        slots.clone(),
                        closing_rx.clone(),
                    ));
                }
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!("retrieval server: accept: {e}");
                }
                Err(e) => {
                    tracing::warn!("retrieval server: accept: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while tasks.join_next().await.is_some() {}
}

/// Errors that concern one connection only (the client gave up before it was accepted).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The connection slots and the connections holding them.
struct Slots {
    limits: ServerLimits,
    permits: Arc<Semaphore>,
    /// Connections waiting for a permit (bounded by `max_connections`).
    waiting: AtomicUsize,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// Origin of the `idle_since` clocks.
    epoch: Instant,
}

/// What eviction needs to know about one served connection.
struct ConnState {
    /// Requests whose handler is running (hyper serves one at a time per connection).
    busy: AtomicUsize,
    /// When the connection last had no request in its handler, in ns since [`Slots::epoch`].
    idle_since: AtomicU64,
    /// Set once the connection was chosen for eviction, so it is not chosen twice.
    evicted: AtomicBool,
    evict: Notify,
}

impl Slots {
    fn new(limits: ServerLimits) -> Self {
        Self {
            limits,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            waiting: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now()),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.lock().insert(id, state.clone());
        Registered {
            slots: self.clone(),
            id,
            state,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        // The map stays consistent even if a holder panicked: every update is one insert/remove.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask the connection idle longest to close; false if every connection is mid-request.
    fn evict_idlest(&self) -> bool {
        let open = self.lock();
        let idlest = open
            .values()
            .filter(|c| c.busy.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Acquire))
            .min_by_key(|c| c.idle_since.load(Ordering::Acquire));
        match idlest {
            Some(c) => {
                c.evicted.store(true, Ordering::Release);
                // `notify_one` stores the wake-up if the connection task is not waiting yet.
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A connection's entry in [`Slots::open`], removed when the connection ends.
struct Registered {
    slots: Arc<Slots>,
    id: u64,
    state: Arc<ConnState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.slots.lock().remove(&self.id);
    }
}

/// Counts a waiting connection for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    slots: Arc<Slots>,
    mut closing: watch::Receiver<bool>,
) {
    let limits = slots.limits;
    let _permit = match slots.permits.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            if slots.waiting.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
                slots.waiting.fetch_sub(1, Ordering::AcqRel);
                refuse(&stream, &limits);
                return;
            }
            let _waiting = Waiting(&slots.waiting);
            slots.evict_idlest();
            match tokio::time::timeout(
                limits.connection_wait,
                slots.permits.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(p)) => p,
                // Timed out (or the semaphore closed, which this module never does).
                _ => {
                    refuse(&stream, &limits);
                    return;
                }
            }
        }
    };
    let registered = slots.register();
    let state = registered.state.clone();
    let service = Tracked {
        inner: TowerToHyperService::new(router),
        state: state.clone(),
        slots: slots.clone(),
    };
    let io = TokioIo::new(StallLimited::new(stream, limits.request_timeout));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A client may shut its write side once its request is sent; it still gets its answer.
        .half_close(true);
    let mut conn = builder.serve_connection(io, service);
    let mut shutting_down = false;
    let finished = loop {
        tokio::select! {
            // Without shutdown: the socket is taken back below to close it gently.
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break result,
            _ = state.evict.notified() => {
                if state.busy.load(Ordering::Acquire) == 0 {
                    // Idle: nothing to lose, close now to free the slot.
                    return;
                }
                // A request started since it was chosen: answer it, then close.
                Pin::new(&mut conn).graceful_shutdown();
            }
            changed = closing.changed(), if !shutting_down => {
                shutting_down = true;
                if changed.is_ok() {
                    Pin::new(&mut conn).graceful_shutdown();
                }
            }
        }
    };
    match finished {
        // On server stop there is no answer left to protect: close at once.
        Ok(()) if shutting_down => {}
        Ok(()) => linger(conn.into_parts().io.into_inner().inner, &limits).await,
        // Timeouts, resets and malformed requests end here: the client's problem, and no
        // reason to spend more time on it.
        Err(e) => tracing::debug!("retrieval server: connection: {e}"),
    }
    drop(registered);
}

/// Close a finished connection without resetting it: send FIN, then read and drop whatever the
/// client still sends (at most `max_body_bytes` + 64 KiB, for at most [`LINGER`]). When the
/// server answered before reading a whole request (413 on a declared size, 408), the unread
/// rest would otherwise make the close a reset, which can destroy the answer before the client
/// reads it. A client that closes first (the usual case) ends this at once.
async fn linger(mut stream: TcpStream, limits: &ServerLimits) {
    let shut = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await;
    if shut.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER;
    let budget = limits.max_body_bytes.saturating_add(REFUSED_DRAIN_BYTES);
    let mut sink = [0u8; 8192];
    let mut drained = 0usize;
    while drained < budget {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Ok(Ok(())) => match stream.try_read(&mut sink) {
                Ok(0) => break,
                Ok(n) => drained += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            },
            _ => break,
        }
    }
}

/// Answer 503 (which limit, in JSON) and close, without ever waiting on the client.
fn refuse(stream: &TcpStream, limits: &ServerLimits) {
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < REFUSED_DRAIN_BYTES {
        match stream.try_read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    let body = json!({
        "error": format!(
            "server busy: all {} connection slots are mid-request (--max-connections); retry shortly",
            limits.max_connections
        ),
        "limit": "max_connections",
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Best effort: a client whose socket buffer is full just sees the connection close.
    let _ = stream.try_write(answer.as_bytes());
}

/// The router as a hyper service that marks its connection busy while a handler runs.
struct Tracked {
    inner: TowerToHyperService<Router>,
    state: Arc<ConnState>,
    slots: Arc<Slots>,
}

/// Marks a connection busy; on drop, idle again from now.
struct Busy {
    state: Arc<ConnState>,
    slots: Arc<Slots>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.state
            .idle_since
            .store(self.slots.now(), Ordering::Release);
        self.state.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.state.busy.fetch_add(1, Ordering::AcqRel);
        let busy = Busy {
            state: self.state.clone(),
            slots: self.slots.clone(),
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answer = answer.await;
            drop(busy);
            answer
        })
    }
}

/// A TCP stream whose writes fail once they have made no progress for `limit`: hyper has no
/// write timeout, and a client that stops reading would otherwise hold its connection forever.
struct StallLimited {
    inner: TcpStream,
    limit: Duration,
    /// Running while a write is blocked; reset whenever one makes progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StallLimited {
    fn new(inner: TcpStream, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Turn a pending write into a timeout error once it has been pending for `limit`.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("client read nothing for {limit:?} (--request-timeout)"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StallLimited {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallLimited {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, polled)
    }
}
