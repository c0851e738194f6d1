//! Plain streams for Servant's own protocols: open one to a peer for a protocol, or
//! accept every inbound stream of a protocol (the AutoNAT v2 client's dial requests
//! and dial-backs, see [`crate::reach`]).
//!
//! This replaces libp2p-stream 0.5.0-alpha, whose behaviour keeps a channel for every
//! connection it ever saw: its map from connection to channel gains an entry per
//! connection and loses none when the connection closes (about 300 bytes each, a few
//! hundred connections per 10 minutes under the soak's churn). Here the behaviour
//! holds only the connections that are open and the requests still waiting for a
//! dial; both shrink as connections close and dials end.
//!
//! A request goes from a [`Control`] to the behaviour over a channel, the behaviour
//! hands it to one of the peer's connections (dialing the peer first if there is
//! none), and that connection's handler asks for an outbound stream and answers the
//! request with it. Inbound streams are offered to the protocols registered with
//! [`Control::accept`]; with no one accepting, the protocol is not offered at all.
//! Each handler keeps its own copy of the accepted protocols, which the behaviour
//! refreshes with a command whenever one is accepted or given up: a handler's
//! protocols change only through a call into it, as [`crate::flat_protocols`] needs.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use futures::{
    channel::{mpsc, oneshot},
    future::{ready, Ready},
    StreamExt,
};
use libp2p::{
    core::{transport::PortUse, Endpoint, UpgradeInfo},
    swarm::{
        dial_opts::DialOpts,
        handler::{
            ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
        },
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, DialError,
        FromSwarm, NetworkBehaviour, NotifyHandler, Stream, StreamProtocol, StreamUpgradeError,
        SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    InboundUpgrade, Multiaddr, OutboundUpgrade, PeerId,
};

/// Inbound streams queued per accepted protocol before the acceptor takes them;
/// beyond this an inbound stream is dropped (reset), not queued without bound.
const ACCEPT_QUEUE: usize = 16;
/// Requests waiting for a dial to a peer; beyond this a request fails at once.
const MAX_WAITING_FOR_DIAL: usize = 256;

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenStreamError {
    /// The peer does not speak the protocol. Only where the stream is negotiated
    /// eagerly: Servant's swarm negotiates lazily, so there the refusal comes on the
    /// stream's first read instead (see [`crate::negotiation::refused`]).
    #[error("the peer does not support {0}")]
    UnsupportedProtocol(StreamProtocol),
    /// The peer could not be reached.
    #[error("cannot reach the peer: {0}")]
    Dial(String),
    /// The connection failed or closed before the stream was open.
    #[error("opening the stream failed: {0}")]
    Io(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Stopped,
}

/// A second [`Control::accept`] for a protocol already accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is already accepted elsewhere")]
pub struct AlreadyAccepted(StreamProtocol);

/// Who accepts which inbound protocol: shared by the controls and every handler.
type Acceptors = Arc<Mutex<HashMap<StreamProtocol, mpsc::Sender<(PeerId, Stream)>>>>;

fn lock(
    acceptors: &Acceptors,
) -> MutexGuard<'_, HashMap<StreamProtocol, mpsc::Sender<(PeerId, Stream)>>> {
    // A panic while holding the lock leaves a map that is still consistent (every
    // operation on it is a single insert, remove or lookup).
    acceptors.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a [`Control`] asks of the behaviour.
#[derive(Debug)]
enum Request {
    /// A stream to a peer.
    Open(PeerId, Open),
    /// The accepted protocols changed: tell every connection.
    Refresh,
}

/// A command to one connection's handler.
#[derive(Debug)]
pub enum In {
    /// Open a stream.
    Open(Open),
    /// The protocols accepted from now on.
    Protocols(Vec<StreamProtocol>),
}

/// One request for an outbound stream.
#[derive(Debug)]
pub struct Open {
    protocol: StreamProtocol,
    reply: oneshot::Sender<Result<Stream, OpenStreamError>>,
}

/// A handle for opening and accepting streams; cheap to clone.
#[derive(Clone)]
pub struct Control {
    requests: mpsc::UnboundedSender<Request>,
    acceptors: Acceptors,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    /// Opens a stream to `peer` speaking `protocol`, dialing the peer if this node
    /// has no connection to it.
    pub async fn open_stream(
        &mut self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenStreamError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .unbounded_send(Request::Open(peer, Open { protocol, reply }))
            .map_err(|_| OpenStreamError::Stopped)?;
        answer.await.unwrap_or_else(|_| {
            Err(OpenStreamError::Io(
                "the connection closed before the stream was open".into(),
            ))
        })
    }

    /// Every inbound stream of `protocol` from now on, with the peer it came from.
    /// Dropping the returned stream stops accepting.
    pub fn accept(&mut self, protocol: StreamProtocol) -> Result<IncomingStreams, AlreadyAccepted> {
        let mut acceptors = lock(&self.acceptors);
        acceptors.retain(|_, sender| !sender.is_closed());
        if acceptors.contains_key(&protocol) {
            return Err(AlreadyAccepted(protocol));
        }
        let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE);
        acceptors.insert(protocol, sender);
        // A node shutting down has no connections left to tell.
        let _ = self.requests.unbounded_send(Request::Refresh);
        Ok(IncomingStreams {
            receiver,
            requests: self.requests.clone(),
        })
    }
}

/// Inbound streams of one accepted protocol; dropping it stops accepting.
#[derive(Debug)]
pub struct IncomingStreams {
    receiver: mpsc::Receiver<(PeerId, Stream)>,
    /// For the refresh that withdraws the protocol when this is dropped.
    requests: mpsc::UnboundedSender<Request>,
}

impl Drop for IncomingStreams {
    fn drop(&mut self) {
        // Closed first, so that the behaviour's refresh sees the protocol gone.
        self.receiver.close();
        let _ = self.requests.unbounded_send(Request::Refresh);
    }
}

impl futures::Stream for IncomingStreams {
    type Item = (PeerId, Stream);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        self.receiver.poll_next_unpin(cx)
    }
}

