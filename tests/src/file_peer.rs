//! A hostile file provider living in the test process: a bare rust-libp2p peer that
//! speaks `/servant/file/1.0.0` with Servant's own codec and serves whatever manifest
//! the test hands it, with corrupt chunks (a liar) or the chunks the test gives it (a
//! peer with a hostile manifest).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use libp2p::{
    identify, identity::Keypair, noise, request_response, swarm::NetworkBehaviour,
    swarm::SwarmEvent, tcp, yamux, Multiaddr, PeerId,
};
use servant::codecs::{FileCodec, FILE_PROTOCOL};
use servant_protocol::{
    file::{Request, Response},
    manifest::{Manifest, MAX_CHUNK_SIZE},
};

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    file: request_response::Behaviour<FileCodec>,
}

/// A running liar.
pub struct LyingProvider {
    /// Its PeerId.
    pub peer_id: PeerId,
    /// Corrupt chunks it has sent.
    pub chunks_sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LyingProvider {
    /// Starts a liar that knows `manifest` (exact bytes) and dials `target`.
    pub async fn start(target: Multiaddr, manifest: Vec<u8>) -> Result<LyingProvider> {
        Self::serving(target, manifest, None).await
    }

    /// Starts a provider of `manifest` that serves `chunks` by index (or corrupt ones
    /// when `None`), and dials `target`.
    pub async fn serving(
        target: Multiaddr,
        manifest: Vec<u8>,
        chunks: Option<Vec<Vec<u8>>>,
    ) -> Result<LyingProvider> {
        let id = Manifest::id_of(&manifest);
        let key = Keypair::generate_ed25519();
        let peer_id = key.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|key| Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    servant::behaviour::PROTOCOL_VERSION.into(),
                    key.public(),
                )),
                file: request_response::Behaviour::with_codec(
                    FileCodec,
                    [(FILE_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default(),
                ),
            })
            .map_err(|e| anyhow!("{e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        swarm.dial(target)?;
        let chunks_sent = Arc::new(AtomicU64::new(0));
        let sent = chunks_sent.clone();
        let task = tokio::spawn(async move {
            loop {
                let event = swarm.select_next_some().await;
                let SwarmEvent::Behaviour(BehaviourEvent::File(request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                })) = event
                else {
                    continue;
                };
                let response = match request {
                    Request::Manifest(asked) if asked == id => Response::Manifest(manifest.clone()),
                    Request::Chunk { id: asked, index } if asked == id => {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if let Some(chunks) = &chunks {
                            let _ = swarm.behaviour_mut().file.send_response(
                                channel,
                                chunks
                                    .get(index as usize)
                                    .map_or(Response::NotFound, |c| Response::Chunk(c.clone())),
                            );
                            continue;
                        }
                        // Plausible length, wrong bytes.
                        let len = (index as usize % 7 + 1) * 1024;
                        Response::Chunk(vec![0xa5; len.min(MAX_CHUNK_SIZE as usize)])
                    }
                    _ => Response::NotFound,
                };
                let _ = swarm.behaviour_mut().file.send_response(channel, response);
            }
        });
        Ok(LyingProvider {
            peer_id,
            chunks_sent,
            task,
        })
    }
}

impl Drop for LyingProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}
