"""Kernel offload: a blocked client's address goes into an nftables set
and the kernel drops its SYNs, so it never reaches the guard again.

In network namespaces (client ── gateway ── MTA, see netns.py): the guard
runs in the gateway namespace on port 25 with [nftables] on; a bot in the
client namespace talks early, is rejected and blocked; its next SYN gets
no answer at all, while another address of the same client host is
served."""

import shutil
import subprocess

import pytest

import netns
from peers import RawClient, SmtpSink, wait_until

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="nft missing (tests/install-deps.sh)")

TABLE = "mxguard_e2e"


def nft_set(ns: str, name: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "set", "inet", TABLE, name],
                          capture_output=True, text=True, timeout=10).stdout



def test_a_blocked_clients_syn_gets_no_answer(topo, make_guard, workdir):
    client4, gw4, _, mta4 = topo.addrs(4)
    other = "10.77.1.3"
    netns.ip("addr", "add", f"{other}/24", "dev", "c0", ns=topo.client)
    sink = SmtpSink(workdir, host=mta4, port=2525, ns=topo.mta)
    guard = make_guard(upstream=sink.addr, listen=[f"{gw4}:25"], ns=topo.gw, **{
        "greet.delay": "1s",
        "nftables.enabled": True,
        "nftables.table": TABLE,
        "nftables.batch_interval": "100ms",
    })
    guard.wait_log(rf"nftables: table inet {TABLE} with sets blocked4, blocked6")
    assert netns.syn_answered(topo.client, gw4, 25, client4)

    bot = RawClient(gw4, 25, source=client4, ns=topo.client)
    bot.send(b"EHLO bot.example.test\r\n")
    assert bot.read_reply(timeout=3).code == 554
    bot.close()
    wait_until(lambda: client4 in nft_set(topo.gw, "blocked4"), 5, "the bot in the kernel set")
    assert "timeout" in nft_set(topo.gw, "blocked4"), "the set entry expires with the block"

    # Its next SYN is dropped by the kernel: no SYN-ACK, no RST, and the
    # guard never sees a connection.
    accepted = guard.metric("mxguard_connections_accepted_total")
    assert not netns.syn_answered(topo.client, gw4, 25, client4)
    assert guard.metric("mxguard_connections_accepted_total") == accepted
    # Another address is served.
    c = RawClient(gw4, 25, source=other, ns=topo.client)
    assert c.read_line(timeout=3)[1].startswith(b"220-")
    c.close()
    assert guard.metric("mxguard_nftables_elements_total", result="ok") == 1
    guard.stop()
    netns.in_ns(topo.gw, "nft", "delete", "table", "inet", TABLE, check=False)
