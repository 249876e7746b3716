//! Bearer tokens for the admin API, read from `[admin] token_file`.
//!
//! The file holds one token per line: `NAME:SECRET`, or a bare `SECRET`
//! (named `admin`); blank lines and `#` comments are skipped. The name is
//! who the event log says acted; the secret is what a client sends as
//! `Authorization: Bearer SECRET`.
//!
//! Comparison is constant-time with the `subtle` crate rather than a
//! hand-written loop: an XOR-and-OR loop is easy to write, but the
//! optimiser is free to turn it back into an early exit, and `subtle`
//! exists to stop exactly that (an optimisation barrier on every result;
//! it is what RustCrypto and rustls-adjacent code rely on). Every
//! configured token is compared, whatever matched, so the time does not
//! say which one did either. The secret's length can still show (`ct_eq`
//! returns at once on a length mismatch); secrets are random and at least
//! 16 characters, so the length is not what protects them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use subtle::ConstantTimeEq;

/// A secret shorter than this is refused: it could be guessed online.
pub const MIN_SECRET: usize = 16;

#[derive(Default)]
pub struct Tokens {
    entries: Vec<Token>,
}

struct Token {
    name: String,
    secret: Vec<u8>,
}

impl Tokens {
    /// No tokens: the API routes are off.
    pub fn disabled() -> Self {
        Self::default()
    }

    pub fn enabled(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Reads the token file; the error names the file and the line.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o004 != 0 {
                tracing::warn!(
                    "{}: the admin token file is readable by every user; chmod 0640 it",
                    path.display()
                );
            }
        }
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<Token> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, secret) = match line.split_once(':') {
                Some((name, secret)) => (name.trim(), secret.trim()),
                None => ("admin", line),
            };
            let at = n + 1;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(format!(
                    "line {at}: the token name must be 1 to 64 of A-Z a-z 0-9 . _ -"
                ));
            }
            if secret.len() < MIN_SECRET || !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {at}: the secret must be at least {MIN_SECRET} printable characters without spaces (try `openssl rand -hex 32`)"
                ));
            }
            if entries.iter().any(|t| t.name == name) {
                return Err(format!("line {at}: the name `{name}` is used twice"));
            }
            if entries.iter().any(|t| t.secret == secret.as_bytes()) {
                return Err(format!("line {at}: the same secret is given twice"));
            }
            entries.push(Token {
                name: name.to_owned(),
                secret: secret.as_bytes().to_vec(),
            });
        }
        if entries.is_empty() {
            return Err("no token in the file".into());
        }
        Ok(Self { entries })
    }

    /// The name of the token `presented` is, if any.
    pub fn check(&self, presented: &[u8]) -> Option<&str> {
        let mut found: Option<usize> = None;
        for (i, token) in self.entries.iter().enumerate() {
            // No early exit: every token is compared.
            if bool::from(token.secret.as_slice().ct_eq(presented)) {
                found = Some(i);
            }
        }
        found.map(|i| self.entries[i].name.as_str())
    }

    /// The first token's secret (what `mxguard ctl` sends), by name if given.
    pub fn secret(&self, name: Option<&str>) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|t| match name {
                Some(n) => n == t.name,
                None => true,
            })
            .map(|t| t.secret.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_bare_tokens_are_told_apart() {
        let t = Tokens::parse("# ops team\nops:0123456789abcdef0123\n\n  fedcba9876543210fedc  \n")
            .unwrap();
        assert_eq!(t.check(b"0123456789abcdef0123"), Some("ops"));
        assert_eq!(t.check(b"fedcba9876543210fedc"), Some("admin"));
        assert_eq!(t.check(b"0123456789abcdef012"), None);
        assert_eq!(t.check(b""), None);
        assert_eq!(t.secret(Some("admin")), Some(&b"fedcba9876543210fedc"[..]));
    }

    #[test]
    fn weak_or_ambiguous_files_are_refused_with_the_line() {
        for (text, needle) in [
            ("short", "line 1"),
            ("a:0123456789abcdef\nb:0123456789abcdef\n", "twice"),
            ("a:0123456789abcdef\na:0123456789abcdeX\n", "`a`"),
            ("bad name:0123456789abcdef\n", "name"),
            ("# only a comment\n", "no token"),
        ] {
            let e = Tokens::parse(text).err().unwrap();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
