//! Admission control: who may open a session, and who may send.
//!
//! ```text
//!  accept ─► lists (lock-free snapshot) ── allow ─► no test, no limit
//!              │ block ─► 554, never reaches the MTA
//!              ▼
//!            connection cap per address (this gateway)
//!              ▼
//!            token buckets per address and prefix ─ fleet-wide through
//!              │                                   Redis when clustered,
//!              │                                   local when Redis is not
//!              │                                   there within its timeout
//!              ▼ over ─► [admission] over_limit: tempfail | reject |
//!            admitted                   tarpit | block
//! ```
//!
//! After the greeting, each `MAIL FROM` is checked against the sender's
//! buckets (address and domain, separate quotas for authenticated
//! sessions) and its volume trend; over a limit the MAIL gets `451 4.7.1`
//! from us and never reaches the MTA.
//!
//! Every limit hit and every detection adds to the client's reputation
//! score; crossing `reputation.threshold` blocklists it and sends an alert
//! (each configurable), once per crossing.
//!
//! The state lives in the sans-IO tables of `mxguard_policy`, each behind
//! its own short `parking_lot` lock (no await while held). A held session
//! costs its permit (a key and a flag) and nothing else here.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use mxguard_policy::{
    Admission, ClientKey, ConnectionCounts, ConnectionPermit, LimitKind, Limited, Limiter,
    LimiterConfig, Reputation, ReputationRecord, TokenBuckets, TrendDecision, TrendRecord,
    TrendTracker,
};
use parking_lot::Mutex;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};
use tokio::time::Instant;

use crate::admission_config::{OverLimit, ThresholdResponse};
use crate::alert::{AlertDoc, AlertObserver, Alerts};
use crate::config::Config;
use crate::lists::{millis, unix_now, ListKind};
use crate::server::{Runtime, Shared};
use crate::state::StateStore;

/// What admission decided for a new connection.
pub enum Gate<'a> {
    /// On the allowlist: no test, no limit.
    Allowlisted,
    /// On the blocklist.
    Blocked,
    Admitted(Permit<'a>),
    /// Over a limit, let in under the tarpit.
    Tarpit(Permit<'a>, Limited),
    /// Over a limit: answer with `response` (tempfail, reject or block).
    Refused(Limited, OverLimit),
}

/// A connection counted against its address's cap until dropped.
pub struct Permit<'a> {
    control: &'a AdmissionControl,
    permit: Option<ConnectionPermit>,
}

impl Permit<'_> {
    /// The count, taken out for a session parked off its task (the holding
    /// pen): it stays counted until [`AdmissionControl::reattach`]ed and
    /// dropped.
    pub fn detach(mut self) -> Option<ConnectionPermit> {
        self.permit.take()
    }
}

impl AdmissionControl {
    /// A detached count as a permit again.
    pub fn reattach(&self, permit: Option<ConnectionPermit>) -> Permit<'_> {
        Permit {
            control: self,
            permit,
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            if p.is_tracked() {
                self.control.limits.lock().conns.release(p);
            }
        }
    }
}

/// What the sender checks said about a MAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderVerdict {
    Allowed,
    /// Over the limit of this kind: `address`, `domain` or `trend`.
    Limited(&'static str),
}

struct Limits {
    config_id: usize,
    limiter: Limiter,
    conns: ConnectionCounts,
}

type SenderBuckets = TokenBuckets<Box<str>>;

struct Senders {
    config_id: usize,
    unauth_address: SenderBuckets,
    unauth_domain: SenderBuckets,
    auth_address: SenderBuckets,
    auth_domain: SenderBuckets,
    trend: Option<TrendTracker>,
}

/// Admission state shared by every session.
pub struct AdmissionControl {
    limits: Mutex<Limits>,
    reputation: Mutex<Reputation>,
    senders: Mutex<Senders>,
    reputation_config: AtomicUsize,
    pub metrics: AdmissionMetrics,
    pub alerts: OnceLock<Alerts>,
    pub cluster: OnceLock<Arc<crate::cluster::Cluster>>,
    pub state: OnceLock<Arc<StateStore>>,
    gateway: String,
}

fn config_id(runtime: &Runtime) -> usize {
    std::ptr::from_ref(runtime) as usize
}

