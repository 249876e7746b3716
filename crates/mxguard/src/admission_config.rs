//! The configuration sections of admission control (docs/limits.md,
//! docs/fleet.md): `[admission]`, `[reputation]`, `[alert]`, `[senders]`,
//! `[state]`, `[cluster]`, `[nftables]`. Kept apart from `config.rs` so
//! that file stays readable; the same rules hold: `deny_unknown_fields`,
//! defaults in the `Default` impls below, errors naming the key.

use std::path::PathBuf;
use std::time::Duration;

use mxguard_policy::{Family, PrefixLength, Quota, TrendConfig};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::Dur;

/// What a client over a rate or connection limit gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// `421 4.7.0`, then close: the client retries later.
    Tempfail,
    /// `554 5.7.1`, then close.
    Reject,
    /// Let in, but greeted late and every reply slowed.
    Tarpit,
    /// Blocklisted for `block_ttl`, then refused like any listed client.
    Block,
}

impl OverLimit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tempfail => "tempfail",
            Self::Reject => "reject",
            Self::Tarpit => "tarpit",
            Self::Block => "block",
        }
    }
}

/// A prefix length written `ipv4/24`, `ipv6/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLen(pub PrefixLength);

impl Serialize for PrefixLen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PrefixLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("`{s}` is not like ipv4/24 or ipv6/64"));
        let (family, len) = s.split_once('/').ok_or_else(bad)?;
        let family = match family {
            "ipv4" => Family::V4,
            "ipv6" => Family::V6,
            _ => return Err(bad()),
        };
        let len: u8 = len.parse().map_err(|_| bad())?;
        PrefixLength::new(family, len)
            .map(PrefixLen)
            .map_err(serde::de::Error::custom)
    }
}

/// A token bucket for every prefix of one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRule {
    pub length: PrefixLen,
    /// Connections a second.
    pub rate: f64,
    pub burst: u32,
}

/// `[admission]`: rate and connection limits before the greeting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admission {
    /// Off: no rate or connection limit (lists still apply).
    pub enabled: bool,
    /// Connections per address: `{ rate = 1.0, burst = 30 }`.
    pub per_address: Quota,
    /// Connections per prefix, one bucket per prefix of each length.
    pub prefixes: Vec<PrefixRule>,
    /// Open connections per address (0: no cap). Per gateway, also in a
    /// fleet.
    pub max_connections_per_address: u32,
    pub over_limit: OverLimit,
    /// How long `over_limit = "block"` lists a client.
    pub block_ttl: Dur,
    /// How long a tarpitted client waits for its greeting (its replies are
    /// slowed by `actions.tarpit_delay`).
    pub tarpit_greet_delay: Dur,
    /// The most keys each table tracks (address, each prefix length,
    /// connections).
    pub max_tracked_keys: usize,
}

/// What crossing the reputation threshold does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdResponse {
    /// Blocklist the client for `reputation.block_ttl`.
    Block,
    /// POST an alert to `alert.webhook`.
    Alert,
}

/// `[reputation]`: a decaying score per client address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reputation {
    /// The score halves every this long.
    pub half_life: Dur,
    /// Points for each test that fires on a client.
    pub detection_points: f64,
    /// Points for each connection over a rate or connection limit.
    pub limit_points: f64,
    /// Points for a MAIL refused by a sender limit.
    pub sender_limit_points: f64,
    /// A score at or over this fires `on_threshold` (once per crossing).
    pub threshold: f64,
    pub on_threshold: Vec<ThresholdResponse>,
    pub block_ttl: Dur,
    pub max_tracked: usize,
}

/// `[alert]`: where alerts go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Alert {
    /// `http://host:port/path`; "" turns alerts off.
    pub webhook: String,
    /// Per attempt.
    pub timeout: Dur,
    /// Attempts after the first, with exponential backoff.
    pub retries: u32,
    /// Alerts waiting to be sent; past this new ones are dropped (counted).
    pub queue: usize,
}

/// Sender limits for one kind of session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderQuotas {
    /// MAIL commands per sender address.
    pub per_address: Quota,
    /// MAIL commands per sender domain.
    pub per_domain: Quota,
}

