"""Steering without NAT: `intercept.mode = "sk_lookup"`.

The guard runs on the MTA's host (here the gateway namespace of netns.py,
where `smtp-sink` listens on port 25 of every address). Its BPF program
hands new connections to port 25 that come in on `g0` to the guard's own
sockets (on loopback, another port): the accepted socket's local address is
where the client was going, and the guard's own connection to it (from the
host to itself) is not steered, so it reaches the MTA. No nftables rule, no
connection tracking. With `sk_lookup.bypass_passed` a client that passed is
put into the program's map with the pass TTL, and its next connections go
to the MTA's socket without the guard; a block takes it out again. When
the guard stops, the program goes with it and port 25 is the MTA's own."""

import os
import shutil
import signal
import subprocess
import time

import pytest

import guard as guard_mod
import netns
from admin_api import accepted, bypass_guard, call
from peers import PostfixMta, RawClient, SmtpSink, clean_session, free_port, run, wait_until

pytestmark = [pytest.mark.time_limit(90)]

FAMILIES = [4, 6]


def mta_host_guard(topo, make_guard, workdir, bypass: bool, name="guard", **overrides):
    """The guard beside the MTA in the gateway namespace, listening on
    loopback only, steering port 25 from g0."""
    port = free_port()
    return bypass_guard(
        make_guard, workdir, topo.gw, [f"127.0.0.1:{port}", f"[::1]:{port}"],
        r"sk_lookup: new connections to ports \[25\] on g0 steered to "
        rf"127\.0\.0\.1:{port}, \[::1\]:{port}", name=name,
        **{"intercept.mode": "sk_lookup",
           "sk_lookup.ports": [25],
           "sk_lookup.interfaces": ["g0"],
           "sk_lookup.bypass_passed": bypass,
           **overrides})


def from_guard(greeting: list[bytes]) -> bool:
    return greeting[0].startswith(b"220-guard.example.test")


def from_mta(greeting: list[bytes]) -> bool:
    return greeting == [b"220 sink.example.test ESMTP\r\n"]


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_connections_are_steered_to_the_guard_and_passed_clients_go_to_the_mta(
        family, topo, make_guard, workdir):
    client, gw, _, _ = topo.addrs(family)
    sink = SmtpSink(workdir, host="0.0.0.0" if family == 4 else "::", port=25, ns=topo.gw)
    guard = mta_host_guard(topo, make_guard, workdir, bypass=True)

    # First session: through the guard (challenge line, greet pause), which
    # relays it to where it was going, port 25 of the gateway's address;
    # the MTA sees the host itself.
    greeting = clean_session(gw, 25, client, topo.client, 1)
    assert from_guard(greeting), greeting
    assert guard.wait_verdict(client)["verdict"] == "pass"
    sink.wait_messages(1)
    assert sink.connections() == [gw]
    assert accepted(guard) == 1
    assert guard.metric("mxguard_sk_lookup_passed_total", op="add", result="ok") == 1
    # One list look-up, the admission's: the pass's own check is not one.
    assert guard.metric("mxguard_blocklist_lookups_total", result="unlisted") == 1

    # Next sessions: the kernel leaves them to the MTA's socket. The guard
    # does not see them; the MTA sees the client's own address.
    for n in (2, 3):
        assert from_mta(clean_session(gw, 25, client, topo.client, n))
    sink.wait_messages(3)
    assert sink.connections() == [gw, client, client]
    assert accepted(guard) == 1

    # An operator blocks it: out of the map at once; its next connection
    # meets the guard, which refuses it.
    status, body, _ = call(guard, "POST", "/api/v1/blocklist", {"address": client, "ttl_seconds": 600})
    assert status in (200, 201), body
    assert guard.metric("mxguard_sk_lookup_passed_total", op="remove", result="ok") == 1
    c = RawClient(gw, 25, source=client, ns=topo.client)
    assert c.read_reply(timeout=5).code == 554
    c.close()
    assert accepted(guard) == 2

    # Unblocked, it is a stranger again (the block took its pass too).
    status, body, _ = call(guard, "DELETE", f"/api/v1/blocklist?net={client}")
    assert status == 200, body
    assert from_guard(clean_session(gw, 25, client, topo.client, 4))
    assert accepted(guard) == 3
    sink.wait_messages(4)
    assert sink.connections()[-1] == gw

    # The program goes with the guard: port 25 is the MTA's own again.
    guard.stop()
    assert from_mta(clean_session(gw, 25, client, topo.client, 5))
    sink.wait_messages(5)
    assert sink.connections()[-1] == client


