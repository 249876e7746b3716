//! The daemon: listeners, the accept loop, signals, reload and drain.
//!
//! State shared by all sessions lives in [`Shared`]; the per-session
//! settings are a [`Runtime`] snapshot in an `ArcSwap`, so a SIGHUP reload
//! swaps it without a lock and live sessions keep the snapshot they started
//! with.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use mxguard_policy::{Blocklist, EntrySource};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::admission::{AdmissionControl, AdmissionMetrics};
use crate::api::Tokens;
use crate::config::{Config, Mode, Overrides};
use crate::events::EventLog;
use crate::intercept::{self, OriginalDestination};
use crate::lists::{DynamicRecord, ListFiles, ListKind, Lists};
use crate::metrics::Metrics;
use crate::quarantine::Quarantine;
use crate::sessions::SessionTable;

/// Per-session settings, swapped whole on reload.
pub struct Runtime {
    pub config: Config,
    pub intercept: Box<dyn OriginalDestination>,
}

impl Runtime {
    pub fn new(config: Config) -> Self {
        let intercept = intercept::from_config(&config);
        Self { config, intercept }
    }
}

/// What every session shares.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub metrics: Metrics,
    pub relay_counters: RelayCounters,
    pub listen_addrs: Vec<SocketAddr>,
    /// Where quarantined mail goes; `None` when it cannot be opened (then a
    /// message to quarantine gets a 451, never a 250).
    pub quarantine: Option<Quarantine>,
    pub sessions: SessionTable,
    /// Sessions waiting out a long greet delay without a task (`pen`).
    pub pen: crate::pen::Pen,
    /// Allow/block files and the dynamic overlay (`lists`).
    pub lists: Lists,
    /// Rate and connection limits, reputation, sender limits (`admission`).
    pub admission: AdmissionControl,
    /// Addresses that passed every test lately.
    passed: Mutex<Blocklist>,
    /// The kernel's copy of the pass cache (`nftables.bypass_passed` or
    /// `sk_lookup.bypass_passed`).
    pub kernel_bypass: std::sync::OnceLock<Arc<dyn KernelPasses>>,
    /// The steering program (`intercept.mode = "sk_lookup"`), held while
    /// the daemon runs.
    pub sk_lookup: std::sync::OnceLock<Arc<crate::sk_lookup::SkLookup>>,
    live: AtomicUsize,
    idle: Notify,
    /// The JSON-lines event log (`[log] events`).
    pub events: EventLog,
    /// The admin API's bearer tokens, swapped on reload.
    pub tokens: ArcSwap<Tokens>,
    pub started: Instant,
    pub(crate) config_source: std::sync::OnceLock<crate::reload::ConfigSource>,
    /// The session threads' heartbeats (set when they start).
    pub session_threads: std::sync::OnceLock<Arc<crate::notify::Heartbeats>>,
}

/// The kernel's copy of the pass cache: whose new connections skip the
/// guard.
pub trait KernelPasses: Send + Sync {
    /// `ip` passed; its pass lasts `ttl`.
    fn passed(&self, ip: IpAddr, ttl: Duration);
}

impl Shared {
    pub fn new(
        config: Config,
        metrics: Metrics,
        listen_addrs: Vec<SocketAddr>,
        quarantine: Option<Quarantine>,
    ) -> Self {
        let lists = Lists::new(config.limits.blocklist_max);
        let admission = AdmissionControl::new(
            &config,
            AdmissionMetrics::new(&metrics).expect("admission series are registered once"),
        );
        if let Err(e) = lists.load_files(&ListFiles::from_config(&config)) {
            // `run` checks the files before it gets here; a unit test's
            // defaults have none.
            tracing::error!("lists: {e}");
        }
        let passed = Blocklist::new(config.pass_cache.max_entries.max(1));
        let relay_counters = RelayCounters::new(&metrics);
        let events = EventLog::new(
            metrics.event_log_lines.clone(),
            metrics.event_log_dropped.clone(),
        );
        Self {
            runtime: ArcSwap::from_pointee(Runtime::new(config)),
            metrics,
            relay_counters,
            listen_addrs,
            quarantine,
            sessions: SessionTable::default(),
            pen: crate::pen::Pen::default(),
            lists,
            admission,
            passed: Mutex::new(passed),
            kernel_bypass: std::sync::OnceLock::new(),
            sk_lookup: std::sync::OnceLock::new(),
            live: AtomicUsize::new(0),
            idle: Notify::new(),
            events,
            tokens: ArcSwap::from_pointee(Tokens::disabled()),
            started: Instant::now(),
            config_source: std::sync::OnceLock::new(),
            session_threads: std::sync::OnceLock::new(),
        }
    }

