"""A fleet: three guards sharing one real redis-server (started by the
test on a loopback port). A burst spread over the guards is limited as
one; a block on one guard is enforced on the others within a second;
Redis killed mid-run: every guard goes on serving on local decisions;
Redis back: they rejoin by themselves."""

import shutil
import signal
import subprocess
import time

import pytest

from peers import Proc, RawClient, free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server missing (tests/install-deps.sh installs it)")

SLOW = 0.01  # one token every 100 s


class Redis:
    def __init__(self, workdir, port=None):
        self.workdir = workdir
        self.port = port or free_port()
        self.start()

    def start(self):
        self.proc = Proc(f"redis-{self.port}-{time.monotonic_ns()}",
                         ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--daemonize", "no"],
                         self.workdir)
        wait_until(lambda: self.answers(), 10, "redis-server answering")

    def answers(self) -> bool:
        try:
            c = RawClient("127.0.0.1", self.port, source=None, timeout=1)
        except OSError:
            return False
        try:
            c.send(b"PING\r\n")
            return c.read_line(timeout=1)[1].startswith(b"+PONG")
        except (OSError, AssertionError):
            return False
        finally:
            c.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/"

    def kill(self):
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(5)


def first_line(guard, source) -> bytes:
    c = RawClient("127.0.0.1", guard.port, source=source, timeout=5)
    try:
        return c.read_line(timeout=5)[1]
    finally:
        c.close()


def fleet(make_guard, sink, redis, n=3, **overrides):
    guards = [make_guard(upstream=sink.addr, name=f"gw-{chr(97 + i)}", **{
        "cluster.redis": redis.url,
        "cluster.gateway_id": f"gw-{chr(97 + i)}",
        "cluster.publish_interval": "500ms",
        "admission.per_address.rate": SLOW,
        "admission.per_address.burst": 6,
        **overrides,
    }) for i in range(n)]
    for g in guards:
        g.wait_log(r"cluster: redis answers", timeout=10)
    return guards


def test_a_burst_spread_over_the_fleet_is_limited_as_one(sink, make_guard, workdir):
    redis = Redis(workdir)
    a, b, c = fleet(make_guard, sink, redis)
    # Nine connections from one address, round robin over three guards:
    # the fleet's bucket holds six, wherever they land.
    codes = [first_line(g, "127.0.0.2")[:3] for g in [a, b, c] * 3]
    assert codes.count(b"220") == 6 and codes.count(b"421") == 3, codes
    assert codes[:6] == [b"220"] * 6, codes
    # Each gateway publishes its counts for a fleet view.
    def counts():
        out = subprocess.run(["redis-cli", "-p", str(redis.port), "HGET", "mxguard:gw:gw-b", "admitted"],
                             capture_output=True, timeout=5)
        return out.stdout.strip()
    wait_until(lambda: counts() == b"2", 5, "gw-b's counts in redis")


def test_a_block_on_one_guard_is_enforced_on_the_others_within_a_second(sink, make_guard, workdir):
    redis = Redis(workdir)
    a, b, c = fleet(make_guard, sink, redis, **{"greet.delay": "1s"})
    assert first_line(b, "127.0.0.9").startswith(b"220-")
    # A bot talks early on A: A rejects and blocks it ...
    bot = RawClient("127.0.0.1", a.port, source="127.0.0.9")
    bot.send(b"EHLO bot.example.test\r\n")
    assert bot.read_reply(timeout=3).code == 554
    t0 = time.monotonic()
    bot.close()
    # ... and B and C refuse it within a second, never touching the MTA.
    for g in (b, c):
        wait_until(lambda: first_line(g, "127.0.0.9").startswith(b"554"), 1.0,
                   f"{g.name} refuses the bot", interval=0.05)
    assert time.monotonic() - t0 < 1.0
    b.wait_log(r'verdict="?blocked"? test="?blocklist"? client=127\.0\.0\.9:')
    assert b.metric("mxguard_cluster_list_updates_total", op="add") == 1
    assert sink.connections() == []


@pytest.mark.time_limit(90)
def test_redis_down_the_fleet_serves_locally_and_rejoins_when_it_is_back(sink, make_guard, workdir):
    redis = Redis(workdir)
    a, b = fleet(make_guard, sink, redis, n=2, **{"greet.delay": "300ms"})
    redis.kill()
    # Both go on serving at once: a decision waits at most cluster.timeout.
    for g in (a, b):
        t0 = time.monotonic()
        assert first_line(g, "127.0.0.3").startswith(b"220-")
        assert time.monotonic() - t0 < 0.5
    for g in (a, b):
        g.wait_log(r"cluster: redis unreachable .*deciding locally", timeout=5)
        wait_until(lambda: g.metric("mxguard_cluster_up") == 0, 5, "cluster_up 0")
    # Local limits still hold: the per-address burst of six, on each guard.
    codes = [first_line(a, "127.0.0.4")[:3] for _ in range(7)]
    assert codes == [b"220"] * 6 + [b"421"], codes
    # A block made while Redis is away is kept locally and published later.
    bot = RawClient("127.0.0.1", a.port, source="127.0.0.9")
    bot.send(b"EHLO bot.example.test\r\n")
    assert bot.read_reply(timeout=3).code == 554
    bot.close()
    assert first_line(b, "127.0.0.9").startswith(b"220-"), "B cannot know yet"

    redis.start()
    for g in (a, b):
        g.wait_log(r"cluster: redis answers", timeout=15, count=2)
        wait_until(lambda: g.metric("mxguard_cluster_up") == 1, 5, "cluster_up 1")
    # The block queued on A reaches B once the fleet is back.
    wait_until(lambda: first_line(b, "127.0.0.9").startswith(b"554"), 5,
               "B refuses the bot blocked on A while Redis was away", interval=0.2)
    assert a.metric("mxguard_cluster_fallbacks_total", op="admit") >= 1