def test_without_the_bypass_every_session_is_the_guards(topo, make_guard, workdir):
    client, gw, _, _ = topo.addrs(4)
    sink = SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.gw)
    guard = mta_host_guard(topo, make_guard, workdir, bypass=False)
    assert from_guard(clean_session(gw, 25, client, topo.client, 1))
    assert guard.wait_verdict(client)["verdict"] == "pass"
    # The guard's own pass cache: no pause the second time, but its session.
    assert from_mta(clean_session(gw, 25, client, topo.client, 2))
    sink.wait_messages(2)
    assert sink.connections() == [gw, gw]
    assert accepted(guard) == 2
    assert guard.metric("mxguard_sk_lookup_passed_total", op="add", result="ok") == 0
    # Another port of the host is not steered.
    sink26 = SmtpSink(workdir, host="0.0.0.0", port=26, ns=topo.gw, name="sink26")
    c = RawClient(gw, 26, source=client, ns=topo.client)
    assert c.read_reply(timeout=5).lines == [b"220 sink.example.test ESMTP\r\n"]
    c.close()
    assert accepted(guard) == 2
    assert sink26.connections() == [client]
    guard.stop()


def test_a_detection_takes_a_passed_client_out_of_the_map(topo, make_guard, workdir):
    """A session opened before the client passed is the guard's to the end;
    a protocol violation on it blocks the address and takes its pass out of
    the program's map."""
    client, gw, _, _ = topo.addrs(4)
    sink = SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.gw)
    guard = mta_host_guard(topo, make_guard, workdir, bypass=True)

    early = RawClient(gw, 25, source=client, ns=topo.client)
    assert early.read_reply(timeout=5).code == 220
    clean_session(gw, 25, client, topo.client, 1)
    # The pass is in the map before the verdict is logged.
    assert guard.wait_verdict(client)["verdict"] == "pass"
    assert from_mta(clean_session(gw, 25, client, topo.client, 2))

    # EHLO must end a pipeline group: a bot's burst on the old session.
    early.send(b"EHLO hasty.example.test\r\nMAIL FROM:<a@b.example>\r\n")
    assert early.read_reply(timeout=5).code == 554
    early.close()
    assert guard.metric("mxguard_sk_lookup_passed_total", op="remove", result="ok") == 1
    c = RawClient(gw, 25, source=client, ns=topo.client)
    assert c.read_reply(timeout=5).code == 554
    c.close()
    assert len(sink.messages()) == 2
    guard.stop()