fn limiter_config(config: &Config) -> LimiterConfig {
    let a = &config.admission;
    LimiterConfig {
        address: a.enabled.then_some(a.per_address),
        prefixes: if a.enabled {
            a.prefix_quotas()
        } else {
            Vec::new()
        },
        // The cap is counted apart (`conns`): it stays per gateway when
        // the rates go fleet-wide.
        max_connections_per_address: None,
        max_tracked_keys: a.max_tracked_keys,
    }
}

fn conn_cap(config: &Config) -> u32 {
    match config.admission.max_connections_per_address {
        0 => u32::MAX,
        n => n,
    }
}

fn new_senders(config: &Config, id: usize) -> Senders {
    let s = &config.senders;
    let max = s.max_tracked;
    Senders {
        config_id: id,
        unauth_address: TokenBuckets::new(s.unauthenticated.per_address, max),
        unauth_domain: TokenBuckets::new(s.unauthenticated.per_domain, max),
        auth_address: TokenBuckets::new(s.authenticated.per_address, max),
        auth_domain: TokenBuckets::new(s.authenticated.per_domain, max),
        trend: if s.trend.enabled {
            TrendTracker::new(s.trend.policy()).ok()
        } else {
            None
        },
    }
}

fn new_reputation(config: &Config) -> Reputation {
    let r = &config.reputation;
    Reputation::new(r.half_life.0, r.max_tracked).unwrap_or_else(|_| {
        // `validate` refuses a zero half-life; an hour if it ever got here.
        Reputation::new(std::time::Duration::from_secs(3600), r.max_tracked)
            .expect("a one-hour half-life is valid")
    })
}

/// A sender address as a key: lower case, and its domain.
fn sender_keys(sender: &str) -> (String, Option<String>) {
    let address = sender.trim().to_ascii_lowercase();
    let domain = address
        .rsplit_once('@')
        .map(|(_, d)| d.to_string())
        .filter(|d| !d.is_empty());
    (address, domain)
}

impl AdmissionControl {
    pub fn new(config: &Config, metrics: AdmissionMetrics) -> Self {
        let gateway = if config.cluster.gateway_id.is_empty() {
            config.hostname.clone()
        } else {
            config.cluster.gateway_id.clone()
        };
        Self {
            limits: Mutex::new(Limits {
                config_id: 0,
                limiter: Limiter::new(&limiter_config(config)),
                conns: ConnectionCounts::new(conn_cap(config), config.admission.max_tracked_keys),
            }),
            reputation: Mutex::new(new_reputation(config)),
            senders: Mutex::new(new_senders(config, 0)),
            reputation_config: AtomicUsize::new(0),
            metrics,
            alerts: OnceLock::new(),
            cluster: OnceLock::new(),
            state: OnceLock::new(),
            gateway,
        }
    }

    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Applies a reloaded configuration to the limiter, keeping what each
    /// key has used and the open connections.
    fn refresh_limits(&self, l: &mut Limits, runtime: &Runtime) {
        let id = config_id(runtime);
        if l.config_id != id {
            l.config_id = id;
            l.limiter.reconfigure(&limiter_config(&runtime.config));
            l.conns.set_cap(conn_cap(&runtime.config));
        }
    }

