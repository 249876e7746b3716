//! Alerts: a JSON document POSTed to a webhook, off the data path.
//!
//! A session that crosses a threshold only puts the alert on a bounded
//! queue (`try_send`: never waits); one task sends them, one at a time,
//! each attempt bounded by `alert.timeout`, retried with exponential
//! backoff (0.5 s, 1 s, 2 s ... capped at 30 s) up to `alert.retries`
//! times. A full queue drops the new alert and counts it: under a flood the
//! metric `mxguard_alerts_total{result="dropped"}` is the alert.
//!
//! The client is hyper's own HTTP/1.1 connection over a tokio socket: the
//! daemon already carries hyper for its admin listener, so this adds no
//! dependency. Plain `http://` only: receivers are an Alertmanager, a
//! chat relay or a SIEM collector on the management network; an `https://`
//! receiver is reached through a local relay (stunnel, the collector's
//! agent) rather than by putting a second TLS stack into the firewall's
//! process.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::mpsc;

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl WebhookUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!(
                "`{url}`: only http:// webhooks (reach an https receiver through a local relay)"
            )
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("`{url}`: no host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("`{url}`: bad port `{p}`"))?;
                (h.trim_matches(|c| c == '[' || c == ']').to_string(), port)
            }
            _ => (authority.to_string(), 80),
        };
        if host.is_empty() || path.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(format!("`{url}` is not a URL"));
        }
        Ok(Self {
            host,
            port,
            path: path.to_string(),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One alert as the receiver gets it.
#[derive(Debug, Clone, Serialize)]
pub struct AlertDoc {
    /// `reputation-threshold`, `limit-block`.
    pub event: &'static str,
    pub gateway: String,
    pub client: String,
    pub reason: String,
    pub score: Option<f64>,
    pub action: Vec<&'static str>,
    pub at_unix_ms: u64,
}

/// How an alert fared, for the metric.
pub trait AlertObserver: Send + Sync + 'static {
    fn alert(&self, result: &'static str);
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Alerts {
    tx: mpsc::Sender<AlertDoc>,
}

impl Alerts {
    /// Starts the sender task for `url`.
    pub fn start(
        url: WebhookUrl,
        timeout: Duration,
        retries: u32,
        queue: usize,
        observer: impl AlertObserver,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue.max(1));
        tokio::spawn(sender(url, timeout, retries, rx, observer));
        Self { tx }
    }

    /// Queues `doc`; false when the queue is full (the alert is dropped).
    pub fn send(&self, doc: AlertDoc) -> bool {
        self.tx.try_send(doc).is_ok()
    }
}

async fn sender(
    url: WebhookUrl,
    timeout: Duration,
    retries: u32,
    mut rx: mpsc::Receiver<AlertDoc>,
    observer: impl AlertObserver,
) {
    while let Some(doc) = rx.recv().await {
        let body = match serde_json::to_vec(&doc) {
            Ok(b) => Bytes::from(b),
            Err(_) => continue,
        };
        let mut backoff = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            match tokio::time::timeout(timeout, post(&url, body.clone())).await {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    observer.alert("sent");
                    break;
                }
                outcome => {
                    let why = match outcome {
                        Ok(Ok(status)) => format!("HTTP {status}"),
                        Ok(Err(e)) => e,
                        Err(_) => format!("no answer within {}ms", timeout.as_millis()),
                    };
                    if attempt >= retries {
                        tracing::warn!(
                            "alert: giving up on {} after {} attempts: {why}",
                            doc.event,
                            attempt + 1
                        );
                        observer.alert("failed");
                        break;
                    }
                    observer.alert("retried");
                    tracing::debug!("alert: attempt {} failed: {why}", attempt + 1);
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// One POST on a fresh connection; the HTTP status.
async fn post(url: &WebhookUrl, body: Bytes) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post(url.path.as_str())
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "mxguard")
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    Ok(resp.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_parse_and_https_is_refused_with_a_reason() {
        let u = WebhookUrl::parse("http://127.0.0.1:9000/hook").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 9000, "/hook")
        );
        let u = WebhookUrl::parse("http://alerts.example").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = WebhookUrl::parse("http://[::1]:8080/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        assert!(WebhookUrl::parse("https://x/")
            .unwrap_err()
            .contains("relay"));
        assert!(WebhookUrl::parse("http://:80/").is_err());
        assert!(WebhookUrl::parse("http://h:99999/").is_err());
    }
}
