//! Catching clients that talk before the greeting ends.
//!
//! RFC 5321 §3.1: the client waits for the server's greeting. Any byte that
//! arrives before the final greeting line went out means the client did not
//! wait: ratware firing a canned transaction, or a spoofed, blind connection
//! that cannot see our replies at all. Like postscreen's PREGREET test, the
//! watch records when it happened and the first bytes, escaped and capped.

use std::time::{Duration, Instant};

use crate::escape::escape_capped;

/// A client spoke before its turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pregreet {
    /// Time from accept to the first early byte.
    pub after: Duration,
    /// Early bytes seen so far.
    pub bytes: u64,
    /// The first of them, escaped for a log line.
    pub first_bytes: String,
}

impl std::fmt::Display for Pregreet {
    /// postscreen's shape: `PREGREET 11 after 0.19`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PREGREET {} after {:.2}",
            self.bytes,
            self.after.as_secs_f64()
        )
    }
}

/// Watches client bytes until the final greeting line has been sent.
#[derive(Debug)]
pub struct PregreetWatch {
    connected_at: Instant,
    cap: usize,
    first_at: Option<Instant>,
    bytes: u64,
    capture: Vec<u8>,
}

impl PregreetWatch {
    /// Starts watching a connection accepted at `connected_at`, keeping at
    /// most `cap` early bytes as evidence.
    pub fn new(connected_at: Instant, cap: usize) -> Self {
        Self {
            connected_at,
            cap,
            first_at: None,
            bytes: 0,
            capture: Vec::new(),
        }
    }

    /// Client bytes arrived at `now`, before the greeting ended. Returns the
    /// event the first time the client talks early; later bytes only add to
    /// the count and the capture.
    #[must_use]
    pub fn on_early_bytes(&mut self, now: Instant, bytes: &[u8]) -> Option<Pregreet> {
        if bytes.is_empty() {
            return None;
        }
        self.bytes += bytes.len() as u64;
        let room = self.cap.saturating_sub(self.capture.len());
        self.capture
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        if self.first_at.is_some() {
            return None;
        }
        self.first_at = Some(now);
        self.current()
    }

    /// The event as it stands (with every early byte counted), if any.
    pub fn current(&self) -> Option<Pregreet> {
        let first_at = self.first_at?;
        Some(Pregreet {
            after: first_at.saturating_duration_since(self.connected_at),
            bytes: self.bytes,
            first_bytes: escape_capped(&self.capture, self.cap),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_early_bytes_make_one_event_with_time_and_text() {
        let t0 = Instant::now();
        let mut watch = PregreetWatch::new(t0, 100);
        let event = watch
            .on_early_bytes(t0 + Duration::from_millis(190), b"EHLO x\r\n")
            .unwrap();
        assert_eq!(event.after, Duration::from_millis(190));
        assert_eq!(event.bytes, 8);
        assert_eq!(event.first_bytes, "EHLO x\\r\\n");
        assert_eq!(event.to_string(), "PREGREET 8 after 0.19");
        assert_eq!(
            watch.on_early_bytes(t0 + Duration::from_millis(200), b"MAIL"),
            None
        );
        assert_eq!(watch.current().unwrap().bytes, 12);
    }

    #[test]
    fn capture_is_capped_but_count_is_not() {
        let t0 = Instant::now();
        let mut watch = PregreetWatch::new(t0, 4);
        let _ = watch.on_early_bytes(t0, &[b'A'; 1000]);
        let _ = watch.on_early_bytes(t0, &[0u8; 1000]);
        let event = watch.current().unwrap();
        assert_eq!(event.bytes, 2000);
        assert_eq!(event.first_bytes, "AAAA");
    }

    #[test]
    fn silence_is_no_event() {
        let t0 = Instant::now();
        let mut watch = PregreetWatch::new(t0, 100);
        assert_eq!(watch.on_early_bytes(t0, b""), None);
        assert_eq!(watch.current(), None);
    }
}