    /// What the allow/block lists say about `ip`: lock-free. Counted in
    /// `mxguard_blocklist_lookups_total` (admission's look-ups).
    pub fn listed(&self, ip: IpAddr) -> Option<ListKind> {
        let listed = self.lists.classify_kind(ip);
        self.metrics
            .list_lookup(listed.map(|k| k == ListKind::Block));
        listed
    }

    /// Whether `ip` is blocked now, uncounted: the kernel copies' own
    /// checks (a pass against a block), which are not admissions.
    pub fn blocked_now(&self, ip: IpAddr) -> bool {
        self.lists.classify_kind(ip) == Some(ListKind::Block)
    }

    #[allow(dead_code)] // admission asks `listed`; kept for the admin API
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.listed(ip) == Some(ListKind::Block)
    }

    /// A detection blocks `ip` for `ttl` (0s: not at all). Recorded in the
    /// state store within its flush window, and shared with the fleet.
    pub fn block(&self, ip: IpAddr, ttl: Duration, reason: &'static str) {
        if ttl.is_zero() {
            return;
        }
        let now = crate::lists::unix_now();
        let record = DynamicRecord {
            net: IpNet::from(mxguard_policy::canonical_ip(ip)),
            kind: ListKind::Block,
            source: EntrySource::Detection,
            reason: reason.to_string(),
            added_by: None,
            since_unix_ms: crate::lists::millis(now),
            until_unix_ms: Some(crate::lists::millis(now.saturating_add(ttl))),
        };
        match self.lists.add(record, false) {
            Ok(Some(_)) => self.lists_changed(),
            Ok(None) => {}
            Err(e) => tracing::warn!("blocklist: cannot add {ip}: {e}"),
        }
    }

    /// The lists changed: refresh what follows them.
    pub fn lists_changed(&self) {
        self.metrics
            .blocklist_entries
            .with_label_values(&["dynamic"])
            .set(self.lists.dynamic_len() as i64);
    }

    fn purge_blocklist(&self) {
        let now = Instant::now().into_std();
        let (removed, _) = self.lists.purge();
        if removed > 0 {
            self.lists_changed();
        }
        self.passed.lock().purge(now);
    }

    /// Allowlisted: skips every test.
    #[allow(dead_code)] // admission asks `listed`; kept for the admin API
    pub fn is_allowlisted(&self, ip: IpAddr) -> bool {
        self.listed(ip) == Some(ListKind::Allow)
    }

    /// Passed every test within the pass cache's TTL.
    pub fn passed_before(&self, ip: IpAddr) -> bool {
        let now = Instant::now().into_std();
        self.passed.lock().lookup(ip, now).is_some()
    }

    pub fn remember_pass(&self, ip: IpAddr, ttl: Duration) {
        let now = Instant::now().into_std();
        self.passed.lock().insert(ip, now, ttl, "pass");
        if let Some(kernel) = self.kernel_bypass.get() {
            kernel.passed(ip, ttl);
        }
    }

    /// Forgets the passes of the addresses in `net` (it was blocked);
    /// returns them.
    pub fn forget_passes(&self, net: IpNet) -> Vec<IpAddr> {
        let net = mxguard_policy::canonical_net(net);
        let mut passed = self.passed.lock();
        if net.prefix_len() < net.max_prefix_len() {
            return passed.remove_where(|ip| net.contains(&mxguard_policy::canonical_ip(ip)));
        }
        // One address (a detection): two look-ups, not a scan. A
        // dual-stack listener sees an IPv4 client as `::ffff:a.b.c.d`.
        let ip = net.addr();
        let mapped = match ip {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        };
        [Some(ip), mapped]
            .into_iter()
            .flatten()
            .filter(|a| passed.remove(*a))
            .collect()
    }

    /// The addresses with a live pass, and the time each has left.
    pub fn passes(&self) -> Vec<(IpAddr, Duration)> {
        let now = Instant::now().into_std();
        self.passed.lock().live(now).collect()
    }

    pub fn count_action(&self, action: mxguard_policy::action::Action) {
        self.metrics
            .actions
            .with_label_values(&[action.as_str()])
            .inc();
    }

    pub fn live_sessions(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    fn session_started(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn session_ended(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no session is live, or `limit` passes.
    async fn drained(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.live_sessions() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.live_sessions() == 0;
            }
        }
    }
}

