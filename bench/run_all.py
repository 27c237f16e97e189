"""`make bench`: every benchmark in turn, with the command that reproduces each."""
from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    ["-m", "bench.pipeline_bench", "--apps", "100,1000", "--changes", "200", "--breakdown"],
    ["-m", "bench.pipeline_bench", "--apps", "1000,10000", "--tasks", "3", "--changes", "100", "--until-plan",
     "--breakdown"],
    ["-m", "bench.pipeline_bench", "--apps", "100,1000", "--changes", "200", "--registrator"],
    ["-m", "bench.codec_bench"],
    ["-m", "bench.applier_bench"],
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