    /// Decides on a new connection from `ip`.
    pub async fn admit<'a>(&'a self, shared: &Shared, runtime: &Runtime, ip: IpAddr) -> Gate<'a> {
        // Counted by `listed` (`result` blocked/allowed/unlisted).
        let listed = shared.listed(ip);
        match listed {
            Some(ListKind::Allow) => {
                self.metrics
                    .admissions
                    .with_label_values(&["allowlisted"])
                    .inc();
                return Gate::Allowlisted;
            }
            Some(ListKind::Block) => {
                self.metrics
                    .admissions
                    .with_label_values(&["blocked"])
                    .inc();
                return Gate::Blocked;
            }
            None => {}
        }
        let config = &runtime.config;
        if !config.admission.enabled {
            self.metrics
                .admissions
                .with_label_values(&["admitted"])
                .inc();
            return Gate::Admitted(Permit {
                control: self,
                permit: None,
            });
        }
        let address = ClientKey::address(ip);
        let has_room = {
            let mut l = self.limits.lock();
            self.refresh_limits(&mut l, runtime);
            l.conns.has_room(&address)
        };
        let limited = if has_room {
            // The fleet decides the rates when it answers in time.
            let fleet = match self.cluster.get() {
                Some(cluster) if cluster.is_up() => {
                    Box::pin(cluster.admit(ip, &config.admission, &self.metrics)).await
                }
                _ => None,
            };
            let now = Instant::now().into_std();
            let mut l = self.limits.lock();
            self.refresh_limits(&mut l, runtime);
            // Local buckets are fed either way, so a fall-back to local
            // decisions starts from this gateway's share, not from full.
            let local = match l.limiter.admit(ip, now) {
                Admission::Admitted(_) => None,
                Admission::Limited(x) => Some(x),
            };
            match fleet {
                Some(decision) => decision,
                None => local,
            }
        } else {
            Some(Limited {
                scope: mxguard_policy::Scope::Address,
                kind: LimitKind::Concurrency,
                key: address,
                retry_after: None,
            })
        };
        let Some(limited) = limited else {
            let permit = self.limits.lock().conns.acquire(address);
            let Some(permit) = permit else {
                // Lost a race for the last slot.
                return self.over(shared, runtime, ip, concurrency(address));
            };
            self.metrics
                .admissions
                .with_label_values(&["admitted"])
                .inc();
            return Gate::Admitted(Permit {
                control: self,
                permit: Some(permit),
            });
        };
        self.over(shared, runtime, ip, limited)
    }

    fn over<'a>(
        &'a self,
        shared: &Shared,
        runtime: &Runtime,
        ip: IpAddr,
        limited: Limited,
    ) -> Gate<'a> {
        let config = &runtime.config;
        let response = config.admission.over_limit;
        self.metrics
            .admissions
            .with_label_values(&["limited"])
            .inc();
        self.metrics
            .limited
            .with_label_values(&[
                &limited.scope.to_string(),
                limited.kind.as_str(),
                response.as_str(),
            ])
            .inc();
        self.add_points(shared, runtime, ip, config.reputation.limit_points, "limit");
        match response {
            OverLimit::Tarpit => {
                let permit = self.limits.lock().conns.acquire(ClientKey::address(ip));
                Gate::Tarpit(
                    Permit {
                        control: self,
                        permit,
                    },
                    limited,
                )
            }
            OverLimit::Block => {
                shared.block(ip, config.admission.block_ttl.0, "ratelimit");
                self.alert(
                    shared,
                    ip,
                    "limit-block",
                    "over a connection limit",
                    None,
                    vec!["block"],
                );
                Gate::Refused(limited, response)
            }
            OverLimit::Tempfail | OverLimit::Reject => Gate::Refused(limited, response),
        }
    }

    /// Adds `points` to `ip`'s score; at the crossing of the threshold,
    /// the configured responses.
    pub fn add_points(
        &self,
        shared: &Shared,
        runtime: &Runtime,
        ip: IpAddr,
        points: f64,
        why: &'static str,
    ) {
        if points <= 0.0 {
            return;
        }
        let config = &runtime.config;
        let now = Instant::now().into_std();
        let (before, after) = {
            let mut rep = self.reputation.lock();
            let id = config_id(runtime);
            if self.reputation_config.swap(id, Ordering::Relaxed) != id
                && rep.half_life() != config.reputation.half_life.0
            {
                let records = rep.to_records(&crate::lists::anchor_now());
                *rep = new_reputation(config);
                rep.restore(records, &crate::lists::anchor_now());
            }
            let before = rep.score(ip, now);
            (before, rep.add(ip, points, now))
        };
        self.metrics
            .tracked
            .with_label_values(&["reputation"])
            .set(self.reputation.lock().len() as i64);
        let threshold = config.reputation.threshold;
        if before >= threshold || after < threshold {
            return;
        }
        tracing::info!(
            target: "mxguard::detect",
            "REPUTATION {after:.2} over {threshold} for [{ip}] (last: {why})"
        );
        let mut actions = Vec::new();
        for response in &config.reputation.on_threshold {
            match response {
                ThresholdResponse::Block => {
                    shared.block(ip, config.reputation.block_ttl.0, "reputation");
                    actions.push("block");
                    self.metrics.threshold.with_label_values(&["block"]).inc();
                }
                ThresholdResponse::Alert => {
                    actions.push("alert");
                    self.metrics.threshold.with_label_values(&["alert"]).inc();
                }
            }
        }
        self.metrics.threshold.with_label_values(&["crossed"]).inc();
        if config
            .reputation
            .on_threshold
            .contains(&ThresholdResponse::Alert)
        {
            self.alert(
                shared,
                ip,
                "reputation-threshold",
                why,
                Some(after),
                actions,
            );
        }
    }

    fn alert(
        &self,
        _shared: &Shared,
        ip: IpAddr,
        event: &'static str,
        reason: &str,
        score: Option<f64>,
        action: Vec<&'static str>,
    ) {
        let Some(alerts) = self.alerts.get() else {
            return;
        };
        let doc = AlertDoc {
            event,
            gateway: self.gateway.clone(),
            client: ip.to_string(),
            reason: reason.to_string(),
            score,
            action,
            at_unix_ms: millis(unix_now()),
        };
        if !alerts.send(doc) {
            self.metrics.alerts.with_label_values(&["dropped"]).inc();
        }
    }

    /// A MAIL FROM in a session: within the sender's limits?
    pub fn check_sender(
        &self,
        runtime: &Runtime,
        sender: &str,
        authenticated: bool,
    ) -> SenderVerdict {
        let config = &runtime.config;
        if !config.senders.enabled {
            return SenderVerdict::Allowed;
        }
        let (address, domain) = sender_keys(sender);
        // The null sender (bounces) is never limited by name: there is no
        // name, and refusing bounces loses delivery reports.
        if address.is_empty() {
            return SenderVerdict::Allowed;
        }
        let now = Instant::now().into_std();
        let id = config_id(runtime);
        let mut s = self.senders.lock();
        if s.config_id != id {
            let trend = s.trend.take();
            *s = new_senders(config, id);
            if let (Some(old), Some(new)) = (trend, s.trend.as_mut()) {
                let anchor = crate::lists::anchor_now();
                new.restore(old.to_records(&anchor), &anchor);
            }
        }
        let Senders {
            unauth_address,
            unauth_domain,
            auth_address,
            auth_domain,
            trend,
            ..
        } = &mut *s;
        let (by_address, by_domain) = if authenticated {
            (auth_address, auth_domain)
        } else {
            (unauth_address, unauth_domain)
        };
        let auth = if authenticated { "yes" } else { "no" };
        if !by_address.peek(address.as_str(), now).is_allowed() {
            self.metrics
                .sender_limited
                .with_label_values(&["address", auth])
                .inc();
            return SenderVerdict::Limited("address");
        }
        if let Some(d) = &domain {
            if !by_domain.peek(d.as_str(), now).is_allowed() {
                self.metrics
                    .sender_limited
                    .with_label_values(&["domain", auth])
                    .inc();
                return SenderVerdict::Limited("domain");
            }
        }
        if let Some(trend) = trend {
            if let TrendDecision::Limited { .. } = trend.observe(&address, now) {
                self.metrics
                    .sender_limited
                    .with_label_values(&["trend", auth])
                    .inc();
                return SenderVerdict::Limited("trend");
            }
        }
        let _ = by_address.check(address.as_str(), now);
        if let Some(d) = &domain {
            let _ = by_domain.check(d.as_str(), now);
        }
        SenderVerdict::Allowed
    }

    /// Reputation and trend records for the state store.
    pub fn records(&self) -> (Vec<ReputationRecord>, Vec<TrendRecord>) {
        let anchor = crate::lists::anchor_now();
        let rep = self.reputation.lock().to_records(&anchor);
        let trend = self
            .senders
            .lock()
            .trend
            .as_ref()
            .map(|t| t.to_records(&anchor))
            .unwrap_or_default();
        (rep, trend)
    }

    /// Puts back what the state store kept.
    pub fn restore(&self, reputation: Vec<ReputationRecord>, trends: Vec<TrendRecord>) {
        let anchor = crate::lists::anchor_now();
        self.reputation.lock().restore(reputation, &anchor);
        if let Some(t) = self.senders.lock().trend.as_mut() {
            t.restore(trends, &anchor);
        }
    }

    /// Forgets what carries no information any more; updates the gauges.
    pub fn sweep(&self) {
        let now = Instant::now().into_std();
        let (buckets, conns) = {
            let mut l = self.limits.lock();
            l.limiter.sweep(now);
            (l.limiter.tracked_keys(), l.conns.len())
        };
        let rep = {
            let mut r = self.reputation.lock();
            r.sweep(now);
            r.len()
        };
        let (senders, trends) = {
            let mut guard = self.senders.lock();
            let s = &mut *guard;
            let mut n = 0;
            for b in [
                &mut s.unauth_address,
                &mut s.unauth_domain,
                &mut s.auth_address,
                &mut s.auth_domain,
            ] {
                b.sweep(now);
                n += b.len();
            }
            let t = s.trend.as_mut().map_or(0, |t| {
                t.sweep(now);
                t.len()
            });
            (n, t)
        };
        let m = &self.metrics.tracked;
        m.with_label_values(&["buckets"]).set(buckets as i64);
        m.with_label_values(&["connections"]).set(conns as i64);
        m.with_label_values(&["reputation"]).set(rep as i64);
        m.with_label_values(&["senders"]).set(senders as i64);
        m.with_label_values(&["trends"]).set(trends as i64);
    }
}

