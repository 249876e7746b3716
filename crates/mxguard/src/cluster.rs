//! The fleet: token buckets and blocks shared through Redis
//! (docs/fleet.md).
//!
//! - **Buckets.** One Lua script per decision (`gcra.lua`): it checks the
//!   address and prefix buckets of a client in GCRA form (one timestamp
//!   per key, Redis's own clock so gateways' clocks do not matter), and
//!   takes a token from each only if every one has one — the same
//!   all-or-nothing rule as the local `Limiter`, in one round trip. No
//!   local batching: a token taken locally ahead of the fleet would let a
//!   burst spread over N gateways through N times. The cap on concurrent
//!   connections stays per gateway (a crashed gateway would otherwise
//!   hold its slots in Redis forever).
//! - **Blocks.** A block (detection, admin, limit) is written as a key
//!   with a TTL and published on a channel; every gateway subscribed adds
//!   it at once (milliseconds), and a gateway that (re)connects reads the
//!   keys back, so nothing published while it was away is missed.
//! - **Counts.** Each gateway writes its counters to a hash every
//!   `publish_interval`, expiring after three intervals: the fleet view.
//! - **Failure.** A decision waits at most `cluster.timeout` (50 ms by
//!   default) for Redis; on a timeout or an error the gateway marks the
//!   fleet down, decides locally from then on (no more waiting), says so
//!   in the log and in `mxguard_cluster_up`, and a supervisor pings every
//!   second until Redis answers again, then resyncs. Mail never waits on
//!   Redis beyond one timeout.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ipnet::IpNet;
use mxguard_policy::{ClientKey, EntrySource, LimitKind, Limited, Scope};
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::admission::AdmissionMetrics;
use crate::admission_config::Admission;
use crate::lists::{DynamicRecord, ListKind, ListSink};
use crate::server::Shared;

/// The GCRA script: KEYS are bucket keys; ARGV holds, per key, the
/// interval between tokens and the burst, in microseconds and tokens.
/// Returns `{0, 0}` when admitted (a token taken from every bucket), or
/// `{i, wait_us}`: bucket `i` (1-based) is empty for `wait_us`.
pub const GCRA: &str = include_str!("gcra.lua");

/// Blocks waiting to be published while Redis is away; past this the
/// oldest go (the fleet resyncs from the keys anyway).
const PENDING_MAX: usize = 10_000;

/// A list change as the fleet sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ListMessage {
    gateway: String,
    op: Op,
    kind: ListKind,
    net: IpNet,
    #[serde(default)]
    record: Option<DynamicRecord>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Op {
    Add,
    Remove,
}

pub struct Cluster {
    client: redis::Client,
    conn: ConnectionManager,
    up: AtomicBool,
    timeout: Duration,
    prefix: String,
    gateway: String,
    script: redis::Script,
    metrics: AdmissionMetrics,
    pending: Mutex<VecDeque<ListMessage>>,
    wake: tokio::sync::Notify,
    /// The daemon's main runtime. Admission asks the fleet from the
    /// session threads, but the connection manager spawns its reconnects
    /// on the runtime of whoever called when the link broke: the calls
    /// run here, so the connection never moves onto a session thread (one
    /// busy session thread would then hold up every thread's admission).
    home: Option<tokio::runtime::Handle>,
}