/// One live session in [`Shared::live_sessions`], counted out when its
/// task ends, by a panic too (tokio catches it and drops the task's
/// state): a session that panicked used to stay live, and the drain at
/// shutdown waited for it to its timeout.
pub(crate) struct LiveSession(Option<Arc<Shared>>);

impl LiveSession {
    /// The session `shared` counted in with `session_started`.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self(Some(shared))
    }

    /// The session goes on elsewhere (the holding pen), which counts it
    /// out.
    pub(crate) fn handed_on(mut self) {
        self.0 = None;
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.session_ended();
        }
    }
}

/// Feeds relayed byte counts to the metrics without a label lookup per call.
pub struct RelayCounters {
    splice_up: prometheus::IntCounter,
    splice_down: prometheus::IntCounter,
    copy_up: prometheus::IntCounter,
    copy_down: prometheus::IntCounter,
}

impl RelayCounters {
    fn new(metrics: &Metrics) -> Self {
        let c = |mode, dir| metrics.relayed_bytes.with_label_values(&[mode, dir]);
        Self {
            splice_up: c("splice", "upstream"),
            splice_down: c("splice", "downstream"),
            copy_up: c("copy", "upstream"),
            copy_down: c("copy", "downstream"),
        }
    }
}

impl mxguard_net::RelayObserver for RelayCounters {
    fn relayed(&self, mode: mxguard_net::RelayMode, dir: mxguard_net::Direction, n: u64) {
        use mxguard_net::{Direction, RelayMode};
        let counter = match (mode, dir) {
            (RelayMode::Splice, Direction::Upstream) => &self.splice_up,
            (RelayMode::Splice, Direction::Downstream) => &self.splice_down,
            (RelayMode::Copy, Direction::Upstream) => &self.copy_up,
            (RelayMode::Copy, Direction::Downstream) => &self.copy_down,
        };
        counter.inc_by(n);
    }
}

