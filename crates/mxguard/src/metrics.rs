//! Prometheus series, served by the admin listener at `/metrics`.
//!
//! Label sets are closed (outcomes, tests, phases, modes): a client's
//! address is never a label, so a botnet cannot blow up the series count.

use mxguard_policy::Verdict;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub connections: IntCounterVec,
    pub detections: IntCounterVec,
    pub sessions_active: IntGaugeVec,
    pub relayed_bytes: IntCounterVec,
    pub upstream_connect_errors: IntCounterVec,
    pub greet_held_seconds: HistogramVec,
    pub blocklist_entries: IntGauge,
    pub accept_errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub actions: IntCounterVec,
    pub messages: IntCounterVec,
}

/// The phases a live session can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Greet,
    Relay,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Greet => "greet",
            Self::Relay => "relay",
        }
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let connections = IntCounterVec::new(
            Opts::new("mxguard_connections_total", "Connections by outcome."),
            &["outcome"],
        )?;
        let detections = IntCounterVec::new(
            Opts::new(
                "mxguard_detections_total",
                "Misbehaviour detected, by test.",
            ),
            &["test"],
        )?;
        let sessions_active = IntGaugeVec::new(
            Opts::new("mxguard_sessions_active", "Live sessions by phase."),
            &["phase"],
        )?;
        let relayed_bytes = IntCounterVec::new(
            Opts::new(
                "mxguard_relayed_bytes_total",
                "Bytes relayed, by relay mode and direction.",
            ),
            &["mode", "direction"],
        )?;
        let upstream_connect_errors = IntCounterVec::new(
            Opts::new(
                "mxguard_upstream_errors_total",
                "Upstream failures during the greeting, by kind.",
            ),
            &["kind"],
        )?;
        let greet_held_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mxguard_greet_held_seconds",
                "How long clients were held before the greeting ended or they left.",
            )
            .buckets(vec![0.1, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 30.0]),
            &["outcome"],
        )?;
        let blocklist_entries = IntGauge::new(
            "mxguard_blocklist_entries",
            "Addresses on the dynamic blocklist.",
        )?;
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "mxguard_accept_errors_total",
                "accept(2) failures, by kind (emfile, other).",
            ),
            &["kind"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new("mxguard_config_reloads_total", "Config reloads by result."),
            &["result"],
        )?;
        let actions = IntCounterVec::new(
            Opts::new(
                "mxguard_actions_total",
                "Actions taken on detections, by action.",
            ),
            &["action"],
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "mxguard_messages_total",
                "Messages kept from the MTA, by disposition (quarantine, discard).",
            ),
            &["disposition"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("mxguard_build_info", "Always 1; the version as a label."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(detections.clone()))?;
        registry.register(Box::new(sessions_active.clone()))?;
        registry.register(Box::new(relayed_bytes.clone()))?;
        registry.register(Box::new(upstream_connect_errors.clone()))?;
        registry.register(Box::new(greet_held_seconds.clone()))?;
        registry.register(Box::new(blocklist_entries.clone()))?;
        registry.register(Box::new(accept_errors.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(actions.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(build_info))?;

        // Zero every known series so rates work from the first scrape.
        for v in Verdict::ALL {
            connections.with_label_values(&[v.as_str()]);
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
        for phase in [Phase::Greet, Phase::Relay] {
            sessions_active.with_label_values(&[phase.as_str()]);
        }
        for mode in ["copy", "splice"] {
            for dir in ["upstream", "downstream"] {
                relayed_bytes.with_label_values(&[mode, dir]);
            }
        }
        for kind in ["connect", "timeout", "banner", "refused"] {
            upstream_connect_errors.with_label_values(&[kind]);
        }
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }

        Ok(Self {
            registry,
            connections,
            detections,
            sessions_active,
            relayed_bytes,
            upstream_connect_errors,
            greet_held_seconds,
            blocklist_entries,
            accept_errors,
            config_reloads,
            actions,
            messages,
        })
    }

    /// Counts a session in `phase` for as long as the guard lives.
    pub fn enter(&self, phase: Phase) -> PhaseGuard {
        let gauge = self.sessions_active.with_label_values(&[phase.as_str()]);
        gauge.inc();
        PhaseGuard { gauge }
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

/// Decrements the phase gauge when dropped, however the session ends.
pub struct PhaseGuard {
    gauge: IntGauge,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
