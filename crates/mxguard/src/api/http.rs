//! HTTP plumbing for the API: JSON errors, query strings, bodies.
//!
//! Every client mistake is a 4xx with `{"error": "..."}` naming the
//! problem: an unknown parameter, a malformed value, a body too large or
//! not JSON. A 5xx means the guard itself failed.

use std::collections::BTreeMap;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Request bodies are small JSON objects; anything bigger is refused
/// before it is read whole.
pub const MAX_BODY: usize = 64 * 1024;

/// A request that cannot be served, and why.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

pub type ApiResult = Result<(StatusCode, serde_json::Value), ApiError>;

/// A 200 with `value` as JSON.
pub fn ok<T: Serialize>(value: &T) -> ApiResult {
    serde_json::to_value(value)
        .map(|v| (StatusCode::OK, v))
        .map_err(|e| ApiError::internal(format!("cannot render JSON: {e}")))
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    response(status, "application/json", body)
}

pub fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    json_response(e.status, &serde_json::json!({ "error": e.message }))
}

pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A query string's parameters; each route says which it takes.
#[derive(Debug, Default)]
pub struct Query {
    params: BTreeMap<String, String>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut params = BTreeMap::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(k, true)
                .ok_or_else(|| ApiError::bad_request("a query parameter name is not UTF-8"))?;
            let v = decode(v, true).ok_or_else(|| {
                ApiError::bad_request(format!("query parameter `{k}`: the value is not UTF-8"))
            })?;
            if params.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad_request(format!(
                    "query parameter `{k}` is given twice"
                )));
            }
        }
        Ok(Self { params })
    }

    /// Refuses parameters the route does not take.
    pub fn allow(&self, known: &[&str]) -> Result<(), ApiError> {
        for k in self.params.keys() {
            if !known.contains(&k.as_str()) {
                let accepted = if known.is_empty() {
                    "this route takes none".to_string()
                } else {
                    format!("accepted: {}", known.join(", "))
                };
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{}` ({accepted})",
                    crate::api::http::clip(k)
                )));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// A parameter parsed with `FromStr`; the error names it.
    pub fn parsed<T: std::str::FromStr>(&self, key: &str, what: &str) -> Result<Option<T>, ApiError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|e| {
                ApiError::bad_request(format!(
                    "query parameter `{key}`: `{}` is not {what} ({e})",
                    clip(v)
                ))
            }),
        }
    }

    /// `offset` and `limit` (default `default`, at most `max`).
    pub fn paging(&self, default: usize, max: usize) -> Result<(usize, usize), ApiError> {
        let offset = self.parsed::<usize>("offset", "a count")?.unwrap_or(0);
        let limit = self.parsed::<usize>("limit", "a count")?.unwrap_or(default);
        if limit == 0 || limit > max {
            return Err(ApiError::bad_request(format!(
                "query parameter `limit`: between 1 and {max}"
            )));
        }
        Ok((offset, limit))
    }
}

/// Percent-decoding (RFC 3986 §2.1); `plus` also turns `+` into a space,
/// as HTML forms encode queries. `None` when the result is not UTF-8 or an
/// escape is malformed.
pub fn decode(s: &str, plus: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A value echoed in an error message, kept short and printable.
pub fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(80)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// Reads a request body of at most [`MAX_BODY`] bytes.
pub async fn read_body(req: hyper::Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {MAX_BODY} bytes"),
        )
    };
    if let Some(len) = req.headers().get(hyper::header::CONTENT_LENGTH) {
        let len = len
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?;
        if len > MAX_BODY as u64 {
            return Err(too_large());
        }
    }
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("the body must be application/json, not `{}`", clip(ct)),
            ));
        }
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// The body as a `T`; an empty body is `{}` (every field optional or
/// required as `T` says). The error names the field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("bad JSON body: {inner}"))
        } else {
            ApiError::bad_request(format!("bad JSON body: field `{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_and_refuse_what_the_route_does_not_take() {
        let q = Query::parse(Some("contains=2001%3Adb8%3A%3A1&limit=5&reason=a+b")).unwrap();
        assert_eq!(q.get("contains"), Some("2001:db8::1"));
        assert_eq!(q.get("reason"), Some("a b"));
        assert_eq!(q.paging(100, 1000).unwrap(), (0, 5));
        let e = q.allow(&["contains", "limit"]).unwrap_err();
        assert!(e.message.contains("`reason`"), "{}", e.message);
        assert!(Query::parse(Some("a=1&a=2")).is_err());
        assert!(Query::parse(Some("a=%ff")).is_err());
        assert!(Query::parse(Some("a=%4")).is_err());
        let e = Query::parse(Some("limit=-1"))
            .unwrap()
            .paging(1, 10)
            .unwrap_err();
        assert!(e.message.contains("limit"), "{}", e.message);
        let e = Query::parse(Some("limit=0"))
            .unwrap()
            .paging(1, 10)
            .unwrap_err();
        assert!(e.message.contains("between"), "{}", e.message);
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Add {
            ttl: Option<u64>,
        }
        let e = parse_json::<Add>(br#"{"ttl": -5}"#).unwrap_err();
        assert!(e.message.contains("`ttl`"), "{}", e.message);
        let e = parse_json::<Add>(br#"{"tll": 5}"#).unwrap_err();
        assert!(e.message.contains("tll"), "{}", e.message);
        let e = parse_json::<Add>(b"{not json").unwrap_err();
        assert!(e.message.starts_with("bad JSON body"), "{}", e.message);
        assert!(parse_json::<Add>(b"").is_ok());
        assert!(parse_json::<Add>(br#"{} {}"#).is_err());
    }
}
