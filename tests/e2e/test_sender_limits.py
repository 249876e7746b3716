"""Limits by envelope sender: MAIL FROM is sniffed, counted per sender
address and per sender domain, with separate quotas for sessions that
authenticated (AUTH answered 235 by the MTA) and those that did not, and a
trend limit at a multiple of each sender's usual volume. Over a limit the
MAIL gets 451 4.7.1 from the guard and the MTA never sees it.

The MTA is aiosmtpd with an authenticator: a real SMTP server that really
answers AUTH PLAIN/LOGIN (235 for alice/secret, 535 otherwise)."""

import signal
import smtplib
import subprocess
import sys
import textwrap
import time

import pytest

from peers import CLEANUP, free_port, wait_until

AUTH_MTA = textwrap.dedent("""
    import asyncio, sys, time
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            with open(sys.argv[2], "a") as log:
                log.write(f"{envelope.mail_from} {int(bool(session.authenticated))}\\n")
            return "250 2.0.0 Ok: queued"

    def auth(server, session, envelope, mechanism, data):
        ok = (data.login, data.password) == (b"alice", b"secret")
        return AuthResult(success=ok, handled=False)

    c = Controller(Handler(), hostname="127.0.0.1", port=int(sys.argv[1]),
                   server_hostname="mta.example.test", authenticator=auth,
                   auth_require_tls=False, auth_exclude_mechanism=["CRAM-MD5"])
    c.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)
""")


class AuthMta:
    """aiosmtpd on a loopback port; `delivered()` lists (sender, authenticated)."""

    def __init__(self, workdir):
        pytest.importorskip("aiosmtpd", reason="tests/install-deps.sh installs aiosmtpd")
        self.port = free_port()
        self.log = workdir / "auth-mta.log"
        self.log.write_text("")
        self.proc = subprocess.Popen([sys.executable, "-c", AUTH_MTA, str(self.port), str(self.log)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        CLEANUP.push("aiosmtpd", self.stop)
        assert self.proc.stdout.readline().strip() == "ready"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def delivered(self) -> list[tuple[str, bool]]:
        return [(s, a == "1") for s, a in (l.split() for l in self.log.read_text().splitlines())]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def session(guard, source="127.0.0.2", login=False) -> smtplib.SMTP:
    s = smtplib.SMTP(timeout=15, source_address=(source, 0))
    code, _ = s.connect("127.0.0.1", guard.port)
    assert code == 220
    s.ehlo("client.example.test")
    if login:
        s.login("alice", "secret")
    return s


def send(s: smtplib.SMTP, sender: str) -> int:
    """One message; the MAIL reply's code (250, or the refusal's)."""
    try:
        s.sendmail(sender, ["bob@example.test"], f"From: {sender}\r\nSubject: hi\r\n\r\nhello\r\n")
        return 250
    except smtplib.SMTPSenderRefused as e:
        assert b"4.7.1" in e.smtp_error, e.smtp_error
        s.rset()
        return e.smtp_code


SLOW = 0.01  # one token every 100 s


def test_sender_address_and_domain_limits_differ_for_authenticated_sessions(workdir, make_guard):
    mta = AuthMta(workdir)
    guard = make_guard(upstream=mta.addr, **{
        "greet.delay": "200ms",
        "senders.trend.enabled": False,
        "senders.unauthenticated.per_address.rate": SLOW,
        "senders.unauthenticated.per_address.burst": 2,
        "senders.unauthenticated.per_domain.rate": SLOW,
        "senders.unauthenticated.per_domain.burst": 3,
        "senders.authenticated.per_address.rate": SLOW,
        "senders.authenticated.per_address.burst": 4,
        "senders.authenticated.per_domain.rate": SLOW,
        "senders.authenticated.per_domain.burst": 100,
    })
    s = session(guard)
    # Unauthenticated: two from one sender, then 451 4.7.1 at its MAIL.
    assert [send(s, "bulk@example.org") for _ in range(3)] == [250, 250, 451]
    # Another sender of the same domain: the domain has one of three left.
    assert [send(s, "other@example.org") for _ in range(2)] == [250, 451]
    # Another domain is untouched.
    assert send(s, "someone@example.net") == 250
    s.quit()
    guard.wait_log(r'SENDER-LIMIT address for "bulk@example\.org" from \[127\.0\.0\.2\]:\d+ \(authenticated: no\)')
    guard.wait_log(r'SENDER-LIMIT domain for "other@example\.org" .*\(authenticated: no\)')

    # Authenticated (AUTH answered 235 by the MTA): its own, larger quota.
    s = session(guard, source="127.0.0.3", login=True)
    assert [send(s, "bulk@example.org") for _ in range(5)] == [250] * 4 + [451]
    s.quit()
    guard.wait_log(r'SENDER-LIMIT address for "bulk@example\.org" .*\(authenticated: yes\)')

    # A wrong password is refused by the MTA and the session stays unauthenticated.
    s = session(guard, source="127.0.0.4")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("alice", "wrong")
    assert send(s, "bulk@example.org") == 451, "the unauthenticated bucket is still empty"
    s.quit()

    delivered = mta.delivered()
    assert delivered.count(("bulk@example.org", False)) == 2
    assert delivered.count(("bulk@example.org", True)) == 4
    assert delivered.count(("other@example.org", False)) == 1
    assert guard.metric("mxguard_sender_limited_total", kind="address", authenticated="no") == 2
    assert guard.metric("mxguard_sender_limited_total", kind="domain", authenticated="no") == 1
    assert guard.metric("mxguard_sender_limited_total", kind="address", authenticated="yes") == 1


def test_a_trend_limit_holds_a_sender_at_a_multiple_of_its_baseline_and_survives_kill_9(workdir, make_guard):
    mta = AuthMta(workdir)
    guard = make_guard(upstream=mta.addr, **{
        "greet.delay": "200ms",
        "state.snapshot_interval": "1s",
        "senders.trend.interval": "1500ms",
        "senders.trend.alpha": 1.0,
        "senders.trend.multiple": 2.0,
        "senders.trend.min_intervals": 2,
        "senders.trend.floor": 1,
    })
    s = session(guard)
    # Learning: one message in each of two intervals (baseline 1).
    assert send(s, "news@example.org") == 250
    time.sleep(1.6)
    assert send(s, "news@example.org") == 250
    time.sleep(1.6)
    # Judged: at most 2 x baseline in this interval.
    assert [send(s, "news@example.org") for _ in range(3)] == [250, 250, 451]
    s.quit()
    guard.wait_log(r'SENDER-LIMIT trend for "news@example\.org"')
    time.sleep(1.2)  # a snapshot

    guard.proc.signal(signal.SIGKILL)
    guard.proc.wait(5)
    guard.start()
    guard.wait_log(r"state: \d+ list entries, \d+ scores, 1 sender trends")
    # The baseline came back: the sender is judged at once, not relearnt.
    s = session(guard)
    time.sleep(1.6)
    assert [send(s, "news@example.org") for _ in range(5)][-1] == 451
    s.quit()
    assert guard.metric("mxguard_sender_limited_total", kind="trend", authenticated="no") >= 1