def test_an_unknown_interface_is_a_clear_start_error(topo, workdir):
    g = guard_mod.Guard(workdir, listen=[f"127.0.0.1:{free_port()}"], ns=topo.gw, name="bad", start=False,
                        **{"intercept.mode": "sk_lookup", "sk_lookup.interfaces": ["nosuch0"]})
    out = subprocess.run(["ip", "netns", "exec", topo.gw, guard_mod.binary(), "run", "--config",
                          str(g.config_path)], capture_output=True, text=True, timeout=20,
                         stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert 'sk_lookup.interfaces: no interface "nosuch0"' in out.stderr, out.stderr


def test_runs_as_nobody_with_the_drop_ins_capabilities(topo, workdir):
    """What systemd/sk-lookup.conf grants (CAP_BPF and CAP_NET_ADMIN
    ambient, no new privileges) is enough to load and attach the program;
    without CAP_BPF the start stops with a clear error."""
    client, gw, _, _ = topo.addrs(4)
    SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.gw)
    state = workdir / "nobody-state"
    state.mkdir()
    os.chmod(state, 0o777)
    port = free_port()
    g = guard_mod.Guard(workdir, listen=[f"127.0.0.1:{port}"], ns=topo.gw, name="nobody", start=False,
                        **{"intercept.mode": "sk_lookup", "state.dir": str(state), "greet.delay": "300ms"})
    os.chmod(g.workdir, 0o755)
    os.chmod(g.config_path, 0o644)

    def as_nobody(caps: str) -> list[str]:
        return ["ip", "netns", "exec", topo.gw, "setpriv", "--reuid=nobody", "--regid=nogroup",
                "--clear-groups", "--no-new-privs", f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}",
                f"--bounding-set=-all,{caps}", guard_mod.binary(), "run", "--config", str(g.config_path)]

    out = subprocess.run(as_nobody("+net_admin"), capture_output=True, text=True, timeout=20,
                         stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert "needs CAP_BPF and CAP_NET_ADMIN" in out.stderr, out.stderr

    proc = subprocess.Popen(as_nobody("+net_admin,+bpf"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: port in netns_listening(topo.gw) or proc.poll() is not None, 10, "listening")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        c = RawClient(gw, 25, source=client, ns=topo.client)
        assert c.read_reply(timeout=5).lines[0].startswith(b"220-guard.example.test")
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def netns_listening(ns: str) -> set[int]:
    out = netns.in_ns(ns, "ss", "-Htln").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_a_steered_session_is_spliced_byte_for_byte(topo, make_guard, workdir):
    """The accepted sockets of a steered listener relay like any other:
    a 1 MB body after the greeting goes through the splice relay, whole."""
    client, gw, _, _ = topo.addrs(4)
    sink = SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.gw)
    guard = mta_host_guard(topo, make_guard, workdir, bypass=False,
                           **{"turns.watch": "greeting", "relay.mode": "splice", "greet.delay": "0s"})
    line = b"x" * 74 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (1_000_000 // len(line))
    c = RawClient(gw, 25, source=client, ns=topo.client)
    assert c.read_reply(timeout=5).code == 220
    assert c.command(b"EHLO client.example.test\r\n").code == 250
    assert c.command(b"MAIL FROM:<alice@sender.example.test>\r\n").code == 250
    assert c.command(b"RCPT TO:<bob@example.test>\r\n").code == 250
    assert c.command(b"DATA\r\n").code == 354
    assert c.command(body + b".\r\n", timeout=30).code == 250
    assert c.command(b"QUIT\r\n").code == 221
    c.close()
    (got,) = sink.wait_messages(1)
    assert got.content.endswith(body.replace(b"\r\n", b"\n")[-100_000:])
    assert body.replace(b"\r\n", b"\n") in got.content
    spliced = guard.metric("mxguard_relayed_bytes_total", direction="upstream", mode="splice")
    assert spliced > len(body) / 2, spliced
    guard.stop()


def test_a_block_file_takes_a_passed_client_out_of_the_map(topo, make_guard, workdir):
    client, gw, _, _ = topo.addrs(4)
    SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.gw)
    block = workdir / "block.txt"
    block.write_text("# nobody yet\n")
    guard = mta_host_guard(topo, make_guard, workdir, bypass=True,
                           **{"lists.block_files": [str(block)], "lists.watch_interval": "200ms"})
    clean_session(gw, 25, client, topo.client, 1)
    # The pass is in the map before the verdict is logged.
    assert guard.wait_verdict(client)["verdict"] == "pass"
    assert from_mta(clean_session(gw, 25, client, topo.client, 2))
    assert accepted(guard) == 1

    # A prefix in a file: the pass goes when the file is read again.
    block.write_text("10.77.1.0/24\n")
    guard.wait_metric("mxguard_sk_lookup_passed_total", 1, timeout=5, op="remove", result="ok")
    c = RawClient(gw, 25, source=client, ns=topo.client)
    assert c.read_reply(timeout=5).code == 554
    c.close()
    assert accepted(guard) == 2
    guard.stop()


def relay_attempt(gw: str, client: str, ns: str) -> int:
    """A session through the guard that asks the MTA to relay: the RCPT's
    reply code."""
    c = RawClient(gw, 25, source=client, ns=ns)
    assert c.read_reply(timeout=5).code == 220
    assert c.command(b"EHLO client.example.test\r\n").code == 250
    assert c.command(b"MAIL FROM:<spammer@sender.example.test>\r\n").code == 250
    code = c.command(b"RCPT TO:<victim@elsewhere.example>\r\n").code
    c.command(b"QUIT\r\n")
    c.close()
    return code


def test_a_postfix_that_trusts_its_host_relays_for_the_guards_sessions_unless_told(topo, make_guard, workdir):
    """The hazard docs/deployment.md warns of: the guard's sessions reach the
    MTA from the host's own address, which Postfix's default mynetworks
    (style `host`) trusts. `-o mynetworks=` on the port-25 service (the
    documented `postconf -P`) closes it."""
    client, gw, gw_mta_side, _ = topo.addrs(4)
    host_networks = f"127.0.0.0/8 [::1]/128 {gw}/32 {gw_mta_side}/32"
    mta = PostfixMta(workdir, host="0.0.0.0", port=25, ns=topo.gw,
                     extra_main={"mynetworks": host_networks})
    mta_host_guard(topo, make_guard, workdir, bypass=False, **{"greet.delay": "0s"})
    assert relay_attempt(gw, client, topo.client) == 250
    run(["postconf", "-c", str(mta.dir), "-P", "0.0.0.0:25/inet/mynetworks="])
    mta.postfix("reload")
    mta.wait_log(r"master\[\d+\]: reload -- version")
    # smtpd processes started before the reload may serve one more session.
    time.sleep(1)
    # 554 with this MTA's reject_unauth_destination (Postfix's default,
    # defer_unauth_destination, says 454).
    assert relay_attempt(gw, client, topo.client) == 554
    assert "Relay access denied" in mta.log()


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft missing (tests/install-deps.sh)")
def test_nftables_drops_blocked_clients_before_the_program(topo, make_guard, workdir):
    """Blocks in the kernel as in the other modes: `[nftables]` without its
    redirect is an input chain, which the packets meet before the socket
    lookup (and the program) does."""
    client, gw, _, _ = topo.addrs(4)
    SmtpSink(workdir, host="0.0.0.0", port=25, ns=topo.gw)
    table = "mxguard_sk_e2e"
    guard = mta_host_guard(topo, make_guard, workdir, bypass=False,
                           **{"nftables.enabled": True, "nftables.table": table,
                              "nftables.batch_interval": "100ms"})
    try:
        assert netns.syn_answered(topo.client, gw, 25, client)
        status, body, _ = call(guard, "POST", "/api/v1/blocklist", {"address": client, "ttl_seconds": 600})
        assert status in (200, 201), body
        guard.wait_metric("mxguard_nftables_elements_total", 1, timeout=5, result="ok")
        assert not netns.syn_answered(topo.client, gw, 25, client)
        assert accepted(guard) == 1
    finally:
        guard.stop()
        netns.in_ns(topo.gw, "nft", "delete", "table", "inet", table, check=False)
