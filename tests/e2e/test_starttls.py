"""STARTTLS end to end: the client and the real Postfix negotiate TLS through
the guard (the guard never terminates TLS; after `220` to STARTTLS the
stream is opaque and spliced), and the message arrives intact."""

from peers import lf, make_message, smtplib_send, strip_trace_headers, swaks, wait_until


def test_swaks_starttls_through_guard_to_postfix(mta, make_guard, workdir):
    guard = make_guard(upstream=mta.addr)
    # ~300 KB: bulk enough that the relay splices it
    msg = make_message(body_lines=["Hello Bob,", *["t" * 998] * 300, "bye"])

    out = swaks("127.0.0.1", guard.port, msg, source="127.0.0.2", extra=["--tls"], workdir=workdir)

    transcript = out.stdout.decode()
    assert "<-  220 2.0.0 Ready to start TLS" in transcript, transcript
    assert "TLS started" in transcript, transcript
    assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    mta.wait_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]")
    verdict = guard.wait_verdict("127.0.0.2")
    assert verdict["verdict"] == "pass"
    # after STARTTLS the stream is opaque, relayed blind: small TLS records
    # are copied at once (one recv, one send), the message's bulk is spliced
    def relayed(direction, mode):
        return guard.metric("mxguard_relayed_bytes_total", direction=direction, mode=mode)
    wait_until(lambda: relayed("upstream", "splice") > len(msg.data) / 2, 3, "spliced upstream bytes counted")
    assert relayed("upstream", "splice") + relayed("upstream", "copy") > len(msg.data)
    assert relayed("downstream", "copy") > 0


def test_smtplib_starttls_through_guard_to_postfix(mta, make_guard):
    guard = make_guard(upstream=mta.addr)
    msg = make_message()

    smtplib_send("127.0.0.1", guard.port, msg, source="127.0.0.3", starttls=True)

    stored = mta.wait_for(msg.token)
    assert strip_trace_headers(stored) == lf(msg.data)
    assert b"with ESMTPS" in stored, "Postfix recorded a TLS session"
    assert guard.wait_verdict("127.0.0.3")["verdict"] == "pass"
