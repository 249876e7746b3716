//! What a client's command line is, as far as turn-taking cares.
//!
//! The guard does not parse mail. It reads the verb of each command line to
//! know which reply the client must wait for (RFC 2920 §3.1: EHLO, DATA,
//! VRFY, EXPN, TURN, QUIT and NOOP end a pipeline group; so do STARTTLS
//! (RFC 3207 §4.2) and AUTH (RFC 4954 §4)), and it recognises traffic that is
//! not SMTP at all: HTTP requests and headers (a proxy abused to reach port
//! 25), and a TLS ClientHello sent to the plaintext port.

/// The command verbs the guard distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Ehlo,
    Helo,
    Lhlo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Vrfy,
    Expn,
    Help,
    Noop,
    Quit,
    StartTls,
    Auth,
    Turn,
    Etrn,
    Atrn,
    /// XCLIENT, XFORWARD and other extensions the MTA may know.
    Extension,
    /// Not an SMTP verb at all.
    Unknown,
}

impl Verb {
    /// Reads the verb at the start of a command line (case-insensitive).
    /// Blanks before it are skipped, as Postfix's and Exim's parsers skip
    /// them: the guard must read the command the MTA will act on (a
    /// `" MAIL"` read as unknown went past the sender checks).
    pub fn parse(line: &[u8]) -> Verb {
        let blanks = line
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t'))
            .unwrap_or(line.len());
        let line = &line[blanks..];
        let end = line
            .iter()
            .position(|b| matches!(b, b' ' | b'\r' | b'\n' | b'\t'))
            .unwrap_or(line.len());
        let word = &line[..end];
        let is = |name: &str| word.eq_ignore_ascii_case(name.as_bytes());
        match word.len() {
            4 if is("EHLO") => Verb::Ehlo,
            4 if is("HELO") => Verb::Helo,
            4 if is("LHLO") => Verb::Lhlo,
            4 if is("MAIL") => Verb::Mail,
            4 if is("RCPT") => Verb::Rcpt,
            4 if is("DATA") => Verb::Data,
            4 if is("BDAT") => Verb::Bdat,
            4 if is("RSET") => Verb::Rset,
            4 if is("VRFY") => Verb::Vrfy,
            4 if is("EXPN") => Verb::Expn,
            4 if is("HELP") => Verb::Help,
            4 if is("NOOP") => Verb::Noop,
            4 if is("QUIT") => Verb::Quit,
            4 if is("AUTH") => Verb::Auth,
            4 if is("TURN") => Verb::Turn,
            4 if is("ETRN") => Verb::Etrn,
            4 if is("ATRN") => Verb::Atrn,
            8 if is("STARTTLS") => Verb::StartTls,
            _ if word.len() >= 2
                && word[0].eq_ignore_ascii_case(&b'X')
                && word
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-') =>
            {
                Verb::Extension
            }
            _ => Verb::Unknown,
        }
    }

    /// Must be the last command of a pipeline group: the client waits for
    /// its reply before sending anything else (RFC 2920 §3.1, RFC 3207,
    /// RFC 4954, RFC 3030 for BDAT LAST handled by the caller).
    pub fn ends_group(self) -> bool {
        !matches!(self, Verb::Mail | Verb::Rcpt | Verb::Rset | Verb::Bdat)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Ehlo => "EHLO",
            Verb::Helo => "HELO",
            Verb::Lhlo => "LHLO",
            Verb::Mail => "MAIL",
            Verb::Rcpt => "RCPT",
            Verb::Data => "DATA",
            Verb::Bdat => "BDAT",
            Verb::Rset => "RSET",
            Verb::Vrfy => "VRFY",
            Verb::Expn => "EXPN",
            Verb::Help => "HELP",
            Verb::Noop => "NOOP",
            Verb::Quit => "QUIT",
            Verb::StartTls => "STARTTLS",
            Verb::Auth => "AUTH",
            Verb::Turn => "TURN",
            Verb::Etrn => "ETRN",
            Verb::Atrn => "ATRN",
            Verb::Extension => "X-EXTENSION",
            Verb::Unknown => "UNKNOWN",
        }
    }
}

