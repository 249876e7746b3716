//! Quarantine ids: unique, sortable by time, and safe as a file name.
//!
//! An id is the UTC time the message was received, to the microsecond, and
//! 64 random bits: `20260501T101502.123456Z-9f86d081884c7d65`. It is the
//! file's name, so an id typed on the command line (or sent to the admin
//! API later) is only ever accepted when it has exactly this shape: no `/`,
//! no `..`, nothing a path could be made of.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `YYYYMMDDTHHMMSS.ffffffZ` (23) + `-` + 16 lowercase hex digits.
const LEN: usize = 40;

/// The id of one quarantined message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QuarantineId(String);

impl QuarantineId {
    /// A fresh id for a message received at `at`, with the same time in
    /// RFC 3339 (`2026-05-01T10:15:02.123456Z`) for the metadata.
    pub fn generate(at: SystemTime) -> (Self, String) {
        let rfc3339 = humantime::format_rfc3339_micros(at).to_string();
        let compact: String = rfc3339
            .chars()
            .filter(|c| !matches!(c, '-' | ':'))
            .collect();
        let id = Self(format!("{compact}-{:016x}", random_u64()));
        debug_assert!(is_valid(&id.0), "generated a malformed id {}", id.0);
        (id, rfc3339)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// 64 bits no other message in any process will draw. The standard
/// library's `RandomState` is keyed from the OS's random source once per
/// thread; hashing a process-wide counter, the pid and the clock through it
/// gives unpredictable, distinct values without another dependency. Two
/// ids would also have to share the microsecond to collide, and the store
/// refuses to overwrite (`link(2)` fails on an existing name) even then.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

fn is_valid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == LEN
        && b.iter().enumerate().all(|(i, &c)| match i {
            0..=7 | 9..=14 | 16..=21 => c.is_ascii_digit(),
            8 => c == b'T',
            15 => c == b'.',
            22 => c == b'Z',
            23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// An id that does not have the exact shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a quarantine id (expected e.g. 20260501T101502.123456Z-9f86d081884c7d65)")]
pub struct BadId(pub String);

impl FromStr for QuarantineId {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
        if is_valid(s) {
            Ok(Self(s.to_owned()))
        } else {
            // The rejected text goes into an error message: keep it short
            // and printable.
            Err(BadId(mxguard_smtp::escape_capped(s.as_bytes(), 64)))
        }
    }
}

impl fmt::Display for QuarantineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for QuarantineId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for QuarantineId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_generated_id_reads_back_and_carries_its_time() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_777_630_502_123_456);
        let (id, received) = QuarantineId::generate(at);
        assert_eq!(received, "2026-05-01T10:15:02.123456Z");
        assert!(id.as_str().starts_with("20260501T101502.123456Z-"), "{id}");
        assert_eq!(id.as_str().parse::<QuarantineId>().unwrap(), id);
    }

    #[test]
    fn ids_of_the_same_instant_differ_and_sort_by_time() {
        let at = SystemTime::now();
        let (a, _) = QuarantineId::generate(at);
        let (b, _) = QuarantineId::generate(at);
        assert_ne!(a, b);
        let (later, _) = QuarantineId::generate(at + Duration::from_secs(1));
        assert!(a < later && b < later);
    }

    #[test]
    fn anything_but_the_exact_shape_is_refused() {
        for bad in [
            "",
            "..",
            "../../etc/passwd",
            "20260501T101502.123456Z-9f86d081884c7d6",
            "20260501T101502.123456Z-9f86d081884c7d655",
            "20260501T101502.123456Z-9F86D081884C7D65",
            "20260501T101502.123456Z/9f86d081884c7d65",
            "20260501T101502.123456Z-9f86d081884c7d6/",
            "2026050XT101502.123456Z-9f86d081884c7d65",
            "../60501T101502.123456Z-9f86d081884c7d65",
            "20260501T101502.123456Z-9f86d081884c7d6\n",
            "20260501T101502.123456Z-9f86d081884c7d6\u{e9}",
        ] {
            assert!(bad.parse::<QuarantineId>().is_err(), "accepted {bad:?}");
        }
        let err = "a\r\nb".parse::<QuarantineId>().unwrap_err();
        assert!(err.to_string().contains("a\\r\\nb"), "{err}");
    }
}
