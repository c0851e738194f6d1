//! The API's accept loop: HTTP/1 with a cap on connections and a deadline on
//! request headers.
//!
//! axum's `serve` accepts every connection and waits for its headers for as long as
//! the client likes: each slow client holds a descriptor, and a thousand of them
//! (measured: 1,000 slow clients took a node from 19 to 1,020 descriptors) would use
//! up a process limited to 1,024 and stop the p2p side from accepting peers. Here a
//! client must finish its headers within [`HEADER_READ_TIMEOUT`], and at most
//! [`MAX_CONNECTIONS`] are served at once; the rest wait in the kernel's accept
//! queue, costing the node nothing, until a slot frees.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::watch, sync::Semaphore};

/// API connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open requests (streams included) to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves `router` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, router: Router, shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let stopped = stopped(shutdown);
    tokio::pin!(stopped);
    loop {
        // A slot first: without one, the next connection stays in the accept queue.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut stopped => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's (reset, headers too slow): nothing to log.
            let _ = connection.await;
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
