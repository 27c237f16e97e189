"""`make bench`: every benchmark in turn, with the command that reproduces each."""
from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    ["-m", "bench.pipeline_bench", "--apps", "100,1000", "--changes", "200", "--registrator"],
    ["-m", "bench.churn_bench", "--changes", "200"],
    ["-m", "bench.marathon_bench"],
    ["bench/registrator_bench.py"],
)


def main() -> int:
    failed = 0
    for args in BENCHMARKS:
        print(f"\n$ .venv/bin/python {' '.join(args)}", flush=True)
        failed += subprocess.run([sys.executable, *args]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
