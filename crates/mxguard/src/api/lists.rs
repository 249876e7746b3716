//! Blocklist and allowlist routes over the `lists` facade: list (filter,
//! paging), add (address or CIDR, TTL, reason), remove, and look up one
//! address across both lists.

use std::net::IpAddr;
use std::time::Duration;

use hyper::StatusCode;
use ipnet::IpNet;
use serde::Deserialize;

use super::http::{clip, ok, parse_json, ApiError, ApiResult};
use super::Call;
use crate::lists::{ListError, ListKind, ListQuery};

/// Ten years: past this a TTL is a typo, and "no expiry" is said by
/// leaving `ttl_seconds` out.
pub const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;
pub const MAX_REASON: usize = 256;

/// An address (a host entry: /32, /128) or a network in CIDR form, with
/// no host bits set: `192.0.2.7/24` is refused rather than guessed.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if s.contains('/') {
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("`{}` is not an address or a CIDR network", clip(s)))?;
        if net.trunc() != net {
            return Err(format!(
                "`{}` has host bits set; the network is {}",
                clip(s),
                net.trunc()
            ));
        }
        Ok(net)
    } else {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| format!("`{}` is not an address or a CIDR network", clip(s)))?;
        Ok(IpNet::from(ip))
    }
}

fn list_error(e: ListError) -> ApiError {
    match e {
        ListError::Invalid(m) => ApiError::bad_request(m),
        ListError::NotFound => ApiError::not_found("no such entry"),
        ListError::Store(m) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("state store: {m}; nothing was changed"),
        ),
    }
}

fn verbs(kind: ListKind) -> (&'static str, &'static str) {
    match kind {
        ListKind::Block => ("block", "unblock"),
        ListKind::Allow => ("allow", "unallow"),
    }
}

/// `GET /api/v1/{blocklist,allowlist}`.
pub fn entries(call: &Call<'_>, kind: ListKind) -> ApiResult {
    call.query
        .allow(&["contains", "source", "offset", "limit"])?;
    let contains = call.query.parsed::<IpAddr>("contains", "an IP address")?;
    let source = match call.query.get("source") {
        None => None,
        Some(s @ ("file" | "detection" | "admin" | "cluster")) => Some(s.to_string()),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "query parameter `source`: `{}` is not one of file, detection, admin, cluster",
                clip(other)
            )))
        }
    };
    let (offset, limit) = call.query.paging(100, 1000)?;
    let page = call.shared.list_entries(&ListQuery {
        kind: Some(kind),
        contains,
        source,
        offset,
        limit,
    });
    ok(&page)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    /// `192.0.2.7`, `192.0.2.0/24`, `2001:db8::/48`.
    address: String,
    /// Omitted: no expiry.
    ttl_seconds: Option<u64>,
    #[serde(default)]
    reason: String,
}

/// `POST /api/v1/{blocklist,allowlist}`.
pub async fn add(call: &Call<'_>, kind: ListKind) -> ApiResult {
    call.query.allow(&[])?;
    let body: AddBody = parse_json(&call.body)?;
    let net = parse_net(&body.address)
        .map_err(|e| ApiError::bad_request(format!("field `address`: {e}")))?;
    let ttl = match body.ttl_seconds {
        None => None,
        Some(0) => {
            return Err(ApiError::bad_request(
                "field `ttl_seconds`: must be at least 1 (leave it out for no expiry)",
            ))
        }
        Some(s) if s > MAX_TTL_SECONDS => {
            return Err(ApiError::bad_request(format!(
                "field `ttl_seconds`: at most {MAX_TTL_SECONDS} (leave it out for no expiry)"
            )))
        }
        Some(s) => Some(Duration::from_secs(s)),
    };
    if body.reason.chars().count() > MAX_REASON || body.reason.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "field `reason`: at most {MAX_REASON} characters, no control characters"
        )));
    }
    let shared = call.shared.clone();
    let who = call.who.clone();
    let reason = body.reason;
    let result = tokio::task::spawn_blocking(move || shared.add_entry(kind, net, ttl, reason, who))
        .await
        .map_err(|e| ApiError::internal(format!("blocking task: {e}")))?;
    let target = net.to_string();
    match result {
        Ok(view) => {
            call.audit(verbs(kind).0, Some(&target), Ok(&view.reason));
            let (_, value) = ok(&view)?;
            Ok((StatusCode::CREATED, value))
        }
        Err(e) => {
            let e = list_error(e);
            call.audit(verbs(kind).0, Some(&target), Err(&e.message));
            Err(e)
        }
    }
}

/// `DELETE /api/v1/{blocklist,allowlist}?net=…`.
pub async fn remove(call: &Call<'_>, kind: ListKind) -> ApiResult {
    call.query.allow(&["net"])?;
    let raw = call
        .query
        .get("net")
        .ok_or_else(|| ApiError::bad_request("query parameter `net` is required"))?;
    let net =
        parse_net(raw).map_err(|e| ApiError::bad_request(format!("query parameter `net`: {e}")))?;
    let shared = call.shared.clone();
    let result = tokio::task::spawn_blocking(move || shared.remove_entry(kind, net))
        .await
        .map_err(|e| ApiError::internal(format!("blocking task: {e}")))?;
    let target = net.to_string();
    match result {
        Ok(view) => {
            call.audit(verbs(kind).1, Some(&target), Ok(""));
            ok(&view)
        }
        Err(e) => {
            let e = match e {
                ListError::NotFound => ApiError::not_found(format!(
                    "{target} is not a dynamic entry of the {}list (entries from files are removed by editing the file)",
                    kind.as_str()
                )),
                other => list_error(other),
            };
            call.audit(verbs(kind).1, Some(&target), Err(&e.message));
            Err(e)
        }
    }
}

/// `GET /api/v1/lookup/{address}`: which list decides for the address,
/// by which entry, since and until when, added by whom.
pub fn lookup(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    let raw = call.param(0);
    let ip: IpAddr = raw
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{}` is not an IP address", clip(raw))))?;
    ok(&call.shared.lookup(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_are_addresses_or_clean_cidrs() {
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_net("2001:db8::/48").unwrap().to_string(),
            "2001:db8::/48"
        );
        let e = parse_net("192.0.2.7/24").unwrap_err();
        assert!(e.contains("192.0.2.0/24"), "{e}");
        for bad in ["192.0.2.0/33", "300.1.1.1", "example.org", "", "1.2.3.4/"] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }
}
