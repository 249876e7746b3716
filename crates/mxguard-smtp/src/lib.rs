//! Sans-IO SMTP pieces for the guard: bytes and instants in, facts out.
//!
//! Nothing here owns a socket, a task or a clock. The daemon feeds what it
//! read and when; these types say what it means for the session: whether the
//! client spoke before its turn ([`PregreetWatch`]), what the upstream's
//! reply was ([`ReplyReader`]), and which bytes the client must see as its
//! greeting ([`GreetingPlan`]). Every rule is therefore testable with exact
//! bytes and exact instants.
#![forbid(unsafe_code)]

pub mod body;
pub mod command;
pub mod ehlo;
pub mod escape;
pub mod greeting;
pub mod line;
pub mod pregreet;
pub mod reply;
pub mod tracker;

pub use body::{BodyScanner, Smuggling, SmugglingPolicy};
pub use command::Verb;
pub use escape::escape_capped;
pub use greeting::{
    blocked_reply, challenge_line, closing_reply, plan_greeting, pregreet_reject_reply,
    tempfail_reply, GreetingPlan, UpstreamGreeting,
};
pub use line::{find_line_end, LineEnd};
pub use pregreet::{Pregreet, PregreetWatch};
pub use reply::{Reply, ReplyError, ReplyReader};
pub use tracker::{
    Disposition, Envelope, Event, ReplyDelays, TrackerConfig, TurnTracker, Violation,
};
