//! Servant's AutoNAT v2 client: asks one server to dial one of our addresses back,
//! and answers the dial-backs that arrive on new connections.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId};

use crate::streams::Control;

use super::{
    verdict::ProbeResult,
    wire::{self, dial_status, response_status, Message, Msg},
};

/// How long a probe may take, dial-back included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a dial-back stream may take to deliver its nonce.
const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Dial-back streams handled at once; more are dropped (only our own probes'
/// servers have a reason to send one).
const MAX_DIAL_BACKS_IN_FLIGHT: usize = 32;

/// How a probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The server tested the address.
    Verdict(ProbeResult),
    /// No verdict: the server refused, failed, lied or went away.
    NoVerdict(String),
}

/// The nonces of probes under way, and whether their dial-back arrived.
#[derive(Debug, Clone, Default)]
pub struct DialBacks {
    pending: Arc<Mutex<HashMap<u64, bool>>>,
}

impl DialBacks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, bool>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn await_nonce(&self, nonce: u64) {
        self.lock().insert(nonce, false);
    }

    /// Marks a nonce received; false if no probe waits for it.
    fn arrived(&self, nonce: u64) -> bool {
        match self.lock().get_mut(&nonce) {
            Some(received) => {
                *received = true;
                true
            }
            None => false,
        }
    }

    fn take(&self, nonce: u64) -> bool {
        self.lock().remove(&nonce).unwrap_or(false)
    }
}

/// Asks `server` to dial us back at `addr`.
pub async fn probe(
    mut control: Control,
    dial_backs: DialBacks,
    server: PeerId,
    addr: Multiaddr,
    nonce: u64,
) -> ProbeOutcome {
    dial_backs.await_nonce(nonce);
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, exchange(&mut control, server, &addr, nonce))
        .await
        .unwrap_or_else(|_| Err(ExchangeError::Other("timed out".into())));
    let received = dial_backs.take(nonce);
    match outcome {
        Ok(dial_status::OK) if received => ProbeOutcome::Verdict(ProbeResult::Reached),
        // A server that claims a dial-back we never saw is wrong or lying: ignore it.
        Ok(dial_status::OK) => {
            ProbeOutcome::NoVerdict("server reported a dial-back that never arrived".into())
        }
        Ok(dial_status::DIAL_ERROR) => {
            ProbeOutcome::Verdict(ProbeResult::Unreachable("the server's dial failed".into()))
        }
        Ok(other) => ProbeOutcome::NoVerdict(format!("dial status {other}")),
        // The server took the request and went silent until its own deadline cut the
        // stream: its dial-back hung, which is what a dial into a NAT that drops
        // unsolicited packets does (a TCP SYN gets no answer at all). Counting it as a
        // failure lets a NATed node whose only candidate is a TCP address reach its
        // verdict; a wrong one is undone by any dial-back that succeeds.
        Err(ExchangeError::Unanswered(e)) if !received => ProbeOutcome::Verdict(
            ProbeResult::Unreachable(format!("the server's dial-back never completed ({e})")),
        ),
        Err(ExchangeError::Unanswered(e) | ExchangeError::Other(e)) => ProbeOutcome::NoVerdict(e),
    }
}

/// Why an exchange gave no dial status.
#[derive(Debug)]
enum ExchangeError {
    /// The server accepted the request but the stream ended without a response.
    Unanswered(String),
    /// Anything else: no stream, a refused or malformed exchange, our own timeout.
    Other(String),
}

impl From<String> for ExchangeError {
    fn from(e: String) -> Self {
        ExchangeError::Other(e)
    }
}

impl From<&str> for ExchangeError {
    fn from(e: &str) -> Self {
        ExchangeError::Other(e.to_string())
    }
}

