//! Fetching content from many providers at once, verifying every chunk.
//!
//! A fetch runs as a task of its own and talks to the event loop only through a
//! [`Client`]. It finds providers (Kademlia records and connected peers), takes the
//! manifest from whichever provider answers first with bytes that hash to the content
//! id, then pulls the missing chunks: each provider has a window of requests in flight
//! that grows while it delivers and halves when it is busy or fails, so faster
//! providers serve more chunks. Every chunk is checked against the manifest before it
//! is written; a provider that sends a corrupt chunk is penalized and not asked again
//! in this fetch, and the chunk goes back in the queue for another provider.
//!
//! Verified chunks are kept as they arrive, so an interrupted fetch (a closed client,
//! a killed node) resumes from them. A single file to a path is normally linked by the
//! store ([`Store::link`]): each chunk is written once, to its offset in the output's
//! part file, and completion is a rename. Otherwise (content partly held as blocks
//! already) chunks go to the store as blocks and also to a part file ([`PartFile`]);
//! a directory, or content the store already holds, is exported from the store
//! through a temporary file and a rename. Then the node starts providing it.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use servant_protocol::{
    file::{Request, Response},
    manifest::{ContentId, Kind, Manifest},
};
use tokio::sync::mpsc;

use crate::{
    client::Client,
    metrics::{FileMetrics, ReasonLabel},
    part_file::PartFile,
    store::{Store, StoreError},
};

/// Requests in flight to a new provider before it has proved itself.
const INITIAL_WINDOW: u32 = 4;
/// Manifest requests in flight at once while looking for providers.
const MANIFEST_PARALLELISM: usize = 16;
/// After the first good manifest, other candidates get this long to answer too.
const MANIFEST_GRACE: Duration = Duration::from_secs(2);
/// Consecutive failures after which a provider is given up (until a later lookup
/// finds it again).
const MAX_FAILURES: u32 = 3;
/// Failed requests to one provider within this long of each other count as one
/// failure (they are the same lost connection), and a provider that failed is not
/// asked again within it.
const FAILURE_BURST: Duration = Duration::from_secs(1);
/// Wait before asking a busy provider again.
const BUSY_BACKOFF: Duration = Duration::from_millis(250);
/// A fetch with no provider left gives up after this long without progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between provider lookups while no provider is left.
const REDISCOVER_PAUSE: Duration = Duration::from_secs(2);
/// How often progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// What to fetch and where to put it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The content id.
    pub id: ContentId,
    /// The output path (a file, or a directory for a directory's content). Absolute:
    /// the node does not know the caller's working directory.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// A directory to save into under the content's own (sanitized) name, when `out`
    /// is not given.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Replace an existing output.
    #[serde(default)]
    pub overwrite: bool,
}

/// Progress of a fetch, streamed to the caller as JSON lines.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The manifest is known.
    Started {
        /// Content id.
        id: ContentId,
        /// Its name.
        name: String,
        /// File or directory.
        kind: Kind,
        /// Total bytes.
        size: u64,
        /// Total chunks.
        chunks: u64,
        /// Chunks already verified before this run (a resume).
        have_chunks: u64,
        /// Providers found.
        providers: usize,
    },
    /// Periodic progress.
    Progress {
        /// Verified chunks.
        done_chunks: u64,
        /// Verified bytes.
        done_bytes: u64,
        /// Total bytes.
        size: u64,
        /// Providers in use.
        providers: usize,
        /// Bytes per second over the last interval.
        rate: u64,
    },
    /// A provider was dropped from this fetch.
    ProviderDropped {
        /// Its PeerId.
        peer: String,
        /// `corrupt_chunk`, `not_found`, `unreachable` or `busy` (nothing but "busy" for 30 s).
        reason: String,
    },
    /// Done: the content is complete and exported.
    Finished {
        /// Content id.
        id: ContentId,
        /// Where it was written, if anywhere.
        path: Option<PathBuf>,
        /// Total bytes.
        size: u64,
        /// Chunks fetched in this run, per provider.
        providers: Vec<ProviderShare>,
        /// Chunks that were already verified before this run.
        resumed_chunks: u64,
        /// Time taken, in milliseconds.
        elapsed_ms: u64,
    },
    /// Failed; the verified chunks are kept for the next attempt.
    Failed {
        /// What went wrong.
        error: String,
        /// Chunks verified so far.
        have_chunks: u64,
        /// Total chunks (0 if the manifest was never found).
        chunks: u64,
    },
}