/// Traffic that is not SMTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    /// An HTTP request line or header: an open proxy relaying to port 25.
    Http,
    /// A TLS record (ClientHello) on the plaintext port: usually a
    /// misconfigured real sender expecting implicit TLS, not a bot.
    TlsHandshake,
}

/// HTTP methods and headers that no SMTP client sends (postscreen's
/// non-SMTP command test looks for the same).
const HTTP_PREFIXES: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"CONNECT ",
    b"PATCH ",
    b"TRACE ",
    b"HOST:",
    b"USER-AGENT:",
    b"ACCEPT:",
    b"CONTENT-TYPE:",
    b"CONTENT-LENGTH:",
    b"PROXY-CONNECTION:",
    b"CONNECTION:",
    b"REFERER:",
];

/// How many of a line's first bytes [`foreign`] needs to be sure (the
/// longest prefix it looks for); a line's whole start if it is shorter.
pub const FOREIGN_NEEDS: usize = {
    let mut longest = 2;
    let mut i = 0;
    while i < HTTP_PREFIXES.len() {
        if HTTP_PREFIXES[i].len() > longest {
            longest = HTTP_PREFIXES[i].len();
        }
        i += 1;
    }
    longest
};

/// Recognises the start of a command line that is not SMTP. Needs only the
/// first bytes of the line ([`FOREIGN_NEEDS`]).
pub fn foreign(line_start: &[u8]) -> Option<Foreign> {
    // TLS record: handshake (22), version 3.x.
    if line_start.len() >= 2 && line_start[0] == 0x16 && line_start[1] == 0x03 {
        return Some(Foreign::TlsHandshake);
    }
    // Every command goes through here: one byte compared per prefix, the
    // whole prefix only when the first letter matches.
    let first = line_start.first()?.to_ascii_uppercase();
    let is_http = HTTP_PREFIXES.iter().any(|p| {
        p[0] == first
            && line_start.len() >= p.len()
            && line_start[..p.len()].eq_ignore_ascii_case(p)
    });
    is_http.then_some(Foreign::Http)
}

/// The `BDAT <size> [LAST]` arguments (RFC 3030 §2).
pub fn parse_bdat(line: &[u8]) -> Option<(u64, bool)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_ascii_whitespace();
    let verb = words.next()?;
    if !verb.eq_ignore_ascii_case("BDAT") {
        return None;
    }
    let size = words.next()?.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some((size, last))
}

