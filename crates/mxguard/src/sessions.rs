//! The live sessions, for the admin API's `sessions` view.
//!
//! Every connection registers here for its whole life, held ones included,
//! so the entry is kept small: addresses, start time, phase and a bitmask of
//! the tests that fired (no strings, no allocation per test). The entry goes
//! when the session's [`SessionHandle`] drops, however the session ends.
// The admin API's sessions route reads the table (issue 5).
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Where a live session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPhase {
    /// Held in the greet delay.
    Greet,
    /// Watched command by command (copy mode).
    Watch,
    /// Relayed blind (splice or copy).
    Relay,
}

impl SessionPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Greet => "greet",
            Self::Watch => "watch",
            Self::Relay => "relay",
        }
    }
}

/// Every test name a session can carry, for the bitmask.
pub const TESTS: [&str; 16] = [
    "pregreet",
    "hangup",
    "blocklist",
    "allowlist",
    "ratelimit",
    "sender-limit",
    "upstream",
    "pipelining",
    "early-data",
    "non-smtp",
    "tls-on-plaintext",
    "bare-lf",
    "long-line",
    "unknown-commands",
    "smuggling",
    "starttls-injection",
];

#[derive(Debug, Clone, Copy)]
struct Entry {
    client: SocketAddr,
    orig_dst: Option<SocketAddr>,
    started: Instant,
    phase: SessionPhase,
    tests: u16,
}

/// One live session as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub id: u64,
    pub client: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    pub phase: SessionPhase,
    pub age: Duration,
    pub tests: Vec<&'static str>,
}

#[derive(Default)]
pub struct SessionTable {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

impl SessionTable {
    /// Registers a session; it is listed until the handle drops.
    pub fn register(&self, client: SocketAddr) -> SessionHandle<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.live.lock().insert(
            id,
            Entry {
                client,
                orig_dst: None,
                started: Instant::now(),
                phase: SessionPhase::Greet,
                tests: 0,
            },
        );
        SessionHandle { table: self, id }
    }

    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    /// The handle of a session that was [detached](SessionHandle::detach).
    pub fn attach(&self, id: u64) -> SessionHandle<'_> {
        SessionHandle { table: self, id }
    }

    /// The live sessions, oldest first.
    pub fn snapshot(&self) -> Vec<SessionView> {
        let now = Instant::now();
        let mut views: Vec<SessionView> = self
            .live
            .lock()
            .iter()
            .map(|(id, e)| SessionView {
                id: *id,
                client: e.client,
                orig_dst: e.orig_dst,
                phase: e.phase,
                age: now.saturating_duration_since(e.started),
                tests: TESTS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| e.tests & (1 << i) != 0)
                    .map(|(_, t)| *t)
                    .collect(),
            })
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.live.lock().get_mut(&id) {
            f(entry);
        }
    }
}

/// A session's registration; dropping it unlists the session.
pub struct SessionHandle<'a> {
    table: &'a SessionTable,
    id: u64,
}

impl SessionHandle<'_> {
    pub fn set_phase(&self, phase: SessionPhase) {
        self.table.update(self.id, |e| e.phase = phase);
    }

    pub fn set_orig_dst(&self, dst: SocketAddr) {
        self.table.update(self.id, |e| e.orig_dst = Some(dst));
    }

    pub fn fired(&self, test: &str) {
        if let Some(bit) = TESTS.iter().position(|t| *t == test) {
            self.table.update(self.id, |e| e.tests |= 1 << bit);
        }
    }
}

impl SessionHandle<'_> {
    /// The session leaves its task for the holding pen: it stays listed,
    /// and comes back under its id with [`SessionTable::attach`].
    pub fn detach(self) -> u64 {
        let id = self.id;
        std::mem::forget(self);
        id
    }
}

impl Drop for SessionHandle<'_> {
    fn drop(&mut self) {
        self.table.live.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_listed_with_its_phase_and_tests_until_it_ends() {
        let table = SessionTable::default();
        let client: SocketAddr = "127.0.0.2:40000".parse().unwrap();
        let handle = table.register(client);
        handle.set_phase(SessionPhase::Watch);
        handle.fired("pregreet");
        handle.fired("pipelining");
        handle.fired("not-a-test");
        let views = table.snapshot();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].client, client);
        assert_eq!(views[0].phase.as_str(), "watch");
        assert_eq!(table.len(), 1);
        assert_eq!(views[0].tests, ["pregreet", "pipelining"]);
        drop(handle);
        assert!(table.snapshot().is_empty());
    }

    #[test]
    fn every_test_fits_the_mask() {
        assert!(TESTS.len() <= 16);
        for t in mxguard_smtp::Violation::TESTS {
            assert!(TESTS.contains(&t), "{t}");
        }
    }
}
