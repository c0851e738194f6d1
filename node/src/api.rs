//! The HTTP API: `/metrics`, `/livez`, `/readyz` and JSON under `/v1/`.
//!
//! Handlers hold a [`Client`] and never touch the Swarm. Bound to localhost by
//! default; bound anywhere else, `/v1/` requires `Authorization: Bearer <token>` while
//! the scrape and probe endpoints stay open, because Prometheus and Kubernetes probes
//! should not need a secret and reveal nothing an operator must hide.

use std::{convert::Infallible, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, Query, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use servant_protocol::manifest::ContentId;

use crate::{
    client::{Client, CommandError, ConnectTarget},
    config::Config,
    datadir::{write_atomic, DataDir},
    deny::BanTarget,
    event_loop::Health,
    fetch::{self, FetchContext, FetchRequest, Progress},
    store::{Store, StoreError},
};

/// Largest request body accepted; every JSON request of ours is far smaller.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// How long a non-streaming request may take before it gets 504.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `/livez` fails when the event loop has not ticked for this long.
pub const LIVENESS_STALL: Duration = Duration::from_secs(30);
/// The environment variable holding the bearer token, if not in a file.
pub const TOKEN_ENV: &str = "SERVANT_API_TOKEN";

/// OpenMetrics' content type, as prometheus-client writes it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct AppState {
    client: Client,
    registry: Arc<Registry>,
    health: watch::Receiver<Health>,
    token: Option<Arc<str>>,
    shutdown: watch::Receiver<bool>,
    files: FilesState,
}