/// `[senders.trend]`: a limit at a multiple of each sender's usual volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trend {
    pub enabled: bool,
    pub interval: Dur,
    pub alpha: f64,
    pub multiple: f64,
    pub min_intervals: u32,
    pub floor: u32,
    pub max_senders: usize,
}

/// `[senders]`: limits by envelope sender (MAIL FROM), sniffed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Senders {
    pub enabled: bool,
    pub unauthenticated: SenderQuotas,
    /// Sessions that authenticated (AUTH answered 235).
    pub authenticated: SenderQuotas,
    pub trend: Trend,
    pub max_tracked: usize,
}

/// `[state]`: where dynamic lists, reputation and trends survive restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    /// "" keeps everything in memory only.
    pub dir: PathBuf,
    /// Detections reach the disk within this window (admin adds before
    /// they are acknowledged).
    pub flush_interval: Dur,
    /// Reputation and trend data are written this often; the list log is
    /// compacted at the same time.
    pub snapshot_interval: Dur,
}

/// `[cluster]`: a fleet sharing limits and blocks through Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// `redis://host:port/db`; "" runs alone.
    pub redis: String,
    /// This gateway's name in the fleet ("" = the hostname).
    pub gateway_id: String,
    /// A decision waits at most this long for Redis, then is made locally.
    pub timeout: Dur,
    /// Key and channel prefix, so fleets can share a Redis.
    pub key_prefix: String,
    /// How often this gateway publishes its counts.
    pub publish_interval: Dur,
}

/// `[nftables]`: push blocked addresses into a kernel set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nftables {
    pub enabled: bool,
    /// The `nft` binary.
    pub nft: PathBuf,
    /// `inet` table holding the sets (and, with `create`, the drop rule).
    pub table: String,
    /// Create the table, the sets and a rule dropping their members' SYNs
    /// to `ports`; off when the operator's own ruleset has them.
    pub create: bool,
    pub ports: Vec<u16>,
    /// Additions are batched this long into one `nft` run.
    pub batch_interval: Dur,
    /// The guard's table also holds the REDIRECT: new connections to
    /// `ports` that come in on `redirect_interfaces` go to the guard's
    /// listen port (IPv4 and IPv6). Needs `create` and `intercept.mode =
    /// "redirect"`; the operator's own REDIRECT rule must go.
    pub redirect: bool,
    /// The interfaces whose connections are redirected (`iifname`).
    pub redirect_interfaces: Vec<String>,
    /// Clients in the pass cache skip the redirect: their new connections
    /// reach the MTA in the kernel for `pass_cache.ttl`. Needs `redirect`.
    pub bypass_passed: bool,
}

// The defaults, in one place.

impl Default for Admission {
    fn default() -> Self {
        let rule = |family, len, rate, burst| PrefixRule {
            length: PrefixLen(PrefixLength::new(family, len).unwrap_or(PrefixLength::DEFAULTS[0])),
            rate,
            burst,
        };
        Self {
            enabled: true,
            per_address: quota(1.0, 30),
            prefixes: vec![
                rule(Family::V4, 24, 5.0, 100),
                rule(Family::V6, 64, 5.0, 100),
                rule(Family::V6, 48, 10.0, 200),
            ],
            max_connections_per_address: 20,
            over_limit: OverLimit::Tempfail,
            block_ttl: Dur::secs(600),
            tarpit_greet_delay: Dur::secs(30),
            // 7/8 of 2^20: the cap that fills its hash table best.
            max_tracked_keys: 917_504,
        }
    }
}

/// A quota from constants known to be valid.
fn quota(rate: f64, burst: u32) -> Quota {
    Quota::per_second(rate, burst).expect("the default quotas are valid")
}

impl Default for Reputation {
    fn default() -> Self {
        Self {
            half_life: Dur::secs(3600),
            detection_points: 1.0,
            limit_points: 0.2,
            sender_limit_points: 0.5,
            threshold: 5.0,
            on_threshold: vec![ThresholdResponse::Block, ThresholdResponse::Alert],
            block_ttl: Dur::secs(3600),
            max_tracked: 917_504,
        }
    }
}

