"""`make demo`: the whole pipeline on an embedded default, with traffic you can watch.

Starts three small HTTP backends and proxymatic (supervisord, collector, planner, applier,
status, HAProxy) on a demo services file in a temporary run dir, sends requests through
HAProxy, then edits the file (one backend removed, one added) and shows traffic following.
Ctrl-C stops everything. `--once` runs the script and exits (used by the tests).

The terminal shows the demo's story only: proxymatic's own output (the launcher's and
supervisord's lines) goes to `<run dir>/logs/proxymatic.log`, each program's to its own
`<run dir>/logs/<program>.log` (supervisord), and the demo ends by saying where they are.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from services.common.bus import Message
from services.tap import format_line
from sim.backends import HttpBackend

SERVICE_PORT = int(os.environ.get("DEMO_PORT", "10080"))
STATUS_PORT = int(os.environ.get("DEMO_STATUS_PORT", "19090"))


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def write_services(path: str, backends: list[HttpBackend]) -> None:
    document = {"services": [{"name": "demo-web", "port": SERVICE_PORT, "protocol": "tcp", "mode": "http",
                              "servers": [{"host": "127.0.0.1", "port": b.port, "weight": 500} for b in backends]}]}
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(document, handle, indent=2)
    os.replace(temporary, path)


def fetch(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()


def wait_for(what: str, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def traffic(requests: int = 30) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for _ in range(requests):
        counts[fetch(f"http://127.0.0.1:{SERVICE_PORT}/")[1]] += 1
    return counts


def show(counts: collections.Counter) -> None:
    for name, count in sorted(counts.items()):
        print(f"    {name:<12} {'#' * count} {count}", flush=True)


def proxymatic_command(*args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "proxymatic"), *args]


def bus_excerpt(run_dir: str, count: int = 5) -> list[str]:
    """The newest data message of each topic, as `proxymatic tap` shows them, in time order (a
    tap gets them from three publishers' snapshots, in whatever order those answer): the
    source's one service and its summary, the plan's one service and its summary, the result."""
    result = subprocess.run(proxymatic_command("tap", "--run-dir", run_dir, "--no-heartbeats", "--json",
                                               "--count", str(count)),
                            capture_output=True, text=True, timeout=15)
    messages = []
    for line in result.stdout.splitlines():
        try:
            document = json.loads(line)
            messages.append(Message(document["topic"], document["seq"], document["ts"], document["sender"],
                                    document["epoch"], document["payload"]))
        except (ValueError, KeyError, TypeError):
            continue
    return [format_line(m) for m in sorted(messages, key=lambda m: m.ts)]


class DiffTap:
    """`proxymatic tap --diff --topic plan` running while the demo edits the file: its lines."""

    def __init__(self, run_dir: str):
        self.process = subprocess.Popen(proxymatic_command("tap", "--run-dir", run_dir, "--diff", "--topic", "plan"),
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def messages(self, topic: str | None = None) -> int:
        """Message lines shown so far (of `topic` only, when given)."""
        return sum(1 for line in list(self.lines)
                   if not line.startswith(" ") and (topic is None or line.split()[1:2] == [topic]))

    def stop(self, wanted_summaries: int, timeout: float = 5.0) -> list[str]:
        """The lines once `wanted_summaries` plan summaries were shown (or `timeout` passed):
        a plan's change is its key messages, then its summary."""
        deadline = time.monotonic() + timeout
        while self.messages("plan") < wanted_summaries and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # the change lines under the last message
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=2)
        self.process.stdout.close()
        return list(self.lines)


