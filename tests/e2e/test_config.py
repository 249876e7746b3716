"""`mxguard check-config`: the effective config is printed as TOML (defaults
filled in, flags applied); a bad file is refused with the key and the file
named, exit status 2, and `run` refuses it the same way."""

import re
import subprocess
import tomllib

import pytest

from guard import binary, check_config

UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}


def seconds(text: str) -> float:
    """Durations as written by humans and by humantime: 6s, 500ms, 5m, 1h 30m."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)", text)
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*(ms|s|min|m|h))+\s*", text), f"not a duration: {text!r}"
    return sum(float(n) * UNITS[u] for n, u in parts)


def test_without_a_file_the_defaults_are_printed():
    out = check_config()
    assert out.returncode == 0, out.stderr
    cfg = tomllib.loads(out.stdout)

    assert cfg["intercept"]["mode"] == "fixed"
    assert cfg["intercept"]["listen"] == ["0.0.0.0:25"]
    assert cfg["intercept"]["transparent_upstream"] is False
    assert seconds(cfg["greet"]["delay"]) == 6
    assert cfg["greet"]["challenge"] is True
    assert cfg["greet"]["upstream_connect"] == "lazy"
    assert seconds(cfg["greet"]["connect_lead"]) == 1
    assert seconds(cfg["greet"]["banner_timeout"]) == 30
    assert cfg["pregreet"]["action"] == "reject"
    assert seconds(cfg["pregreet"]["block_ttl"]) == 3600
    assert cfg["pregreet"]["capture"] == 100
    assert cfg["relay"]["mode"] == "splice"
    assert seconds(cfg["relay"]["idle_timeout"]) == 300
    assert seconds(cfg["limits"]["drain_timeout"]) == 30
    assert cfg["admin"]["listen"] == "127.0.0.1:9425"
    assert cfg["log"]["format"] == "text"


def test_a_good_file_is_accepted_and_printed_with_defaults_filled_in(workdir):
    path = workdir / "good.toml"
    path.write_text(
        'hostname = "mx.example.test"\n'
        "[intercept]\n"
        'listen = ["127.0.0.1:2525", "[::1]:2525"]\n'
        'upstream = "127.0.0.1:10025"\n'
        "[greet]\n"
        'delay = "750ms"\n'
        'upstream_connect = "eager"\n'
        "[pregreet]\n"
        'action = "observe"\n'
    )
    out = check_config(config=path)
    assert out.returncode == 0, out.stderr
    cfg = tomllib.loads(out.stdout)

    assert cfg["hostname"] == "mx.example.test"
    assert cfg["intercept"]["listen"] == ["127.0.0.1:2525", "[::1]:2525"]
    assert cfg["intercept"]["upstream"] == "127.0.0.1:10025"
    assert seconds(cfg["greet"]["delay"]) == 0.75
    assert cfg["greet"]["upstream_connect"] == "eager"
    assert cfg["pregreet"]["action"] == "observe"
    assert seconds(cfg["relay"]["idle_timeout"]) == 300, "defaults fill what the file leaves out"

    # the printed config is itself a valid config that means the same
    again = workdir / "again.toml"
    again.write_text(out.stdout)
    out2 = check_config(config=again)
    assert out2.returncode == 0, out2.stderr
    assert tomllib.loads(out2.stdout) == cfg


def test_flags_override_the_file(workdir):
    path = workdir / "base.toml"
    path.write_text('[greet]\ndelay = "9s"\n[pregreet]\naction = "drop"\n')
    out = check_config("--greet-delay", "2s", "--pregreet-action", "observe", "--listen", "127.0.0.1:2601",
                       "--listen", "[::1]:2601", "--mode", "redirect", "--upstream", "127.0.0.1:2700",
                       "--admin-listen", "127.0.0.1:9999", "--log-format", "json", config=path)
    assert out.returncode == 0, out.stderr
    cfg = tomllib.loads(out.stdout)

    assert seconds(cfg["greet"]["delay"]) == 2
    assert cfg["pregreet"]["action"] == "observe"
    assert cfg["intercept"]["listen"] == ["127.0.0.1:2601", "[::1]:2601"]
    assert cfg["intercept"]["mode"] == "redirect"
    assert cfg["intercept"]["upstream"] == "127.0.0.1:2700"
    assert cfg["admin"]["listen"] == "127.0.0.1:9999"
    assert cfg["log"]["format"] == "json"


BAD = {
    "unknown-key": ("[greet]\ndelay = \"1s\"\nbogus = 1\n", "greet.bogus"),
    "unknown-table": ("[nonsense]\nx = 1\n", "nonsense"),
    "unknown-top-level-key": ("colour = \"blue\"\n", "colour"),
    "bad-duration": ("[greet]\ndelay = \"6 parsecs\"\n", "greet.delay"),
    "duration-not-a-string": ("[greet]\nbanner_timeout = 30\n", "greet.banner_timeout"),
    "bad-action": ("[pregreet]\naction = \"maybe\"\n", "pregreet.action"),
    "bad-mode": ("[intercept]\nmode = \"magic\"\n", "intercept.mode"),
    "bad-listen-address": ("[intercept]\nlisten = [\"not an address\"]\n", "intercept.listen"),
    "bad-upstream-connect": ("[greet]\nupstream_connect = \"sometimes\"\n", "greet.upstream_connect"),
    "too-many-workers": ("[intercept]\nworkers = 1000\n", "intercept.workers"),
    "not-toml": ("[greet\ndelay = 1s\n", None),
}


@pytest.mark.parametrize("case", BAD.keys())
def test_a_bad_file_is_refused_naming_the_key_and_the_file(case, workdir):
    text, key = BAD[case]
    path = workdir / f"{case}.toml"
    path.write_text(text)

    out = check_config(config=path)

    assert out.returncode == 2, (out.returncode, out.stderr)
    assert str(path) in out.stderr, out.stderr
    if key:
        assert key in out.stderr, out.stderr
    assert out.stdout == ""


def test_a_missing_file_is_refused_naming_it(workdir):
    path = workdir / "does-not-exist.toml"
    out = check_config(config=path)
    assert out.returncode != 0
    assert str(path) in out.stderr


def test_run_refuses_a_bad_file_without_listening(workdir):
    path = workdir / "bad.toml"
    path.write_text('[greet]\ndelay = "soon"\n')
    proc = subprocess.run([binary(), "run", "--config", str(path)], capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc
    assert "greet.delay" in proc.stderr and str(path) in proc.stderr
