//! Sans-IO decisions: what to do about a client, given what it did.
//!
//! No sockets, no clock of its own: time is passed in. The daemon asks
//! these types whether a client is listed, whether it is over a limit,
//! how suspect it is, and what a detection turns into.
//!
//! Admission control (issue 4) is built from:
//! - `key`: a client's address and prefixes as compact keys;
//! - `bucket` and `limiter`: token buckets and connection caps per key;
//! - `prefix`, `prefix_file`, `lists`: allow/block CIDR tables with
//!   longest-prefix match, file parsing, and the combined verdict;
//! - `reputation`: decaying scores per client;
//! - `trend`: per-sender volume baselines;
//! - `anchor`: wall-clock records of that state for persistence.
//!
//! Every per-key table has a fixed maximum size and drops what carries no
//! information first (see `bounded`).
#![forbid(unsafe_code)]

pub mod action;
pub mod anchor;
pub mod blocklist;
mod bounded;
pub mod bucket;
pub mod error;
pub mod key;
pub mod limiter;
pub mod lists;
pub mod prefix;
pub mod prefix_file;
pub mod reputation;
mod ticks;
pub mod trend;
pub mod verdict;

pub use action::PregreetAction;
pub use anchor::TimeAnchor;
pub use blocklist::{BlockEntry, Blocklist};
pub use bounded::EvictionStats;
pub use bucket::{ConnectionCounts, ConnectionPermit, Decision, Quota, TokenBuckets};
pub use error::{Error, LineError, LineProblem, ListError};
pub use key::{canonical_ip, canonical_net, client_keys, ClientKey, Family, PrefixLength};
pub use limiter::{Admission, LimitKind, Limited, Limiter, LimiterConfig, PrefixQuota, Scope};
pub use lists::{ListVerdict, PrefixLists};
pub use prefix::{EntrySource, ListKind, PrefixEntry, PrefixMatch, PrefixRecord, PrefixTable};
pub use prefix_file::{parse_prefix, parse_prefix_list};
pub use reputation::{Reputation, ReputationRecord};
pub use trend::{TrendConfig, TrendDecision, TrendRecord, TrendTracker};
pub use verdict::Verdict;