def read_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="run the script, then stop (no waiting for Ctrl-C)")
    args = parser.parse_args()
    for port, variable in ((SERVICE_PORT, "DEMO_PORT"), (STATUS_PORT, "DEMO_STATUS_PORT")):
        if not port_free(port):
            raise SystemExit(f"demo: port {port} is in use; choose another with {variable}=<port> make demo")
    run_dir = tempfile.mkdtemp(prefix="proxymatic-demo-")
    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, mode=0o700)
    services_file = os.path.join(run_dir, "services.json")
    backends = {name: HttpBackend(name) for name in ("backend-a", "backend-b", "backend-c")}
    write_services(services_file, [backends["backend-a"], backends["backend-b"]])
    say(f"starting proxymatic (run dir {run_dir})")
    # proxymatic's own output (the launcher, supervisord) to a log file: the terminal is the demo's
    output = open(os.path.join(logs, "proxymatic.log"), "ab")
    proxymatic = subprocess.Popen(
        proxymatic_command("--services-file", services_file, "--run-dir", run_dir,
                           "--status-endpoint", f"127.0.0.1:{STATUS_PORT}"),
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    output.close()
    diff_tap = None
    try:
        def status_ok() -> bool:
            if proxymatic.poll() is not None:
                raise SystemExit(f"demo: proxymatic exited with code {proxymatic.returncode}")
            return fetch(f"http://127.0.0.1:{STATUS_PORT}/status")[0] == 200
        wait_for("/status OK", status_ok)
        say(f"/status is OK; 30 requests to http://127.0.0.1:{SERVICE_PORT}/ (backends a and b)")
        show(traffic())
        diff_tap = DiffTap(run_dir)
        # the plan as it is, from the snapshot: its service's key message, then its summary
        wait_for("the tap", lambda: diff_tap.messages("plan") >= 1, timeout=10)
        before = len(diff_tap.lines)
        say("editing the services file: backend-a removed, backend-c added")
        write_services(services_file, [backends["backend-b"], backends["backend-c"]])
        wait_for("traffic to follow", lambda: set(traffic(6)) == {"backend-b", "backend-c"})
        say("30 requests again (backends b and c)")
        counts = traffic()
        show(counts)
        if set(counts) != {"backend-b", "backend-c"}:
            raise SystemExit(f"demo: unexpected backends {sorted(counts)}")
        say("what the edit changed in the plan, as `proxymatic tap --diff --topic plan` showed it:")
        lines = diff_tap.stop(wanted_summaries=2)
        diff_tap = None
        changes = lines[before:]
        print("\n".join(changes or ["(the tap showed no change)"]), flush=True)
        say(f"the bus, as `proxymatic tap --run-dir {run_dir}` shows it (newest message of each topic):")
        print("\n".join(bus_excerpt(run_dir)), flush=True)
        say(f"what `proxymatic explain {SERVICE_PORT} --run-dir {run_dir}` says:")
        explained = subprocess.run(proxymatic_command("explain", str(SERVICE_PORT), "--run-dir", run_dir),
                                   capture_output=True, text=True, timeout=15)
        print("\n".join("    " + line for line in (explained.stdout or explained.stderr).rstrip().splitlines()),
              flush=True)
        say(f"HAProxy statistics: http://127.0.0.1:{STATUS_PORT}/   status: http://127.0.0.1:{STATUS_PORT}/status")
        say(f"what is served and why: http://127.0.0.1:{STATUS_PORT}/services   metrics: "
            f"http://127.0.0.1:{STATUS_PORT}/metrics")
        if not args.once:
            say(f"try: curl http://127.0.0.1:{SERVICE_PORT}/ ; edit {services_file} ; Ctrl-C stops everything")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except SystemExit:
        # the demo failed: proxymatic's own last lines say why more often than not
        tail = read_tail(os.path.join(logs, "proxymatic.log"))
        if tail:
            print("demo: the last lines of proxymatic.log:\n" + tail, file=sys.stderr, flush=True)
        raise
    finally:
        if diff_tap is not None:
            diff_tap.stop(wanted_summaries=0, timeout=0)
        say("stopping")
        proxymatic.send_signal(signal.SIGINT)
        try:
            proxymatic.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proxymatic.pid, signal.SIGKILL)
        for backend in backends.values():
            backend.close()
        names = sorted(name for name in os.listdir(logs) if name.endswith(".log")) if os.path.isdir(logs) else []
        say(f"logs are in {logs}: {', '.join(names)} (proxymatic.log: the launcher and supervisord)")


if __name__ == "__main__":
    sys.exit(main())