/// Runs the guard until SIGTERM/SIGINT, then drains.
pub async fn run(
    config_path: Option<PathBuf>,
    overrides: Overrides,
    config: Config,
) -> anyhow::Result<()> {
    raise_nofile_limit();
    // Before anything listens: a SIGHUP sent as soon as the port answers
    // must reload, not kill (its default action).
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let metrics = Metrics::new().context("cannot set up metrics")?;

    let transparent = config.intercept.mode == Mode::Tproxy;
    let workers = worker_count(config.intercept.workers);
    // listeners[w]: worker w's socket for each listen address.
    let mut listeners: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut listen_addrs = Vec::new();
    for addr in &config.intercept.listen {
        let group = mxguard_net::bind_listeners(*addr, transparent, 4096, workers)
            .with_context(|| format!("cannot listen on {addr}"))?;
        if let Some(first) = group.first() {
            listen_addrs.push(first.local_addr()?);
        }
        for (w, listener) in group.into_iter().enumerate() {
            listeners[w].push(listener);
        }
    }
    // Steering starts once the sockets are there to take the connections
    // (they wait in the backlogs until the session threads accept).
    let steer = if config.intercept.mode == Mode::SkLookup {
        // The first thread's sockets: one per listen address.
        let sockets = listeners.first().map_or(&[][..], Vec::as_slice);
        Some(crate::sk_lookup::attach(&config, sockets)?)
    } else {
        None
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let admin_addr = match config.admin.listen {
        Some(addr) => {
            let listener =
                crate::admin::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
            Some((listener.local_addr()?, listener))
        }
        None => None,
    };

    crate::lists::read_files(&ListFiles::from_config(&config))
        .map_err(|e| anyhow::anyhow!("lists: {e}"))?;

    // Opened only when some action needs it: a guard that never
    // quarantines creates no directory.
    let quarantine = if config.uses_quarantine() {
        let q = Quarantine::open(&config.quarantine).map_err(|e| {
            anyhow::anyhow!(
                "quarantine is an action in the config but its store cannot be opened: {e}"
            )
        })?;
        Some(q)
    } else {
        None
    };
    let tokens = crate::reload::load_tokens(&config)
        .map_err(|e| anyhow::anyhow!("admin.token_file: {e}"))?;
    let shared = Arc::new(Shared::new(
        config.clone(),
        metrics,
        listen_addrs.clone(),
        quarantine,
    ));
    shared.tokens.store(Arc::new(tokens));
    shared.pen.start();
    shared
        .events
        .configure(config.log.events.as_deref())
        .context("log.events")?;
    shared.set_config_source(config_path, overrides);
    crate::admission::start(&shared, &config).await?;
    if let Some(steer) = steer {
        crate::sk_lookup::start(&shared, steer);
    }
    let admin_bound = admin_addr.as_ref().map(|(a, _)| *a);
    if let Some((_, listener)) = admin_addr {
        tokio::spawn(crate::admin::serve(
            listener,
            shared.clone(),
            shutdown_rx.clone(),
        ));
    }

    tracing::info!(
        "mxguard {} listening on {} (mode {}, {} worker thread{}, greet delay {}, pregreet action {}){}",
        env!("CARGO_PKG_VERSION"),
        join(&listen_addrs),
        config.intercept.mode.as_str(),
        workers,
        if workers == 1 { "" } else { "s" },
        config.greet.delay,
        config.pregreet.action.as_str(),
        admin_bound.map_or_else(String::new, |a| format!(", admin on {a}")),
    );

    let watchdog = crate::notify::watchdog_interval();
    let beats = Arc::new(crate::notify::Heartbeats::new(workers));
    let _ = shared.session_threads.set(beats.clone());
    let period = crate::notify::Heartbeats::period(watchdog);
    for (w, sockets) in listeners.into_iter().enumerate() {
        start_worker(
            w,
            sockets,
            shared.clone(),
            shutdown_rx.clone(),
            (beats.clone(), period),
        )?;
    }
    tokio::spawn(purge_loop(shared.clone(), shutdown_rx.clone()));

    // Every listener is bound and served: systemd may start what comes
    // after us (Type=notify).
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=listening on {}",
        join(&listen_addrs)
    ));
    if let Some(every) = watchdog {
        tokio::spawn(crate::notify::watchdog(every, shutdown_rx.clone(), beats));
    }
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let shared = shared.clone();
                // Reading files: off the runtime's threads.
                let _ = tokio::task::spawn_blocking(move || shared.reload("sighup", "signal")).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    crate::notify::notify("STOPPING=1");

    let drain = shared.runtime.load().config.limits.drain_timeout.0;
    let _ = shutdown_tx.send(true);
    tracing::info!(
        "draining: no new connections; waiting up to {}s for {} live session(s)",
        drain.as_secs(),
        shared.live_sessions()
    );
    if shared.drained(drain).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            "drain timeout: closing {} live session(s)",
            shared.live_sessions()
        );
    }
    crate::admission::stop(&shared);
    // The drained sessions' verdicts are the event log's last lines: its
    // writer thread would end with the process, queue and all.
    let events = shared.clone();
    let _ = tokio::task::spawn_blocking(move || events.events.close(EVENT_LOG_CLOSE)).await;
    Ok(())
}