/// Starts what admission control runs beside the sessions: the alert
/// sender, the state store, the fleet, the nftables offload, the list
/// file watcher.
pub async fn start(shared: &Arc<Shared>, config: &Config) -> anyhow::Result<()> {
    let a = &shared.admission;
    if !config.alert.webhook.is_empty() {
        let url = crate::alert::WebhookUrl::parse(&config.alert.webhook)
            .map_err(|e| anyhow::anyhow!("alert.webhook: {e}"))?;
        let alerts = Alerts::start(
            url,
            config.alert.timeout.0,
            config.alert.retries,
            config.alert.queue,
            a.metrics.clone(),
        );
        let _ = a.alerts.set(alerts);
    }
    tokio::spawn(watch_list_files(shared.clone()));
    if !config.cluster.redis.is_empty() {
        let cluster = crate::cluster::Cluster::new(
            &config.cluster.redis,
            a.gateway().to_string(),
            config.cluster.key_prefix.clone(),
            config.cluster.timeout.0,
            a.metrics.clone(),
        )
        .map_err(|e| anyhow::anyhow!("cluster.redis: {e}"))?;
        let cluster = Arc::new(cluster);
        shared.lists.add_sink(cluster.clone());
        let _ = a.cluster.set(cluster.clone());
        crate::cluster::start(shared, cluster, config.cluster.publish_interval.0);
        tracing::info!(
            "cluster: gateway `{}` in the fleet at {}",
            a.gateway(),
            config.cluster.redis
        );
    }
    if !config.state.dir.as_os_str().is_empty() {
        let dir = &config.state.dir;
        let (store, loaded) = StateStore::open(dir, a.metrics.clone())
            .map_err(|e| anyhow::anyhow!("state.dir: {e}"))?;
        let entries = shared.lists.restore(loaded.entries);
        let (scores, trends) = (loaded.reputation.len(), loaded.trends.len());
        a.restore(loaded.reputation, loaded.trends);
        tracing::info!(
            "state: {entries} list entries, {scores} scores, {trends} sender trends from {}",
            dir.display()
        );
        shared.lists_changed();
        shared.lists.add_sink(store.clone());
        let _ = a.state.set(store.clone());
        tokio::spawn(flush_loop(store, config.state.flush_interval.0));
        tokio::spawn(snapshot_loop(
            shared.clone(),
            config.state.snapshot_interval.0,
        ));
    }
    if config.nftables.enabled {
        crate::nft::start(shared, &config.nftables).await?;
    }
    Ok(())
}

