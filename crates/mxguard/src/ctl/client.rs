//! A minimal HTTP/1.1 client for the admin API (hyper's connection-level
//! client over one TCP connection per request: the admin API is local
//! and plain HTTP, so no pool and no TLS stack are needed).

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A quarantined message is shown whole: allow for a big one.
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// Where the admin API is: `http://HOST:PORT` with an optional path prefix
/// (a reverse proxy in front), or just `HOST:PORT`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    authority: String,
    prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("`{url}` is not a URL ({e})"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "`{url}`: only http:// is spoken (the admin API listens on loopback; put a TLS proxy in front for remote use)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if authority.port_u16().is_none() {
            return Err(format!("`{url}` has no port"));
        }
        Ok(Self {
            authority: authority.as_str().to_string(),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    pub fn display(&self) -> String {
        format!("http://{}{}", self.authority, self.prefix)
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

/// One request; `Err` is a transport failure (the API's own errors are
/// replies with their status).
pub async fn request(
    endpoint: &Endpoint,
    token: Option<&[u8]>,
    method: Method,
    path_and_query: &str,
    body: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<Reply, String> {
    let call = async {
        let stream = TcpStream::connect(endpoint.authority.as_str())
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let uri = format!("{}{path_and_query}", endpoint.prefix);
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(HOST, endpoint.authority.as_str())
            .header(
                USER_AGENT,
                concat!("mxguard-ctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = token {
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(token);
            let mut value = HeaderValue::from_bytes(&value)
                .map_err(|_| "the token is not a valid header value")?;
            value.set_sensitive(true);
            req = req.header(AUTHORIZATION, value);
        }
        let body = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v).map_err(|e| e.to_string())?)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the reply: {e}"))?
            .to_bytes();
        Ok::<_, String>(Reply { status, body })
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(format!("no reply within {}s", timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_read_like_people_write_them() {
        let e = Endpoint::parse("127.0.0.1:9425").unwrap();
        assert_eq!(e.display(), "http://127.0.0.1:9425");
        let e = Endpoint::parse("http://[::1]:9425/mx/").unwrap();
        assert_eq!(e.display(), "http://[::1]:9425/mx");
        assert!(Endpoint::parse("https://127.0.0.1:9425").is_err());
        assert!(Endpoint::parse("http://127.0.0.1").is_err());
        assert!(Endpoint::parse("not a url").is_err());
    }
}
