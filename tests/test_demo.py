"""`make demo` runs end to end (here with free ports, and without waiting for Ctrl-C)."""
import os
import re
import shutil
import subprocess
import sys

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAP_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \S+ +seq=")


def test_demo_shows_traffic_following_the_change():
    env = {**os.environ, "DEMO_PORT": str(free_port()), "DEMO_STATUS_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "sim.demo", "--once"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    before, after = result.stdout.split("backend-a removed, backend-c added")
    assert "backend-a" in before and "backend-b" in before
    assert "backend-c" in after and "backend-a" not in after.split("what the edit changed")[0]
    assert "applied." in after  # the tap lines

    # The demo's story alone: its own lines, the traffic bars, the tap's lines; no log line of
    # the launcher, supervisord or a stage (they are in the run dir's logs).
    assert result.stderr == ""
    for line in result.stdout.splitlines():
        assert line.startswith(("==> ", "    ", "  + ", "  - ", "  ~ ")) or TAP_LINE.match(line), \
            f"not a line of the demo: {line!r}"
    # what the edit changed, as tap --diff showed it: backend-a's server out, backend-c's in
    changed = after.split("what the edit changed")[1].split("==> the bus")[0]
    assert re.search(r"^  - \d+/tcp demo-web: 127\.0\.0\.1:\d+ weight 500$", changed, re.M)
    assert re.search(r"^  \+ \d+/tcp demo-web: 127\.0\.0\.1:\d+ weight 500$", changed, re.M)
    # the bus excerpt in time order
    excerpt = after.split("==> the bus")[1].split("==> what `proxymatic explain")[0]
    stamps = [m.group(1) for m in map(TAP_LINE.match, excerpt.splitlines()) if m]
    assert len(stamps) == 5 and stamps == sorted(stamps)  # a source's key and summary, the plan's, the result
    topics = sorted(line.split()[1] for line in excerpt.splitlines() if TAP_LINE.match(line))
    key = f"{env['DEMO_PORT']}/tcp"
    assert topics[0].startswith("applied.") and topics[1:] == ["plan", f"plan:{key}", "source.file", f"source.file:{key}"], \
        topics
    # what `proxymatic explain PORT` says: the service, its two servers UP
    explained = after.split("==> what `proxymatic explain")[1].split("==> HAProxy")[0]
    port = env["DEMO_PORT"]
    assert f"    {port}/tcp demo-web (http, from file): served by haproxy on port {port}" in explained
    assert "2 servers, 2 UP" in explained
    # it ends by saying where the logs are, and they are there
    last = result.stdout.splitlines()[-1]
    match = re.match(r"^==> logs are in (\S+): (.*)$", last)
    assert match, last
    logs, names = match.group(1), match.group(2)
    for program in ("proxymatic", "supervisord", "collector", "planner", "applier", "status", "haproxy"):
        assert f"{program}.log" in names
        assert os.path.isfile(os.path.join(logs, f"{program}.log"))
    try:
        with open(os.path.join(logs, "proxymatic.log")) as handle:
            assert "supervisord started" in handle.read()  # what used to be on the terminal
    finally:
        shutil.rmtree(os.path.dirname(logs), ignore_errors=True)  # the demo leaves it for a reader