/// What identifies a version of a file: modification time, size, inode.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a swapped symlink (a Kubernetes
    // ConfigMap, an atomic deploy) shows as a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Re-reads the list files when one changes. Polling the files' stamps
/// every `lists.watch_interval` (2 s by default) rather than inotify
/// (`notify`): a stat per file is nothing at that pace, it sees every way
/// a file is replaced (editors writing a new file and renaming it, symlink
/// swaps, NFS) without watching directories, and it needs no dependency.
async fn watch_list_files(shared: Arc<Shared>) {
    let stamps = |files: &crate::lists::ListFiles| -> Vec<(std::path::PathBuf, Stamp)> {
        files.paths().map(|p| (p.to_owned(), stamp(p))).collect()
    };
    // The files as they were read at start: a change before the first
    // poll is a change.
    let mut seen = stamps(&shared.lists.files());
    loop {
        let every = shared.runtime.load().config.lists.watch_interval.0;
        if every.is_zero() {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            continue;
        }
        tokio::time::sleep(every).await;
        let now = stamps(&shared.lists.files());
        let same_files = seen.len() == now.len() && seen.iter().zip(&now).all(|(a, b)| a.0 == b.0);
        if same_files && seen != now {
            tracing::info!("lists: a list file changed; reloading");
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || s.reload_lists()).await;
        }
        seen = now;
    }
}

