//! Accepting connections: TLS, HTTP/1.1 and HTTP/2, and connection-refusing outages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::api::DropConnection;
use crate::reply::Reply;
use crate::{Outage, OutageMode, Shared, admin, api, entra};

/// When a connection-refusing outage in force ends.
fn refusing_until(outage: &Option<Outage>) -> Option<Instant> {
    outage
        .filter(|o| o.mode == OutageMode::Refuse && o.until > Instant::now())
        .map(|o| o.until)
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut outage = shared.outage.subscribe();
    let mut listener = Some(listener);
    // Owning the connection tasks means shutting down (dropping the set) closes them all.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let refusing = refusing_until(&outage.borrow_and_update());
        if let Some(until) = refusing {
            // Closing the listening socket is what makes new connections fail with
            // "connection refused", as for a service that is down.
            listener = None;
            tokio::select! {
                () = tokio::time::sleep_until(until.into()) => {}
                _ = outage.changed() => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let current = match &listener {
            Some(l) => l,
            None => match TcpListener::bind(addr).await {
                Ok(l) => listener.insert(l),
                Err(e) => {
                    tracing::warn!("re-listening on {addr} after an outage failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::select! {
            accepted = current.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, shared.clone(), tls.clone()));
                }
                // Running out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = outage.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    // Small request/response exchanges: do not let Nagle delay them.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| dispatch(shared.clone(), req));
    let builder = auto::Builder::new(TokioExecutor::new());
    let result = match tls {
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => {
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
            }
            Err(e) => {
                tracing::debug!("TLS handshake failed: {e}");
                return;
            }
        },
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// Every request on every connection: the admin endpoints (with `--admin`), the Entra
/// authority (a service of its own: the API's faults and 503 outages do not touch it) or the API.
async fn dispatch(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Reply, DropConnection> {
    if shared.admin && req.uri().path().starts_with(admin::PREFIX) {
        return Ok(admin::handle(&shared, req).await);
    }
    if let Some(route) = entra::route(req.method(), req.uri().path()) {
        return Ok(entra::handle(&shared, route, req).await);
    }
    api::handle(shared, req).await
}
