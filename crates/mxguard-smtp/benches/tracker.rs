//! Turn tracker throughput: bytes of whole SMTP sessions (both ways) fed
//! through [`TurnTracker`], as the guard does in copy mode until STARTTLS.
//!
//! `cargo bench -p mxguard-smtp --bench tracker` (part of `make bench`).
//! The corpus mixes what a gateway sees: short text mail, a base64
//! attachment, long lines with dot-stuffing and bare LFs, and a pipelined
//! client (PIPELINING offered) sending several recipients; each session is
//! fed in the 16 KiB reads of copy mode and answered as an MTA would.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mxguard_smtp::{TrackerConfig, TurnTracker};

/// One direction's bytes at one step of a session.
enum Step {
    Client(Vec<u8>),
    Server(&'static [u8]),
}

const EHLO_REPLY: &[u8] =
    b"250-mta.example\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";

fn message_session(body: &[u8], rcpts: usize, pipelined: bool) -> Vec<Step> {
    let mut steps = vec![
        Step::Client(b"EHLO client.example\r\n".to_vec()),
        Step::Server(EHLO_REPLY),
    ];
    let mut envelope = b"MAIL FROM:<alice@sender.example> SIZE=1000\r\n".to_vec();
    let mut replies = 1;
    if !pipelined {
        steps.push(Step::Client(std::mem::take(&mut envelope)));
        steps.push(Step::Server(b"250 2.1.0 Ok\r\n"));
        replies = 0;
    }
    for i in 0..rcpts {
        envelope.extend_from_slice(format!("RCPT TO:<user{i}@example.net>\r\n").as_bytes());
        replies += 1;
        if !pipelined {
            steps.push(Step::Client(std::mem::take(&mut envelope)));
            steps.push(Step::Server(b"250 2.1.5 Ok\r\n"));
            replies = 0;
        }
    }
    envelope.extend_from_slice(b"DATA\r\n");
    steps.push(Step::Client(envelope));
    for _ in 0..replies {
        steps.push(Step::Server(b"250 2.1.5 Ok\r\n"));
    }
    steps.push(Step::Server(b"354 End data with <CR><LF>.<CR><LF>\r\n"));
    let mut data = body.to_vec();
    data.extend_from_slice(b".\r\n");
    for chunk in data.chunks(16 * 1024) {
        steps.push(Step::Client(chunk.to_vec()));
    }
    steps.push(Step::Server(b"250 2.0.0 Ok: queued as 4XyZ\r\n"));
    steps.push(Step::Client(b"QUIT\r\n".to_vec()));
    steps.push(Step::Server(b"221 2.0.0 Bye\r\n"));
    steps
}

fn headers(subject: &str) -> Vec<u8> {
    format!(
        "From: Alice <alice@sender.example>\r\nTo: <user0@example.net>\r\n\
         Subject: {subject}\r\nMessage-ID: <1@sender.example>\r\nMIME-Version: 1.0\r\n\r\n"
    )
    .into_bytes()
}

fn text_body() -> Vec<u8> {
    let mut b = headers("text");
    for i in 0..40 {
        b.extend_from_slice(
            format!("Line {i} of a short plain text message, as people write.\r\n").as_bytes(),
        );
    }
    b
}

fn base64_body() -> Vec<u8> {
    let mut b = headers("attachment");
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for i in 0..2600usize {
        let line: Vec<u8> = (0..76).map(|j| alphabet[(i * 7 + j * 13) % 64]).collect();
        b.extend_from_slice(&line);
        b.extend_from_slice(b"\r\n");
    }
    b
}

fn long_lines_body() -> Vec<u8> {
    let mut b = headers("long lines");
    for i in 0..200 {
        if i % 10 == 0 {
            // A dot-stuffed line, and a bare LF inside a line.
            b.extend_from_slice(b"..a line that began with a dot\r\n");
            b.extend_from_slice(b"bare\nLF in the middle\r\n");
        }
        b.extend(std::iter::repeat_n(b'x', 990));
        b.extend_from_slice(b"\r\n");
    }
    b
}

/// Runs one session through a fresh tracker; returns bytes fed.
fn run(steps: &[Step], cfg: &TrackerConfig) -> usize {
    let start = Instant::now();
    let mut t = TurnTracker::new(cfg.clone(), start);
    let mut fed = 0;
    for step in steps {
        match step {
            Step::Client(bytes) => {
                fed += bytes.len();
                t.on_client(start, bytes);
            }
            Step::Server(bytes) => {
                fed += bytes.len();
                let _ = t.on_upstream(start, bytes);
            }
        }
        while t.poll_event().is_some() {}
        let n = t.upstream_output().len();
        black_box(t.upstream_output());
        t.upstream_written(n);
        while let Some(out) = t.client_output(start) {
            let n = out.len();
            black_box(out);
            t.client_written(start, n);
        }
    }
    fed
}

fn bench(c: &mut Criterion) {
    let cfg = TrackerConfig::default();
    let corpus: Vec<(&str, Vec<Step>)> = vec![
        ("text-2k", message_session(&text_body(), 1, false)),
        ("base64-200k", message_session(&base64_body(), 1, false)),
        (
            "long-lines-200k",
            message_session(&long_lines_body(), 1, false),
        ),
        ("pipelined-10rcpt", message_session(&text_body(), 10, true)),
    ];
    let mut group = c.benchmark_group("tracker");
    let mut all = 0;
    for (name, steps) in &corpus {
        let bytes = run(steps, &cfg);
        all += bytes;
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(*name, |b| b.iter(|| run(black_box(steps), &cfg)));
    }
    group.throughput(Throughput::Bytes(all as u64));
    group.bench_function("mixed", |b| {
        b.iter(|| {
            corpus
                .iter()
                .map(|(_, steps)| run(black_box(steps), &cfg))
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
