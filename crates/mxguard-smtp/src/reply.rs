//! Reading the upstream's replies (RFC 5321 §4.2) from a byte stream.
//!
//! A reply is one or more lines `ddd-text` ending with `ddd text` (or a bare
//! `ddd`); every line carries the same code. The reader is fed whatever the
//! socket gave and hands back whole replies, keeping any bytes after the
//! last line for the caller. It is bounded: an upstream that streams garbage
//! or an endless continuation cannot grow it past `max`.

use crate::escape::escape_capped;

/// One complete reply, exactly as the upstream sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code shared by all lines.
    pub code: u16,
    /// All lines, terminators included, byte for byte.
    pub raw: Vec<u8>,
}

impl Reply {
    /// 2xx: the command (or connection) was accepted.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 4xx or 5xx: a refusal the client must hear as it is.
    pub fn is_refusal(&self) -> bool {
        (400..600).contains(&self.code)
    }
}

/// Why bytes could not be read as a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line: {0}")]
    Malformed(String),
    #[error("reply lines carry different codes ({first} then {later})")]
    MixedCodes { first: u16, later: u16 },
    #[error("reply longer than {0} bytes")]
    TooLong(usize),
}

/// A reply buffer larger than this is freed, not kept for the next reply.
const RECYCLE_MAX: usize = 4096;

/// Accumulates upstream bytes until a whole reply is there.
#[derive(Debug, Default)]
pub struct ReplyReader {
    buf: Vec<u8>,
    max: usize,
}

impl ReplyReader {
    /// A reader that refuses replies longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Feeds bytes; returns the reply once its last line has arrived. Bytes
    /// after that line stay buffered ([`ReplyReader::take_rest`]).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Reply>, ReplyError> {
        self.buf.extend_from_slice(bytes);
        let mut code = None;
        let mut pos = 0;
        while let Some(lf) = memchr::memchr(b'\n', &self.buf[pos..]) {
            let line = &self.buf[pos..pos + lf + 1];
            let (line_code, last) = parse_line(line)?;
            match code {
                None => code = Some(line_code),
                Some(first) if first != line_code => {
                    return Err(ReplyError::MixedCodes {
                        first,
                        later: line_code,
                    })
                }
                Some(_) => {}
            }
            pos += lf + 1;
            if last {
                let raw = if pos == self.buf.len() {
                    // The usual case: the reply is all there is. Its bytes
                    // leave in the buffer itself (no copy); a buffer given
                    // back with `recycle` takes its place.
                    std::mem::take(&mut self.buf)
                } else {
                    let raw = self.buf[..pos].to_vec();
                    self.buf.drain(..pos);
                    raw
                };
                return Ok(Some(Reply {
                    code: line_code,
                    raw,
                }));
            }
        }
        if self.buf.len() > self.max {
            return Err(ReplyError::TooLong(self.max));
        }
        Ok(None)
    }

    /// A reply's buffer, done with, for the next reply to be read into:
    /// a session's replies then cycle through one or two buffers instead
    /// of an allocation each. Taken only when the reader holds nothing and
    /// the buffer is not large.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.buf.capacity() == 0 && buf.capacity() <= RECYCLE_MAX {
            buf.clear();
            self.buf = buf;
        }
    }

    /// Bytes received after the last complete reply.
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Whether part of a reply has been received.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Returns the line's code and whether it is the last line of its reply.
fn parse_line(line: &[u8]) -> Result<(u16, bool), ReplyError> {
    let malformed = || ReplyError::Malformed(escape_capped(line, 64));
    let digits = line.get(..3).ok_or_else(malformed)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return Err(malformed());
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    match line.get(3) {
        Some(b'-') => Ok((code, false)),
        Some(b' ') | Some(b'\r') | Some(b'\n') => Ok((code, true)),
        _ => Err(malformed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_is_read_into_and_handed_back() {
        let mut r = ReplyReader::new(4096);
        let first = r.push(b"250 ok\r\n").unwrap().unwrap();
        let ptr = first.raw.as_ptr();
        r.recycle(first.raw);
        let second = r.push(b"354 go\r\n").unwrap().unwrap();
        assert_eq!(second.raw, b"354 go\r\n");
        assert_eq!(second.raw.as_ptr(), ptr, "the same allocation");
        // Not taken while part of a reply is held.
        r.push(b"250-a\r\n").unwrap();
        r.recycle(vec![0u8; 16]);
        let third = r.push(b"250 b\r\n").unwrap().unwrap();
        assert_eq!(third.raw, b"250-a\r\n250 b\r\n");
        // Pipelined replies still come apart, the rest kept.
        let fourth = r.push(b"250 x\r\n250 y\r\n").unwrap().unwrap();
        assert_eq!(fourth.raw, b"250 x\r\n");
        assert_eq!(r.push(b"").unwrap().unwrap().raw, b"250 y\r\n");
    }

    #[test]
    fn single_line_banner() {
        let mut r = ReplyReader::new(4096);
        let reply = r.push(b"220 mx.test ESMTP Postfix\r\n").unwrap().unwrap();
        assert_eq!(reply.code, 220);
        assert_eq!(reply.raw, b"220 mx.test ESMTP Postfix\r\n");
        assert!(r.is_empty());
    }

    #[test]
    fn multi_line_reply_arriving_in_pieces() {
        let mut r = ReplyReader::new(4096);
        assert_eq!(r.push(b"250-mx.test\r\n250-PIPE").unwrap(), None);
        assert_eq!(r.push(b"LINING\r\n250 8BITMIME").unwrap(), None);
        let reply = r.push(b"\r\nEXTRA").unwrap().unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(
            reply.raw,
            b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
        assert_eq!(r.take_rest(), b"EXTRA");
    }

    #[test]
    fn bare_code_line_ends_a_reply() {
        let mut r = ReplyReader::new(4096);
        let reply = r.push(b"220\r\n").unwrap().unwrap();
        assert_eq!(reply.code, 220);
    }

    #[test]
    fn refusal_banners_are_classified() {
        let mut r = ReplyReader::new(4096);
        let reply = r.push(b"554 5.3.2 no service\r\n").unwrap().unwrap();
        assert!(reply.is_refusal());
        assert!(!reply.is_positive());
    }

    #[test]
    fn garbage_is_malformed() {
        let mut r = ReplyReader::new(4096);
        assert!(matches!(
            r.push(b"HTTP/1.1 400 Bad\r\n"),
            Err(ReplyError::Malformed(_))
        ));
        let mut r = ReplyReader::new(4096);
        assert!(matches!(r.push(b"22\r\n"), Err(ReplyError::Malformed(_))));
        let mut r = ReplyReader::new(4096);
        assert!(matches!(r.push(b"220x\r\n"), Err(ReplyError::Malformed(_))));
    }

    #[test]
    fn mixed_codes_are_refused() {
        let mut r = ReplyReader::new(4096);
        assert_eq!(
            r.push(b"220-a\r\n250 b\r\n"),
            Err(ReplyError::MixedCodes {
                first: 220,
                later: 250
            })
        );
    }

    #[test]
    fn endless_continuation_is_bounded() {
        let mut r = ReplyReader::new(64);
        let mut result = Ok(None);
        for _ in 0..10 {
            result = r.push(b"220-more text more text\r\n");
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ReplyError::TooLong(64)));
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let mut r = ReplyReader::new(64);
        assert_eq!(r.push(&[b'2'; 100]), Err(ReplyError::TooLong(64)));
    }
}
