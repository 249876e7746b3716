//! Prometheus series, served by the admin listener at `/metrics`.
//!
//! Label sets are closed (outcomes, tests, phases, modes): a client's
//! address is never a label, so a botnet cannot blow up the series count.
//! Every series with a known label set is created at start (at zero), so
//! `rate()` and the dashboard work from the first scrape. The full list,
//! with what each series means, is in docs/operations.md ("Metrics").

use mxguard_policy::Verdict;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Every accepted connection, counted at accept.
    pub connections_accepted: IntCounter,
    /// Every finished connection, by its verdict.
    pub connections: IntCounterVec,
    pub detections: IntCounterVec,
    pub relayed_bytes: IntCounterVec,
    pub upstream_connect_errors: IntCounterVec,
    pub upstream_connect_seconds: Histogram,
    pub greet_held_seconds: HistogramVec,
    /// Blocklist entries by source: `static` (files, config) and
    /// `dynamic` (detections, the admin API, the cluster).
    pub blocklist_entries: IntGaugeVec,
    pub allowlist_entries: IntGaugeVec,
    pub accept_errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_successful: IntGauge,
    pub config_last_reload_success_timestamp: Gauge,
    pub actions: IntCounterVec,
    pub messages: IntCounterVec,
    pub quarantine_messages: IntGauge,
    pub quarantine_bytes: IntGauge,
    pub admin_requests: IntCounterVec,
    pub event_log_lines: IntCounterVec,
    pub event_log_dropped: IntCounter,
    /// The series every session touches, resolved once: a label look-up
    /// hashes the labels and takes the family's lock on every call.
    hot: Hot,
}

/// Pre-resolved handles of the per-session series.
struct Hot {
    /// By `Verdict` discriminant (`Verdict::ALL` is in declaration order;
    /// a unit test holds it): finished connections, their duration.
    verdicts: Vec<(IntCounter, Histogram)>,
    /// By `Phase` discriminant (`Phase::ALL` in declaration order).
    phases: Vec<IntGauge>,
    greeted: Histogram,
    /// List look-ups at admission (`mxguard_blocklist_lookups_total`):
    /// `blocked`, `allowed`, `unlisted`.
    lookups: [IntCounter; 3],
}

/// The phases a live session can be in, as the gauge counts them:
/// `relay` is everything after the greeting (watched or blind); the admin
/// API's session table tells watched from blind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Greet,
    Relay,
}

impl Phase {
    pub const ALL: [Phase; 2] = [Phase::Greet, Phase::Relay];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Greet => "greet",
            Self::Relay => "relay",
        }
    }
}