/// How long the exit waits for the event log's writer (a hung disk must
/// not hold it up for good).
const EVENT_LOG_CLOSE: Duration = Duration::from_secs(5);

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Session threads: one per CPU unless the config says how many.
fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Starts session thread `index`: a single-threaded runtime that accepts on
/// its own sockets and runs every session it accepts to the end, so a
/// session's I/O is driven and served on one thread, with no wake-up or
/// work stealing across threads (the multi-threaded runtime spent ~15 % of
/// the guard's CPU per small message on those: futex, eventfd, context
/// switches; docs/benchmarks.md). The kernel spreads connections over the
/// threads' sockets (`SO_REUSEPORT`). The daemon's own tasks (signals,
/// admin API, holding pen, state, fleet) stay on the main runtime; a
/// session back from the holding pen is spawned on the thread that
/// accepted it. The thread runs until the process exits: after the drain,
/// like the main runtime, it is simply stopped. It beats a heartbeat that
/// the systemd watchdog's pings and `/readyz` depend on.
fn start_worker(
    index: usize,
    sockets: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    beat: (Arc<crate::notify::Heartbeats>, Duration),
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a session thread's runtime")?;
    // Registered with the thread's own runtime, before it starts, so that
    // an error is the daemon's start-up error.
    let listeners = {
        let _entered = rt.enter();
        sockets
            .into_iter()
            .map(TcpListener::from_std)
            .collect::<std::io::Result<Vec<_>>>()?
    };
    let spares: Vec<Spare> = listeners.iter().map(|_| Spare::open()).collect();
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("mxguard-sess{index}"))
        .spawn(move || {
            rt.block_on(async move {
                // The end of the greet delay, on this thread's own timer.
                crate::deadline::start_local();
                let _ = started_tx.send(());
                for (listener, spare) in listeners.into_iter().zip(spares) {
                    tokio::spawn(accept_loop(
                        listener,
                        spare,
                        shared.clone(),
                        shutdown.clone(),
                    ));
                }
                // Proof of life for the systemd watchdog and `/readyz`.
                let (beats, period) = beat;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    beats.beat(index);
                }
            });
        })
        .context("cannot start a session thread")?;
    // Its timer and spares are open before the daemon says it is ready,
    // so the descriptor count is settled from then on.
    started_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("session thread {index} did not start"))?;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    mut spare: Spare,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        // A spare lost to another thread (see `Spare`) is taken back before
        // a session takes the descriptor that came free.
        spare.refill();
        let accepted = tokio::select! {
            accepted = std::future::poll_fn(|cx| {
                let _turning_away = TURNING_AWAY.read();
                listener.poll_accept(cx)
            }) => accepted,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // TCP_NODELAY: inherited from the listener. The server
                // speaks first: no read before the client is reported.
                mxguard_net::forget_assumed_readable(&stream);
                shared.metrics.connections_accepted.inc();
                shared.session_started();
                let shared = shared.clone();
                // Boxed before it is spawned: the session's future (~1 KiB)
                // is written once, into its box, instead of being moved
                // through spawn into the task's cell.
                tokio::spawn(Box::pin(async move {
                    let live = LiveSession::new(shared.clone());
                    if let Some(parked) = crate::session::run(shared.clone(), stream, peer).await {
                        // It waits out its greet delay without this task.
                        live.handed_on();
                        shared.pen.park(parked);
                    }
                }));
            }
            Err(e) => {
                if accept_failed(&shared, &e) {
                    spare.turn_away(&listener, &shared);
                }
                let pause = if spare.is_open() { 5 } else { 50 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}

/// A descriptor held in reserve. When accept fails for want of descriptors,
/// the pending client would wait in the backlog with no answer; closing the
/// spare lets us accept it, tell it `421` (it retries later, as a real MTA
/// does) and close it, then take the spare back (the trick nginx and libev
/// use).
///
/// Each accept loop (one per listener per session thread) has its own, but
/// the descriptor table is the process's: the slot a spare frees could be
/// taken by another thread's accept, whose session would then hold it for
/// its greet delay, and the spare was lost for good (seen: after a few
/// waves of a flood no thread could answer its backlog). So a turn-away
/// (close, accept, answer, close, reopen: no await, a few system calls)
/// holds [`TURNING_AWAY`] for writing, which every accept loop's accept
/// holds for reading. Whatever else takes the slot meanwhile (an upstream
/// connect, a pipe) is a session's own need; the spare is then refilled
/// before the loop's next accept, once a descriptor frees.
struct Spare(Option<std::fs::File>);

/// Accepts read-lock it, a turn-away write-locks it (see [`Spare`]).
static TURNING_AWAY: parking_lot::RwLock<()> = parking_lot::RwLock::new(());

impl Spare {
    fn open() -> Self {
        Self(std::fs::File::open("/dev/null").ok())
    }

    fn is_open(&self) -> bool {
        self.0.is_some()
    }

    /// Reopens a spare that was lost (one open(2) per accept while it is).
    fn refill(&mut self) {
        if self.0.is_none() {
            *self = Self::open();
        }
    }

    fn turn_away(&mut self, listener: &TcpListener, shared: &Shared) {
        let _accepts_wait = TURNING_AWAY.write();
        if self.0.take().is_none() {
            *self = Self::open();
            return;
        }
        // The listener is non-blocking: this never waits. The accepted
        // socket is blocking, but a reply of a few dozen bytes fits the
        // empty send buffer of a new connection.
        if let Ok((stream, _peer)) = socket2::SockRef::from(listener).accept() {
            let hostname = shared.runtime.load().config.hostname.clone();
            let reply = format!("421 4.3.2 {hostname} All server ports are busy\r\n");
            let _ = stream.set_nonblocking(true);
            let _ = stream.send(reply.as_bytes());
            shared
                .metrics
                .connections
                .with_label_values(&["tempfail"])
                .inc();
        }
        *self = Self::open();
    }
}

/// Out of descriptors (EMFILE/ENFILE) or memory: the pending connection
/// stays in the backlog and accept would fail again at once. Count it, log
/// the first of a burst, and say whether descriptors ran out (the caller
/// turns one client away with the spare and backs off instead of spinning).
fn accept_failed(shared: &Shared, e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let exhausted = e.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
        )
    });
    let kind = if exhausted { "emfile" } else { "other" };
    let counter = shared.metrics.accept_errors.with_label_values(&[kind]);
    if counter.get().is_multiple_of(1000) {
        tracing::warn!("accept failed: {e}; backing off");
    }
    counter.inc();
    exhausted
}