/// The behaviour: routes each request to a connection of its peer.
pub struct Behaviour {
    requests: mpsc::UnboundedReceiver<Request>,
    /// Kept so that [`Behaviour::new_control`] can hand out more senders.
    sender: mpsc::UnboundedSender<Request>,
    acceptors: Acceptors,
    /// The protocols accepted, as every handler was last told.
    accepted: Vec<StreamProtocol>,
    /// The open connections of each peer, oldest first, and whether each is relayed;
    /// entries leave when connections close.
    connections: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    /// Requests to peers being dialed, and our dial (`None` when the swarm skipped it
    /// for another dial already under way); they leave when the dial ends either way.
    waiting: HashMap<PeerId, (Option<ConnectionId>, Vec<Open>)>,
    /// What the behaviour has to tell the swarm.
    to_swarm: VecDeque<ToSwarm<Infallible, In>>,
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Behaviour")
            .field("connections", &self.connections.len())
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Self::new()
    }
}

impl Behaviour {
    /// A behaviour with no protocol accepted yet.
    pub fn new() -> Self {
        let (sender, requests) = mpsc::unbounded();
        Behaviour {
            requests,
            sender,
            acceptors: Acceptors::default(),
            accepted: Vec::new(),
            connections: HashMap::new(),
            waiting: HashMap::new(),
            to_swarm: VecDeque::new(),
        }
    }

    /// A new handle on this behaviour.
    pub fn new_control(&self) -> Control {
        Control {
            requests: self.sender.clone(),
            acceptors: self.acceptors.clone(),
        }
    }

    /// Peers with open connections and peers with requests waiting for a dial: what
    /// this behaviour keeps, for the test that it keeps nothing after they go.
    pub fn tracked(&self) -> (usize, usize) {
        (self.connections.len(), self.waiting.len())
    }