/// What the file endpoints need besides the client.
#[derive(Clone)]
pub struct FilesState {
    /// The content store.
    pub store: Arc<Store>,
    /// Everything a fetch task needs.
    pub fetch: FetchContext,
    /// Chunk size of new shares.
    pub chunk_size: u32,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The address could not be bound.
    #[error("cannot bind the API to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file could not be read or created.
    #[error("API token {path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Finds the bearer token `/v1/` requires, or `None` when the API is on loopback.
///
/// In order: `SERVANT_API_TOKEN`, the `api_token_file` key, else `<data_dir>/api.token`,
/// generated on first use (mode 0600) so a node bound to `0.0.0.0` is never open.
pub fn resolve_token(config: &Config, data_dir: &DataDir) -> Result<Option<String>, ApiError> {
    if config.api.ip().is_loopback() {
        return Ok(None);
    }
    if let Ok(token) = std::env::var(TOKEN_ENV) {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok(Some(token));
        }
    }
    if let Some(path) = &config.api_token_file {
        return read_token(path).map(Some);
    }
    let path = data_dir.api_token_path();
    if path.exists() {
        return read_token(&path).map(Some);
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_atomic(&path, format!("{token}\n").as_bytes(), 0o600).map_err(|e| ApiError::Token {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    tracing::info!(path = %path.display(), "generated an API token for /v1/ (the API is not on localhost)");
    Ok(Some(token))
}

fn read_token(path: &Path) -> Result<String, ApiError> {
    let err = |reason: String| ApiError::Token {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(token)
}

/// A bound API listener, ready to serve.
pub struct Api {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl Api {
    /// Binds `addr` and prepares the routes.
    pub async fn bind(
        addr: SocketAddr,
        client: Client,
        registry: Arc<Registry>,
        health: watch::Receiver<Health>,
        token: Option<String>,
        shutdown: watch::Receiver<bool>,
        files: FilesState,
    ) -> Result<Api, ApiError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Bind { addr, source })?;
        let state = AppState {
            client,
            registry,
            health,
            token: token.map(Arc::from),
            shutdown,
            files,
        };
        Ok(Api {
            listener,
            router: router(state),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` turns true, with connections capped and headers on a
    /// deadline (see `http_server`).
    pub async fn serve(self, shutdown: watch::Receiver<bool>) {
        crate::http_server::serve(self.listener, self.router, shutdown).await;
    }
}

fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/reach", get(reach))
        .route("/connect", post(connect))
        .route("/bans", get(bans))
        .route("/ban", post(ban))
        .route("/unban", post(unban))
        .route("/publish", post(publish))
        .route("/subscribe", get(subscribe))
        .route("/share", post(share))
        .route("/shares", get(shares))
        .route("/unshare", post(unshare))
        .route("/fetch", post(fetch))
        .route("/search", get(search))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .nest("/v1", v1)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "this API is not on localhost: send Authorization: Bearer <token> (see api_token_file)",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so response time does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(ErrorBody { error: message })).into_response()
}

impl IntoResponse for CommandError {
    fn into_response(self) -> Response {
        let status = match &self {
            CommandError::NodeStopped => StatusCode::SERVICE_UNAVAILABLE,
            CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
            CommandError::NoAddress(_) => StatusCode::NOT_FOUND,
            CommandError::DialFailed(_) => StatusCode::BAD_GATEWAY,
            CommandError::Denied(_) => StatusCode::FORBIDDEN,
            CommandError::NoPeers(_) => StatusCode::SERVICE_UNAVAILABLE,
            CommandError::Broadcast(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_response(status, &self.to_string())
    }
}

/// Runs a client call with the request deadline.
async fn within<T>(
    fut: impl std::future::Future<Output = Result<T, CommandError>>,
) -> Result<T, Response> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.into_response()),
        Err(_) => Err(error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "the node did not answer in time",
        )),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics"),
    }
}

async fn livez(State(state): State<AppState>) -> Response {
    let stalled = state.health.borrow().last_tick.elapsed() > LIVENESS_STALL;
    if stalled {
        (StatusCode::SERVICE_UNAVAILABLE, "event loop stalled\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let health = state.health.borrow().clone();
    // Warnings do not fail the probe: a node at its connection caps still serves
    // the peers it has. They are in the body for whoever reads it.
    let warnings: String = health
        .warnings
        .iter()
        .map(|w| format!("warning: {w}\n"))
        .collect();
    if health.ready {
        (StatusCode::OK, format!("ready\n{warnings}")).into_response()
    } else {
        let reason = health.not_ready_reason.unwrap_or_else(|| "starting".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n{warnings}"),
        )
            .into_response()
    }
}

async fn status(State(state): State<AppState>) -> Response {
    match within(state.client.status()).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn reach(State(state): State<AppState>) -> Response {
    match within(state.client.reach()).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn peers(State(state): State<AppState>) -> Response {
    match within(state.client.peers()).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// Body of `POST /v1/connect`, `/v1/ban` and `/v1/unban`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TargetRequest {
    /// A multiaddr or PeerId (connect), a PeerId or CIDR (ban, unban).
    pub target: String,
}

async fn connect(State(state): State<AppState>, Json(req): Json<TargetRequest>) -> Response {
    let target: ConnectTarget = match req.target.parse() {
        Ok(t) => t,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    match within(state.client.connect(target)).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn bans(State(state): State<AppState>) -> Response {
    match within(state.client.bans()).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

fn parse_ban(req: &TargetRequest) -> Result<BanTarget, Box<Response>> {
    req.target
        .parse()
        .map_err(|e: String| Box::new(error_response(StatusCode::BAD_REQUEST, &e)))
}

async fn ban(State(state): State<AppState>, Json(req): Json<TargetRequest>) -> Response {
    let target = match parse_ban(&req) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match within(state.client.ban(target)).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn unban(State(state): State<AppState>, Json(req): Json<TargetRequest>) -> Response {
    let target = match parse_ban(&req) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match within(state.client.unban(target)).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// Body of `POST /v1/publish`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The topic.
    pub topic: String,
    /// An optional title.
    #[serde(default)]
    pub title: String,
    /// The message.
    pub body: String,
}

async fn publish(State(state): State<AppState>, Json(req): Json<PublishRequest>) -> Response {
    match within(state.client.publish(req.topic, req.title, req.body)).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// Query of `GET /v1/subscribe`.
#[derive(Debug, Deserialize)]
pub struct SubscribeQuery {
    /// The topic.
    pub topic: String,
}

/// Streams deliveries as JSON lines (`application/x-ndjson`) until the client goes
/// away or the node stops. A subscriber too slow to keep up skips ahead and is told
/// how many it missed in a `{"lagged": n}` line.
async fn subscribe(State(state): State<AppState>, Query(q): Query<SubscribeQuery>) -> Response {
    let receiver = match within(state.client.subscribe(q.topic)).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let stream = futures::stream::unfold(
        (receiver, state.shutdown.clone()),
        |(mut receiver, mut shutdown)| async move {
            let line = tokio::select! {
                item = receiver.recv() => match item {
                    Ok(delivery) => serde_json::to_vec(&*delivery).ok()?,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        format!("{{\"lagged\":{n}}}").into_bytes()
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = shutdown.wait_for(|stop| *stop) => return None,
            };
            let mut line = line;
            line.push(b'\n');
            Some((
                Ok::<Bytes, Infallible>(Bytes::from(line)),
                (receiver, shutdown),
            ))
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Turns a channel of serializable items into an NDJSON response; the response ends
/// when every sender is gone, and dropping it (the client left) closes the channel.
fn ndjson<T: Serialize + Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        let mut line = serde_json::to_vec(&item).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<Bytes, Infallible>(Bytes::from(line)), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

impl IntoResponse for StoreError {
    fn into_response(self) -> Response {
        let status = match &self {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::DiskFull { .. } | StoreError::QuotaFull { .. } => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            StoreError::AlreadyExists(_) => StatusCode::CONFLICT,
            StoreError::Io { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        error_response(status, &self.to_string())
    }
}

/// Body of `POST /v1/share`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShareRequest {
    /// An absolute path to a file or directory on the node's machine.
    pub path: std::path::PathBuf,
}

async fn share(State(state): State<AppState>, Json(req): Json<ShareRequest>) -> Response {
    if !req.path.is_absolute() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "the path must be absolute (the node does not know the caller's directory)",
        );
    }
    let store = state.files.store.clone();
    let chunk_size = state.files.chunk_size;
    let imported = tokio::task::spawn_blocking(move || store.import(&req.path, chunk_size)).await;
    let id = match imported {
        Ok(Ok((id, _))) => id,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    if let Err(e) = state.client.provide(id).await {
        return e.into_response();
    }
    match state.files.store.info(id) {
        Some(info) => Json(info).into_response(),
        None => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "imported content vanished",
        ),
    }
}

async fn shares(State(state): State<AppState>) -> Response {
    Json(state.files.store.list()).into_response()
}

/// Body of `POST /v1/unshare`.
#[derive(Debug, Serialize, Deserialize)]
pub struct IdRequest {
    /// A content id.
    pub id: String,
}

async fn unshare(State(state): State<AppState>, Json(req): Json<IdRequest>) -> Response {
    let id: ContentId = match req.id.parse() {
        Ok(id) => id,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("{e}")),
    };
    if let Err(e) = state.client.unprovide(id).await {
        return e.into_response();
    }
    let store = state.files.store.clone();
    match tokio::task::spawn_blocking(move || store.remove(id)).await {
        Ok(Ok(true)) => Json(serde_json::json!({ "id": id, "removed": true })).into_response(),
        Ok(Ok(false)) => {
            error_response(StatusCode::NOT_FOUND, &format!("{id} is not in the store"))
        }
        Ok(Err(e)) => e.into_response(),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Runs a fetch and streams its progress as JSON lines; the last line is `finished`
/// or `failed`. Closing the connection cancels the fetch (its verified chunks stay).
/// A fetch of content this node is fetching already is refused (409).
async fn fetch(State(state): State<AppState>, Json(req): Json<FetchRequest>) -> Response {
    for path in req.out.iter().chain(req.dir.iter()) {
        if !path.is_absolute() {
            return error_response(StatusCode::BAD_REQUEST, "output paths must be absolute");
        }
    }
    let ctx = state.files.fetch.clone();
    let Some(claim) = ctx.running.claim(req.id) else {
        return error_response(
            StatusCode::CONFLICT,
            &format!(
                "{} is already being fetched by this node; fetch it again once that \
                 fetch has ended",
                req.id
            ),
        );
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Progress>(64);
    tokio::spawn(async move {
        let last = match fetch::run(ctx.clone(), req.clone(), tx.clone(), claim).await {
            Ok(done) => done,
            Err(e) => {
                let info = ctx.store.info(req.id);
                Progress::Failed {
                    error: e.to_string(),
                    have_chunks: info.as_ref().map_or(0, |i| i.have_chunks),
                    chunks: info.as_ref().map_or(0, |i| i.chunks),
                }
            }
        };
        let _ = tx.send(last).await;
    });
    ndjson(rx)
}

/// Query of `GET /v1/search`.
#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    /// What to look for in content names.
    pub term: String,
    /// Hops the query may travel (1: connected peers only).
    #[serde(default = "default_ttl")]
    pub ttl: u8,
    /// How long to collect hits, in milliseconds (at most 60 s).
    #[serde(default = "default_search_ms")]
    pub timeout_ms: u64,
}

fn default_ttl() -> u8 {
    3
}

fn default_search_ms() -> u64 {
    3000
}

/// Streams hits as JSON lines as they arrive, until the timeout.
async fn search(State(state): State<AppState>, Query(q): Query<SearchQuery>) -> Response {
    let mut hits = match within(state.client.search(q.term, q.ttl)).await {
        Ok(rx) => rx,
        Err(r) => return r,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.timeout_ms.min(60_000));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(hit)) = tokio::time::timeout_at(deadline, hits.recv()).await {
            if tx.send(hit).await.is_err() {
                break;
            }
        }
    });
    ndjson(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
