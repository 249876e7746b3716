//! Quarantine routes: list, show, release, delete. The store's blocking
//! file work runs on the blocking pool.

use std::net::SocketAddr;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::http::{clip, ok, parse_json, ApiError, ApiResult};
use super::info::quarantine_store;
use super::Call;
use crate::quarantine::{QuarantineError, QuarantineId, ReleaseError};

fn id_param(call: &Call<'_>) -> Result<QuarantineId, ApiError> {
    let raw = call.param(0);
    raw.parse::<QuarantineId>().map_err(|e| {
        ApiError::bad_request(format!("`{}` is not a quarantine id ({})", clip(raw), e.0))
    })
}

fn store_error(e: QuarantineError) -> ApiError {
    let status = match &e {
        QuarantineError::NotFound(_) => StatusCode::NOT_FOUND,
        QuarantineError::Busy(_) => StatusCode::CONFLICT,
        QuarantineError::TooLarge { .. }
        | QuarantineError::Corrupt { .. }
        | QuarantineError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QuarantineError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("blocking task: {e}")))?
        .map_err(store_error)
}

/// `GET /api/v1/quarantine`: the messages, oldest first.
pub async fn list(call: &Call<'_>) -> ApiResult {
    call.query.allow(&["offset", "limit"])?;
    let (offset, limit) = call.query.paging(100, 10_000)?;
    let store = quarantine_store(call.shared);
    let listing = blocking(move || store.list()).await?;
    let messages: Vec<_> = listing.messages.iter().skip(offset).take(limit).collect();
    // Unreadable files may be mail: always reported.
    let skipped: Vec<String> = listing.skipped.iter().map(ToString::to_string).collect();
    ok(&json!({
        "total": listing.messages.len(),
        "messages": messages,
        "skipped": skipped,
    }))
}

/// `GET /api/v1/quarantine/{id}`: metadata and content.
pub async fn show(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    let id = id_param(call)?;
    let store = quarantine_store(call.shared);
    let (meta, message) = blocking(move || store.show(&id)).await?;
    ok(&json!({
        "meta": meta,
        "size": message.len(),
        "message": std::str::from_utf8(&message).ok(),
        "message_base64": crate::quarantine::base64(&message),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    /// The MTA to deliver to; the config's `intercept.upstream` by default.
    upstream: Option<SocketAddr>,
}

#[derive(Serialize)]
struct Released {
    id: String,
    upstream: String,
    recipients: Vec<String>,
    size: u64,
    reply: String,
}

/// `POST /api/v1/quarantine/{id}/release`: deliver with the stored
/// envelope; the message leaves the quarantine once the MTA took it.
pub async fn release(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    let id = id_param(call)?;
    let body: ReleaseBody = parse_json(&call.body)?;
    let runtime = call.shared.runtime.load_full();
    let upstream = body.upstream.unwrap_or(runtime.config.intercept.upstream);
    let store = quarantine_store(call.shared);
    let target = id.to_string();
    match store.release(&id, upstream, &runtime.config.hostname).await {
        Ok(r) => {
            call.audit("quarantine.release", Some(&target), Ok(&r.reply));
            ok(&Released {
                id: r.id.to_string(),
                upstream: r.upstream.to_string(),
                recipients: r.recipients,
                size: r.size,
                reply: r.reply,
            })
        }
        Err(e) => {
            let message = e.to_string();
            call.audit("quarantine.release", Some(&target), Err(&message));
            let status = match &e {
                ReleaseError::Store(QuarantineError::NotFound(_)) => StatusCode::NOT_FOUND,
                ReleaseError::Store(QuarantineError::Busy(_)) => StatusCode::CONFLICT,
                ReleaseError::Store(_) | ReleaseError::AcceptedNotRemoved { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                ReleaseError::BadEnvelope(_) => StatusCode::UNPROCESSABLE_ENTITY,
                // The MTA refused or failed: the gateway's upstream.
                ReleaseError::Connect { .. }
                | ReleaseError::Refused { .. }
                | ReleaseError::Conversation { .. } => StatusCode::BAD_GATEWAY,
            };
            let kept = !matches!(e, ReleaseError::AcceptedNotRemoved { .. })
                && !matches!(e, ReleaseError::Store(QuarantineError::NotFound(_)));
            let message = if kept {
                format!("{message}; {target} stays in the quarantine")
            } else {
                message
            };
            Err(ApiError::new(status, message))
        }
    }
}

/// `DELETE /api/v1/quarantine/{id}`.
pub async fn delete(call: &Call<'_>) -> ApiResult {
    call.query.allow(&[])?;
    let id = id_param(call)?;
    let store = quarantine_store(call.shared);
    let target = id.to_string();
    let wanted = id.clone();
    match blocking(move || store.delete(&wanted)).await {
        Ok(()) => {
            call.audit("quarantine.delete", Some(&target), Ok(""));
            ok(&json!({ "deleted": target }))
        }
        Err(e) => {
            call.audit("quarantine.delete", Some(&target), Err(&e.message));
            Err(e)
        }
    }
}
