"""Threshold responses: each detection raises the client's reputation
score; crossing the threshold blocklists it, counts it in a metric, and
POSTs an alert (JSON) to a webhook. The receiver here is a small HTTP
server in the test that fails the first delivery: the guard retries."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from peers import CLEANUP, RawClient, wait_until


class Receiver:
    def __init__(self, fail_first=1):
        self.bodies: list[dict] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts += 1
                if receiver.attempts <= fail_first:
                    self.send_response(500)
                else:
                    receiver.bodies.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                            "json": json.loads(body)})
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        CLEANUP.push("webhook receiver", self.server.shutdown)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mxguard"


def talk_early(guard, source):
    c = RawClient("127.0.0.1", guard.port, source=source)
    c.send(b"EHLO early.example.test\r\n")
    code = c.read_reply(timeout=3).code
    c.close()
    return code


def test_crossing_the_reputation_threshold_blocks_and_posts_an_alert(sink, make_guard):
    receiver = Receiver(fail_first=1)
    guard = make_guard(upstream=sink.addr, **{
        "greet.delay": "300ms",
        "pregreet.action": "observe",
        "reputation.detection_points": 1.0,
        "reputation.threshold": 1.5,
        "reputation.on_threshold": ["block", "alert"],
        "reputation.block_ttl": "1h",
        "alert.webhook": receiver.url,
        "alert.timeout": "2s",
        "alert.retries": 3,
    })
    assert talk_early(guard, "127.0.0.5") == 220  # observed: one point
    assert talk_early(guard, "127.0.0.5") == 220  # two points: over the threshold of 1.5
    guard.wait_log(r"REPUTATION 2\.00 over 1\.5 for \[127\.0\.0\.5\] \(last: pregreet\)")

    wait_until(lambda: receiver.bodies, 10, "the alert at the webhook")
    [alert] = receiver.bodies
    assert alert["path"] == "/hooks/mxguard" and alert["type"] == "application/json"
    doc = alert["json"]
    assert doc["event"] == "reputation-threshold"
    assert doc["client"] == "127.0.0.5"
    assert doc["gateway"] == "guard.example.test"
    assert doc["score"] >= 1.99 and doc["action"] == ["block", "alert"]
    assert doc["reason"] == "pregreet" and doc["at_unix_ms"] > 0
    assert receiver.attempts == 2, "the first delivery failed and was retried"

    # The block took effect, and the metrics an alert rule watches moved.
    c = RawClient("127.0.0.1", guard.port, source="127.0.0.5")
    assert c.read_reply(timeout=3).code == 554
    c.close()
    assert guard.metric("mxguard_reputation_threshold_total", response="crossed") == 1
    assert guard.metric("mxguard_alerts_total", result="sent") == 1
    assert guard.metric("mxguard_alerts_total", result="retried") == 1
    # Another client is untouched.
    assert talk_early(guard, "127.0.0.6") == 220