/// Writes what the state store keeps as snapshots (and compacts its log).
pub fn snapshot(shared: &Shared) {
    let Some(store) = shared.admission.state.get() else {
        return;
    };
    // The log is sealed with the lists held still, then the snapshots are
    // written while sessions go on appending.
    let mut compaction = store.compaction();
    let (entries, seq) = shared.lists.dynamic_records_with(|| compaction.seal());
    let (reputation, trends) = shared.admission.records();
    if let Err(e) = compaction.write(entries, seq, &reputation, &trends) {
        tracing::error!("state: snapshot failed: {e}");
    }
}

/// At a clean stop: everything on disk.
pub fn stop(shared: &Shared) {
    if let Some(store) = shared.admission.state.get() {
        store.flush();
        snapshot(shared);
    }
}

async fn flush_loop(store: Arc<StateStore>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    }
}

async fn snapshot_loop(shared: Arc<Shared>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let shared = shared.clone();
        let _ = tokio::task::spawn_blocking(move || snapshot(&shared)).await;
    }
}

fn concurrency(address: ClientKey) -> Limited {
    Limited {
        scope: mxguard_policy::Scope::Address,
        kind: LimitKind::Concurrency,
        key: address,
        retry_after: None,
    }
}

/// The series of admission control. Labels are closed sets: results,
/// scopes from the configured prefix lengths, kinds, responses.
#[derive(Clone)]
pub struct AdmissionMetrics {
    pub admissions: IntCounterVec,
    pub limited: IntCounterVec,
    pub sender_limited: IntCounterVec,
    pub threshold: IntCounterVec,
    pub alerts: IntCounterVec,
    pub tracked: IntGaugeVec,
    pub list_reloads: IntCounterVec,
    pub state_writes: IntCounterVec,
    pub state_errors: IntCounter,
    pub cluster_up: IntGauge,
    pub cluster_fallbacks: IntCounterVec,
    pub cluster_seconds: HistogramVec,
    pub cluster_received: IntCounterVec,
    pub nft: IntCounterVec,
    pub nft_passed: IntCounterVec,
    pub sk_lookup_passed: IntCounterVec,
}

