//! Read-mostly routes: readiness, live sessions, stats, the effective
//! config, and reload.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::http::{ok, ApiError, ApiResult};
use super::Call;
use crate::config::Mode;
use crate::lists::{ListKind, ListQuery};
use crate::quarantine::Quarantine;
use crate::server::Shared;
use crate::sessions::SessionPhase;

/// A readiness probe must answer before the prober gives up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

/// A session thread that has not beaten (every second) for this long is
/// stalled.
const THREAD_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /readyz`: the MTA answers a TCP connect, the stores are usable and
/// every session thread makes progress.
pub async fn readyz(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    let runtime = call.shared.runtime.load_full();
    let config = &runtime.config;
    let mut checks = BTreeMap::new();

    let probe = config
        .admin
        .ready_probe
        .or((config.intercept.mode == Mode::Fixed).then_some(config.intercept.upstream));
    let upstream = match probe {
        Some(addr) => {
            let start = Instant::now();
            match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let took = start.elapsed();
                    // A polite QUIT, off the request's path, so the MTA
                    // logs a clean disconnect rather than a lost one.
                    tokio::spawn(crate::session::quit_upstream(stream));
                    Check {
                        ok: true,
                        detail: format!(
                            "{addr} accepted a connection in {:.1} ms",
                            took.as_secs_f64() * 1000.0
                        ),
                    }
                }
                Ok(Err(e)) => Check {
                    ok: false,
                    detail: format!("{addr}: {e}"),
                },
                Err(_) => Check {
                    ok: false,
                    detail: format!("{addr}: no answer within {}s", PROBE_TIMEOUT.as_secs()),
                },
            }
        }
        None => Check {
            ok: true,
            detail: format!(
                "not checked: mode {} has no fixed upstream (set [admin] ready_probe)",
                config.intercept.mode.as_str()
            ),
        },
    };
    checks.insert("upstream", upstream);

    let quarantine = match &call.shared.quarantine {
        Some(q) => {
            let new = q.dir().join("new");
            match nix::unistd::access(&new, nix::unistd::AccessFlags::W_OK) {
                Ok(()) => Check {
                    ok: true,
                    detail: format!("{} is writable", new.display()),
                },
                Err(e) => Check {
                    ok: false,
                    detail: format!("{}: {e}", new.display()),
                },
            }
        }
        None => Check {
            ok: true,
            detail: "not in use (no action quarantines)".into(),
        },
    };
    checks.insert("quarantine", quarantine);

    // A session thread that stopped beating holds up its sessions and its
    // share of new connections (`intercept.workers`).
    if let Some(beats) = call.shared.session_threads.get() {
        let ages = beats.ages();
        let stalled = beats.stalled(THREAD_STALL);
        let oldest = ages.iter().max().copied().unwrap_or_default();
        checks.insert(
            "session_threads",
            if stalled.is_empty() {
                Check {
                    ok: true,
                    detail: format!(
                        "{} session thread(s), the last beat of each at most {} ms ago",
                        ages.len(),
                        oldest.as_millis()
                    ),
                }
            } else {
                Check {
                    ok: false,
                    detail: format!(
                        "session thread(s) {stalled:?} made no progress for {}s or more",
                        THREAD_STALL.as_secs()
                    ),
                }
            },
        );
    }

    let ready = checks.values().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, json!({ "ready": ready, "checks": checks })))
}

#[derive(Serialize)]
struct SessionOut {
    id: u64,
    client: String,
    orig_dst: Option<String>,
    phase: &'static str,
    age_seconds: f64,
    tests: Vec<&'static str>,
}

/// `GET /api/v1/sessions`: the live sessions, oldest first.
pub fn sessions(call: &Call<'_>) -> ApiResult {
    call.query.allow(&["phase", "offset", "limit"])?;
    let phase = match call.query.get("phase") {
        None => None,
        Some("greet") => Some(SessionPhase::Greet),
        Some("watch") => Some(SessionPhase::Watch),
        Some("relay") => Some(SessionPhase::Relay),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "query parameter `phase`: `{}` is not one of greet, watch, relay",
                super::http::clip(other)
            )))
        }
    };
    let (offset, limit) = call.query.paging(100, 10_000)?;
    let all: Vec<_> = call
        .shared
        .sessions
        .snapshot()
        .into_iter()
        .filter(|s| phase.is_none_or_eq(s.phase))
        .collect();
    let sessions: Vec<SessionOut> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|s| SessionOut {
            id: s.id,
            client: s.client.to_string(),
            orig_dst: s.orig_dst.map(|d| d.to_string()),
            phase: s.phase.as_str(),
            age_seconds: (s.age.as_secs_f64() * 1000.0).round() / 1000.0,
            tests: s.tests.clone(),
        })
        .collect();
    ok(&json!({ "total": all.len(), "sessions": sessions }))
}

trait PhaseFilter {
    fn is_none_or_eq(&self, phase: SessionPhase) -> bool;
}

impl PhaseFilter for Option<SessionPhase> {
    fn is_none_or_eq(&self, phase: SessionPhase) -> bool {
        match self {
            Some(p) => *p == phase,
            None => true,
        }
    }
}

/// The quarantine store the API reads: the daemon's, or the configured
/// directory opened read-side (a guard that quarantines nothing may still
/// hold old mail there).
pub fn quarantine_store(shared: &Shared) -> Quarantine {
    match &shared.quarantine {
        Some(q) => q.clone(),
        None => Quarantine::open_existing(&shared.runtime.load().config.quarantine),
    }
}

/// Gauges that are cheaper to compute when asked (a scrape every few
/// seconds) than to keep current on every change: the list sizes (one
/// pass over the snapshot, no lock, no allocation) and the quarantine's
/// size (a directory scan, off the runtime's threads).
pub async fn refresh_gauges(shared: &Shared) {
    let lists = shared.lists.load();
    let now = Instant::now().into_std();
    // [block, allow] x [static, dynamic]
    let mut counts = [[0i64; 2]; 2];
    for (table, source) in [(lists.files(), 0), (lists.dynamic(), 1)] {
        for (_, entry) in table.iter().filter(|(_, e)| e.is_live(now)) {
            let kind = match ListKind::from(entry.kind) {
                ListKind::Block => 0,
                ListKind::Allow => 1,
            };
            counts[kind][source] += 1;
        }
    }
    drop(lists);
    for (gauge, row) in [
        (&shared.metrics.blocklist_entries, counts[0]),
        (&shared.metrics.allowlist_entries, counts[1]),
    ] {
        gauge.with_label_values(&["static"]).set(row[0]);
        gauge.with_label_values(&["dynamic"]).set(row[1]);
    }
    let store = quarantine_store(shared);
    if let Ok(Ok((messages, bytes))) = tokio::task::spawn_blocking(move || store.usage()).await {
        shared.metrics.quarantine_messages.set(messages as i64);
        shared.metrics.quarantine_bytes.set(bytes as i64);
    }
}

/// `GET /api/v1/stats`: the counts an operator asks first.
pub async fn stats(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    let shared = call.shared;
    refresh_gauges(shared).await;
    let m = &shared.metrics;
    let mut by_phase: BTreeMap<&str, usize> = [("greet", 0), ("watch", 0), ("relay", 0)]
        .into_iter()
        .collect();
    let sessions = shared.sessions.snapshot();
    for s in &sessions {
        *by_phase.entry(s.phase.as_str()).or_default() += 1;
    }
    let list_size = |kind| {
        shared
            .list_entries(&ListQuery {
                kind: Some(kind),
                limit: 1,
                ..ListQuery::default()
            })
            .total
    };
    let uptime = shared.started.elapsed().as_secs_f64();
    ok(&json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": uptime.round(),
        "connections": {
            "accepted": m.connections_accepted.get(),
            "by_outcome": m.counter_values("mxguard_connections_total"),
        },
        "detections": m.counter_values("mxguard_detections_total"),
        "actions": m.counter_values("mxguard_actions_total"),
        "sessions": { "live": sessions.len(), "by_phase": by_phase },
        "blocklist": {
            "entries": list_size(ListKind::Block),
            "static": m.blocklist_entries.with_label_values(&["static"]).get(),
            "dynamic": m.blocklist_entries.with_label_values(&["dynamic"]).get(),
        },
        "allowlist": {
            "entries": list_size(ListKind::Allow),
            "static": m.allowlist_entries.with_label_values(&["static"]).get(),
            "dynamic": m.allowlist_entries.with_label_values(&["dynamic"]).get(),
        },
        "quarantine": {
            "messages": m.quarantine_messages.get(),
            "bytes": m.quarantine_bytes.get(),
        },
        "relayed_bytes": m.counter_values("mxguard_relayed_bytes_total"),
        "config_reloads": m.counter_values("mxguard_config_reloads_total"),
    }))
}

/// `GET /api/v1/config`: the running configuration, secrets masked.
pub fn config(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    let runtime = call.shared.runtime.load();
    let mut value = serde_json::to_value(&runtime.config)
        .map_err(|e| ApiError::internal(format!("cannot render the config: {e}")))?;
    mask(&mut value, false);
    Ok((StatusCode::OK, value))
}

pub const MASK: &str = "********";

/// Masks what an API reader must not learn: anything under a key that
/// names a secret (token, password, secret, key file) and the password in
/// a URL's userinfo (`redis://user:pass@host`), wherever they are, so keys
/// added later are covered too.
pub fn mask(value: &mut Value, secret: bool) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                let named = ["token", "password", "secret", "passwd", "credential"]
                    .iter()
                    .any(|w| k.contains(w));
                mask(v, secret || named);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| mask(v, secret)),
        Value::String(s) if secret => *s = MASK.into(),
        Value::String(s) => {
            if let Some(masked) = mask_url_password(s) {
                *s = masked;
            }
        }
        Value::Number(_) | Value::Bool(_) if secret => *value = Value::String(MASK.into()),
        _ => {}
    }
}

