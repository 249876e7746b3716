//! What the operator chose to do about a detection.
//!
//! Every test (pregreet, pipelining, non-SMTP, ...) has an action. Some end
//! the session (`reject`, `drop`, `tempfail`), some slow it (`tarpit`), some
//! decide what becomes of its mail (`tag`, `quarantine`, `discard`), and
//! `observe` only logs and counts. When several tests fire, the strongest
//! action wins ([`Action::strength`]).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Log and count, then let the session go on as if nothing happened.
    Observe,
    /// Let the mail through with a header saying why it is suspect.
    Tag,
    /// Slow every reply down: cheap for us, expensive for a bot.
    Tarpit,
    /// Accept each message, store it apart, never deliver it.
    Quarantine,
    /// Accept each message and drop it.
    Discard,
    /// `421`/`451`: the sender retries later; a real MTA will.
    Tempfail,
    /// `554 5.7.1`, close, and blocklist the address for a while.
    #[default]
    Reject,
    /// Close without a word: cheapest against floods.
    Drop,
}

/// The action for a client that talked before the greeting ended.
pub type PregreetAction = Action;

impl Action {
    pub const ALL: [Action; 8] = [
        Action::Observe,
        Action::Tag,
        Action::Tarpit,
        Action::Quarantine,
        Action::Discard,
        Action::Tempfail,
        Action::Reject,
        Action::Drop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Observe => "observe",
            Action::Tag => "tag",
            Action::Tarpit => "tarpit",
            Action::Quarantine => "quarantine",
            Action::Discard => "discard",
            Action::Tempfail => "tempfail",
            Action::Reject => "reject",
            Action::Drop => "drop",
        }
    }

    /// Ordering for "the strongest action wins".
    pub fn strength(self) -> u8 {
        match self {
            Action::Observe => 0,
            Action::Tag => 1,
            Action::Tarpit => 2,
            Action::Quarantine => 3,
            Action::Discard => 4,
            Action::Tempfail => 5,
            Action::Reject => 6,
            Action::Drop => 7,
        }
    }

    /// The session ends at once.
    pub fn ends_session(self) -> bool {
        matches!(self, Action::Tempfail | Action::Reject | Action::Drop)
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown action `{s}` (expected one of observe, tag, tarpit, quarantine, discard, tempfail, reject, drop)"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        assert!("nuke".parse::<Action>().is_err());
    }

    #[test]
    fn the_strongest_action_wins() {
        let mut sorted = Action::ALL;
        sorted.sort_by_key(|a| a.strength());
        assert_eq!(sorted, Action::ALL);
        assert!(Action::Reject.ends_session() && !Action::Quarantine.ends_session());
    }
}
