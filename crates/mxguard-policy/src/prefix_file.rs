//! Reading CIDR list files: one prefix or address a line.
//!
//! ```text
//! # partners: never limited
//! 192.0.2.0/24        # the relay farm
//! 2001:db8:100::/48
//! 198.51.100.7        # a bare address is a /32 (or a /128)
//! ```
//!
//! `#` starts a comment; the comment on an entry's line becomes its
//! reason. Host bits are cleared (`192.0.2.7/24` is `192.0.2.0/24`), and
//! IPv4-mapped IPv6 ranges are read as IPv4. Every bad line is reported
//! with its number, and a file with any bad line is refused whole, so a
//! reload never runs on half a list.
//!
//! The text is passed in: reading the file is the daemon's business.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::error::{LineError, LineProblem, ListError};
use crate::key::canonical_net;
use crate::prefix::{EntrySource, ListKind, PrefixEntry};

/// How much of a bad line an error quotes.
const QUOTE_CHARS: usize = 60;

/// The entries of a list file. Lines without a comment share one entry
/// (`kind`, `source`, `reason`), so a big file costs little per line.
pub fn parse_prefix_list(
    text: &str,
    kind: ListKind,
    source: EntrySource,
    reason: &str,
) -> Result<Vec<(IpNet, Arc<PrefixEntry>)>, ListError> {
    let shared = Arc::new(PrefixEntry::new(kind, source, reason));
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let (body, comment) = match line.split_once('#') {
            Some((body, comment)) => (body.trim(), comment.trim()),
            None => (line.trim(), ""),
        };
        if body.is_empty() {
            continue;
        }
        match parse_prefix(body) {
            Ok(net) => {
                let entry = if comment.is_empty() {
                    Arc::clone(&shared)
                } else {
                    Arc::new(PrefixEntry::new(kind, source, comment))
                };
                entries.push((net, entry));
            }
            Err(problem) => bad.push(LineError {
                line: i + 1,
                text: body.chars().take(QUOTE_CHARS).collect(),
                problem,
            }),
        }
    }
    if bad.is_empty() {
        Ok(entries)
    } else {
        Err(ListError { lines: bad })
    }
}

/// One prefix or bare address, canonical.
pub fn parse_prefix(text: &str) -> Result<IpNet, LineProblem> {
    let mut words = text.split_whitespace();
    let word = words.next().ok_or(LineProblem::NotAnAddress)?;
    if words.next().is_some() {
        return Err(LineProblem::TrailingText);
    }
    let (addr, len) = match word.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (word, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| LineProblem::NotAnAddress)?;
    let max = match addr {
        IpAddr::V4(_) => 32u8,
        IpAddr::V6(_) => 128,
    };
    let len = match len {
        None => max,
        Some(len) => {
            // Digits only: `u32::from_str` would take a `+`.
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                return Err(LineProblem::BadLength);
            }
            let n: u32 = len
                .parse()
                .map_err(|_| LineProblem::LengthTooLong { len: u32::MAX, max })?;
            u8::try_from(n)
                .ok()
                .filter(|n| *n <= max)
                .ok_or(LineProblem::LengthTooLong { len: n, max })?
        }
    };
    let net = IpNet::new(addr, len).map_err(|_| LineProblem::LengthTooLong {
        len: u32::from(len),
        max,
    })?;
    Ok(canonical_net(net))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn parse(text: &str) -> Result<Vec<(IpNet, Arc<PrefixEntry>)>, ListError> {
        parse_prefix_list(text, ListKind::Block, EntrySource::File, "block.txt")
    }

    #[test]
    fn a_list_with_comments_blank_lines_and_bare_addresses() {
        let text = "\u{feff}# a block list\r\n\
                    \r\n\
                    192.0.2.0/24    # snowshoe run\r\n\
                    198.51.100.7\n\
                    \t2001:db8::/32\n\
                    2001:db8:1::1\n\
                    203.0.113.77/24\n\
                    ::ffff:10.0.0.0/104  # mapped\n\
                    # the end";
        let entries = parse(text).unwrap();
        let nets: Vec<String> = entries.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            nets,
            [
                "192.0.2.0/24",
                "198.51.100.7/32",
                "2001:db8::/32",
                "2001:db8:1::1/128",
                "203.0.113.0/24",
                "10.0.0.0/8"
            ]
        );
        assert_eq!(entries[0].1.reason, "snowshoe run");
        assert_eq!(entries[1].1.reason, "block.txt");
        assert!(
            Arc::ptr_eq(&entries[1].1, &entries[2].1),
            "uncommented lines share an entry"
        );
        assert_eq!(entries[1].1.kind, ListKind::Block);
        assert_eq!(entries[1].1.until, None);
    }

    #[test]
    fn bad_lines_are_reported_all_at_once_with_their_numbers() {
        let text = "192.0.2.0/24\n\
                    192.0.2.0/33\n\
                    \n\
                    example.com\n\
                    10.0.0.1 10.0.0.2\n\
                    10.0.0.0/x   # typo\n\
                    2001:db8::/129\n\
                    10.0.0.0/+8\n\
                    10.0.0.0/99999999999\n\
                    10.0.0.0/\n";
        let err = parse(text).unwrap_err();
        let got: Vec<(usize, LineProblem)> =
            err.lines.iter().map(|l| (l.line, l.problem)).collect();
        assert_eq!(
            got,
            [
                (2, LineProblem::LengthTooLong { len: 33, max: 32 }),
                (4, LineProblem::NotAnAddress),
                (5, LineProblem::TrailingText),
                (6, LineProblem::BadLength),
                (7, LineProblem::LengthTooLong { len: 129, max: 128 }),
                (8, LineProblem::BadLength),
                (
                    9,
                    LineProblem::LengthTooLong {
                        len: u32::MAX,
                        max: 32
                    }
                ),
                (10, LineProblem::BadLength),
            ]
        );
        assert_eq!(err.lines[3].text, "10.0.0.0/x", "the comment is not quoted");
        let message = Error::from(err).to_string();
        assert!(
            message.starts_with("8 bad lines: line 2: prefix length /33 is longer"),
            "{message}"
        );
        assert!(
            message.contains("line 4: not an IP address: `example.com`"),
            "{message}"
        );
        assert!(message.ends_with("; and 3 more"), "{message}");
    }

    #[test]
    fn an_empty_file_is_an_empty_list() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("# nothing yet\n\n   \n").unwrap().is_empty());
    }
}
