//! The turn tracker between a client and an upstream, on a script decoded
//! from the input onto SMTP alphabets. The top bit of the first byte picks
//! the upstream: the model MTA (every promise is checked) or chaos replies
//! (no panic, bounded buffers, replies in order).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxguard_smtp_fuzz::sim::{decode, Checks, Sim};

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let model = first & 0x80 == 0;
    let (setup, ops) = decode(rest, model);
    Sim::run(setup, Checks::all(), &ops);
});