/// How many chunks one provider delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderShare {
    /// Its PeerId.
    pub peer: String,
    /// Chunks it delivered (verified).
    pub chunks: u64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No peer had the manifest.
    #[error("no provider found for {0}")]
    NoProviders(ContentId),
    /// Providers went away and none came back in time.
    #[error("no provider left for {id}: {have} of {total} chunks verified and kept{why}; run the fetch again to resume")]
    Stalled {
        /// Content id.
        id: ContentId,
        /// Verified chunks.
        have: u64,
        /// Total chunks.
        total: u64,
        /// The last failure seen, as `; last failure: ...`, or empty.
        why: String,
    },
    /// The store or the output could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node stopped or the caller went away.
    #[error("fetch cancelled: {0}")]
    Cancelled(String),
}

/// What a fetch needs from the node.
#[derive(Clone)]
pub struct FetchContext {
    /// The way to the event loop.
    pub client: Client,
    /// The content store.
    pub store: Arc<Store>,
    /// File metrics.
    pub metrics: FileMetrics,
    /// Most requests in flight per provider.
    pub window: u32,
    /// The contents being fetched right now.
    pub running: Running,
}

/// The contents this node is fetching. One fetch per content at a time: two would
/// ask providers for the same chunks twice and race to finish the same store entry.
#[derive(Debug, Clone, Default)]
pub struct Running(Arc<std::sync::Mutex<HashSet<ContentId>>>);

impl Running {
    /// Claims `id` for one fetch; `None` while another fetch of it runs.
    pub fn claim(&self, id: ContentId) -> Option<RunningClaim> {
        let mut running = self.0.lock().unwrap_or_else(|e| e.into_inner());
        running.insert(id).then(|| RunningClaim {
            running: self.clone(),
            id,
        })
    }
}

/// A fetch's hold on its content; dropping it (the fetch ended, however) frees it.
#[derive(Debug)]
pub struct RunningClaim {
    running: Running,
    id: ContentId,
}

impl Drop for RunningClaim {
    fn drop(&mut self) {
        let mut running = self.running.0.lock().unwrap_or_else(|e| e.into_inner());
        running.remove(&self.id);
    }
}

struct ProviderState {
    window: u32,
    in_flight: u32,
    failures: u32,
    last_failure: Option<Instant>,
    delivered: u64,
    retry_after: Option<Instant>,
    dropped: bool,
    /// When it last delivered a chunk (or joined): a provider that answers nothing
    /// but "busy" for [`STALL_TIMEOUT`] is dropped, or it could hold a fetch forever.
    last_delivery: Instant,
}

impl ProviderState {
    fn new(max_window: u32) -> Self {
        ProviderState {
            window: INITIAL_WINDOW.min(max_window),
            in_flight: 0,
            failures: 0,
            last_failure: None,
            delivered: 0,
            retry_after: None,
            dropped: false,
            last_delivery: Instant::now(),
        }
    }
}

enum Outcome {
    Verified {
        peer: PeerId,
        bytes: u64,
    },
    Corrupt {
        peer: PeerId,
        index: u64,
    },
    Missing {
        peer: PeerId,
        index: u64,
    },
    Busy {
        peer: PeerId,
        index: u64,
    },
    Failed {
        peer: PeerId,
        index: u64,
        error: String,
    },
    Store(StoreError),
}

/// Keeps the active-fetch gauge right however the fetch ends.
struct ActiveGuard(FileMetrics);

