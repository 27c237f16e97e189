"""Run the real pipeline (stages and proxies as separate processes, no supervisord) in a temp
run dir: for integration tests and benchmarks that need to restart or inspect single parts."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PROXYMATIC = [sys.executable, "-m", "services.cli"]
STAGE_ORDER = ("haproxy", "pen", "nginx", "applier", "planner", "collector", "status")


class Pipeline:
    def __init__(self, args: list[str], programs: tuple[str, ...] = ("haproxy", "pen", "applier", "planner", "collector"),
                 env: dict | None = None, log_to_files: bool = True, services_file: bool = False):
        self.run_dir = tempfile.mkdtemp(prefix="pmp")
        # `services_file=True`: a static source at `self.services_file`, inside the run dir
        self.services_file = os.path.join(self.run_dir, "services.json")
        self.args = ["--run-dir", self.run_dir, *(["--services-file", self.services_file] if services_file else []), *args]
        self.programs = programs
        self.env = {**os.environ, **(env or {})}
        self.log_to_files = log_to_files
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, *names: str) -> "Pipeline":
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        for name in names or [p for p in STAGE_ORDER if p in self.programs]:
            output = open(os.path.join(self.run_dir, "logs", f"{name}.log"), "ab") if self.log_to_files else None
            self.processes[name] = subprocess.Popen([*PROXYMATIC, name, *self.args], env=self.env, stdout=output,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start(name)

    def log(self, name: str) -> str:
        with open(os.path.join(self.run_dir, "logs", f"{name}.log"), errors="replace") as handle:
            return handle.read()

    def log_tails(self, limit: int = 3000) -> str:
        """The end of every running program's log, for a test's failure message."""
        tails = []
        for name in self.processes:
            try:
                tails.append(f"--- {name}.log ---\n" + self.log(name)[-limit:])
            except OSError:
                pass
        return "\n".join(tails)

    def stop(self) -> None:
        for name in reversed(STAGE_ORDER):
            if name in self.processes:
                process = self.processes[name]
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 15
        for name, process in list(self.processes.items()):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