impl Default for Alert {
    fn default() -> Self {
        Self {
            webhook: String::new(),
            timeout: Dur::secs(5),
            retries: 5,
            queue: 1000,
        }
    }
}

impl Default for Senders {
    fn default() -> Self {
        Self {
            enabled: true,
            unauthenticated: SenderQuotas {
                per_address: quota(1.0, 60),
                per_domain: quota(10.0, 600),
            },
            authenticated: SenderQuotas {
                per_address: quota(5.0, 300),
                per_domain: quota(50.0, 3000),
            },
            trend: Trend::default(),
            max_tracked: 917_504,
        }
    }
}

impl Default for Trend {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Dur::secs(3600),
            alpha: 0.3,
            multiple: 5.0,
            min_intervals: 24,
            floor: 50,
            max_senders: 917_504,
        }
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/mxguard/state"),
            flush_interval: Dur::secs(1),
            snapshot_interval: Dur::secs(30),
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            redis: String::new(),
            gateway_id: String::new(),
            timeout: Dur(Duration::from_millis(50)),
            key_prefix: "mxguard".into(),
            publish_interval: Dur::secs(5),
        }
    }
}

impl Default for Nftables {
    fn default() -> Self {
        Self {
            enabled: false,
            nft: PathBuf::from("nft"),
            table: "mxguard".into(),
            create: true,
            ports: vec![25],
            batch_interval: Dur(Duration::from_millis(200)),
            redirect: false,
            redirect_interfaces: Vec::new(),
            bypass_passed: false,
        }
    }
}

impl Trend {
    pub fn policy(&self) -> TrendConfig {
        TrendConfig {
            interval: self.interval.0,
            alpha: self.alpha,
            multiple: self.multiple,
            min_intervals: self.min_intervals,
            floor: self.floor,
            max_senders: self.max_senders,
        }
    }
}

impl Admission {
    /// The prefix quotas, checked (`validate` reports the key).
    pub fn prefix_quotas(&self) -> Vec<mxguard_policy::PrefixQuota> {
        self.prefixes
            .iter()
            .filter_map(|r| {
                Quota::per_second(r.rate, r.burst)
                    .ok()
                    .map(|quota| mxguard_policy::PrefixQuota {
                        length: r.length.0,
                        quota,
                    })
            })
            .collect()
    }
}

/// A problem in one of these sections: (key, message).
pub type Problem = (String, String);