impl ActiveGuard {
    fn new(metrics: &FileMetrics) -> Self {
        metrics.active_fetches.inc();
        ActiveGuard(metrics.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active_fetches.dec();
    }
}

/// The error of a fetch whose caller went away.
fn gone() -> FetchError {
    FetchError::Cancelled("the caller went away".into())
}

/// Runs a fetch to its end, reporting progress on `progress`. Stops early if the
/// receiver of `progress` goes away. `_claim` (from [`Running::claim`]) is held until
/// the fetch ends.
pub async fn run(
    ctx: FetchContext,
    request: FetchRequest,
    progress: mpsc::Sender<Progress>,
    _claim: RunningClaim,
) -> Result<Progress, FetchError> {
    let _active = ActiveGuard::new(&ctx.metrics);
    let result = Fetch::new(ctx.clone(), request, progress.clone())
        .run()
        .await;
    let label = match &result {
        Ok(_) => "ok",
        Err(FetchError::NoProviders(_)) => "no_providers",
        Err(FetchError::Stalled { .. }) => "stalled",
        Err(FetchError::Store(_)) => "store_error",
        Err(FetchError::Cancelled(_)) => "cancelled",
    };
    ctx.metrics
        .fetches
        .get_or_create(&ReasonLabel { reason: label })
        .inc();
    result
}

struct Fetch {
    ctx: FetchContext,
    request: FetchRequest,
    progress: mpsc::Sender<Progress>,
    started: Instant,
    providers: HashMap<PeerId, ProviderState>,
    /// Peers never to ask again in this fetch: liars.
    excluded: HashSet<PeerId>,
    /// The last chunk request that failed, for the error a stalled fetch ends with.
    last_error: Option<(PeerId, String)>,
}

impl Fetch {
    fn new(ctx: FetchContext, request: FetchRequest, progress: mpsc::Sender<Progress>) -> Self {
        Fetch {
            ctx,
            request,
            progress,
            started: Instant::now(),
            providers: HashMap::new(),
            excluded: HashSet::new(),
            last_error: None,
        }
    }

    async fn report(&self, event: Progress) -> Result<(), FetchError> {
        self.progress.send(event).await.map_err(|_| gone())
    }

