//! The admin API's routes: one table ([`ROUTES`]), bearer-token auth,
//! JSON in and out. `admin.rs` owns the listener and hands every request
//! to [`handle`].
//!
//! Access (docs/operations.md, "The admin API"):
//!
//! - `/healthz` answers everyone: it says the process is up and nothing
//!   more.
//! - `/metrics` answers everyone too: the series carry no client address
//!   and no secret by design (bounded labels only), Prometheus scrapes it
//!   without a token, and who may connect at all is set by
//!   `[admin] listen` (loopback by default).
//! - every other route needs `Authorization: Bearer SECRET` with a secret
//!   from `[admin] token_file`; without a token file they are off (403).
//!
//! The route table is also what `docs/api/openapi.yaml` is checked
//! against (a test below), so the document cannot drift from the router.

mod auth;
mod http;
mod info;
mod lists;
mod quarantine;

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};

pub use auth::Tokens;
use http::{error_response, json_response, ApiError, ApiResult, Query};

use crate::metrics::ADMIN_ROUTE_UNKNOWN;
use crate::server::Shared;

/// What a route does; the dispatch below matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    Healthz,
    Metrics,
    Readyz,
    ListEntries(crate::lists::ListKind),
    ListAdd(crate::lists::ListKind),
    ListRemove(crate::lists::ListKind),
    Lookup,
    Sessions,
    QuarantineList,
    QuarantineShow,
    QuarantineRelease,
    QuarantineDelete,
    Reload,
    Config,
    Stats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Delete => "DELETE",
        }
    }

    fn of(method: &Method) -> Option<Self> {
        match *method {
            Method::GET | Method::HEAD => Some(Self::Get),
            Method::POST => Some(Self::Post),
            Method::DELETE => Some(Self::Delete),
            _ => None,
        }
    }
}

pub struct Route {
    pub verb: Verb,
    /// `{name}` matches one path segment.
    pub path: &'static str,
    pub id: RouteId,
    /// Needs a bearer token.
    pub auth: bool,
}

const fn route(verb: Verb, path: &'static str, id: RouteId, auth: bool) -> Route {
    Route {
        verb,
        path,
        id,
        auth,
    }
}

use crate::lists::ListKind::{Allow, Block};
use RouteId as R;
use Verb::{Delete, Get, Post};

pub const ROUTES: &[Route] = &[
    route(Get, "/healthz", R::Healthz, false),
    route(Get, "/metrics", R::Metrics, false),
    route(Get, "/readyz", R::Readyz, true),
    route(Get, "/api/v1/blocklist", R::ListEntries(Block), true),
    route(Post, "/api/v1/blocklist", R::ListAdd(Block), true),
    route(Delete, "/api/v1/blocklist", R::ListRemove(Block), true),
    route(Get, "/api/v1/allowlist", R::ListEntries(Allow), true),
    route(Post, "/api/v1/allowlist", R::ListAdd(Allow), true),
    route(Delete, "/api/v1/allowlist", R::ListRemove(Allow), true),
    route(Get, "/api/v1/lookup/{address}", R::Lookup, true),
    route(Get, "/api/v1/sessions", R::Sessions, true),
    route(Get, "/api/v1/quarantine", R::QuarantineList, true),
    route(Get, "/api/v1/quarantine/{id}", R::QuarantineShow, true),
    route(
        Post,
        "/api/v1/quarantine/{id}/release",
        R::QuarantineRelease,
        true,
    ),
    route(Delete, "/api/v1/quarantine/{id}", R::QuarantineDelete, true),
    route(Post, "/api/v1/reload", R::Reload, true),
    route(Get, "/api/v1/config", R::Config, true),
    route(Get, "/api/v1/stats", R::Stats, true),
];

/// One authenticated call, as the handlers see it.
pub struct Call<'a> {
    pub shared: &'a Arc<Shared>,
    /// The token's name (`-` on routes without auth).
    pub who: String,
    /// The `{…}` segments of the route, decoded, in order.
    pub params: Vec<String>,
    pub query: Query,
    pub body: Bytes,
}

