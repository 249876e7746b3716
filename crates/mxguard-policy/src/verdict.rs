//! How a session ended, as logged and counted.

/// The outcome of one connection. The set is closed so it can label a
/// metric (never the client's address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Relayed to the upstream to the end.
    Pass,
    /// Answered 554 and closed.
    Reject,
    /// Closed without a reply.
    Drop,
    /// Refused at once: on the blocklist.
    Blocked,
    /// The client hung up before the greeting ended.
    Hangup,
    /// Answered 421: the upstream was unavailable, try later.
    Tempfail,
    /// The connection's destination was the guard itself.
    Loop,
    /// Something failed on our side or a peer's mid-session.
    Error,
    /// Relayed, its mail tagged as suspect.
    Tag,
    /// Relayed with every reply slowed down.
    Tarpit,
    /// Its mail was stored apart, not delivered.
    Quarantine,
    /// Its mail was accepted and dropped.
    Discard,
}

impl Verdict {
    pub const ALL: [Verdict; 12] = [
        Self::Pass,
        Self::Reject,
        Self::Drop,
        Self::Blocked,
        Self::Hangup,
        Self::Tempfail,
        Self::Loop,
        Self::Error,
        Self::Tag,
        Self::Tarpit,
        Self::Quarantine,
        Self::Discard,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Reject => "reject",
            Self::Drop => "drop",
            Self::Blocked => "blocked",
            Self::Hangup => "hangup",
            Self::Tempfail => "tempfail",
            Self::Loop => "loop",
            Self::Error => "error",
            Self::Tag => "tag",
            Self::Tarpit => "tarpit",
            Self::Quarantine => "quarantine",
            Self::Discard => "discard",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
