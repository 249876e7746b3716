"""The peers on their own, without the guard: if one of these fails, a
failure elsewhere is about the test setup, not about mxguard."""

from peers import PostfixSender, lf, make_message, smtplib_send, strip_trace_headers, swaks


def test_smtp_sink_stores_exactly_what_swaks_sent(sink, workdir):
    msg = make_message()
    swaks("127.0.0.1", sink.port, msg, source="127.0.0.2", workdir=workdir)
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    assert stored.client_addr == "127.0.0.2"
    assert sink.connections() == ["127.0.0.2"]


def test_postfix_mta_stores_exactly_what_smtplib_sent(mta):
    msg = make_message()
    smtplib_send("127.0.0.1", mta.port, msg, source="127.0.0.2")
    assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    assert mta.connects() == 1


def test_postfix_sender_relays_to_postfix_mta(mta, workdir):
    sender = PostfixSender(workdir, relay=f"[127.0.0.1]:{mta.port}", bind="127.0.0.4")
    msg = make_message()
    sender.send(msg)
    sender.wait_sent()
    assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    assert "connect from unknown[127.0.0.4]" in mta.log()


def test_postfix_mta_offers_starttls_to_swaks(mta, workdir):
    msg = make_message()
    out = swaks("127.0.0.1", mta.port, msg, source="127.0.0.2", extra=["--tls"], workdir=workdir)
    assert "TLS started" in out.stdout.decode()
    assert strip_trace_headers(mta.wait_for(msg.token)) == lf(msg.data)
    mta.wait_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.2\]")
