"""The kernel bypass: clients in the pass cache skip the guard.

In network namespaces (client ── gateway ── MTA, see netns.py), the guard
owns the interception (`nftables.redirect`): its table redirects new
connections to port 25 coming in on the gateway's client-side interface to
its own port, and drops blocked addresses before that. With
`nftables.bypass_passed` a client whose session passed goes into the set
`passed4`/`passed6` with the pass TTL; its next connections reach the MTA
straight through the kernel — the guard never sees them, the MTA sees the
client's own address. A block of the address takes it out of the set and
out of the pass cache, so after the block its next connection meets the
guard again, greet pause and all."""

import re
import shutil
import subprocess

import pytest

import netns
from admin_api import accepted, bypass_guard, call
from peers import RawClient, SmtpSink, clean_session, free_port, wait_until

pytestmark = [
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft missing (tests/install-deps.sh)"),
    pytest.mark.time_limit(90),
]

TABLE = "mxguard_bypass_e2e"
FAMILIES = [4, 6]


def nft_set(ns: str, name: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "set", "inet", TABLE, name],
                          capture_output=True, text=True, timeout=10).stdout


def in_set(ns: str, name: str, ip: str) -> bool:
    return re.search(rf"[{{ ,]{re.escape(ip)}[ ,}}]", nft_set(ns, name).replace("\n", " ")) is not None



def gateway(topo, make_guard, workdir, bypass: bool, name="guard", **overrides):
    """The guard in the gateway namespace, owning the redirect."""
    port = free_port()
    return bypass_guard(
        make_guard, workdir, topo.gw, [f"0.0.0.0:{port}", f"[::]:{port}"],
        rf"nftables: new connections to ports \[25\] on g0 redirected to port {port}", name=name,
        **{"intercept.mode": "redirect",
           "nftables.enabled": True,
           "nftables.table": TABLE,
           "nftables.batch_interval": "100ms",
           "nftables.redirect": True,
           "nftables.redirect_interfaces": ["g0"],
           "nftables.bypass_passed": bypass,
           **overrides})


@pytest.fixture
def cleanup_table(topo):
    yield
    netns.in_ns(topo.gw, "nft", "delete", "table", "inet", TABLE, check=False)


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_a_client_that_passed_reaches_the_mta_without_the_guard_until_it_is_blocked(
        family, topo, make_guard, workdir, cleanup_table):
    client, _, gw_mta_side, mta_ip = topo.addrs(family)
    passed = "passed4" if family == 4 else "passed6"
    blocked = "blocked4" if family == 4 else "blocked6"
    sink = SmtpSink(workdir, host="0.0.0.0" if family == 4 else "::", port=25, ns=topo.mta)
    guard = gateway(topo, make_guard, workdir, bypass=True)

    # First session: through the guard (challenge line, greet pause); the
    # MTA sees the gateway.
    greeting = clean_session(mta_ip, 25, client, topo.client, 1)
    assert greeting[0].startswith(b"220-guard.example.test"), greeting
    assert guard.wait_verdict(client)["verdict"] == "pass"
    sink.wait_messages(1)
    assert sink.connections() == [gw_mta_side]
    assert accepted(guard) == 1

    # Its address goes into the passed set, with the pass TTL.
    wait_until(lambda: in_set(topo.gw, passed, client), 5, "the client in the passed set")
    assert re.search(r"timeout 1h", nft_set(topo.gw, passed)), nft_set(topo.gw, passed)
    assert guard.metric("mxguard_nftables_passed_total", op="add", result="ok") == 1
    # One list look-up, the admission's: the batch's own check is not one.
    assert guard.metric("mxguard_blocklist_lookups_total", result="unlisted") == 1

    # Next sessions: straight to the MTA. The guard does not see them; the
    # MTA sees the client's own address and greets it itself.
    for n in (2, 3):
        greeting = clean_session(mta_ip, 25, client, topo.client, n)
        assert greeting == [b"220 sink.example.test ESMTP\r\n"], greeting
    sink.wait_messages(3)
    assert sink.connections() == [gw_mta_side, client, client]
    assert accepted(guard) == 1

    # An operator blocks it: out of the passed set, into the blocked one;
    # its SYNs are dropped before the redirect and before the bypass.
    status, body, _ = call(guard, "POST", "/api/v1/blocklist", {"address": client, "ttl_seconds": 600})
    assert status in (200, 201), body
    wait_until(lambda: not in_set(topo.gw, passed, client), 5, "the client out of the passed set")
    wait_until(lambda: in_set(topo.gw, blocked, client), 5, "the client in the blocked set")
    assert guard.metric("mxguard_nftables_passed_total", op="remove", result="ok") == 1
    assert not netns.syn_answered(topo.client, mta_ip, 25, client)
    assert accepted(guard) == 1
    assert len(sink.connections()) == 3

    # Unblocked, it meets the guard again, as a stranger: the block also
    # took it out of the pass cache.
    status, body, _ = call(guard, "DELETE", f"/api/v1/blocklist?net={client}")
    assert status == 200, body
    wait_until(lambda: not in_set(topo.gw, blocked, client), 5, "the client out of the blocked set")
    greeting = clean_session(mta_ip, 25, client, topo.client, 4)
    assert greeting[0].startswith(b"220-guard.example.test"), greeting
    assert accepted(guard) == 2
    sink.wait_messages(4)
    assert sink.connections()[-1] == gw_mta_side
    guard.stop()