    /// Runs `work` unless the caller goes away first. A fetch with nothing to report
    /// (looking for providers, or waiting for them) would otherwise notice a closed
    /// client only at its next progress event, up to the stall timeout later, and
    /// hold its content's claim ([`Running`]) until then.
    async fn unless_gone<T>(
        progress: &mpsc::Sender<Progress>,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, FetchError> {
        tokio::select! {
            done = work => Ok(done),
            _ = progress.closed() => Err(gone()),
        }
    }

    async fn run(mut self) -> Result<Progress, FetchError> {
        let id = self.request.id;
        let store = self.ctx.store.clone();
        let complete = store.info(id).is_some_and(|i| i.complete);
        let (manifest, mut have) = if complete {
            let bytes = store
                .manifest_bytes(id)?
                .ok_or(FetchError::Store(StoreError::NotFound(id)))?;
            blocking(move || store.begin_fetch(id, &bytes)).await?
        } else {
            let bytes = self.find_manifest().await?;
            let store = store.clone();
            blocking(move || store.begin_fetch(id, &bytes)).await?
        };
        let total = manifest.chunk_count() as u64;
        let path = self.request.out.clone().or_else(|| {
            self.request
                .dir
                .as_ref()
                .map(|d| d.join(manifest.safe_name()))
        });
        let mut linked = false;
        // Without an output path, a content linked by an earlier fetch still resumes
        // into that fetch's part file.
        let link_to = path
            .clone()
            .or_else(|| self.ctx.store.info(id).and_then(|i| i.path));
        if let Some(link_to) = link_to {
            if manifest.kind == Kind::File && have.contains(&false) {
                let store = self.ctx.store.clone();
                let (path, overwrite) = (link_to, self.request.overwrite);
                if let Some(verified) = blocking(move || store.link(id, &path, overwrite)).await? {
                    have = verified;
                    linked = true;
                }
            }
        }
        let resumed = have.iter().filter(|h| **h).count() as u64;
        self.report(Progress::Started {
            id,
            name: manifest.name.clone(),
            kind: manifest.kind,
            size: manifest.total_size(),
            chunks: total,
            have_chunks: resumed,
            providers: self.providers.len(),
        })
        .await?;
        let mut queue: VecDeque<u64> = have
            .iter()
            .enumerate()
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i as u64)
            .collect();
        let part = match &path {
            Some(path) if manifest.kind == Kind::File && !queue.is_empty() && !linked => {
                let (store, manifest, have) =
                    (self.ctx.store.clone(), manifest.clone(), have.clone());
                let (path, overwrite) = (path.clone(), self.request.overwrite);
                let (part, lost) =
                    blocking(move || start_part(&store, id, &manifest, &have, &path, overwrite))
                        .await?;
                queue.extend(lost);
                Some(Arc::new(part))
            }
            _ => None,
        };
        if !queue.is_empty() {
            let mut pending = vec![false; total as usize];
            for &index in &queue {
                if let Some(p) = pending.get_mut(index as usize) {
                    *p = true;
                }
            }
            let done_bytes: u64 = manifest
                .chunks()
                .zip(&pending)
                .filter(|(_, p)| !**p)
                .map(|(c, _)| u64::from(c.len))
                .sum();
            let done_chunks = total - queue.len() as u64;
            let pulled = self
                .pull(&manifest, queue, done_chunks, done_bytes, part.clone())
                .await;
            if let Err(e) = pulled {
                if let Some(part) = &part {
                    part.abandon();
                }
                return Err(e);
            }
        }

        let store = self.ctx.store.clone();
        let evicted = blocking(move || store.complete(id)).await?;
        for old in evicted {
            self.ctx.metrics.store_evictions.inc();
            let _ = self.ctx.client.unprovide(old).await;
        }
        let _ = self.ctx.client.provide(id).await;
        // Completing renamed a linked fetch's part file onto the output, unless an
        // earlier fetch of the same content to another path left the link there
        // (then: a copy, as below).
        let kept_there =
            linked && path.is_some() && self.ctx.store.info(id).and_then(|i| i.path) == path;
        match (part, &path) {
            (Some(part), _) => blocking(move || part.finish()).await.map(drop)?,
            (None, Some(_)) if kept_there => {}
            (None, Some(path)) => {
                let store = self.ctx.store.clone();
                let (path, overwrite) = (path.clone(), self.request.overwrite);
                blocking(move || store.export(id, &path, overwrite)).await?;
            }
            (None, None) => {}
        }
        let used = self.providers.values().filter(|p| p.delivered > 0).count();
        if used > 0 {
            self.ctx.metrics.providers_per_fetch.observe(used as f64);
        }
        let mut shares: Vec<ProviderShare> = self
            .providers
            .iter()
            .filter(|(_, p)| p.delivered > 0)
            .map(|(peer, p)| ProviderShare {
                peer: peer.to_string(),
                chunks: p.delivered,
            })
            .collect();
        shares.sort_by_key(|s| std::cmp::Reverse(s.chunks));
        Ok(Progress::Finished {
            id,
            path,
            size: manifest.total_size(),
            providers: shares,
            resumed_chunks: resumed,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        })
    }

    /// Looks for providers and returns the first manifest that hashes to the id.
    /// Every candidate that answers with the manifest becomes a provider.
    async fn find_manifest(&mut self) -> Result<Vec<u8>, FetchError> {
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            let progress = self.progress.clone();
            let found = Self::unless_gone(&progress, self.discover()).await??;
            if let Some(bytes) = found {
                return Ok(bytes);
            }
            if Instant::now() >= deadline {
                return Err(FetchError::NoProviders(self.request.id));
            }
            Self::unless_gone(&progress, tokio::time::sleep(REDISCOVER_PAUSE)).await?;
        }
    }