async fn purge_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                shared.purge_blocklist();
                shared.admission.sweep();
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// A held session costs a descriptor: take all the kernel allows.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!("descriptor limit raised from {soft} to {hard}"),
            Err(e) => tracing::warn!("cannot raise the descriptor limit above {soft}: {e}"),
        },
        Ok((soft, _)) => tracing::debug!("descriptor limit {soft}"),
        Err(e) => tracing::warn!("cannot read the descriptor limit: {e}"),
    }
}

#[cfg(test)]
impl Shared {
    /// The shared state of a unit test's sessions: `config`, fresh
    /// metrics, the guard listening on `listen`, no quarantine.
    pub(crate) fn for_test(config: Config, listen: SocketAddr) -> Arc<Self> {
        Arc::new(Self::new(
            config,
            Metrics::new().expect("metrics"),
            vec![listen],
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session whose task panics is counted out all the same: the drain
    /// at shutdown does not wait for it.
    #[tokio::test]
    async fn a_session_that_panics_is_no_longer_live() {
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let shared = Shared::for_test(Config::default(), addr);
        shared.session_started();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                let _live = LiveSession::new(shared);
                panic!("a bug in a session");
            }
        });
        assert!(task.await.is_err(), "the task panicked");
        assert_eq!(shared.live_sessions(), 0);
        assert!(shared.drained(Duration::from_millis(50)).await);
        // Handed on (to the holding pen), it stays live until the pen's
        // own count goes.
        shared.session_started();
        LiveSession::new(shared.clone()).handed_on();
        assert_eq!(shared.live_sessions(), 1);
    }
}
