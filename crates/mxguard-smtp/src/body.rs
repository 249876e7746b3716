//! Following a DATA body to its end, and refusing to disagree about it.
//!
//! RFC 5321 §4.1.1.4: the body ends at `<CRLF>.<CRLF>`; lines starting with
//! a dot are dot-stuffed. SMTP smuggling (CVE-2023-51764/5/6) works because
//! some servers also end a body at look-alikes with a bare LF or bare CR
//! (`<LF>.<LF>`, `<CR><LF>.<LF>`, `<CR>.<CR>`, ...): what one server passes on
//! as content, the next takes for the end, and the rest of the "body" becomes
//! a second, forged transaction. The guard must end a message exactly where
//! the MTA will, so a dot line with any non-standard line break is never let
//! through as it is: the caller either rejects the message, or has it
//! normalised here into unambiguous content (the dot is stuffed and every
//! bare CR or LF becomes CRLF, as Postfix's `smtpd_forbid_bare_newline =
//! normalize` reads them).
//!
//! Scanning skips ordinary bytes with `memchr2`, so a large body costs a
//! pass of memchr and a copy.

use std::fmt;

/// A line break as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// The start of the body: as good as a CRLF.
    Begin,
    CrLf,
    /// A bare LF.
    Lf,
    /// A bare CR.
    Cr,
}

impl Break {
    fn as_str(self) -> &'static str {
        match self {
            Break::Begin | Break::CrLf => "<CR><LF>",
            Break::Lf => "<LF>",
            Break::Cr => "<CR>",
        }
    }
}

/// A dot line with at least one non-standard line break around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smuggling {
    pub before: Break,
    pub after: Break,
}

impl fmt::Display for Smuggling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.before.as_str(), self.after.as_str())
    }
}

/// What to do with a smuggling look-alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmugglingPolicy {
    /// Stop at it: the caller refuses the message.
    Reject,
    /// Rewrite it (and every bare line break) into unambiguous content.
    Normalize,
}

/// What one call to [`BodyScanner::feed`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    /// Input bytes consumed; with `ended`, up to and including the final
    /// `.<CRLF>`, and the rest of the input is commands again.
    pub consumed: usize,
    pub ended: bool,
    /// Bare CR or LF line breaks seen (outside smuggling look-alikes).
    pub bare_breaks: u32,
    /// A look-alike was seen. Under `Reject` scanning stopped right there.
    pub smuggling: Option<Smuggling>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line that followed this break.
    LineStart(Break),
    /// The line so far is `.`.
    Dot(Break),
    /// The line so far is `.<CR>`.
    DotCr(Break),
    /// Inside a line.
    Text,
    /// Inside a line, right after a CR.
    TextCr,
}

/// Follows one message body (after `354`) to its end.
#[derive(Debug, Clone)]
pub struct BodyScanner {
    state: State,
    policy: SmugglingPolicy,
}

impl BodyScanner {
    pub fn new(policy: SmugglingPolicy) -> Self {
        Self {
            state: State::LineStart(Break::Begin),
            policy,
        }
    }