impl AdmissionMetrics {
    pub fn new(metrics: &crate::metrics::Metrics) -> Result<Self, prometheus::Error> {
        let cv =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                metrics.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let admissions = cv(
            "mxguard_admissions_total",
            "Admission decisions at accept, by result (admitted, allowlisted, blocked, limited).",
            &["result"],
        )?;
        let limited = cv(
            "mxguard_limited_total",
            "Connections over a limit, by scope (address, ipv4/24...), kind (rate, concurrency) and response.",
            &["scope", "kind", "response"],
        )?;
        let sender_limited = cv(
            "mxguard_sender_limited_total",
            "MAIL commands refused by a sender limit, by kind (address, domain, trend) and authenticated (yes, no).",
            &["kind", "authenticated"],
        )?;
        let threshold = cv(
            "mxguard_reputation_threshold_total",
            "Reputation threshold crossings (crossed) and the responses taken (block, alert).",
            &["response"],
        )?;
        let alerts = cv(
            "mxguard_alerts_total",
            "Webhook alerts by result (sent, retried, failed, dropped).",
            &["result"],
        )?;
        let list_reloads = cv(
            "mxguard_list_reloads_total",
            "Reloads of the allow/block list files, by result.",
            &["result"],
        )?;
        let state_writes = cv(
            "mxguard_state_writes_total",
            "Writes to the state store, by kind (sync, flush, snapshot).",
            &["kind"],
        )?;
        let cluster_fallbacks = cv(
            "mxguard_cluster_fallbacks_total",
            "Decisions made locally because Redis did not answer in time or is down, by operation.",
            &["op"],
        )?;
        let cluster_received = cv(
            "mxguard_cluster_list_updates_total",
            "Blocklist changes received from the fleet, by op (add, remove).",
            &["op"],
        )?;
        let nft = cv(
            "mxguard_nftables_elements_total",
            "Addresses pushed into the nftables sets, by result (ok, error).",
            &["result"],
        )?;
        let nft_passed = cv(
            "mxguard_nftables_passed_total",
            "Addresses added to or removed from the nftables passed sets (nftables.bypass_passed), by op (add, remove) and result (ok, error).",
            &["op", "result"],
        )?;
        let sk_lookup_passed = cv(
            "mxguard_sk_lookup_passed_total",
            "Addresses added to or removed from the sk_lookup program's passed map (sk_lookup.bypass_passed), by op (add, remove) and result (ok, error).",
            &["op", "result"],
        )?;
        let tracked = IntGaugeVec::new(
            Opts::new(
                "mxguard_tracked_keys",
                "Keys held by the admission tables (buckets, connections, reputation, senders, trends).",
            ),
            &["table"],
        )?;
        metrics.register(Box::new(tracked.clone()))?;
        let state_errors = IntCounter::new(
            "mxguard_state_errors_total",
            "Failed writes to the state store.",
        )?;
        metrics.register(Box::new(state_errors.clone()))?;
        let cluster_up = IntGauge::new(
            "mxguard_cluster_up",
            "1 while Redis answers and decisions are fleet-wide; 0 when deciding locally.",
        )?;
        metrics.register(Box::new(cluster_up.clone()))?;
        let cluster_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mxguard_cluster_decision_seconds",
                "Round trip of a fleet decision through Redis.",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]),
            &["op"],
        )?;
        metrics.register(Box::new(cluster_seconds.clone()))?;
        for r in ["admitted", "allowlisted", "blocked", "limited"] {
            admissions.with_label_values(&[r]);
        }
        for r in ["crossed", "block", "alert"] {
            threshold.with_label_values(&[r]);
        }
        for r in ["sent", "retried", "failed", "dropped"] {
            alerts.with_label_values(&[r]);
        }
        for r in ["ok", "error"] {
            list_reloads.with_label_values(&[r]);
            nft.with_label_values(&[r]);
        }
        for k in ["address", "domain", "trend"] {
            for a in ["yes", "no"] {
                sender_limited.with_label_values(&[k, a]);
            }
        }
        for k in ["sync", "flush", "snapshot"] {
            state_writes.with_label_values(&[k]);
        }
        for op in ["admit", "block", "publish"] {
            cluster_fallbacks.with_label_values(&[op]);
        }
        for op in ["add", "remove"] {
            cluster_received.with_label_values(&[op]);
        }
        Ok(Self {
            admissions,
            limited,
            sender_limited,
            threshold,
            alerts,
            tracked,
            list_reloads,
            state_writes,
            state_errors,
            cluster_up,
            cluster_fallbacks,
            cluster_seconds,
            cluster_received,
            nft,
            nft_passed,
            sk_lookup_passed,
        })
    }
}

impl AlertObserver for AdmissionMetrics {
    fn alert(&self, result: &'static str) {
        self.alerts.with_label_values(&[result]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_keys_are_lower_case_with_their_domain() {
        assert_eq!(
            sender_keys(" Alice@Example.ORG "),
            ("alice@example.org".into(), Some("example.org".into()))
        );
        assert_eq!(sender_keys("postmaster"), ("postmaster".into(), None));
        assert_eq!(sender_keys(""), (String::new(), None));
    }
}