impl Call<'_> {
    pub fn param(&self, i: usize) -> &str {
        self.params.get(i).map_or("", String::as_str)
    }

    /// Writes an admin action to the event log.
    pub fn audit(&self, action: &str, target: Option<&str>, result: Result<&str, &str>) {
        let (result, detail) = match result {
            Ok(detail) => ("ok", (!detail.is_empty()).then_some(detail)),
            Err(e) => ("error", Some(e)),
        };
        self.shared.events.admin(&crate::events::AdminEvent {
            who: &self.who,
            via: "api",
            action,
            target,
            result,
            detail,
        });
    }
}

enum Found {
    Route(&'static Route, Vec<String>),
    /// The path exists with other methods.
    Method(Vec<&'static str>),
    None,
}

fn find(method: &Method, path: &str) -> Result<Found, ApiError> {
    let segments: Vec<&str> = path.split('/').collect();
    let verb = Verb::of(method);
    let mut allowed = Vec::new();
    for r in ROUTES {
        let template: Vec<&str> = r.path.split('/').collect();
        if template.len() != segments.len() {
            continue;
        }
        let mut params = Vec::new();
        let mut matched = true;
        for (t, s) in template.iter().zip(&segments) {
            if t.starts_with('{') {
                if s.is_empty() {
                    matched = false;
                    break;
                }
                let value = http::decode(s, false).ok_or_else(|| {
                    ApiError::bad_request(format!("path segment `{}` is not UTF-8", http::clip(s)))
                })?;
                params.push(value);
            } else if t != s {
                matched = false;
                break;
            }
        }
        if !matched {
            continue;
        }
        if Some(r.verb) == verb {
            return Ok(Found::Route(r, params));
        }
        allowed.push(r.verb.as_str());
    }
    Ok(if allowed.is_empty() {
        Found::None
    } else {
        Found::Method(allowed)
    })
}

/// Serves one request; never fails (errors are JSON responses).
pub async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let (label, resp) = match route_request(req, &shared).await {
        Ok((label, resp)) => (label, resp),
        Err((label, e)) => {
            let mut resp = error_response(&e);
            if e.status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"mxguard\""),
                );
            }
            (label, resp)
        }
    };
    shared
        .metrics
        .admin_requests
        .with_label_values(&[label, resp.status().as_str()])
        .inc();
    resp
}

type Routed = Result<(&'static str, Response<Full<Bytes>>), (&'static str, ApiError)>;

async fn route_request(req: Request<Incoming>, shared: &Arc<Shared>) -> Routed {
    let unknown = |e| (ADMIN_ROUTE_UNKNOWN, e);
    let path = req.uri().path().to_owned();
    let (route, params) = match find(req.method(), &path).map_err(unknown)? {
        Found::Route(r, params) => (r, params),
        Found::Method(allowed) => {
            let e = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not allowed on {path} (allowed: {})",
                    req.method(),
                    allowed.join(", ")
                ),
            );
            let mut resp = error_response(&e);
            if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                resp.headers_mut().insert(ALLOW, v);
            }
            return Ok((ADMIN_ROUTE_UNKNOWN, resp));
        }
        Found::None => {
            return Err(unknown(ApiError::not_found(format!(
                "no such route: {} {}",
                req.method(),
                http::clip(&path)
            ))))
        }
    };
    let label = route.path;
    let fail = |e| (label, e);
    let who = if route.auth {
        authenticate(&req, shared).map_err(fail)?
    } else {
        "-".to_string()
    };
    match route.id {
        RouteId::Healthz => {
            return Ok((
                label,
                http::response(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            ))
        }
        RouteId::Metrics => {
            info::refresh_gauges(shared).await;
            return Ok((
                label,
                http::response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    shared.metrics.render(),
                ),
            ));
        }
        _ => {}
    }
    let query = Query::parse(req.uri().query()).map_err(fail)?;
    let body = if route.verb == Verb::Get {
        Bytes::new()
    } else {
        http::read_body(req).await.map_err(fail)?
    };
    let call = Call {
        shared,
        who,
        params,
        query,
        body,
    };
    let (status, value) = dispatch(route.id, &call).await.map_err(fail)?;
    Ok((label, json_response(status, &value)))
}

