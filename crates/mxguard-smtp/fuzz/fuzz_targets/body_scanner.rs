//! The DATA body scanner: input mapped onto line-break and dot tokens, cut
//! at fuzzed points; the result must not depend on the cuts, and the end
//! must be where a strict reader puts it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxguard_smtp::SmugglingPolicy;
use mxguard_smtp_fuzz::sim::check_scanner;

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"x",
    b"ab",
    b"\r\n.\r\n",
    b".\r\n",
    b"\n.\n",
    b"\r.\r",
];

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let policy = if first & 1 == 0 {
        SmugglingPolicy::Reject
    } else {
        SmugglingPolicy::Normalize
    };
    let mut input = Vec::new();
    let mut cuts = Vec::new();
    for &b in rest {
        match b >> 6 {
            // One in four bytes is a cut point, the rest build the body.
            0 => cuts.push(input.len()),
            _ => input.extend_from_slice(TOKENS[usize::from(b) % TOKENS.len()]),
        }
    }
    check_scanner(policy, &input, &cuts);
});