    fn route(&mut self, peer: PeerId, open: Open) {
        let open_connections = self
            .connections
            .get(&peer)
            .map(Vec::as_slice)
            .unwrap_or_default();
        // The oldest direct connection: the one Servant keeps when it closes duplicates
        // (`crate::duplicates`), and relayed ones go once a direct one exists.
        let chosen = open_connections
            .iter()
            .find(|(_, relayed)| !relayed)
            .or(open_connections.first());
        if let Some(&(connection, _)) = chosen {
            self.to_swarm.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(connection),
                event: In::Open(open),
            });
            return;
        }
        let total: usize = self.waiting.values().map(|(_, w)| w.len()).sum();
        if total >= MAX_WAITING_FOR_DIAL {
            let _ = open.reply.send(Err(OpenStreamError::Dial(
                "too many streams waiting for dials".into(),
            )));
            return;
        }
        let (dial, waiting) = self.waiting.entry(peer).or_default();
        if waiting.is_empty() {
            let opts = DialOpts::peer_id(peer).build();
            *dial = Some(opts.connection_id());
            self.to_swarm.push_back(ToSwarm::Dial { opts });
        }
        waiting.push(open);
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            acceptors: self.acceptors.clone(),
            accepted: self.accepted.clone(),
            requested: VecDeque::new(),
        }
    }

    /// Reads the accepted protocols afresh and, if they changed, tells every open
    /// connection.
    fn refresh(&mut self) {
        let mut accepted: Vec<StreamProtocol> = lock(&self.acceptors)
            .iter()
            .filter(|(_, sender)| !sender.is_closed())
            .map(|(protocol, _)| protocol.clone())
            .collect();
        // The map's order is arbitrary; a stable order keeps equal sets equal.
        accepted.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        if accepted == self.accepted {
            return;
        }
        self.accepted = accepted;
        for (&peer, connections) in &self.connections {
            for &(connection, _) in connections {
                self.to_swarm.push_back(ToSwarm::NotifyHandler {
                    peer_id: peer,
                    handler: NotifyHandler::One(connection),
                    event: In::Protocols(self.accepted.clone()),
                });
            }
        }
    }

    fn established(&mut self, peer: PeerId, connection: ConnectionId, relayed: bool) {
        self.connections
            .entry(peer)
            .or_default()
            .push((connection, relayed));
        // Whichever dial reached the peer, ours or another behaviour's, will do.
        let (_, waiting) = self.waiting.remove(&peer).unwrap_or_default();
        for open in waiting {
            self.route(peer, open);
        }
    }

    fn dial_failed(&mut self, peer: PeerId, connection: ConnectionId, error: &DialError) {
        let Some((ours, _)) = self.waiting.get_mut(&peer) else {
            return;
        };
        let skipped = matches!(error, DialError::DialPeerConditionFalse(_));
        match (*ours == Some(connection), skipped) {
            // Ours was not made because another dial to the peer is under way: its
            // outcome is ours.
            (true, true) => {
                *ours = None;
                return;
            }
            // Another behaviour's dial skipped for ours, or failed while ours goes on.
            (false, true) => return,
            (false, false) if ours.is_some() => return,
            // Our dial failed, or the dial we were relying on did.
            _ => {}
        }
        let (_, waiting) = self.waiting.remove(&peer).unwrap_or_default();
        for open in waiting {
            let _ = open
                .reply
                .send(Err(OpenStreamError::Dial(error.to_string())));
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.established(e.peer_id, e.connection_id, e.endpoint.is_relayed())
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some(list) = self.connections.get_mut(&e.peer_id) {
                    list.retain(|(c, _)| *c != e.connection_id);
                    if list.is_empty() {
                        self.connections.remove(&e.peer_id);
                    }
                }
            }
            FromSwarm::DialFailure(e) => {
                if let Some(peer) = e.peer_id {
                    self.dial_failed(peer, e.connection_id, e.error);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some(request)) = self.requests.poll_next_unpin(cx) {
            match request {
                Request::Open(peer, open) => self.route(peer, open),
                Request::Refresh => self.refresh(),
            }
        }
        match self.to_swarm.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

/// Negotiates one of a set of protocols and yields the bare stream with it.
#[derive(Debug, Clone)]
pub struct Upgrade(Vec<StreamProtocol>);

impl UpgradeInfo for Upgrade {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Upgrade {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl OutboundUpgrade<Stream> for Upgrade {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

/// One connection's part: opens the streams asked for and hands inbound ones to
/// their acceptors.
pub struct Handler {
    /// The peer at the other end, named to whoever accepts its streams.
    peer: PeerId,
    acceptors: Acceptors,
    /// The protocols offered to the peer, as the behaviour last said.
    accepted: Vec<StreamProtocol>,
    /// Requests not yet turned into stream requests to the swarm.
    requested: VecDeque<Open>,
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("requested", &self.requested.len())
            .finish_non_exhaustive()
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = In;
    type ToBehaviour = Infallible;
    type InboundProtocol = Upgrade;
    type OutboundProtocol = Upgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Open;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(Upgrade(self.accepted.clone()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        // An open stream keeps its connection alive by itself; a request not yet
        // sent out must not see the connection close under it.
        !self.requested.is_empty()
    }

    fn on_behaviour_event(&mut self, command: In) {
        match command {
            In::Open(open) => self.requested.push_back(open),
            In::Protocols(accepted) => self.accepted = accepted,
        }
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        match self.requested.pop_front() {
            Some(open) => Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(Upgrade(vec![open.protocol.clone()]), open),
            }),
            None => Poll::Pending,
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            (),
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => {
                // Whoever accepts the protocol gets the stream; a full or gone
                // acceptor means it is dropped, which resets it.
                if let Some(sender) = lock(&self.acceptors).get_mut(&protocol) {
                    if let Err(e) = sender.try_send((self.peer, stream)) {
                        tracing::debug!(%protocol, full = e.is_full(), "inbound stream dropped");
                    }
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: (stream, _),
                info: open,
            }) => {
                let _ = open.reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info: open, error }) => {
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => {
                        OpenStreamError::UnsupportedProtocol(open.protocol)
                    }
                    other => OpenStreamError::Io(other.to_string()),
                };
                let _ = open.reply.send(Err(error));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::{swarm::SwarmEvent, Swarm};

    use super::*;

    const ECHO: StreamProtocol = StreamProtocol::new("/servant/test/echo");
    const ELSE: StreamProtocol = StreamProtocol::new("/servant/test/else");

    fn swarm() -> anyhow::Result<Swarm<Behaviour>> {
        swarm_of(Behaviour::new)
    }

    /// A swarm on TCP running the behaviour `make` builds, negotiating eagerly so
    /// that a refused protocol shows when the stream is opened.
    fn swarm_of<B: NetworkBehaviour>(make: impl FnOnce() -> B) -> anyhow::Result<Swarm<B>> {
        crate::test_swarm::tcp(make, libp2p::core::upgrade::Version::V1)
    }

    /// Drives `swarm` until `work` is done.
    async fn drive<T>(
        swarm: &mut Swarm<Behaviour>,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = swarm.select_next_some() => {}
            }
        }
    }

    #[tokio::test]
    async fn streams_open_and_nothing_is_kept_after_their_connection_closes() -> anyhow::Result<()>
    {
        let mut server = swarm()?;
        let mut client = swarm()?;
        let server_id = *server.local_peer_id();
        let client_id = *client.local_peer_id();
        let addr = crate::test_swarm::listen(&mut server).await?;
        let mut incoming = server
            .behaviour()
            .new_control()
            .accept(ECHO)
            .expect("first accept");
        assert_eq!(
            server.behaviour().new_control().accept(ECHO).err(),
            Some(AlreadyAccepted(ECHO))
        );
        // The server echoes one message per stream, and says who sent it.
        let (seen_tx, mut seen) = mpsc::unbounded();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some((peer, mut stream)) = incoming.next() => {
                        let _ = seen_tx.unbounded_send(peer);
                        tokio::spawn(async move {
                            let mut buf = [0u8; 5];
                            if stream.read_exact(&mut buf).await.is_ok() {
                                let _ = stream.write_all(&buf).await;
                                let _ = stream.close().await;
                            }
                        });
                    }
                    _ = server.select_next_some() => {}
                }
            }
        });

        // The stream is asked for while the dial is still under way: the behaviour's
        // own dial is skipped for it, and the request waits for its connection.
        client
            .dial(addr.with_p2p(server_id).expect("a bare address"))
            .expect("dial");
        let mut control = client.behaviour().new_control();
        let echoed = drive(&mut client, async {
            let mut stream = control.open_stream(server_id, ECHO).await?;
            stream
                .write_all(b"hello")
                .await
                .map_err(|e| OpenStreamError::Io(e.to_string()))?;
            let mut buf = Vec::new();
            stream
                .read_to_end(&mut buf)
                .await
                .map_err(|e| OpenStreamError::Io(e.to_string()))?;
            Ok::<_, OpenStreamError>(buf)
        })
        .await;
        assert_eq!(echoed.as_deref(), Ok(&b"hello"[..]));
        assert_eq!(
            seen.next().await,
            Some(client_id),
            "the acceptor learns the peer"
        );

        // A protocol nobody accepts is refused by name.
        let refused = drive(&mut client, control.open_stream(server_id, ELSE)).await;
        assert_eq!(
            refused.err(),
            Some(OpenStreamError::UnsupportedProtocol(ELSE))
        );

        // A peer with no known address: the dial fails and the request with it.
        let stranger = PeerId::random();
        let unreachable = drive(&mut client, control.open_stream(stranger, ECHO)).await;
        assert!(
            matches!(unreachable, Err(OpenStreamError::Dial(_))),
            "{unreachable:?}"
        );
        assert_eq!(
            client.behaviour().tracked(),
            (1, 0),
            "the server's connection only"
        );

        // Once the connection is gone, nothing about it is left.
        assert!(client.disconnect_peer_id(server_id).is_ok());
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let SwarmEvent::ConnectionClosed { .. } = client.select_next_some().await {
                    if !client.is_connected(&server_id) {
                        break;
                    }
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the connection closed within 10 s");
        assert_eq!(client.behaviour().tracked(), (0, 0));
        Ok(())
    }

    #[tokio::test]
    async fn a_protocol_accepted_or_given_up_on_a_live_connection_is_offered_or_withdrawn(
    ) -> anyhow::Result<()> {
        // The server runs as the node does, behind the flat protocol list, so a
        // change that reached the list only by a shared map would trip its check.
        let mut server = swarm_of(|| crate::flat_protocols::Flat::new(Behaviour::new()))?;
        let mut client = swarm()?;
        let server_id = *server.local_peer_id();
        let addr = crate::test_swarm::listen(&mut server).await?;
        let mut server_control = server.behaviour().new_control();
        tokio::spawn(async move {
            loop {
                server.select_next_some().await;
            }
        });
        client
            .dial(addr.with_p2p(server_id).expect("a bare address"))
            .expect("dial");
        let mut control = client.behaviour().new_control();
        let before = drive(&mut client, control.open_stream(server_id, ELSE)).await;
        assert_eq!(
            before.err(),
            Some(OpenStreamError::UnsupportedProtocol(ELSE)),
            "nothing accepted yet"
        );

        // Accepted while the connection is up: the connection offers it.
        let mut incoming = server_control.accept(ELSE).expect("accept");
        let opened = drive(&mut client, async {
            // The refresh reaches the server's handler a moment after `accept`.
            for _ in 0..100 {
                match control.open_stream(server_id, ELSE).await {
                    Err(OpenStreamError::UnsupportedProtocol(_)) => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    other => return other,
                }
            }
            Err(OpenStreamError::UnsupportedProtocol(ELSE))
        })
        .await;
        assert!(opened.is_ok(), "{:?}", opened.err());
        let arrived = tokio::time::timeout(Duration::from_secs(10), incoming.next()).await;
        assert!(
            matches!(arrived, Ok(Some(_))),
            "the acceptor got the stream"
        );

        // Given up: the connection stops offering it.
        drop(incoming);
        let withdrawn = drive(&mut client, async {
            for _ in 0..100 {
                match control.open_stream(server_id, ELSE).await {
                    Err(OpenStreamError::UnsupportedProtocol(p)) => return Some(p),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            None
        })
        .await;
        assert_eq!(withdrawn, Some(ELSE));
        Ok(())
    }
}