impl Cluster {
    /// Connects lazily: a Redis that is down at start is a fleet that is
    /// down, not a guard that does not start.
    pub fn new(
        url: &str,
        gateway: String,
        prefix: String,
        timeout: Duration,
        metrics: AdmissionMetrics,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| e.to_string())?;
        metrics.cluster_up.set(0);
        Ok(Self {
            client,
            conn,
            up: AtomicBool::new(false),
            timeout,
            prefix,
            gateway,
            script: redis::Script::new(GCRA),
            metrics,
            pending: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            home: tokio::runtime::Handle::try_current().ok(),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool, why: &str) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.metrics.cluster_up.set(i64::from(up));
            if up {
                tracing::info!("cluster: redis answers; limits and blocks are fleet-wide again");
            } else {
                tracing::warn!(
                    "cluster: redis unreachable ({why}); deciding locally until it is back"
                );
            }
        }
    }

    /// The fleet's decision for a new connection from `ip`: `Some(None)`
    /// admitted, `Some(Some(limit))` limited, `None` decide locally (Redis
    /// did not answer within the timeout).
    pub async fn admit(
        &self,
        ip: IpAddr,
        config: &Admission,
        metrics: &AdmissionMetrics,
    ) -> Option<Option<Limited>> {
        let mut scopes: Vec<(Scope, ClientKey, mxguard_policy::Quota)> = Vec::with_capacity(4);
        scopes.push((Scope::Address, ClientKey::address(ip), config.per_address));
        for p in config.prefix_quotas() {
            if let Some(key) = ClientKey::prefix(ip, p.length) {
                scopes.push((Scope::Prefix(p.length), key, p.quota));
            }
        }
        let args: Vec<(String, u64, u32)> = scopes
            .iter()
            .map(|(scope, key, quota)| {
                let interval_us = u64::try_from(quota.interval().as_micros()).unwrap_or(u64::MAX);
                (
                    format!("{}:b:{scope}:{key}", self.prefix),
                    interval_us.max(1),
                    quota.burst(),
                )
            })
            .collect();
        let script = self.script.clone();
        let mut conn = self.conn.clone();
        let call = async move {
            let mut invocation = script.prepare_invoke();
            for (key, interval_us, burst) in &args {
                invocation.key(key).arg(*interval_us).arg(*burst);
            }
            invocation.invoke_async::<(u64, u64)>(&mut conn).await
        };
        let started = Instant::now();
        let answer = match &self.home {
            Some(home) => {
                let mut task = home.spawn(call);
                let answer = tokio::time::timeout(self.timeout, &mut task).await;
                if answer.is_err() {
                    task.abort();
                }
                answer.map(|joined| {
                    joined.unwrap_or_else(|e| {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "fleet call ended",
                            e.to_string(),
                        )))
                    })
                })
            }
            None => tokio::time::timeout(self.timeout, call).await,
        };
        metrics
            .cluster_seconds
            .with_label_values(&["admit"])
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok((0, _))) => Some(None),
            Ok(Ok((i, wait_us))) => {
                let (scope, key, _) = scopes.get(usize::try_from(i).ok()?.checked_sub(1)?)?;
                Some(Some(Limited {
                    scope: *scope,
                    kind: LimitKind::Rate,
                    key: *key,
                    retry_after: Some(Duration::from_micros(wait_us)),
                }))
            }
            Ok(Err(e)) => {
                metrics
                    .cluster_fallbacks
                    .with_label_values(&["admit"])
                    .inc();
                self.set_up(false, &e.to_string());
                self.wake.notify_one();
                None
            }
            Err(_) => {
                metrics
                    .cluster_fallbacks
                    .with_label_values(&["admit"])
                    .inc();
                self.set_up(
                    false,
                    &format!("no answer within {}ms", self.timeout.as_millis()),
                );
                self.wake.notify_one();
                None
            }
        }
    }

    fn list_key(&self, net: IpNet) -> String {
        format!("{}:l:{net}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:lists", self.prefix)
    }

    fn queue(&self, msg: ListMessage) {
        let mut pending = self.pending.lock();
        if pending.len() >= PENDING_MAX {
            pending.pop_front();
            self.metrics
                .cluster_fallbacks
                .with_label_values(&["publish"])
                .inc();
        }
        pending.push_back(msg);
        drop(pending);
        self.wake.notify_one();
    }

    /// Writes and publishes one list change.
    async fn publish(&self, msg: &ListMessage) -> redis::RedisResult<()> {
        let payload = serde_json::to_string(msg).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "encode", e.to_string()))
        })?;
        let mut conn = self.conn.clone();
        let key = self.list_key(msg.net);
        let mut pipe = redis::pipe();
        match (&msg.op, &msg.record) {
            (Op::Add, Some(record)) => {
                let now = crate::lists::millis(crate::lists::unix_now());
                match record.until_unix_ms {
                    Some(until) if until <= now => return Ok(()),
                    Some(until) => pipe
                        .cmd("SET")
                        .arg(&key)
                        .arg(&payload)
                        .arg("PX")
                        .arg(until - now),
                    None => pipe.cmd("SET").arg(&key).arg(&payload),
                };
            }
            _ => {
                pipe.cmd("DEL").arg(&key);
            }
        }
        pipe.cmd("PUBLISH").arg(self.channel()).arg(&payload);
        tokio::time::timeout(Duration::from_secs(2), pipe.query_async::<()>(&mut conn))
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timeout")))?
    }

    /// Publishes what is queued while Redis answers.
    async fn drain(&self) {
        loop {
            let Some(msg) = self.pending.lock().front().cloned() else {
                return;
            };
            match self.publish(&msg).await {
                Ok(()) => {
                    self.pending.lock().pop_front();
                }
                Err(e) => {
                    self.metrics
                        .cluster_fallbacks
                        .with_label_values(&["publish"])
                        .inc();
                    self.set_up(false, &e.to_string());
                    return;
                }
            }
        }
    }

    /// Reads every shared entry (after a (re)connect).
    async fn resync(&self, shared: &Shared) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:l:*", self.prefix);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut n = 0;
        for chunk in keys.chunks(500) {
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(chunk).query_async(&mut conn).await?;
            for v in values.into_iter().flatten() {
                if let Ok(msg) = serde_json::from_str::<ListMessage>(&v) {
                    if msg.gateway != self.gateway && self.apply(shared, msg) {
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Applies a change from another gateway; whether it changed anything.
    fn apply(&self, shared: &Shared, msg: ListMessage) -> bool {
        match (msg.op, msg.record) {
            (Op::Add, Some(record)) => {
                let record = DynamicRecord {
                    source: EntrySource::Cluster,
                    added_by: Some(msg.gateway.clone()),
                    ..record
                };
                match shared.lists.add(record, false) {
                    Ok(Some(_)) => {
                        self.metrics
                            .cluster_received
                            .with_label_values(&["add"])
                            .inc();
                        shared.lists_changed();
                        true
                    }
                    _ => false,
                }
            }
            _ => {
                // Only an entry that came from the fleet goes: a block this
                // gateway's own detection or admin made stays.
                let ours = shared
                    .lists
                    .load()
                    .dynamic()
                    .get(msg.net)
                    .is_some_and(|e| e.source == EntrySource::Cluster);
                if ours && shared.lists.remove(msg.kind, msg.net, false).is_ok() {
                    self.metrics
                        .cluster_received
                        .with_label_values(&["remove"])
                        .inc();
                    shared.lists_changed();
                    return true;
                }
                false
            }
        }
    }

    /// Writes this gateway's counts for the fleet view.
    async fn publish_counts(&self, shared: &Shared, every: Duration) -> redis::RedisResult<()> {
        let m = &self.metrics;
        let count = |r: &str| m.admissions.with_label_values(&[r]).get();
        let key = format!("{}:gw:{}", self.prefix, self.gateway);
        let mut conn = self.conn.clone();
        let ttl_ms = u64::try_from(every.as_millis() * 3).unwrap_or(u64::MAX);
        redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg("admitted")
            .arg(count("admitted"))
            .arg("limited")
            .arg(count("limited"))
            .arg("blocked")
            .arg(count("blocked"))
            .arg("allowlisted")
            .arg(count("allowlisted"))
            .arg("live_sessions")
            .arg(shared.live_sessions())
            .arg("dynamic_entries")
            .arg(shared.lists.dynamic_len())
            .arg("updated_unix_ms")
            .arg(crate::lists::millis(crate::lists::unix_now()))
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl_ms)
            .query_async::<()>(&mut conn)
            .await
    }
}

impl ListSink for Cluster {
    fn added(&self, record: &DynamicRecord, _sync: bool) -> Result<(), String> {
        // Fleet entries came from the fleet; allow entries are each
        // gateway's own choice (a partner of one site is not every site's).
        if record.source == EntrySource::Cluster || record.kind != ListKind::Block {
            return Ok(());
        }
        self.queue(ListMessage {
            gateway: self.gateway.clone(),
            op: Op::Add,
            kind: record.kind,
            net: record.net,
            record: Some(record.clone()),
        });
        Ok(())
    }

    fn removed(&self, kind: ListKind, net: IpNet) -> Result<(), String> {
        if kind == ListKind::Block {
            self.queue(ListMessage {
                gateway: self.gateway.clone(),
                op: Op::Remove,
                kind,
                net,
                record: None,
            });
        }
        Ok(())
    }
}

/// Starts the fleet's tasks: the supervisor (ping, resync, publish), the
/// subscriber and the counts.
pub fn start(shared: &Arc<Shared>, cluster: Arc<Cluster>, publish_every: Duration) {
    tokio::spawn(supervise(shared.clone(), cluster.clone()));
    tokio::spawn(subscribe(shared.clone(), cluster.clone()));
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(publish_every);
        loop {
            tick.tick().await;
            if cluster.is_up() {
                let _ = cluster.publish_counts(&shared, publish_every).await;
            }
        }
    });
}

