"""`make demo` runs end to end (here with free ports, and without waiting for Ctrl-C)."""
import os
import subprocess
import sys

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_shows_traffic_following_the_change():
    env = {**os.environ, "DEMO_PORT": str(free_port()), "DEMO_STATUS_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "sim.demo", "--once"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    before, after = result.stdout.split("backend-a removed, backend-c added")
    assert "backend-a" in before and "backend-b" in before
    assert "backend-c" in after and "backend-a" not in after.split("the bus")[0]
    assert "applied." in after  # the tap lines
