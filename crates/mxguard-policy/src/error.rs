//! The one error type of this crate: bad settings and bad list files.
//!
//! A client's misbehaviour is never an error here (it is a decision); these
//! are the operator's mistakes, reported so a reload can refuse them and
//! keep the running configuration.

use std::fmt;

/// What went wrong building policy state from the operator's input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting out of its range, e.g. a rate of zero or a /40 for IPv4.
    #[error("{setting}: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
    /// A prefix list file had lines that are not prefixes.
    #[error(transparent)]
    List(#[from] ListError),
    /// The dynamic list is at its size and none of its entries may go:
    /// every one is permanent (no expiry).
    #[error("the dynamic list holds {max} entries that never expire; none can make room")]
    ListFull { max: usize },
}

impl Error {
    pub(crate) fn invalid(setting: &'static str, problem: impl Into<String>) -> Self {
        Self::Invalid {
            setting,
            problem: problem.into(),
        }
    }
}

/// Every bad line of one list file, so the operator can fix them all in
/// one go rather than one per reload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ListError {
    pub lines: Vec<LineError>,
}

/// How many bad lines the message spells out; the rest are counted.
const LINES_SHOWN: usize = 5;

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.lines.len();
        write!(f, "{n} bad line{}", if n == 1 { "" } else { "s" })?;
        for (i, line) in self.lines.iter().take(LINES_SHOWN).enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{line}")?;
        }
        if n > LINES_SHOWN {
            write!(f, "; and {} more", n - LINES_SHOWN)?;
        }
        Ok(())
    }
}

/// One line of a list file that is not a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}: `{text}`")]
pub struct LineError {
    /// 1-based, as editors count.
    pub line: usize,
    /// The offending text (without its comment), cut to a readable length.
    pub text: String,
    pub problem: LineProblem,
}

/// Why a line is not a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    #[error("not an IP address")]
    NotAnAddress,
    #[error("prefix length is not a number")]
    BadLength,
    #[error("prefix length /{len} is longer than the address ({max} bits)")]
    LengthTooLong { len: u32, max: u8 },
    #[error("text after the prefix (write a reason after `#`)")]
    TrailingText,
}
