//! Finding the end of a command line without parsing mail.
//!
//! The guard only needs to know where a client's line ends (to answer its
//! first command with a deferred refusal, and later to take turns); it uses
//! `memchr` so scanning costs next to nothing even on floods.

/// Where a line ended and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineEnd {
    /// Length of the line including its terminator.
    pub len: usize,
    /// The terminator was a bare LF (RFC 5321 requires CRLF).
    pub bare_lf: bool,
}

/// Finds the first line ending (LF, usually after CR) in `buf`.
pub fn find_line_end(buf: &[u8]) -> Option<LineEnd> {
    let lf = memchr::memchr(b'\n', buf)?;
    Some(LineEnd {
        len: lf + 1,
        bare_lf: lf == 0 || buf[lf - 1] != b'\r',
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_line_is_found_with_its_terminator() {
        assert_eq!(
            find_line_end(b"EHLO a\r\nMAIL"),
            Some(LineEnd {
                len: 8,
                bare_lf: false
            })
        );
    }

    #[test]
    fn bare_lf_is_noticed() {
        assert_eq!(
            find_line_end(b"QUIT\n"),
            Some(LineEnd {
                len: 5,
                bare_lf: true
            })
        );
        assert_eq!(
            find_line_end(b"\n"),
            Some(LineEnd {
                len: 1,
                bare_lf: true
            })
        );
    }

    #[test]
    fn incomplete_line_is_none() {
        assert_eq!(find_line_end(b"EHLO a\r"), None);
        assert_eq!(find_line_end(b""), None);
    }
}