    /// One round of provider discovery: a DHT lookup, then a manifest request to
    /// every candidate not yet known or excluded. Returns a verified manifest if one
    /// arrived.
    async fn discover(&mut self) -> Result<Option<Vec<u8>>, FetchError> {
        let id = self.request.id;
        let found = self
            .ctx
            .client
            .find_providers(id)
            .await
            .map_err(|e| FetchError::Cancelled(e.to_string()))?;
        let candidates: Vec<PeerId> = found
            .recorded
            .into_iter()
            .chain(found.connected)
            .filter(|p| {
                !self.excluded.contains(p) && self.providers.get(p).is_none_or(|s| s.dropped)
            })
            .collect();
        let mut asks = FuturesUnordered::new();
        let mut waiting = candidates.into_iter();
        let ask = |peer: PeerId| {
            let client = self.ctx.client.clone();
            async move { (peer, client.file_request(peer, Request::Manifest(id)).await) }
        };
        for peer in waiting.by_ref().take(MANIFEST_PARALLELISM) {
            asks.push(ask(peer));
        }
        let mut manifest: Option<Vec<u8>> = None;
        let mut grace: Option<Instant> = None;
        loop {
            let next = match grace {
                Some(until) => match tokio::time::timeout_at(until.into(), asks.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => asks.next().await,
            };
            let Some((peer, answer)) = next else { break };
            if let Some(more) = waiting.next() {
                asks.push(ask(more));
            }
            match answer {
                Ok(Response::Manifest(bytes)) if Manifest::id_of(&bytes) == id => {
                    // A provider dropped earlier (it went away, or was busy) may be
                    // back: it starts afresh, keeping its count for the report.
                    let delivered = self.providers.get(&peer).map_or(0, |p| p.delivered);
                    let mut state = ProviderState::new(self.ctx.window);
                    state.delivered = delivered;
                    self.providers.insert(peer, state);
                    if manifest.is_none() {
                        manifest = Some(bytes);
                        grace = Some(Instant::now() + MANIFEST_GRACE);
                    }
                }
                Ok(Response::Manifest(_)) => {
                    tracing::warn!(%peer, content = %id, "manifest does not match its id");
                    self.excluded.insert(peer);
                    self.ctx.client.penalize(peer, "bad_manifest").await;
                }
                // Not (yet) a provider: it may have the content by the next round.
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "manifest request failed");
                }
            }
        }
        Ok(manifest)
    }

    /// Pulls every chunk in `queue` from the providers.
    async fn pull(
        &mut self,
        manifest: &Manifest,
        mut queue: VecDeque<u64>,
        mut done_chunks: u64,
        mut done_bytes: u64,
        part: Option<Arc<PartFile>>,
    ) -> Result<(), FetchError> {
        let id = self.request.id;
        let total = manifest.chunk_count() as u64;
        let size = manifest.total_size();
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        let mut last_bytes = done_bytes;
        let mut last_progress = Instant::now();
        loop {
            // Hand out work: one chunk per provider per round, so a new provider is
            // not starved by one that already has a full window.
            let now = Instant::now();
            loop {
                let mut handed = false;
                for (peer, state) in self.providers.iter_mut() {
                    if state.dropped
                        || state.in_flight >= state.window
                        || state.retry_after.is_some_and(|t| t > now)
                    {
                        continue;
                    }
                    let Some(index) = queue.pop_front() else {
                        break;
                    };
                    state.in_flight += 1;
                    let (client, store) = (self.ctx.client.clone(), self.ctx.store.clone());
                    let output = part
                        .clone()
                        .zip(manifest.chunk(index))
                        .map(|(part, chunk)| (part, chunk.offset));
                    in_flight.push(request_chunk(client, store, id, *peer, index, output).boxed());
                    handed = true;
                }
                if !handed || queue.is_empty() {
                    break;
                }
            }
            if queue.is_empty() && in_flight.is_empty() {
                return Ok(());
            }
            if in_flight.is_empty() {
                // Nothing under way: providers are all waiting after "busy", or gone.
                if last_progress.elapsed() >= STALL_TIMEOUT {
                    return Err(FetchError::Stalled {
                        id,
                        have: done_chunks,
                        total,
                        why: self
                            .last_error
                            .as_ref()
                            .map(|(peer, e)| format!("; last failure, from {peer}: {e}"))
                            .unwrap_or_default(),
                    });
                }
                let waiting = self
                    .providers
                    .values()
                    .filter(|p| !p.dropped)
                    .filter_map(|p| p.retry_after)
                    .min();
                let progress = self.progress.clone();
                if let Some(until) = waiting {
                    Self::unless_gone(&progress, tokio::time::sleep_until(until.into())).await?;
                    continue;
                }
                Self::unless_gone(&progress, tokio::time::sleep(REDISCOVER_PAUSE)).await?;
                // New providers answer with the manifest; it is already known.
                let _ = Self::unless_gone(&progress, self.discover()).await??;
                continue;
            }
            tokio::select! {
                outcome = in_flight.next() => {
                    let Some(outcome) = outcome else { continue };
                    match outcome {
                        Outcome::Verified { peer, bytes, .. } => {
                            done_chunks += 1;
                            done_bytes += bytes;
                            last_progress = Instant::now();
                            self.ctx.metrics.chunks_verified.inc();
                            self.ctx.metrics.bytes_fetched.inc_by(bytes);
                            if let Some(p) = self.providers.get_mut(&peer) {
                                p.in_flight = p.in_flight.saturating_sub(1);
                                p.delivered += 1;
                                p.failures = 0;
                                p.last_delivery = Instant::now();
                                if p.window < self.ctx.window {
                                    p.window += 1;
                                }
                            }
                        }
                        Outcome::Corrupt { peer, index } => {
                            self.ctx.metrics.chunks_rejected.inc();
                            tracing::warn!(%peer, content = %id, index, "corrupt chunk refused; provider dropped");
                            queue.push_front(index);
                            self.release(peer);
                            self.drop_provider(peer, "corrupt_chunk").await?;
                            self.ctx.client.penalize(peer, "corrupt_chunk").await;
                        }
                        Outcome::Missing { peer, index } => {
                            queue.push_front(index);
                            self.release(peer);
                            self.drop_provider(peer, "not_found").await?;
                        }
                        Outcome::Busy { peer, index } => {
                            queue.push_back(index);
                            self.release(peer);
                            let starved = match self.providers.get_mut(&peer) {
                                Some(p) => {
                                    p.window = (p.window / 2).max(1);
                                    p.retry_after = Some(Instant::now() + BUSY_BACKOFF);
                                    p.last_delivery.elapsed() >= STALL_TIMEOUT
                                }
                                None => false,
                            };
                            if starved {
                                self.drop_provider(peer, "busy").await?;
                            }
                        }
                        Outcome::Failed { peer, index, error } => {
                            queue.push_front(index);
                            let now = Instant::now();
                            let give_up = match self.providers.get_mut(&peer) {
                                Some(p) => {
                                    p.in_flight = p.in_flight.saturating_sub(1);
                                    // One lost connection fails every request in flight
                                    // on it at once: that is one failure, not sixteen.
                                    let burst = p
                                        .last_failure
                                        .is_some_and(|t| now.duration_since(t) < FAILURE_BURST);
                                    if !burst {
                                        p.failures += 1;
                                        p.window = (p.window / 2).max(1);
                                        p.last_failure = Some(now);
                                    }
                                    // Not asked again within the burst: a provider that
                                    // is gone fails at once, and every retry is a dial.
                                    p.retry_after = Some(now + FAILURE_BURST);
                                    p.failures >= MAX_FAILURES
                                }
                                None => false,
                            };
                            tracing::debug!(%peer, index, %error, "chunk request failed");
                            // A failure on a relayed connection explains the dial
                            // failures that follow it (the circuit is gone): keep it.
                            let explains = self
                                .last_error
                                .as_ref()
                                .is_some_and(|(_, e)| e.contains("relayed connection"));
                            if !explains || error.contains("relayed connection") {
                                self.last_error = Some((peer, error));
                            }
                            if give_up {
                                self.drop_provider(peer, "unreachable").await?;
                            }
                        }
                        Outcome::Store(e) => return Err(e.into()),
                    }
                }
                _ = ticker.tick() => {
                    let elapsed = PROGRESS_INTERVAL.as_secs_f64();
                    let rate = ((done_bytes - last_bytes) as f64 / elapsed) as u64;
                    last_bytes = done_bytes;
                    let providers = self.providers.values().filter(|p| !p.dropped).count();
                    self.report(Progress::Progress { done_chunks, done_bytes, size, providers, rate }).await?;
                }
            }
        }
    }

    /// One request to `peer` has ended.
    fn release(&mut self, peer: PeerId) {
        if let Some(p) = self.providers.get_mut(&peer) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }

    async fn drop_provider(&mut self, peer: PeerId, reason: &str) -> Result<(), FetchError> {
        if let Some(p) = self.providers.get_mut(&peer) {
            if p.dropped {
                return Ok(());
            }
            p.dropped = true;
        }
        // A liar is never asked again; a provider that went away or said it lacks
        // the content may come back through a later provider lookup.
        if reason == "corrupt_chunk" {
            self.excluded.insert(peer);
        }
        self.report(Progress::ProviderDropped {
            peer: peer.to_string(),
            reason: reason.to_string(),
        })
        .await
    }
}

