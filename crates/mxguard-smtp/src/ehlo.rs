//! Editing the EHLO reply the client sees.
//!
//! Some extensions must be hidden from the client:
//! - `PIPECONNECT` / `X_PIPE_CONNECT` (Exim's early pipelining): a client
//!   using it sends EHLO before the greeting, which is a pregreet here;
//! - `PIPELINING` when the operator wants every command to wait for its
//!   reply (any pipelining is then a violation);
//! - `STARTTLS` and `CHUNKING` for a suspect session whose mail must be
//!   tagged, quarantined or discarded: TLS would blind the guard, and BDAT
//!   chunks are simpler to refuse than to rewrite.
//!
//! The reply stays valid: the first line (the domain) is kept, and when the
//! last line is removed the new last line gets its `250 ` separator.

/// Which keywords to remove.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EhloEdit {
    pub pipelining: bool,
    pub starttls: bool,
    pub chunking: bool,
}

/// What the client was offered after the edit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offered {
    pub pipelining: bool,
    pub starttls: bool,
    pub chunking: bool,
    /// The MTA offered CHUNKING, shown to the client or not: whether it
    /// takes a BDAT's chunk as a chunk.
    pub upstream_chunking: bool,
}

/// Always hidden: early pipelining looks exactly like a pregreet.
const ALWAYS_HIDDEN: &[&str] = &["PIPECONNECT", "X_PIPE_CONNECT"];

/// Rewrites a complete EHLO reply (code 250, possibly multi-line).
pub fn edit_ehlo_reply(raw: &[u8], edit: EhloEdit) -> (Vec<u8>, Offered) {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    while let Some(lf) = memchr::memchr(b'\n', &raw[start..]) {
        lines.push(&raw[start..start + lf + 1]);
        start += lf + 1;
    }
    if start < raw.len() {
        lines.push(&raw[start..]);
    }
    let mut kept: Vec<&[u8]> = Vec::with_capacity(lines.len());
    let mut offered = Offered::default();
    for (i, line) in lines.iter().enumerate() {
        if i == 0 {
            kept.push(line);
            continue;
        }
        let keyword = keyword(line);
        offered.upstream_chunking |= keyword.eq_ignore_ascii_case("CHUNKING");
        let hide = ALWAYS_HIDDEN
            .iter()
            .any(|k| keyword.eq_ignore_ascii_case(k))
            || (edit.pipelining && keyword.eq_ignore_ascii_case("PIPELINING"))
            || (edit.starttls && keyword.eq_ignore_ascii_case("STARTTLS"))
            || (edit.chunking && keyword.eq_ignore_ascii_case("CHUNKING"));
        if hide {
            continue;
        }
        offered.pipelining |= keyword.eq_ignore_ascii_case("PIPELINING");
        offered.starttls |= keyword.eq_ignore_ascii_case("STARTTLS");
        offered.chunking |= keyword.eq_ignore_ascii_case("CHUNKING");
        kept.push(line);
    }
    let mut out = Vec::with_capacity(raw.len());
    let last = kept.len().saturating_sub(1);
    for (i, line) in kept.iter().enumerate() {
        out.extend_from_slice(line);
        if line.len() > 3 {
            let sep = out.len() - line.len() + 3;
            out[sep] = if i == last { b' ' } else { b'-' };
        }
    }
    (out, offered)
}

/// The EHLO keyword of a reply line: `250-PIPELINING\r\n` → `PIPELINING`.
fn keyword(line: &[u8]) -> &str {
    let text = line.get(4..).unwrap_or_default();
    let end = text
        .iter()
        .position(|b| matches!(b, b' ' | b'\r' | b'\n' | b'='))
        .unwrap_or(text.len());
    std::str::from_utf8(&text[..end]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSTFIX: &[u8] = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250-CHUNKING\r\n250 8BITMIME\r\n";

    #[test]
    fn nothing_to_hide_keeps_the_reply_byte_for_byte() {
        let (out, offered) = edit_ehlo_reply(POSTFIX, EhloEdit::default());
        assert_eq!(out, POSTFIX);
        assert!(offered.pipelining && offered.starttls && offered.chunking);
        assert!(offered.upstream_chunking);
    }

    #[test]
    fn hidden_keywords_go_and_the_reply_stays_valid() {
        let edit = EhloEdit {
            pipelining: true,
            starttls: true,
            chunking: true,
        };
        let (out, offered) = edit_ehlo_reply(POSTFIX, edit);
        assert_eq!(
            out,
            b"250-mx.example\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
        );
        assert_eq!(
            offered,
            Offered {
                upstream_chunking: true,
                ..Offered::default()
            },
            "hidden from the client, still the MTA's"
        );
    }

    #[test]
    fn removing_the_last_line_moves_the_end_marker() {
        let raw = b"250-mx.example\r\n250-8BITMIME\r\n250 PIPECONNECT\r\n";
        let (out, _) = edit_ehlo_reply(raw, EhloEdit::default());
        assert_eq!(out, b"250-mx.example\r\n250 8BITMIME\r\n");
    }

    #[test]
    fn exim_early_pipelining_is_always_hidden() {
        let raw = b"250-mx.example\r\n250-X_PIPE_CONNECT\r\n250-PIPELINING\r\n250 HELP\r\n";
        let (out, offered) = edit_ehlo_reply(raw, EhloEdit::default());
        assert_eq!(out, b"250-mx.example\r\n250-PIPELINING\r\n250 HELP\r\n");
        assert!(offered.pipelining);
    }

    #[test]
    fn a_one_line_reply_is_untouched() {
        let (out, _) = edit_ehlo_reply(b"250 mx.example\r\n", EhloEdit::default());
        assert_eq!(out, b"250 mx.example\r\n");
    }
}