/// The caller's token name, or 401/403.
fn authenticate(req: &Request<Incoming>, shared: &Shared) -> Result<String, ApiError> {
    let tokens = shared.tokens.load();
    if !tokens.enabled() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the admin API is off: set [admin] token_file to turn it on",
        ));
    }
    let Some(header) = req.headers().get(AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer token",
        ));
    };
    let presented = header
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .or_else(|| header.as_bytes().strip_prefix(b"bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the Authorization header must be `Bearer TOKEN`",
            )
        })?;
    tokens
        .check(presented.trim_ascii())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"))
}

async fn dispatch(id: RouteId, call: &Call<'_>) -> ApiResult {
    match id {
        RouteId::Healthz | RouteId::Metrics => Err(ApiError::internal("not dispatched here")),
        RouteId::Readyz => info::readyz(call).await,
        RouteId::ListEntries(kind) => lists::entries(call, kind),
        RouteId::ListAdd(kind) => lists::add(call, kind).await,
        RouteId::ListRemove(kind) => lists::remove(call, kind).await,
        RouteId::Lookup => lists::lookup(call),
        RouteId::Sessions => info::sessions(call),
        RouteId::QuarantineList => quarantine::list(call).await,
        RouteId::QuarantineShow => quarantine::show(call).await,
        RouteId::QuarantineRelease => quarantine::release(call).await,
        RouteId::QuarantineDelete => quarantine::delete(call).await,
        RouteId::Reload => info::reload(call).await,
        RouteId::Config => info::config(call),
        RouteId::Stats => info::stats(call).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes of `docs/api/openapi.yaml`: the keys under `paths:` and
    /// the operations under each. The document is kept in the regular
    /// two-space layout this reads, so no YAML parser is needed here.
    fn documented() -> Vec<(String, String)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut out = Vec::new();
        let mut in_paths = false;
        let mut current: Option<String> = None;
        for line in text.lines() {
            if !line.starts_with(' ') && !line.is_empty() && !line.starts_with('#') {
                in_paths = line.trim_end() == "paths:";
                current = None;
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /") {
                current = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
            } else if let (Some(p), Some(op)) = (&current, line.strip_prefix("    ")) {
                if let Some(op) = op.strip_suffix(':') {
                    if ["get", "post", "delete", "put", "patch"].contains(&op) {
                        out.push((op.to_uppercase(), p.clone()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let doc = documented();
        assert!(!doc.is_empty());
        for r in ROUTES {
            let key = (r.verb.as_str().to_string(), r.path.to_string());
            assert!(
                doc.contains(&key),
                "{key:?} is not in docs/api/openapi.yaml"
            );
        }
        for (verb, path) in &doc {
            assert!(
                ROUTES
                    .iter()
                    .any(|r| r.verb.as_str() == verb && r.path == path),
                "{verb} {path} is documented but not routed"
            );
        }
    }

    #[test]
    fn paths_match_templates_and_decode_their_parameters() {
        match find(&Method::GET, "/api/v1/lookup/2001%3Adb8%3A%3A1").unwrap() {
            Found::Route(r, params) => {
                assert_eq!(r.id, RouteId::Lookup);
                assert_eq!(params, ["2001:db8::1"]);
            }
            _ => panic!("no match"),
        }
        assert!(matches!(
            find(&Method::PUT, "/api/v1/reload").unwrap(),
            Found::Method(v) if v == ["POST"]
        ));
        assert!(matches!(
            find(&Method::GET, "/api/v1/nothing").unwrap(),
            Found::None
        ));
        assert!(matches!(
            find(&Method::GET, "/api/v1/quarantine/").unwrap(),
            Found::None | Found::Method(_)
        ));
        assert!(find(&Method::GET, "/api/v1/lookup/%ff").is_err());
    }
}
