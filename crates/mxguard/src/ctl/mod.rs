//! `mxguard ctl`: the operator's commands over the admin API.
//!
//! Human tables by default, the API's JSON with `--json`. Exit codes: 0
//! done; 1 the API refused or failed (its message on stderr), or it could
//! not be reached; 2 a usage or local configuration error (no token file,
//! a bad config).

mod client;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use crate::api::Tokens;
use crate::config::{Config, Dur, Overrides};
use client::Endpoint;

/// Where `--config` points when it is not given and the file exists.
const DEFAULT_CONFIG: &str = "/etc/mxguard/mxguard.toml";
const TIMEOUT: Duration = Duration::from_secs(30);
/// A release waits for the MTA (RFC 5321 timeouts add up to minutes).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(20 * 60);

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The guard's config: where the admin API listens and its token file
    /// [default: /etc/mxguard/mxguard.toml when it exists].
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// The admin API's URL [default: http:// + the config's admin.listen].
    #[arg(long, global = true, env = "MXGUARD_ADMIN", value_name = "URL")]
    admin: Option<String>,
    /// The file holding the bearer token [default: the config's
    /// admin.token_file].
    #[arg(long, global = true, env = "MXGUARD_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Which token of the file to use [default: the first].
    #[arg(long, global = true, value_name = "NAME")]
    token_name: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Block an address or network (CIDR).
    Block(ListAdd),
    /// Remove a dynamic blocklist entry.
    Unblock { address: String },
    /// Allowlist an address or network (CIDR): it skips every test.
    Allow(ListAdd),
    /// Remove a dynamic allowlist entry.
    Unallow { address: String },
    /// Which list decides for an address, by which entry, since and until when.
    Lookup { address: String },
    /// List blocklist entries.
    Blocklist(ListShow),
    /// List allowlist entries.
    Allowlist(ListShow),
    /// The live sessions, oldest first.
    Sessions {
        /// greet | watch | relay
        #[arg(long)]
        phase: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Quarantined mail: list, show, release, delete.
    #[command(subcommand)]
    Quarantine(QuarantineCmd),
    /// Reload the configuration (what SIGHUP does).
    Reload,
    /// The counts an operator asks first.
    Stats,
    /// The running configuration, secrets masked.
    Config,
    /// Readiness: the MTA answers, the stores are usable (exit 1 when not).
    Ready,
}

#[derive(Debug, Args)]
struct ListAdd {
    /// 192.0.2.7, 192.0.2.0/24, 2001:db8::/48
    address: String,
    /// How long, e.g. 1h, 30m, 7d [default: no expiry].
    #[arg(long)]
    ttl: Option<Dur>,
    /// Why (shown by lookup and in the event log).
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Debug, Args)]
struct ListShow {
    /// Only entries containing this address.
    #[arg(long)]
    contains: Option<String>,
    /// file | detection | admin | cluster
    #[arg(long)]
    source: Option<String>,
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[arg(long, default_value_t = 0)]
    offset: usize,
}

#[derive(Debug, Subcommand)]
enum QuarantineCmd {
    /// The quarantined messages, oldest first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One message: its metadata, then its content.
    Show { id: String },
    /// Deliver it to the MTA with its stored envelope.
    Release {
        id: String,
        /// The MTA [default: the guard's intercept.upstream].
        #[arg(long, value_name = "ADDR")]
        upstream: Option<std::net::SocketAddr>,
    },
    /// Delete it without delivering.
    Delete { id: String },
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query(params: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn failure(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

pub fn main(args: CtlArgs) -> ExitCode {
    let config_path = args.config.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    });
    // The config is read only for what the flags leave open.
    let config = if args.admin.is_some() && args.token_file.is_some() {
        None
    } else {
        match Config::load(config_path.as_deref(), &Overrides::default()) {
            Ok(c) => Some(c),
            Err(e) => return usage_error(&e.to_string()),
        }
    };
    let admin = match (&args.admin, config.as_ref().and_then(|c| c.admin.listen)) {
        (Some(url), _) => url.clone(),
        (None, Some(addr)) => format!("http://{addr}"),
        (None, None) => {
            return usage_error(
                "the admin API is off in the config (admin.listen = \"\"); give --admin URL",
            )
        }
    };
    let endpoint = match Endpoint::parse(&admin) {
        Ok(e) => e,
        Err(e) => return usage_error(&e),
    };
    let token_file = args
        .token_file
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.admin.token_file.clone()));
    let Some(token_file) = token_file else {
        return usage_error("no token: give --token-file, or set [admin] token_file in the config");
    };
    let tokens = match Tokens::load(&token_file) {
        Ok(t) => t,
        Err(e) => return usage_error(&e),
    };
    let Some(token) = tokens.secret(args.token_name.as_deref()) else {
        return usage_error(&format!(
            "{}: no token named `{}`",
            token_file.display(),
            args.token_name.as_deref().unwrap_or("")
        ));
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return failure(&format!("cannot start the runtime: {e}")),
    };
    rt.block_on(run(&endpoint, token, args.json, args.command))
}

struct Api<'a> {
    endpoint: &'a Endpoint,
    token: &'a [u8],
}

impl Api<'_> {
    /// The JSON reply of a successful call; the API's error message
    /// otherwise.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(hyper::StatusCode, Value), String> {
        let reply = client::request(self.endpoint, Some(self.token), method, path, body, timeout)
            .await
            .map_err(|e| format!("admin API at {}: {e}", self.endpoint.display()))?;
        let value: Value = serde_json::from_slice(&reply.body).unwrap_or_else(
            |_| json!({ "error": String::from_utf8_lossy(&reply.body).trim().to_string() }),
        );
        Ok((reply.status, value))
    }
}