/// The dial-request exchange; returns the server's dial status.
async fn exchange(
    control: &mut Control,
    server: PeerId,
    addr: &Multiaddr,
    nonce: u64,
) -> Result<i32, ExchangeError> {
    let mut stream = control
        .open_stream(server, wire::DIAL_REQUEST_PROTOCOL)
        .await
        .map_err(|e| e.to_string())?;
    let request = Message {
        msg: Some(Msg::DialRequest(wire::DialRequest {
            addrs: vec![addr.to_vec()],
            nonce,
        })),
    };
    wire::write(&mut stream, &request)
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut sent_data: u64 = 0;
    loop {
        let msg: Message = wire::read(&mut stream, wire::MAX_MESSAGE_BYTES)
            .await
            .map_err(|e| {
                // The stream was negotiated lazily: a server that does not speak the
                // protocol refuses it here, which says nothing about our address.
                if crate::negotiation::refused(&e) {
                    ExchangeError::Other("the server does not speak AutoNAT v2".into())
                } else {
                    ExchangeError::Unanswered(format!("reading the response: {e}"))
                }
            })?;
        match msg.msg {
            Some(Msg::DialDataRequest(req)) => {
                sent_data = data_budget(sent_data, req.num_bytes)?;
                let mut left = req.num_bytes;
                while left > 0 {
                    let n = left.min(wire::DATA_CHUNK as u64);
                    let data = Message {
                        msg: Some(Msg::DialDataResponse(wire::DialDataResponse {
                            data: vec![0; n as usize],
                        })),
                    };
                    wire::write(&mut stream, &data)
                        .await
                        .map_err(|e| format!("sending data: {e}"))?;
                    left -= n;
                }
            }
            Some(Msg::DialResponse(resp)) => {
                let _ = stream.close().await;
                if resp.status != response_status::OK {
                    return Err(match resp.status {
                        response_status::REQUEST_REJECTED => "request rejected".into(),
                        response_status::DIAL_REFUSED => "dial refused".into(),
                        response_status::INTERNAL_ERROR => "server error".into(),
                        s => format!("response status {s}").into(),
                    });
                }
                return Ok(resp.dial_status);
            }
            _ => return Err("unexpected message".into()),
        }
    }
}

/// Adds a server's data request to what it has asked for so far, refusing a total
/// above the cap. A hostile server may ask for `u64::MAX` bytes in one request or in
/// several: the sum is checked so it can neither wrap into a small number nor panic.
fn data_budget(sent: u64, requested: u64) -> Result<u64, String> {
    match sent.checked_add(requested) {
        Some(total) if total <= wire::MAX_DATA_REQUESTED => Ok(total),
        _ => Err(format!(
            "server wants {requested} more bytes of data after {sent}; the cap is {}",
            wire::MAX_DATA_REQUESTED
        )),
    }
}

/// Answers dial-backs for as long as the node runs.
pub async fn serve_dial_backs(mut control: Control, dial_backs: DialBacks) {
    let mut incoming = match control.accept(wire::DIAL_BACK_PROTOCOL) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept AutoNAT dial-backs");
            return;
        }
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_DIAL_BACKS_IN_FLIGHT));
    while let Some((peer, mut stream)) = incoming.next().await {
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many dial-backs at once; dropped one");
            continue;
        };
        let dial_backs = dial_backs.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let got = tokio::time::timeout(
                DIAL_BACK_TIMEOUT,
                wire::read::<wire::DialBack>(&mut stream, wire::MAX_DIAL_BACK_BYTES),
            )
            .await;
            match got {
                Ok(Ok(back)) if dial_backs.arrived(back.nonce) => {
                    let ok = wire::DialBackResponse { status: 0 };
                    let _ = wire::write(&mut stream, &ok).await;
                    let _ = stream.close().await;
                }
                Ok(Ok(_)) => tracing::debug!(%peer, "dial-back with an unknown nonce"),
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "bad dial-back"),
                Err(_) => tracing::debug!(%peer, "dial-back timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_requests_are_capped_without_overflow() {
        assert_eq!(data_budget(0, 1000), Ok(1000));
        assert_eq!(
            data_budget(1000, wire::MAX_DATA_REQUESTED - 1000),
            Ok(wire::MAX_DATA_REQUESTED)
        );
        assert!(data_budget(0, wire::MAX_DATA_REQUESTED + 1).is_err());
        // The sum of two huge requests must not wrap into an accepted total.
        assert!(data_budget(1, u64::MAX).is_err());
        assert!(data_budget(u64::MAX, u64::MAX).is_err());
    }
}
