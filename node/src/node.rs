//! Starting and stopping a node: the library's entry point.
//!
//! [`Node::start`] opens the data dir, loads the identity, builds the swarm, starts
//! the listeners and the API, and spawns the event loop. It returns once the node is
//! listening, with the addresses to hand to other nodes. [`Node::shutdown`] stops it
//! gracefully. The binary is a thin layer over these two.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    api::{self, Api, ApiError, FilesState},
    client::{Client, COMMAND_QUEUE},
    config::{Config, RelayProfile},
    datadir::{DataDir, DataDirError},
    deny::{BansFileError, DenyList},
    event_loop::{EventLoop, Health, ListenFailed, Parts},
    fetch::FetchContext,
    identity::{self, IdentityError},
    metrics::Metrics,
    relay_throttle::RelayThrottle,
    store::{Store, StoreError},
    swarm::{self, SwarmError},
};

/// How long start waits for listeners to report their addresses.
const LISTEN_WAIT: Duration = Duration::from_secs(3);
/// How long shutdown may take in all before tasks are abandoned.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(4);

/// Why a node could not start. Nothing was left running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The data dir is unusable.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The identity key is unusable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The saved ban list is unusable.
    #[error(transparent)]
    Bans(#[from] BansFileError),
    /// The swarm could not be built.
    #[error(transparent)]
    Swarm(#[from] SwarmError),
    /// No listener could start.
    #[error(transparent)]
    Listen(#[from] ListenFailed),
    /// The API could not start.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The content store could not be opened.
    #[error("content store: {0}")]
    Store(#[from] StoreError),
}

/// A running node.
pub struct Node {
    peer_id: PeerId,
    listen_addrs: Vec<Multiaddr>,
    api_addr: Option<SocketAddr>,
    client: Client,
    stop: watch::Sender<bool>,
    event_loop: JoinHandle<()>,
    api: JoinHandle<()>,
}

impl Node {
    /// Starts a node with `config`; returns once it listens.
    pub async fn start(config: Config) -> Result<Node, StartError> {
        let data_dir = DataDir::open(&config.data_dir)?;
        let key =
            identity::load_or_create(&config.identity_path(), config.identity_file.is_none())?;
        let peer_id = key.public().to_peer_id();
        let deny_list = DenyList::load(
            &config.deny_peers,
            &config.deny_cidrs,
            &data_dir.bans_path(),
        )?
        .with_allow_list(&config.allow_peers);
        let token = api::resolve_token(&config, &data_dir)?;
        let store = Arc::new(Store::open(
            &data_dir.path().join("store"),
            config.store_quota.get(),
        )?);

        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let files_metrics = metrics.files.clone();
        let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
        let relay_throttle = (config.relay_profile == RelayProfile::Data
            && config.relay_rate_per_peer.get() > 0)
            .then(|| {
                RelayThrottle::new(
                    config.relay_rate_per_peer.get(),
                    metrics.nat.relay_throttle_waits.clone(),
                )
            });
        let swarm = swarm::build(
            key,
            &config,
            deny_list,
            relay_throttle,
            metrics.streams.clone(),
            &mut registry,
        )?;

        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (health_tx, health_rx) = watch::channel(Health {
            last_tick: std::time::Instant::now(),
            ready: false,
            not_ready_reason: Some("starting".into()),
            warnings: Vec::new(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let client = Client::new(command_tx);

        let mut event_loop = EventLoop::new(
            Parts {
                swarm,
                commands: command_rx,
                data_dir,
                metrics,
                libp2p_metrics,
                health: health_tx,
                store: store.clone(),
            },
            &config,
        )?;
        let files = FilesState {
            fetch: FetchContext {
                client: client.clone(),
                store: store.clone(),
                metrics: files_metrics,
                window: config.fetch_window_per_provider,
                running: Default::default(),
            },
            store,
            chunk_size: config.chunk_size.get() as u32,
        };
        let api = Api::bind(
            config.api,
            client.clone(),
            Arc::new(registry),
            health_rx,
            token,
            stop_rx.clone(),
            files,
        )
        .await?;
        let api_addr = api.local_addr();
        let listen_addrs = event_loop.wait_for_listeners(LISTEN_WAIT).await;

        let mut loop_stop = stop_rx.clone();
        let event_loop = tokio::spawn(event_loop.run(async move {
            let _ = loop_stop.wait_for(|stop| *stop).await;
        }));
        // Returns at once when trimming is off (the default).
        tokio::spawn(crate::allocator::trim_every(
            config.heap_trim_interval.get(),
            stop_rx.clone(),
        ));
        let api = tokio::spawn(api.serve(stop_rx));
        tracing::info!(%peer_id, api = ?api_addr, "node started");
        Ok(Node {
            peer_id,
            listen_addrs,
            api_addr,
            client,
            stop: stop_tx,
            event_loop,
            api,
        })
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses it listens on, with `/p2p/<PeerId>`, as reported at start.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// Where the HTTP API listens.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// A handle for commands.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Stops the node: listeners closed, state saved, connections closed, API
    /// drained. Returns within [`SHUTDOWN_DEADLINE`] even if a task hangs.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let Node {
            event_loop, api, ..
        } = self;
        let both = async {
            let _ = event_loop.await;
            let _ = api.await;
        };
        if tokio::time::timeout(SHUTDOWN_DEADLINE, both).await.is_err() {
            tracing::warn!("shutdown deadline passed; abandoning remaining tasks");
        }
    }

    /// Runs until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}