    /// Scans `input`. `wire` receives what the MTA must get (the input as
    /// is, or normalised); `content`, when given, the message as the client
    /// meant it: unstuffed, CRLF line ends, without the final dot line.
    pub fn feed(
        &mut self,
        input: &[u8],
        wire: &mut Vec<u8>,
        mut content: Option<&mut Vec<u8>>,
    ) -> Scan {
        let normalize = self.policy == SmugglingPolicy::Normalize;
        let mut scan = Scan::default();
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Text => {
                    // The fast path: copy ordinary bytes in bulk, whole
                    // lines at a time (see `clean_run`).
                    let rest = &input[i..];
                    let n = clean_run(rest);
                    wire.extend_from_slice(&rest[..n]);
                    if let Some(c) = content.as_deref_mut() {
                        c.extend_from_slice(&rest[..n]);
                    }
                    i += n;
                    if i == input.len() {
                        break;
                    }
                    let b = input[i];
                    i += 1;
                    if b == b'\r' {
                        if !normalize {
                            wire.push(b'\r');
                        }
                        self.state = State::TextCr;
                    } else {
                        scan.bare_breaks += 1;
                        self.line_break(Break::Lf, normalize, wire, content.as_deref_mut());
                    }
                }
                State::TextCr => {
                    if input[i] == b'\n' {
                        i += 1;
                        if normalize {
                            wire.extend_from_slice(b"\r\n");
                        } else {
                            wire.push(b'\n');
                        }
                        push(content.as_deref_mut(), b"\r\n");
                        self.state = State::LineStart(Break::CrLf);
                    } else {
                        // A bare CR ends the line for lenient readers.
                        scan.bare_breaks += 1;
                        self.line_break(Break::Cr, normalize, wire, content.as_deref_mut());
                    }
                }
                State::LineStart(before) => {
                    let b = input[i];
                    if b == b'.' {
                        i += 1;
                        self.state = State::Dot(before);
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot(before) => {
                    let b = input[i];
                    match b {
                        b'\r' => {
                            i += 1;
                            self.state = State::DotCr(before);
                        }
                        b'\n' => {
                            i += 1;
                            let seq = Smuggling {
                                before,
                                after: Break::Lf,
                            };
                            if self.smuggled(seq, &mut scan, wire, content.as_deref_mut()) {
                                scan.consumed = i;
                                return scan;
                            }
                        }
                        _ => {
                            // A stuffed line (`..x`) or a dot line with text:
                            // the leading dot is transparency, not content.
                            wire.push(b'.');
                            self.state = State::Text;
                        }
                    }
                }
                State::DotCr(before) => {
                    if input[i] == b'\n' {
                        i += 1;
                        if matches!(before, Break::Begin | Break::CrLf) {
                            wire.extend_from_slice(b".\r\n");
                            self.state = State::LineStart(Break::Begin);
                            scan.ended = true;
                            scan.consumed = i;
                            return scan;
                        }
                        let seq = Smuggling {
                            before,
                            after: Break::CrLf,
                        };
                        if self.smuggled(seq, &mut scan, wire, content.as_deref_mut()) {
                            scan.consumed = i;
                            return scan;
                        }
                    } else {
                        let seq = Smuggling {
                            before,
                            after: Break::Cr,
                        };
                        if self.smuggled(seq, &mut scan, wire, content.as_deref_mut()) {
                            scan.consumed = i;
                            return scan;
                        }
                    }
                }
            }
        }
        scan.consumed = input.len();
        scan
    }

    /// Ends the current line with `brk` (bare CR or LF).
    fn line_break(
        &mut self,
        brk: Break,
        normalize: bool,
        wire: &mut Vec<u8>,
        content: Option<&mut Vec<u8>>,
    ) {
        match (normalize, brk) {
            (true, _) => wire.extend_from_slice(b"\r\n"),
            (false, Break::Lf) => wire.push(b'\n'),
            // The CR itself was already copied when it was seen.
            (false, _) => {}
        }
        push(content, b"\r\n");
        self.state = State::LineStart(brk);
    }

    /// Handles a look-alike; returns true when scanning must stop.
    fn smuggled(
        &mut self,
        seq: Smuggling,
        scan: &mut Scan,
        wire: &mut Vec<u8>,
        content: Option<&mut Vec<u8>>,
    ) -> bool {
        if scan.smuggling.is_none() {
            scan.smuggling = Some(seq);
        }
        if self.policy == SmugglingPolicy::Reject {
            return true;
        }
        // A dot line that is content: stuff it so no reader can take it for
        // the end.
        wire.extend_from_slice(b"..\r\n");
        push(content, b".\r\n");
        self.state = State::LineStart(seq.after);
        false
    }
}

/// How many bytes at the start of `text` (inside a line) go to the wire
/// and the content exactly as they are: text up to the first line break,
/// and on past every `<CR><LF>` whose next line does not start with a dot
/// (such a line changes nothing a line at a time would do). Stops at a
/// bare CR or LF, at a `<CR><LF>` before a dot, and at a `<CR><LF>` the
/// input ends with or in (the next byte decides); the state machine takes
/// it from there.
fn clean_run(text: &[u8]) -> usize {
    let mut from = 0;
    loop {
        let Some(k) = memchr::memchr2(b'\r', b'\n', &text[from..]) else {
            return text.len();
        };
        let at = from + k;
        let whole_line = text[at] == b'\r'
            && text.get(at + 1) == Some(&b'\n')
            && text.get(at + 2).is_some_and(|&next| next != b'.');
        if !whole_line {
            return at;
        }
        from = at + 2;
    }
}