/// The address inside `MAIL FROM:<...>` / `RCPT TO:<...>`, without brackets.
pub fn envelope_address(line: &[u8]) -> Option<String> {
    let open = memchr::memchr(b'<', line)?;
    let close = memchr::memchr(b'>', &line[open..])? + open;
    std::str::from_utf8(&line[open + 1..close])
        .ok()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_read_case_insensitively() {
        assert_eq!(Verb::parse(b"ehlo client.example\r\n"), Verb::Ehlo);
        assert_eq!(Verb::parse(b"MAIL FROM:<a@b>\r\n"), Verb::Mail);
        assert_eq!(Verb::parse(b"StartTLS\r\n"), Verb::StartTls);
        assert_eq!(Verb::parse(b"DATA"), Verb::Data);
        assert_eq!(Verb::parse(b"XCLIENT ADDR=1.2.3.4\r\n"), Verb::Extension);
        assert_eq!(Verb::parse(b"DATAX\r\n"), Verb::Unknown);
        assert_eq!(Verb::parse(b"\r\n"), Verb::Unknown);
        assert_eq!(Verb::parse(b"GET / HTTP/1.1\r\n"), Verb::Unknown);
        // Blanks before the verb are skipped, as MTAs skip them.
        assert_eq!(Verb::parse(b" \tMAIL FROM:<a@b>\r\n"), Verb::Mail);
        assert_eq!(Verb::parse(b"  DATA\r\n"), Verb::Data);
        assert_eq!(Verb::parse(b"   \r\n"), Verb::Unknown);
    }

    #[test]
    fn group_enders_follow_rfc_2920() {
        for v in [Verb::Mail, Verb::Rcpt, Verb::Rset, Verb::Bdat] {
            assert!(!v.ends_group(), "{v:?}");
        }
        for v in [
            Verb::Ehlo,
            Verb::Helo,
            Verb::Data,
            Verb::Vrfy,
            Verb::Expn,
            Verb::Turn,
            Verb::Quit,
            Verb::Noop,
            Verb::StartTls,
            Verb::Auth,
        ] {
            assert!(v.ends_group(), "{v:?}");
        }
    }

    #[test]
    fn http_and_tls_are_foreign() {
        assert_eq!(foreign(b"GET / HTTP/1.0\r\n"), Some(Foreign::Http));
        assert_eq!(foreign(b"CONNECT mx:25 HTTP/1.1"), Some(Foreign::Http));
        assert_eq!(foreign(b"user-agent: x"), Some(Foreign::Http));
        assert_eq!(
            foreign(b"\x16\x03\x01\x02\x00"),
            Some(Foreign::TlsHandshake)
        );
        assert_eq!(foreign(b"EHLO x\r\n"), None);
        assert_eq!(foreign(b"GE"), None);
    }

    #[test]
    fn bdat_arguments() {
        assert_eq!(parse_bdat(b"BDAT 100 LAST\r\n"), Some((100, true)));
        assert_eq!(parse_bdat(b"bdat 0\r\n"), Some((0, false)));
        assert_eq!(parse_bdat(b"BDAT x\r\n"), None);
        assert_eq!(parse_bdat(b"BDAT 1 FIRST\r\n"), None);
    }

    #[test]
    fn envelope_addresses() {
        assert_eq!(
            envelope_address(b"MAIL FROM:<a@b.example> SIZE=10\r\n").as_deref(),
            Some("a@b.example")
        );
        assert_eq!(envelope_address(b"MAIL FROM:<>\r\n").as_deref(), Some(""));
        assert_eq!(envelope_address(b"RCPT TO:x\r\n"), None);
    }

    /// The first-byte filter in `foreign` decides as the plain scan over
    /// every prefix did (a090ad7), for every cut of every prefix in every
    /// case, with each byte after it, and for any first two bytes.
    #[test]
    fn foreign_agrees_with_a_scan_of_every_prefix() {
        fn scan(line_start: &[u8]) -> Option<Foreign> {
            if line_start.len() >= 2 && line_start[0] == 0x16 && line_start[1] == 0x03 {
                return Some(Foreign::TlsHandshake);
            }
            let is_http = HTTP_PREFIXES.iter().any(|p| {
                line_start.len() >= p.len() && line_start[..p.len()].eq_ignore_ascii_case(p)
            });
            is_http.then_some(Foreign::Http)
        }
        let mut checked = 0usize;
        let mut check = |bytes: &[u8]| {
            assert_eq!(
                foreign(bytes),
                scan(bytes),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            checked += 1;
        };
        check(b"");
        for a in 0..=255u8 {
            check(&[a]);
            for b in 0..=255u8 {
                check(&[a, b]);
            }
        }
        for prefix in HTTP_PREFIXES {
            for len in 1..=prefix.len() {
                let cut = &prefix[..len];
                // Every mix of upper and lower case over the cut's letters.
                let letters: Vec<usize> =
                    (0..len).filter(|&i| cut[i].is_ascii_alphabetic()).collect();
                for mask in 0u32..(1 << letters.len()) {
                    let mut bytes = cut.to_vec();
                    for (bit, &i) in letters.iter().enumerate() {
                        if mask & (1 << bit) != 0 {
                            bytes[i] = bytes[i].to_ascii_lowercase();
                        }
                    }
                    check(&bytes);
                    for tail in [b'/', b' ', b'x', b'\r', 0x80] {
                        bytes.push(tail);
                        check(&bytes);
                        bytes.pop();
                    }
                }
            }
        }
        assert!(checked > 100_000);
        // Found where it must be, in any case, and nowhere else.
        assert_eq!(foreign(b"get / HTTP/1.0\r\n"), Some(Foreign::Http));
        assert_eq!(foreign(b"uSeR-aGeNt: x\r\n"), Some(Foreign::Http));
        assert_eq!(foreign(b"GETX\r\n"), None);
        assert_eq!(foreign(b"HELO x\r\n"), None);
    }
}
