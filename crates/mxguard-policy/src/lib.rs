//! Sans-IO decisions: what to do about a client, given what it did.
//!
//! No sockets, no clock of its own: time is passed in. The daemon asks
//! these types whether a client is listed and what a detection turns into.
#![forbid(unsafe_code)]

pub mod action;
pub mod blocklist;
pub mod verdict;

pub use action::PregreetAction;
pub use blocklist::{BlockEntry, Blocklist};
pub use verdict::Verdict;
