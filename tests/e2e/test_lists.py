"""Allow and block lists: CIDR files read at start, on SIGHUP and when a
file changes; a bad file keeps the lists in force and says which line;
detections add entries that expire. A blocked address never reaches the
MTA (checked at smtp-sink's side: no connection from it)."""

import signal
import time

from peers import RawClient, make_message, swaks, wait_until


def refused(guard, source) -> bool:
    """Connects from `source`: True for a 554 at once, False for our `220-`."""
    c = RawClient("127.0.0.1", guard.port, source=source, timeout=5)
    try:
        line = c.read_line(timeout=5)[1]
    finally:
        c.close()
    assert line[:3] in (b"554", b"220"), line
    return line.startswith(b"554")


def test_list_files_block_and_allow_and_follow_edits(sink, make_guard, workdir):
    block = workdir / "block.txt"
    allow = workdir / "allow.txt"
    block.write_text("# bots\n127.0.0.7        # caught last week\n10.0.0.0/8\n")
    allow.write_text("127.0.0.8\n")
    guard = make_guard(upstream=sink.addr, **{
        "lists.block_files": [str(block)], "lists.allow_files": [str(allow)],
        "lists.watch_interval": "200ms", "greet.delay": "1s"})

    assert refused(guard, "127.0.0.7")
    guard.wait_log(r'verdict="?blocked"? test="?blocklist"? client=127\.0\.0\.7:')

    # The allowlisted client is greeted by the MTA at once: no delay, no test.
    c = RawClient("127.0.0.1", guard.port, source="127.0.0.8")
    reply = c.read_reply(timeout=3)
    assert reply.code == 220 and b"sink.example.test" in reply.lines[0] and reply.at < 0.8, reply
    c.command(b"QUIT\r\n")
    c.close()
    guard.wait_log(r'test="?allowlist"? client=127\.0\.0\.8:')

    # An edit is picked up without a signal.
    block.write_text("127.0.0.7\n127.0.0.9  # added\n")
    wait_until(lambda: refused(guard, "127.0.0.9"), 5, "127.0.0.9 refused after the edit", interval=0.25)
    guard.wait_log(r"lists: a list file changed; reloading")

    # A bad line: the lists in force stay, the log names the file and line.
    block.write_text("127.0.0.7\n127.0.0.9\n127.0.0.300/33\n")
    guard.wait_log(r"lists: reload failed, keeping the old lists: .*block\.txt: 1 bad line: line 3", timeout=5)
    assert refused(guard, "127.0.0.9")

    # Blocked clients never reached the MTA: only the allowlisted one did.
    msg = make_message()
    swaks("127.0.0.1", guard.port, msg, source="127.0.0.3", workdir=workdir)
    sink.wait_messages(1)
    assert sink.connections() == ["127.0.0.1", "127.0.0.1"]
    assert guard.metric("mxguard_list_reloads_total", result="error") >= 1


def test_sighup_rereads_the_files(sink, make_guard, workdir):
    block = workdir / "block.txt"
    block.write_text("")
    guard = make_guard(upstream=sink.addr, **{"lists.block_files": [str(block)],
                                              "lists.watch_interval": "0s"})
    assert not refused(guard, "127.0.0.7")
    block.write_text("127.0.0.0/29\n")
    time.sleep(0.3)
    assert not refused(guard, "127.0.0.7"), "no watching: only SIGHUP reloads"
    guard.signal(signal.SIGHUP)
    guard.wait_log(r"lists: 1 entries from the list files")
    assert refused(guard, "127.0.0.7")
    assert not refused(guard, "127.0.0.8")


def test_a_detection_blocks_until_its_entry_expires(sink, make_guard):
    guard = make_guard(upstream=sink.addr, **{"pregreet.block_ttl": "1500ms", "greet.delay": "1s"})
    bot = RawClient("127.0.0.1", guard.port, source="127.0.0.2")
    bot.send(b"EHLO bot.example.test\r\n")
    assert bot.read_reply(timeout=3).code == 554
    bot.close()
    guard.wait_log(r'verdict="?reject"? test="?pregreet')
    assert refused(guard, "127.0.0.2")
    assert guard.metric("mxguard_admissions_total", result="blocked") == 1
    # The entry lapses: the client is greeted again.
    wait_until(lambda: not refused(guard, "127.0.0.2"), 5, "the detection's entry expired", interval=0.25)
    assert sink.connections() == []