def test_a_detection_takes_a_passed_client_out_of_the_kernel(topo, make_guard, workdir, cleanup_table):
    """A session opened before the client passed still goes through the
    guard (conntrack keeps its redirect); a protocol violation on it
    blocks the address and takes it out of the passed set."""
    client, _, _, mta_ip = topo.addrs(4)
    sink = SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.mta)
    guard = gateway(topo, make_guard, workdir, bypass=True)

    early = RawClient(mta_ip, 25, source=client, ns=topo.client)
    assert early.read_reply(timeout=5).code == 220
    clean_session(mta_ip, 25, client, topo.client, 1)
    wait_until(lambda: in_set(topo.gw, "passed4", client), 5, "the client in the passed set")

    # EHLO must end a pipeline group: a bot's burst on the old session.
    early.send(b"EHLO hasty.example.test\r\nMAIL FROM:<a@b.example>\r\n")
    assert early.read_reply(timeout=5).code == 554
    early.close()
    wait_until(lambda: not in_set(topo.gw, "passed4", client), 5, "the client out of the passed set")
    wait_until(lambda: in_set(topo.gw, "blocked4", client), 5, "the client in the blocked set")
    assert not netns.syn_answered(topo.client, mta_ip, 25, client)
    # A blocked address that never passed: dropped too, whatever the redirect.
    other = "10.77.1.3"
    netns.ip("addr", "add", f"{other}/24", "dev", "c0", ns=topo.client)
    assert netns.syn_answered(topo.client, mta_ip, 25, other)
    status, body, _ = call(guard, "POST", "/api/v1/blocklist", {"address": other, "ttl_seconds": 600})
    assert status in (200, 201), body
    wait_until(lambda: in_set(topo.gw, "blocked4", other), 5, "the other address in the blocked set")
    assert not netns.syn_answered(topo.client, mta_ip, 25, other)
    assert guard.metric("mxguard_nftables_passed_total", op="remove", result="ok") == 1
    assert len(sink.messages()) == 1
    guard.stop()


def test_passes_in_the_kernel_outlive_a_restart(topo, make_guard, workdir, cleanup_table):
    client, _, gw_mta_side, mta_ip = topo.addrs(4)
    sink = SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.mta)
    guard = gateway(topo, make_guard, workdir, bypass=True)
    clean_session(mta_ip, 25, client, topo.client, 1)
    wait_until(lambda: in_set(topo.gw, "passed4", client), 5, "the client in the passed set")
    guard.stop()
    # The table stays when the guard stops: the kernel keeps the passes.
    assert in_set(topo.gw, "passed4", client)

    again = gateway(topo, make_guard, workdir, bypass=True, name="guard2")
    again.wait_log(r"nftables: 1 passed address\(es\) carried over from the old table")
    wait_until(lambda: in_set(topo.gw, "passed4", client), 5, "the client in the new table's set")
    clean_session(mta_ip, 25, client, topo.client, 2)
    sink.wait_messages(2)
    assert sink.connections() == [gw_mta_side, client]
    assert accepted(again) == 0
    again.stop()


def test_without_the_bypass_every_session_goes_through_the_guard(topo, make_guard, workdir, cleanup_table):
    client, _, gw_mta_side, mta_ip = topo.addrs(4)
    sink = SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.mta)
    guard = gateway(topo, make_guard, workdir, bypass=False)
    assert "passed" not in subprocess.run(
        ["ip", "netns", "exec", topo.gw, "nft", "list", "table", "inet", TABLE],
        capture_output=True, text=True, timeout=10).stdout

    greeting = clean_session(mta_ip, 25, client, topo.client, 1)
    assert greeting[0].startswith(b"220-guard.example.test"), greeting
    assert guard.wait_verdict(client)["verdict"] == "pass"
    # The pass cache still works inside the guard: no pause the second time.
    greeting = clean_session(mta_ip, 25, client, topo.client, 2)
    assert greeting == [b"220 sink.example.test ESMTP\r\n"], greeting
    sink.wait_messages(2)
    assert sink.connections() == [gw_mta_side, gw_mta_side]
    assert accepted(guard) == 2
    assert guard.metric("mxguard_nftables_passed_total", op="add", result="ok") == 0
    guard.stop()


def test_a_block_file_takes_a_passed_client_out_of_the_kernel(topo, make_guard, workdir, cleanup_table):
    client, _, _, mta_ip = topo.addrs(4)
    SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.mta)
    block = workdir / "block.txt"
    block.write_text("# nobody yet\n")
    guard = gateway(topo, make_guard, workdir, bypass=True,
                    **{"lists.block_files": [str(block)], "lists.watch_interval": "200ms"})
    clean_session(mta_ip, 25, client, topo.client, 1)
    wait_until(lambda: in_set(topo.gw, "passed4", client), 5, "the client in the passed set")

    block.write_text(f"{client}/32\n")
    wait_until(lambda: not in_set(topo.gw, "passed4", client), 5, "the client out of the passed set")
    # The file's block is the guard's own (only detections and the admin
    # API go into the kernel's blocked set): its connection meets the guard
    # again and is refused there.
    c = RawClient(mta_ip, 25, source=client, ns=topo.client)
    assert c.read_reply(timeout=5).code == 554
    c.close()
    assert accepted(guard) == 2
    guard.stop()