fn mask_url_password(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, host) = authority.rsplit_once('@')?;
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    Some(format!("{scheme}://{user}:{MASK}@{host}{path}"))
}

/// `POST /api/v1/reload`: what SIGHUP does.
pub async fn reload(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    let _: Empty = super::http::parse_json(&call.body)?;
    let shared = call.shared.clone();
    let who = call.who.clone();
    let report = tokio::task::spawn_blocking(move || shared.reload(&who, "api"))
        .await
        .map_err(|e| ApiError::internal(format!("reload task: {e}")))?;
    match report {
        Ok(report) => ok(&report),
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload failed, the running config is kept: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_wherever_they_are() {
        let mut v = json!({
            "admin": { "token_file": "/etc/mxguard/tokens", "listen": "127.0.0.1:9425" },
            "cluster": { "redis": "redis://mx:hunter2@10.0.0.5:6379/0", "password": "x" },
            "other": ["redis://only-host:6379", { "api_secret": 42 }],
        });
        mask(&mut v, false);
        assert_eq!(v["admin"]["token_file"], MASK);
        assert_eq!(v["admin"]["listen"], "127.0.0.1:9425");
        assert_eq!(v["cluster"]["redis"], "redis://mx:********@10.0.0.5:6379/0");
        assert_eq!(v["cluster"]["password"], MASK);
        assert_eq!(v["other"][0], "redis://only-host:6379");
        assert_eq!(v["other"][1]["api_secret"], MASK);
        assert!(!v.to_string().contains("hunter2"));
    }
}
