"""Transparent interception for real: a client host, a gateway host running
the guard behind iptables REDIRECT or TPROXY, and an MTA host (smtp-sink on
port 25), each in its own network namespace, over IPv4 and IPv6.

The client connects to the MTA's own address on port 25 and never hears of
the guard, yet is guarded: clean mail arrives, early talkers are caught
before the MTA sees a packet, and with TPROXY and source binding the MTA
logs the client's real address. A connection made straight to the guard's
own port is a loop and is refused."""

import re

import pytest

from peers import RawClient, SmtpSink, fmt_addr, free_port, lf, make_message, swaks, wait_until

pytestmark = pytest.mark.time_limit(90)

EHLO = b"EHLO bot.example.test\r\n"
MODES = ["redirect", "tproxy"]
FAMILIES = [4, 6]


def gateway(topo, make_guard, workdir, mode, transparent_upstream=True, **overrides):
    """The guard in the gateway namespace, and the firewall rules that send
    the client's port-25 traffic to it."""
    port = free_port()
    config = {"intercept.mode": mode}
    if mode == "tproxy":
        config["intercept.transparent_upstream"] = transparent_upstream
    config.update(overrides)
    guard = make_guard(listen=[f"0.0.0.0:{port}", f"[::]:{port}"], ns=topo.gw, **config)
    if mode == "redirect":
        topo.redirect(port)
    else:
        topo.tproxy(port)
    return guard


def mta(topo, workdir, family):
    return SmtpSink(workdir, host="0.0.0.0" if family == 4 else "::", port=25, ns=topo.mta)


def sink_addr(addr: str, family: int) -> str:
    return addr if family == 4 else f"ipv6:{addr}"


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", MODES)
def test_clean_mail_to_the_mta_address_is_guarded_transparently(mode, family, topo, make_guard, workdir):
    client_ip, _, gw_mta_side_ip, mta_ip = topo.addrs(family)
    sink = mta(topo, workdir, family)
    guard = gateway(topo, make_guard, workdir, mode)
    msg = make_message()

    out = swaks(mta_ip, 25, msg, source=client_ip, ns=topo.client, workdir=workdir).stdout.decode()

    assert re.search(r"<-  220-guard\.example\.test ESMTP", out), "the guard answered for the MTA:\n" + out
    assert "<-  220 sink.example.test ESMTP" in out, out
    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    real_client = client_ip if mode == "tproxy" else gw_mta_side_ip
    assert sink.connections() == [real_client], "who the MTA saw"
    assert stored.client_addr == sink_addr(real_client, family)
    verdict = guard.wait_verdict(client_ip)
    assert verdict["verdict"] == "pass"
    assert verdict["orig_dst"] == fmt_addr(mta_ip, 25)


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", MODES)
def test_early_talker_is_caught_before_the_mta_sees_it(mode, family, topo, make_guard, workdir):
    client_ip, _, _, mta_ip = topo.addrs(family)
    sink = mta(topo, workdir, family)
    guard = gateway(topo, make_guard, workdir, mode, **{"greet.delay": "1500ms", "greet.connect_lead": "300ms"})

    bot = RawClient(mta_ip, 25, source=client_ip, ns=topo.client)
    bot.send(EHLO)
    seen = bot.read_until_closed(timeout=5)
    bot.close()
    assert re.search(rb"(?m)^554 5\.7\.1 ", seen), seen

    again = RawClient(mta_ip, 25, source=client_ip, ns=topo.client)
    reply = again.read_reply(timeout=3)
    again.close()
    assert reply.code == 554 and reply.at < 0.5, "blocklisted: refused at once"

    guard.wait_log(r"PREGREET \d+ after \S+ from \[" + re.escape(client_ip) + r"\]:\d+: EHLO bot")
    wait_until(lambda: len(guard.verdicts(client_ip)) == 2, 3, "two verdicts")
    # Each session's own verdict: the two may be logged in either order
    # (one session thread each, and the bot sees its close before the
    # first session's line is written).
    def session(c):
        host = f"[{client_ip}]" if ":" in client_ip else client_ip
        return [v["verdict"] for v in guard.verdicts(f"{host}:{c.local_port}")]
    assert session(bot) == ["reject"], guard.verdicts(client_ip)
    assert session(again) == ["blocked"], guard.verdicts(client_ip)
    assert sink.connections() == [], "the MTA never saw the bot"
    guard.wait_metric("mxguard_detections_total", 1, test="pregreet")


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", MODES)
def test_connecting_to_the_guard_port_itself_is_a_refused_loop(mode, family, topo, make_guard, workdir):
    client_ip, gw_ip, _, _ = topo.addrs(family)
    sink = mta(topo, workdir, family)
    guard = gateway(topo, make_guard, workdir, mode)

    c = RawClient(gw_ip, guard.port, source=client_ip, ns=topo.client)
    assert c.closed_within(3), "a loop is closed, not proxied"
    c.close()

    assert b"220 " not in c.received, c.received
    guard.wait_log(r"LOOP")
    assert guard.wait_verdict(client_ip)["verdict"] == "loop"
    guard.wait_metric("mxguard_connections_total", 1, outcome="loop")
    assert sink.connections() == []


def test_tproxy_without_source_binding_the_mta_sees_the_gateway(topo, make_guard, workdir):
    client_ip, _, gw_mta_side_ip, mta_ip = topo.addrs(4)
    sink = mta(topo, workdir, 4)
    gateway(topo, make_guard, workdir, "tproxy", transparent_upstream=False)
    msg = make_message()

    swaks(mta_ip, 25, msg, source=client_ip, ns=topo.client, workdir=workdir)

    [stored] = sink.wait_messages(1)
    assert stored.content == lf(msg.data)
    assert sink.connections() == [gw_mta_side_ip]


def test_other_traffic_is_still_routed_through_the_gateway(topo, make_guard, workdir):
    """Only port 25 is intercepted: the gateway forwards everything else."""
    client_ip, _, _, mta_ip = topo.addrs(4)
    other = SmtpSink(workdir, host="0.0.0.0", port=2525, ns=topo.mta, name="other")
    guard = gateway(topo, make_guard, workdir, "redirect")

    c = RawClient(mta_ip, 2525, source=client_ip, ns=topo.client)
    assert c.read_reply().lines == [b"220 sink.example.test ESMTP\r\n"], "straight from the MTA, no challenge"
    c.command(b"QUIT\r\n")
    c.close()
    wait_until(lambda: other.connections() == [client_ip], 3, "direct connection at the MTA")
    assert guard.verdicts() == []
