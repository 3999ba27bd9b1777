"""Before/after in one run: the request path of a base commit against this checkout.

``python -m bench.compare BASE`` measures both sides, taking turns, in the same run:

* in one process, the layers of ``bench.micro`` (the base's ``smart`` package is
  exported with ``git archive`` and imported as ``smart_base``);
* a one-worker gunicorn of each side under wrk (``bench.profile --no-spy``): server
  CPU per request, the number the optimisations are for.

Medians of the turns, and their ratio (this checkout / base), as a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.processes import ROOT

BASE_PACKAGE = "smart_base"


def export(rev: str, into: Path) -> Path:
    """The commit's whole tree under ``into``, with this checkout's ``bench/``."""
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    shutil.rmtree(into / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "bench", into / "bench", ignore=shutil.ignore_patterns("results"))
    return into


def as_base_package(tree: Path, into: Path) -> None:
    """``tree/smart`` copied to ``into/smart_base``, its own imports renamed."""
    target = into / BASE_PACKAGE
    shutil.copytree(tree / "smart", target)
    for path in target.glob("*.py"):
        text = re.sub(r"\b(from|import) smart\b", rf"\1 {BASE_PACKAGE}", path.read_text())
        path.write_text(text)


def marked(argv: list[str], cwd: Path, marker: str, timeout: float) -> dict[str, float]:
    env_path = f"{cwd}"
    done = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith(marker)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{argv} failed in {cwd}:\n{done.stderr[-3000:]}")
    data: dict[str, float] = json.loads(line.removeprefix(marker))
    return data


MICRO_SCRIPT = """
import json, sys
from bench import micro
from simulator.process import SimulatorProcess
with SimulatorProcess(mode="fixed", fixed_ms=0, failure_rate=0.0) as sim:
    sides = {"base": micro.layers("smart_base", sim.work_url),
             "head": micro.layers("smart", sim.work_url)}
    print("MICRO_JSON " + json.dumps(micro.interleaved(sides, int(sys.argv[1]), 150)))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base", help="the commit to compare with")
    parser.add_argument("--head", help="the commit to measure instead of this checkout")
    parser.add_argument("--rounds", type=int, default=15, help="turns of the in-process layers")
    parser.add_argument("--server-rounds", type=int, default=3, help="turns of the servers")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    python = sys.executable
    rows: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="smart-compare-") as tmp:
        base_tree = export(args.base, Path(tmp) / "tree")
        head_tree = ROOT if args.head is None else export(args.head, Path(tmp) / "head")
        side_by_side = Path(tmp) / "micro"
        side_by_side.mkdir()
        as_base_package(base_tree, side_by_side)
        shutil.copytree(head_tree / "smart", side_by_side / "smart")
        shutil.copytree(
            ROOT / "bench", side_by_side / "bench", ignore=shutil.ignore_patterns("results")
        )
        micro = marked(
            [python, "-c", MICRO_SCRIPT, str(args.rounds)], side_by_side, "MICRO_JSON ", 900
        )
        for name in micro["head"]:  # type: ignore[index]
            rows[name] = (micro["base"][name], micro["head"][name])  # type: ignore[index]
        served: dict[str, list[float]] = {"base": [], "head": []}
        profile = [
            python,
            "-m",
            "bench.profile",
            "--no-spy",
            "--connections",
            str(args.connections),
            "--seconds",
            str(args.seconds),
        ]
        for _ in range(args.server_rounds):
            for side, tree in (("base", base_tree), ("head", head_tree)):
                result = marked(profile, tree, "PROFILE_JSON ", args.seconds + 120)
                served[side].append(result["cpu_us_per_request"])
        name = f"server CPU per request (wrk c={args.connections}, 1 worker)"
        rows[name] = (statistics.median(served["base"]), statistics.median(served["head"]))
    head = args.head or "this checkout"
    print(f"| µs CPU per call (median) | {args.base} | {head} | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name, (base, head) in rows.items():
        print(f"| {name} | {base:.0f} | {head:.0f} | {head / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
