//! Printable, bounded renderings of untrusted bytes for logs.
//!
//! A bot's first bytes are evidence worth logging (postscreen prints them
//! too), but they are attacker-controlled: escape everything that is not
//! printable ASCII so a log line can never be split or forged, and cap the
//! length so a flood cannot bloat the log.

use std::fmt::Write;

/// Renders at most `cap` input bytes: printable ASCII as is, `\r`, `\n`,
/// `\t`, `\\` escaped, anything else as `\xNN`. A trailing `...` marks a cut.
pub fn escape_capped(bytes: &[u8], cap: usize) -> String {
    let shown = &bytes[..bytes.len().min(cap)];
    let mut out = String::with_capacity(shown.len() + 8);
    for &b in shown {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    if bytes.len() > cap {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_shown_with_visible_line_ends() {
        assert_eq!(escape_capped(b"EHLO x\r\n", 100), "EHLO x\\r\\n");
    }

    #[test]
    fn control_and_high_bytes_are_hex_escaped() {
        assert_eq!(
            escape_capped(b"\x00\x16\x03\xff\\", 100),
            "\\x00\\x16\\x03\\xff\\\\"
        );
    }

    #[test]
    fn long_input_is_cut_and_marked() {
        assert_eq!(escape_capped(b"abcdef", 3), "abc...");
        assert_eq!(escape_capped(b"abc", 3), "abc");
    }
}