async fn run(endpoint: &Endpoint, token: &[u8], json_out: bool, command: CtlCommand) -> ExitCode {
    let api = Api { endpoint, token };
    let (method, path, body, timeout) = match &command {
        CtlCommand::Block(add) | CtlCommand::Allow(add) => {
            let list = if matches!(command, CtlCommand::Block(_)) {
                "blocklist"
            } else {
                "allowlist"
            };
            let mut body = json!({ "address": add.address, "reason": add.reason });
            if let Some(ttl) = add.ttl {
                body["ttl_seconds"] = json!(ttl.0.as_secs().max(1));
            }
            (Method::POST, format!("/api/v1/{list}"), Some(body), TIMEOUT)
        }
        CtlCommand::Unblock { address } => (
            Method::DELETE,
            format!("/api/v1/blocklist?net={}", enc(address)),
            None,
            TIMEOUT,
        ),
        CtlCommand::Unallow { address } => (
            Method::DELETE,
            format!("/api/v1/allowlist?net={}", enc(address)),
            None,
            TIMEOUT,
        ),
        CtlCommand::Lookup { address } => (
            Method::GET,
            format!("/api/v1/lookup/{}", enc(address)),
            None,
            TIMEOUT,
        ),
        CtlCommand::Blocklist(show) | CtlCommand::Allowlist(show) => {
            let list = if matches!(command, CtlCommand::Blocklist(_)) {
                "blocklist"
            } else {
                "allowlist"
            };
            let q = query(&[
                ("contains", show.contains.clone()),
                ("source", show.source.clone()),
                ("limit", Some(show.limit.to_string())),
                ("offset", Some(show.offset.to_string())),
            ]);
            (Method::GET, format!("/api/v1/{list}{q}"), None, TIMEOUT)
        }
        CtlCommand::Sessions { phase, limit } => {
            let q = query(&[("phase", phase.clone()), ("limit", Some(limit.to_string()))]);
            (Method::GET, format!("/api/v1/sessions{q}"), None, TIMEOUT)
        }
        CtlCommand::Quarantine(q) => match q {
            QuarantineCmd::List { limit } => (
                Method::GET,
                format!("/api/v1/quarantine?limit={limit}"),
                None,
                TIMEOUT,
            ),
            QuarantineCmd::Show { id } => (
                Method::GET,
                format!("/api/v1/quarantine/{}", enc(id)),
                None,
                TIMEOUT,
            ),
            QuarantineCmd::Release { id, upstream } => {
                let body = match upstream {
                    Some(u) => json!({ "upstream": u.to_string() }),
                    None => json!({}),
                };
                (
                    Method::POST,
                    format!("/api/v1/quarantine/{}/release", enc(id)),
                    Some(body),
                    RELEASE_TIMEOUT,
                )
            }
            QuarantineCmd::Delete { id } => (
                Method::DELETE,
                format!("/api/v1/quarantine/{}", enc(id)),
                None,
                TIMEOUT,
            ),
        },
        CtlCommand::Reload => (
            Method::POST,
            "/api/v1/reload".into(),
            Some(json!({})),
            TIMEOUT,
        ),
        CtlCommand::Stats => (Method::GET, "/api/v1/stats".into(), None, TIMEOUT),
        CtlCommand::Config => (Method::GET, "/api/v1/config".into(), None, TIMEOUT),
        CtlCommand::Ready => (Method::GET, "/readyz".into(), None, TIMEOUT),
    };
    let (status, value) = match api.call(method, &path, body, timeout).await {
        Ok(r) => r,
        Err(e) => return failure(&e),
    };
    // /readyz says "not ready" with a 503 and a full report: show it.
    let is_ready_report = matches!(command, CtlCommand::Ready) && value.get("ready").is_some();
    if !status.is_success() && !is_ready_report {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        return failure(&format!("{message} (HTTP {})", status.as_u16()));
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        print!("{}", render::human(&command_name(&command), &value));
    }
    if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn command_name(command: &CtlCommand) -> String {
    match command {
        CtlCommand::Block(_) => "block",
        CtlCommand::Unblock { .. } => "unblock",
        CtlCommand::Allow(_) => "allow",
        CtlCommand::Unallow { .. } => "unallow",
        CtlCommand::Lookup { .. } => "lookup",
        CtlCommand::Blocklist(_) | CtlCommand::Allowlist(_) => "list",
        CtlCommand::Sessions { .. } => "sessions",
        CtlCommand::Quarantine(QuarantineCmd::List { .. }) => "quarantine-list",
        CtlCommand::Quarantine(QuarantineCmd::Show { .. }) => "quarantine-show",
        CtlCommand::Quarantine(QuarantineCmd::Release { .. }) => "quarantine-release",
        CtlCommand::Quarantine(QuarantineCmd::Delete { .. }) => "quarantine-delete",
        CtlCommand::Reload => "reload",
        CtlCommand::Stats => "stats",
        CtlCommand::Config => "config",
        CtlCommand::Ready => "ready",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_encoded_for_paths_and_queries() {
        assert_eq!(enc("2001:db8::/48"), "2001%3Adb8%3A%3A%2F48");
        assert_eq!(query(&[("a", Some("x y".into())), ("b", None)]), "?a=x%20y");
        assert_eq!(query(&[("b", None)]), "");
    }
}
