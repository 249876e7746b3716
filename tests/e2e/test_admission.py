"""Admission control at accept: token buckets per address and per /24,
the concurrent-connection cap, and what a client over a limit gets
(tempfail, reject, tarpit, block).

Every loopback address is a client of its own; all of 127.0.0.0/24 is one
/24, so a neighbour meets the prefix bucket. Buckets refill at one token
every 100 s here, so a burst's count is exact: accepted connections match
the bucket, within one token."""

import re
import time

from guard import Guard, to_toml
from peers import ClosedError, RawClient, make_message, swaks


def start_guard(workdir, upstream, prefixes=(), name="guard", **overrides) -> Guard:
    """A guard whose [[admission.prefixes]] are `prefixes`: (length, rate, burst)."""
    g = Guard(workdir, upstream=upstream, name=name, start=False, **overrides)
    extra = "".join(
        f'\n[[admission.prefixes]]\nlength = "{length}"\nrate = {rate}\nburst = {burst}\n'
        for length, rate, burst in prefixes)
    g.write_config(to_toml(g.config) + extra)
    g.start()
    return g


def first_reply(guard, source) -> int:
    """Connects from `source`, returns the first reply code (220 for the
    early `220-` line of an admitted client), and hangs up."""
    c = RawClient("127.0.0.1", guard.port, source=source, timeout=5)
    try:
        return int(c.read_line(timeout=5)[1][:3])
    finally:
        c.close()


def burst(guard, source, n) -> list[int]:
    return [first_reply(guard, source) for _ in range(n)]


SLOW = 0.01  # one token every 100 s: nothing refills during a test


def test_a_burst_is_limited_at_the_bucket_and_a_neighbour_at_the_prefix(sink, workdir):
    guard = start_guard(
        workdir, sink.addr, prefixes=[("ipv4/24", SLOW, 8)],
        **{"admission.per_address.rate": SLOW, "admission.per_address.burst": 5,
           "admission.max_connections_per_address": 0})

    # One address: exactly its burst of five, then 421 4.7.0.
    codes = burst(guard, "127.0.0.2", 7)
    assert codes == [220] * 5 + [421] * 2, codes
    guard.wait_log(r"LIMIT rate address of 127\.0\.0\.2 from \[127\.0\.0\.2\]:\d+: tempfail")

    # Another network is untouched by either bucket.
    assert burst(guard, "127.0.1.9", 3) == [220] * 3

    # A neighbour in the same /24 has its own address bucket, but the /24
    # has given five of its eight: three more, then the prefix says no.
    codes = burst(guard, "127.0.0.3", 5)
    assert codes == [220] * 3 + [421] * 2, codes
    guard.wait_log(r"LIMIT rate ipv4/24 of 127\.0\.0\.0/24 from \[127\.0\.0\.3\]:\d+: tempfail")

    verdicts = [v for v in guard.verdicts("127.0.0.2") if v["verdict"] == "tempfail"]
    assert len(verdicts) == 2 and all(v["test"] == "ratelimit" for v in verdicts)
    assert guard.metric("mxguard_limited_total", scope="address", kind="rate", response="tempfail") == 2
    assert guard.metric("mxguard_limited_total", scope="ipv4/24", kind="rate", response="tempfail") == 2
    assert guard.metric("mxguard_admissions_total", result="admitted") == 11
    # Refused clients never reach the MTA.
    assert sink.connections() == []
    guard.stop()


def test_the_connection_cap_holds_with_held_connections_and_frees_on_close(sink, workdir, make_guard):
    guard = make_guard(upstream=sink.addr, **{"admission.max_connections_per_address": 3,
                                              "greet.delay": "10s"})
    held = [RawClient("127.0.0.1", guard.port, source="127.0.0.2") for _ in range(3)]
    for c in held:
        assert c.read_line(timeout=3)[1].startswith(b"220-")
    fourth = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    reply = fourth.read_reply(timeout=3)
    assert reply.code == 421 and b"too many concurrent connections" in reply.lines[0], reply
    assert fourth.closed_within(3)
    guard.wait_log(r"LIMIT concurrency address of 127\.0\.0\.2 ")
    # Another address is not held back by these.
    other = RawClient("127.0.0.1", guard.port, source="127.0.0.5")
    assert other.read_line(timeout=3)[1].startswith(b"220-")
    other.close()
    # One held connection ends: its slot is free again.
    held[0].close()
    deadline = time.monotonic() + 5
    while True:
        c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
        line = c.read_line(timeout=3)[1]
        c.close()
        if line.startswith(b"220-"):
            break
        assert time.monotonic() < deadline, "the slot of a closed connection was never freed"
        time.sleep(0.1)
    for c in held[1:]:
        c.close()
    assert guard.metric("mxguard_limited_total", scope="address", kind="concurrency",
                        response="tempfail") >= 1


def test_reject_and_block_responses(sink, workdir):
    guard = start_guard(workdir, sink.addr, name="reject",
                        **{"admission.per_address.rate": SLOW, "admission.per_address.burst": 2,
                           "admission.over_limit": "reject"})
    assert burst(guard, "127.0.0.2", 3) == [220, 220, 554]
    guard.stop()

    guard = start_guard(workdir, sink.addr, name="block",
                        **{"admission.per_address.rate": SLOW, "admission.per_address.burst": 2,
                           "admission.over_limit": "block", "admission.block_ttl": "1h"})
    assert burst(guard, "127.0.0.2", 3) == [220, 220, 554]
    # Now on the blocklist: refused as a listed client, whatever its bucket.
    c = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert c.read_reply(timeout=3).code == 554
    c.close()
    guard.wait_log(r'verdict="?blocked"? test="?blocklist')
    # A good client from elsewhere still delivers.
    msg = make_message()
    swaks("127.0.0.1", guard.port, msg, source="127.0.1.3", workdir=workdir)
    sink.wait_messages(1)
    assert sink.connections() == ["127.0.0.1"]
    guard.stop()


def test_tarpit_lets_the_client_in_slowly(sink, workdir):
    guard = start_guard(workdir, sink.addr,
                        **{"admission.per_address.rate": SLOW, "admission.per_address.burst": 1,
                           "admission.over_limit": "tarpit",
                           "admission.tarpit_greet_delay": "2s",
                           "actions.tarpit_delay": "1s"})
    first = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    assert first.read_reply(timeout=3).code == 220
    first.close()

    slow = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    greeting = slow.read_reply(timeout=6)
    assert greeting.code == 220 and greeting.at >= 1.9, greeting
    t0 = time.monotonic()
    ehlo = slow.command(b"EHLO tarpitted.example.test\r\n", timeout=6)
    assert ehlo.code == 250 and time.monotonic() - t0 >= 0.9, "every reply is slowed"
    slow.command(b"QUIT\r\n", timeout=6)
    slow.close()
    guard.wait_log(r'verdict="?tarpit"? test="?ratelimit', timeout=5)
    assert guard.metric("mxguard_limited_total", scope="address", kind="rate", response="tarpit") == 1
