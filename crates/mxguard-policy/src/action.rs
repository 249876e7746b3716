//! What the operator chose to do about a detection.

use serde::{Deserialize, Serialize};

/// The answer to a client that talked before the greeting ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PregreetAction {
    /// `554 5.7.1`, close, and blocklist the address for a while.
    #[default]
    Reject,
    /// Close without a word: cheapest against floods.
    Drop,
    /// Log and count, then let the session go on as if nothing happened.
    Observe,
}

impl PregreetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reject => "reject",
            Self::Drop => "drop",
            Self::Observe => "observe",
        }
    }
}

impl std::str::FromStr for PregreetAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reject" => Ok(Self::Reject),
            "drop" => Ok(Self::Drop),
            "observe" => Ok(Self::Observe),
            other => Err(format!(
                "unknown pregreet action `{other}` (expected reject, drop or observe)"
            )),
        }
    }
}