async fn ping(cluster: &Cluster) -> Result<(), String> {
    let mut conn = cluster.conn.clone();
    match tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer to PING within 1s".into()),
    }
}

async fn supervise(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    loop {
        if cluster.is_up() {
            cluster.drain().await;
            tokio::select! {
                () = cluster.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if let Err(e) = ping(&cluster).await {
                        cluster.set_up(false, &e);
                    }
                }
            }
            continue;
        }
        match ping(&cluster).await {
            Ok(()) => {
                match cluster.resync(&shared).await {
                    Ok(n) => tracing::info!("cluster: {n} fleet entries read from redis"),
                    Err(e) => {
                        tracing::debug!("cluster: resync failed: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                cluster.set_up(true, "");
            }
            Err(e) => {
                cluster.set_up(false, &e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Follows the fleet's list channel, reconnecting by itself.
async fn subscribe(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let channel = cluster.channel();
    loop {
        let connected =
            tokio::time::timeout(Duration::from_secs(2), cluster.client.get_async_pubsub()).await;
        let mut pubsub = match connected {
            Ok(Ok(p)) => p,
            _ => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if pubsub.subscribe(&channel).await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tracing::debug!("cluster: subscribed to {channel}");
        // Anything published while we were away is in the keys.
        if cluster.is_up() {
            let _ = cluster.resync(&shared).await;
        }
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            match serde_json::from_str::<ListMessage>(&payload) {
                Ok(m) if m.gateway != cluster.gateway => {
                    cluster.apply(&shared, m);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("cluster: a message that is not ours: {e}"),
            }
        }
        tracing::debug!("cluster: subscription lost; reconnecting");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