/// Checks what serde cannot.
pub fn validate(
    admission: &Admission,
    reputation: &Reputation,
    alert: &Alert,
    senders: &Senders,
    state: &State,
    cluster: &Cluster,
    nft: &Nftables,
) -> Result<(), Problem> {
    let bad = |key: &str, msg: &str| Err((key.to_string(), msg.to_string()));
    for (i, r) in admission.prefixes.iter().enumerate() {
        if let Err(e) = Quota::per_second(r.rate, r.burst) {
            return Err((format!("admission.prefixes[{i}]"), e.to_string()));
        }
        if r.length.0.is_full() {
            return Err((
                format!("admission.prefixes[{i}].length"),
                "a whole address is `per_address`".into(),
            ));
        }
        if admission.prefixes[..i].iter().any(|o| o.length == r.length) {
            return Err((
                format!("admission.prefixes[{i}].length"),
                format!("{} is listed twice", r.length.0),
            ));
        }
    }
    if admission.max_tracked_keys == 0 {
        return bad("admission.max_tracked_keys", "must be at least 1");
    }
    if admission.over_limit == OverLimit::Block && admission.block_ttl.0.is_zero() {
        return bad(
            "admission.block_ttl",
            "over_limit = \"block\" needs a TTL over 0s",
        );
    }
    if admission.tarpit_greet_delay.0 > Duration::from_secs(300) {
        return bad(
            "admission.tarpit_greet_delay",
            "more than 5m: senders give up and retry, which costs more",
        );
    }
    if reputation.half_life.0.is_zero() {
        return bad("reputation.half_life", "must be more than 0s");
    }
    if !(reputation.threshold.is_finite() && reputation.threshold > 0.0) {
        return bad("reputation.threshold", "must be a positive number");
    }
    for (key, v) in [
        ("reputation.detection_points", reputation.detection_points),
        ("reputation.limit_points", reputation.limit_points),
        (
            "reputation.sender_limit_points",
            reputation.sender_limit_points,
        ),
    ] {
        if !v.is_finite() || v < 0.0 {
            return bad(key, "must be a number of at least 0");
        }
    }
    if reputation.on_threshold.contains(&ThresholdResponse::Block)
        && reputation.block_ttl.0.is_zero()
    {
        return bad(
            "reputation.block_ttl",
            "on_threshold has \"block\": needs a TTL over 0s",
        );
    }
    if !alert.webhook.is_empty() {
        if let Err(e) = crate::alert::WebhookUrl::parse(&alert.webhook) {
            return bad("alert.webhook", &e);
        }
        if alert.timeout.0.is_zero() {
            return bad("alert.timeout", "must be more than 0s");
        }
        if alert.queue == 0 {
            return bad("alert.queue", "must be at least 1");
        }
    }
    if let Err(e) = senders.trend.policy().validate() {
        return Err(("senders.trend".into(), e.to_string()));
    }
    if !state.dir.as_os_str().is_empty() && !state.dir.is_absolute() {
        return bad(
            "state.dir",
            "must be an absolute path (or \"\" for memory only)",
        );
    }
    if state.flush_interval.0.is_zero() || state.flush_interval.0 > Duration::from_secs(60) {
        return bad("state.flush_interval", "between 1ms and 60s");
    }
    if state.snapshot_interval.0 < Duration::from_secs(1) {
        return bad("state.snapshot_interval", "at least 1s");
    }
    if !cluster.redis.is_empty() {
        if !(cluster.redis.starts_with("redis://") || cluster.redis.starts_with("unix://")) {
            return bad("cluster.redis", "must start with redis:// (or unix://)");
        }
        if cluster.timeout.0.is_zero() || cluster.timeout.0 > Duration::from_secs(2) {
            return bad(
                "cluster.timeout",
                "between 1ms and 2s: every connection may wait this long",
            );
        }
        if cluster.publish_interval.0.is_zero() {
            return bad("cluster.publish_interval", "must be more than 0s");
        }
        let key_ok = !cluster.key_prefix.is_empty()
            && cluster
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !key_ok {
            return bad("cluster.key_prefix", "letters, digits and -_.: only");
        }
    }
    if nft.enabled {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !name_ok(&nft.table) {
            return bad(
                "nftables.table",
                "letters, digits, - and _ only (at most 32)",
            );
        }
        if nft.create && nft.ports.is_empty() {
            return bad("nftables.ports", "at least one port when create = true");
        }
        if nft.batch_interval.0.is_zero() {
            return bad("nftables.batch_interval", "must be more than 0s");
        }
        if nft.redirect && !nft.create {
            return bad(
                "nftables.redirect",
                "needs create = true (the rule lives in the guard's table)",
            );
        }
        if nft.redirect && nft.redirect_interfaces.is_empty() {
            return bad(
                "nftables.redirect_interfaces",
                "at least one interface when redirect = true (the MTA's own outgoing mail must not be redirected)",
            );
        }
        // Written into the ruleset: no quote, brace or space may get in.
        // A trailing `*` is nft's wildcard.
        let ifname_ok = |s: &str| {
            let name = s.strip_suffix('*').unwrap_or(s);
            !name.is_empty()
                && s.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if let Some(bad_name) = nft.redirect_interfaces.iter().find(|s| !ifname_ok(s)) {
            return Err((
                "nftables.redirect_interfaces".into(),
                format!("`{bad_name}`: an interface name is letters, digits, -_. (at most 15, `*` at the end)"),
            ));
        }
        if nft.bypass_passed && !nft.redirect {
            return bad(
                "nftables.bypass_passed",
                "needs redirect = true: an accept in the guard's table does not stop a REDIRECT in another table",
            );
        }
    }
    Ok(())
}