/// The admin routes' label values are the route templates of
/// `api::ROUTES` plus these, so the label set stays closed.
pub const ADMIN_ROUTE_UNKNOWN: &str = "unknown";

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };

        let connections_accepted = counter(
            "mxguard_connections_accepted_total",
            "Connections accepted on the SMTP listeners.",
        )?;
        let connections = counter_vec(
            "mxguard_connections_total",
            "Finished connections by outcome (the session's verdict).",
            &["outcome"],
        )?;
        let detections = counter_vec(
            "mxguard_detections_total",
            "Misbehaviour detected, by test.",
            &["test"],
        )?;
        let sessions_active = gauge_vec(
            "mxguard_sessions_active",
            "Live sessions by phase (greet: held in the greet delay; relay: after the greeting).",
            &["phase"],
        )?;
        let session_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mxguard_session_duration_seconds",
                "Session lifetime from accept to close, by outcome.",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
            &["outcome"],
        )?;
        registry.register(Box::new(session_duration_seconds.clone()))?;
        let relayed_bytes = counter_vec(
            "mxguard_relayed_bytes_total",
            "Bytes relayed, by relay mode and direction.",
            &["mode", "direction"],
        )?;
        let upstream_connect_errors = counter_vec(
            "mxguard_upstream_errors_total",
            "Upstream failures during the greeting, by kind (connect, refused, timeout, banner).",
            &["kind"],
        )?;
        let upstream_connect_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mxguard_upstream_connect_seconds",
                "Time to open a TCP connection to the MTA (successful connects).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )?;
        registry.register(Box::new(upstream_connect_seconds.clone()))?;
        let greet_held_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mxguard_greet_held_seconds",
                "How long clients were held before the greeting ended or they left.",
            )
            .buckets(vec![0.1, 0.5, 1.0, 2.0, 4.0, 6.0, 6.5, 8.0, 12.0, 30.0]),
            &["outcome"],
        )?;
        registry.register(Box::new(greet_held_seconds.clone()))?;
        let blocklist_entries = gauge_vec(
            "mxguard_blocklist_entries",
            "Blocklist entries by source (static: files and config; dynamic: detections, admin, cluster).",
            &["source"],
        )?;
        let allowlist_entries = gauge_vec(
            "mxguard_allowlist_entries",
            "Allowlist entries by source (static: files and config; dynamic: admin, cluster).",
            &["source"],
        )?;
        let blocklist_lookups = counter_vec(
            "mxguard_blocklist_lookups_total",
            "Allow/block list lookups at admission, by result (blocked, allowed, unlisted).",
            &["result"],
        )?;
        let accept_errors = counter_vec(
            "mxguard_accept_errors_total",
            "accept(2) failures, by kind (emfile, other).",
            &["kind"],
        )?;
        let config_reloads = counter_vec(
            "mxguard_config_reloads_total",
            "Config reloads by result (ok, error).",
            &["result"],
        )?;
        let config_last_reload_successful = int_gauge(
            "mxguard_config_last_reload_successful",
            "1 when the last reload succeeded (or none was tried), 0 when it failed.",
        )?;
        config_last_reload_successful.set(1);
        let config_last_reload_success_timestamp = gauge(
            "mxguard_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (the start counts).",
        )?;
        config_last_reload_success_timestamp.set(unix_now());
        let actions = counter_vec(
            "mxguard_actions_total",
            "Actions taken on detections, by action.",
            &["action"],
        )?;
        let messages = counter_vec(
            "mxguard_messages_total",
            "Messages kept from the MTA, by disposition (quarantine, discard).",
            &["disposition"],
        )?;
        let quarantine_messages =
            int_gauge("mxguard_quarantine_messages", "Messages in the quarantine.")?;
        let quarantine_bytes = int_gauge(
            "mxguard_quarantine_bytes",
            "Bytes on disk in the quarantine (committed messages).",
        )?;
        let admin_requests = counter_vec(
            "mxguard_admin_requests_total",
            "Admin API requests by route template and HTTP status code.",
            &["route", "code"],
        )?;
        let event_log_lines = counter_vec(
            "mxguard_event_log_lines_total",
            "Lines written to the JSON event log, by type (verdict, admin).",
            &["type"],
        )?;
        let event_log_dropped = counter(
            "mxguard_event_log_dropped_total",
            "Event log lines dropped because the writer fell behind or the file failed.",
        )?;
        let start_time_seconds = gauge(
            "mxguard_start_time_seconds",
            "Unix time the daemon started.",
        )?;
        start_time_seconds.set(unix_now());
        let build_info = gauge_vec(
            "mxguard_build_info",
            "Always 1; the version as a label.",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        // Zero every known series so rates work from the first scrape.
        for v in Verdict::ALL {
            connections.with_label_values(&[v.as_str()]);
            session_duration_seconds.with_label_values(&[v.as_str()]);
        }
        for test in ["pregreet", "hangup"]
            .into_iter()
            .chain(mxguard_smtp::Violation::TESTS)
        {
            detections.with_label_values(&[test]);
        }
        for action in mxguard_policy::action::Action::ALL {
            actions.with_label_values(&[action.as_str()]);
        }
        for disposition in ["quarantine", "discard"] {
            messages.with_label_values(&[disposition]);
        }
        for phase in Phase::ALL {
            sessions_active.with_label_values(&[phase.as_str()]);
        }
        for outcome in ["greeted", "hangup", "reject", "drop", "tempfail"] {
            greet_held_seconds.with_label_values(&[outcome]);
        }
        for mode in ["copy", "splice"] {
            for dir in ["upstream", "downstream"] {
                relayed_bytes.with_label_values(&[mode, dir]);
            }
        }
        for kind in ["connect", "timeout", "banner", "refused"] {
            upstream_connect_errors.with_label_values(&[kind]);
        }
        for source in ["static", "dynamic"] {
            blocklist_entries.with_label_values(&[source]);
            allowlist_entries.with_label_values(&[source]);
        }
        for result in ["blocked", "allowed", "unlisted"] {
            blocklist_lookups.with_label_values(&[result]);
        }
        for kind in ["emfile", "other"] {
            accept_errors.with_label_values(&[kind]);
        }
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        for kind in ["verdict", "admin"] {
            event_log_lines.with_label_values(&[kind]);
        }

        let hot = Hot {
            verdicts: Verdict::ALL
                .iter()
                .map(|v| {
                    (
                        connections.with_label_values(&[v.as_str()]),
                        session_duration_seconds.with_label_values(&[v.as_str()]),
                    )
                })
                .collect(),
            phases: Phase::ALL
                .iter()
                .map(|p| sessions_active.with_label_values(&[p.as_str()]))
                .collect(),
            greeted: greet_held_seconds.with_label_values(&["greeted"]),
            lookups: ["blocked", "allowed", "unlisted"]
                .map(|result| blocklist_lookups.with_label_values(&[result])),
        };

        Ok(Self {
            hot,
            registry,
            connections_accepted,
            connections,
            detections,
            relayed_bytes,
            upstream_connect_errors,
            upstream_connect_seconds,
            greet_held_seconds,
            blocklist_entries,
            allowlist_entries,

            accept_errors,
            config_reloads,
            config_last_reload_successful,
            config_last_reload_success_timestamp,
            actions,
            messages,
            quarantine_messages,
            quarantine_bytes,
            admin_requests,
            event_log_lines,
            event_log_dropped,
        })
    }

    /// Counts a session in `phase` for as long as the guard lives.
    pub fn enter(&self, phase: Phase) -> PhaseGuard {
        let gauge = self.hot.phases[phase as usize].clone();
        gauge.inc();
        PhaseGuard { gauge }
    }

    /// A session ended with `verdict` after `seconds`.
    pub fn session_finished(&self, verdict: Verdict, seconds: f64) {
        let (count, duration) = &self.hot.verdicts[verdict as usize];
        count.inc();
        duration.observe(seconds);
    }

    /// A greeting went out after the client was held `seconds`.
    pub fn greeted(&self, seconds: f64) {
        self.hot.greeted.observe(seconds);
    }

    /// A list look-up at admission: `Some(true)` blocked, `Some(false)`
    /// allowed, `None` on no list.
    pub fn list_lookup(&self, blocked: Option<bool>) {
        let i = match blocked {
            Some(true) => 0,
            Some(false) => 1,
            None => 2,
        };
        self.hot.lookups[i].inc();
    }

    /// Records a config load's result (start, SIGHUP, the admin API).
    pub fn reload_result(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads.with_label_values(&[result]).inc();
        self.config_last_reload_successful.set(i64::from(ok));
        if ok {
            self.config_last_reload_success_timestamp.set(unix_now());
        }
    }

    /// A counter family's values by label values (joined with `/` when
    /// there are several), for `/api/v1/stats`.
    pub fn counter_values(&self, name: &str) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let key = m
                    .get_label()
                    .iter()
                    .map(|l| l.value())
                    .collect::<Vec<_>>()
                    .join("/");
                out.insert(key, m.get_counter().value() as u64);
            }
        }
        out
    }

    /// Registers a module's own series (admission control keeps its
    /// series in `admission::AdmissionMetrics`).
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Decrements the phase gauge when dropped, however the session ends.
pub struct PhaseGuard {
    gauge: IntGauge,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample's value in the exposition text, by its name and labels.
    fn sample(m: &Metrics, series: &str) -> f64 {
        let text = String::from_utf8(m.render()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {series}"))
    }

    #[test]
    fn the_hot_handles_are_the_series_of_their_labels() {
        // `hot` is indexed by discriminant: ALL must be in declaration
        // order, and each handle must count under its own label.
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{v:?}");
        }
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "{p:?}");
        }
        let m = Metrics::new().unwrap();
        m.session_finished(Verdict::Quarantine, 0.5);
        let _relay = m.enter(Phase::Relay);
        for v in Verdict::ALL {
            let want = u64::from(v == Verdict::Quarantine);
            assert_eq!(
                m.connections.with_label_values(&[v.as_str()]).get(),
                want,
                "{v:?}"
            );
            let count = format!(
                "mxguard_session_duration_seconds_count{{outcome=\"{}\"}}",
                v.as_str()
            );
            assert_eq!(sample(&m, &count), want as f64, "{v:?}");
        }
        assert_eq!(sample(&m, "mxguard_sessions_active{phase=\"relay\"}"), 1.0);
        assert_eq!(sample(&m, "mxguard_sessions_active{phase=\"greet\"}"), 0.0);
    }

    #[test]
    fn every_series_name_follows_the_conventions() {
        let m = Metrics::new().unwrap();
        let text = String::from_utf8(m.render()).unwrap();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("mxguard_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            } else {
                assert!(!name.ends_with("_total"), "{name}");
            }
        }
        // Never a client address as a label.
        assert!(!text.contains("client="), "{text}");
    }

    #[test]
    fn a_phase_guard_releases_its_count() {
        let m = Metrics::new().unwrap();
        let get = |p: Phase| {
            sample(
                &m,
                &format!("mxguard_sessions_active{{phase=\"{}\"}}", p.as_str()),
            ) as i64
        };
        {
            let _g = m.enter(Phase::Greet);
            assert_eq!(get(Phase::Greet), 1);
        }
        assert_eq!(get(Phase::Greet), 0);
    }
}