fn push(content: Option<&mut Vec<u8>>, bytes: &[u8]) {
    if let Some(c) = content {
        c.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: SmugglingPolicy, chunks: &[&[u8]]) -> (Vec<u8>, Vec<u8>, Scan, usize) {
        let mut s = BodyScanner::new(policy);
        let mut wire = Vec::new();
        let mut content = Vec::new();
        let mut total = Scan::default();
        let mut rest_at = 0;
        for (k, chunk) in chunks.iter().enumerate() {
            let scan = s.feed(chunk, &mut wire, Some(&mut content));
            total.bare_breaks += scan.bare_breaks;
            total.smuggling = total.smuggling.or(scan.smuggling);
            if scan.ended || (scan.smuggling.is_some() && policy == SmugglingPolicy::Reject) {
                total.ended = scan.ended;
                rest_at = chunks[..k].iter().map(|c| c.len()).sum::<usize>() + scan.consumed;
                break;
            }
        }
        (wire, content, total, rest_at)
    }

    #[test]
    fn a_plain_body_passes_byte_for_byte_and_ends_at_crlf_dot_crlf() {
        let body = b"Subject: x\r\n\r\nhello\r\n..stuffed\r\n.\r\nQUIT\r\n";
        let (wire, content, scan, rest) = run(SmugglingPolicy::Reject, &[body]);
        assert!(scan.ended);
        assert_eq!(wire, &body[..body.len() - 6]);
        assert_eq!(content, b"Subject: x\r\n\r\nhello\r\n.stuffed\r\n");
        assert_eq!(&body[rest..], b"QUIT\r\n");
        assert_eq!(scan.smuggling, None);
    }

    #[test]
    fn the_end_is_found_across_any_split() {
        let body = b"a\r\n.b\r\n\r\n.\r\nNEXT";
        for split in 0..body.len() {
            let (wire, content, scan, rest) =
                run(SmugglingPolicy::Reject, &[&body[..split], &body[split..]]);
            assert!(scan.ended, "split {split}");
            assert_eq!(wire, &body[..body.len() - 4], "split {split}");
            assert_eq!(content, b"a\r\nb\r\n\r\n", "split {split}");
            assert_eq!(&body[rest..], b"NEXT", "split {split}");
        }
    }

    #[test]
    fn an_empty_message_ends_at_once() {
        let (wire, content, scan, _) = run(SmugglingPolicy::Reject, &[b".\r\n"]);
        assert!(scan.ended);
        assert_eq!(wire, b".\r\n");
        assert!(content.is_empty());
    }

    #[test]
    fn every_published_look_alike_is_caught() {
        let cases: &[(&[u8], &str)] = &[
            (b"x\n.\nMAIL FROM:<a@b>\r\n", "<LF>.<LF>"),
            (b"x\r\n.\nMAIL", "<CR><LF>.<LF>"),
            (b"x\n.\r\nMAIL", "<LF>.<CR><LF>"),
            (b"x\r.\rMAIL", "<CR>.<CR>"),
            (b"x\r\n.\rMAIL", "<CR><LF>.<CR>"),
            (b"x\r.\r\nMAIL", "<CR>.<CR><LF>"),
            (b".\nMAIL", "<CR><LF>.<LF>"),
        ];
        for (body, seq) in cases {
            let (_, _, scan, _) = run(SmugglingPolicy::Reject, &[body]);
            assert!(!scan.ended, "{seq}");
            assert_eq!(scan.smuggling.map(|s| s.to_string()).as_deref(), Some(*seq));
        }
    }

    #[test]
    fn normalising_makes_look_alikes_content_that_no_reader_ends_at() {
        let body = b"x\n.\nMAIL FROM:<evil@x>\r\n\r\n.\r\nQUIT\r\n";
        let (wire, content, scan, rest) = run(SmugglingPolicy::Normalize, &[body]);
        assert!(scan.ended);
        assert_eq!(wire, b"x\r\n..\r\nMAIL FROM:<evil@x>\r\n\r\n.\r\n");
        assert_eq!(content, b"x\r\n.\r\nMAIL FROM:<evil@x>\r\n\r\n");
        assert_eq!(&body[rest..], b"QUIT\r\n");
        assert!(scan.smuggling.is_some());
        // The only CRLF.CRLF in what the MTA gets is the real end.
        let ends = wire.windows(5).filter(|w| w == b"\r\n.\r\n").count();
        assert_eq!(ends, 1);
    }

    #[test]
    fn bare_line_breaks_are_counted_and_normalised() {
        let (wire, _, scan, _) = run(SmugglingPolicy::Normalize, &[b"a\nb\rc\r\n.\r\n"]);
        assert_eq!(scan.bare_breaks, 2);
        assert_eq!(wire, b"a\r\nb\r\nc\r\n.\r\n");
        let (wire, _, scan, _) = run(SmugglingPolicy::Reject, &[b"a\nb\rc\r\n.\r\n"]);
        assert_eq!(scan.bare_breaks, 2);
        assert_eq!(wire, b"a\nb\rc\r\n.\r\n");
    }

    #[test]
    fn a_dot_at_the_start_of_a_line_with_text_is_not_an_end() {
        let (_, content, scan, _) = run(SmugglingPolicy::Reject, &[b".hidden\r\n.\r\n"]);
        assert!(scan.ended);
        assert_eq!(content, b"hidden\r\n");
    }
}