/// Starts the part file of a single-file fetch and copies into it the chunks the
/// store already holds (a resume). Returns the chunks the store turned out not to
/// hold after all, to be fetched again.
fn start_part(
    store: &Store,
    id: ContentId,
    manifest: &Manifest,
    have: &[bool],
    out: &std::path::Path,
    overwrite: bool,
) -> Result<(PartFile, Vec<u64>), StoreError> {
    let part = PartFile::create(out, manifest.total_size(), overwrite)?;
    let mut lost = Vec::new();
    for (index, chunk) in manifest.chunks().enumerate() {
        if !have.get(index).copied().unwrap_or(false) {
            continue;
        }
        match store.read_chunk(id, index as u64) {
            Ok(Some(data)) => {
                if let Err(e) = part.write_at(chunk.offset, &data) {
                    part.abandon();
                    return Err(e);
                }
            }
            Ok(None) => lost.push(index as u64),
            Err(e) => {
                part.abandon();
                return Err(e);
            }
        }
    }
    Ok((part, lost))
}

/// One chunk request and, if the chunk arrives, its verification and writes: to the
/// store, and to its offset in the output's part file when there is one.
async fn request_chunk(
    client: Client,
    store: Arc<Store>,
    id: ContentId,
    peer: PeerId,
    index: u64,
    output: Option<(Arc<PartFile>, u64)>,
) -> Outcome {
    match client
        .file_request(peer, Request::Chunk { id, index })
        .await
    {
        Ok(Response::Chunk(data)) => {
            let bytes = data.len() as u64;
            let result = tokio::task::spawn_blocking(move || {
                let written = store
                    .put_chunk(id, index, &data)
                    .and_then(|()| match output {
                        Some((part, offset)) => part.write_at(offset, &data),
                        None => Ok(()),
                    });
                crate::chunk_pool::give(data);
                written
            })
            .await;
            match result {
                Ok(Ok(())) => Outcome::Verified { peer, bytes },
                Ok(Err(StoreError::HashMismatch { .. })) => Outcome::Corrupt { peer, index },
                Ok(Err(e)) => Outcome::Store(e),
                Err(e) => Outcome::Failed {
                    peer,
                    index,
                    error: e.to_string(),
                },
            }
        }
        Ok(Response::Busy) => Outcome::Busy { peer, index },
        Ok(Response::NotFound | Response::BadRequest) => Outcome::Missing { peer, index },
        Ok(Response::Manifest(_)) => Outcome::Failed {
            peer,
            index,
            error: "answered a chunk request with a manifest".into(),
        },
        Err(error) => Outcome::Failed { peer, index, error },
    }
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchError::Cancelled(e.to_string()))?
        .map_err(FetchError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use servant_protocol::manifest::Hash;

    #[test]
    fn one_claim_per_content_until_it_is_dropped() {
        let running = Running::default();
        let (a, b) = (Hash::of(b"a"), Hash::of(b"b"));
        let claim = running.claim(a);
        assert!(claim.is_some());
        assert!(
            running.claim(a).is_none(),
            "a second claim of a running fetch"
        );
        assert!(running.claim(b).is_some(), "another content is independent");
        drop(claim);
        assert!(
            running.claim(a).is_some(),
            "free again once the fetch ended"
        );
    }
}
