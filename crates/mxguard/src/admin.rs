//! The admin listener: HTTP/1.1 on loopback by default. The routes, auth
//! and JSON handling are in `api`; this owns the socket and connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Shared;

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Failed accepts since the last one that worked.
    let mut failures: u32 = 0;
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    failures = 0;
                    a
                }
                Err(e) => {
                    let pause = accept_failed(&shared, &e, failures);
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(crate::api::handle(req, shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Out of descriptors or memory, the pending connection stays in the
/// backlog and accept fails again at once: a log line per failure would
/// flood the log while the guard is already in trouble. As on
/// the mail listeners (`server::accept_failed`): count it in
/// `mxguard_accept_errors_total`, log the first of a burst (and every
/// 1000th), and back off — 50 ms doubling to 800 ms, so the API answers
/// again within a second of descriptors coming back. Returns the pause.
fn accept_failed(shared: &Shared, e: &std::io::Error, in_a_row: u32) -> Duration {
    use nix::errno::Errno;
    let exhausted = e.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
        )
    });
    let kind = if exhausted { "emfile" } else { "other" };
    shared
        .metrics
        .accept_errors
        .with_label_values(&[kind])
        .inc();
    if in_a_row.is_multiple_of(1000) {
        tracing::warn!("admin accept failed: {e}; backing off");
    }
    ACCEPT_BACKOFF_MIN * (1 << in_a_row.min(4))
}

/// The first pause after a failed accept on the admin listener.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}
