"""Runs every benchmark in sequence (one process each), then prints the goals table and writes results.json.

    python benchmarks/run_all.py [--quick] [--out-dir /tmp/cifar_jax_bench] [--workdir runs/resnet18_cpu]

Each script writes OUT_DIR/NAME.json; OUT_DIR/results.json holds them all plus
the goal checks. Result files are not meant to be committed (docs/benchmarks.md
carries the table of a real run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import machine, table, training_is_running

HERE = Path(__file__).resolve().parent
SCRIPTS = ["train_throughput", "host_overhead", "cam_throughput", "cold_warm_start", "peak_memory"]


def goals(r: dict) -> list[dict]:
    """The issue's targets, each with the measured value and met / not met."""
    def get(name, *keys):
        value = r.get(name)
        for k in keys:
            value = None if value is None else value.get(k)
        return value

    checks = [
        ("train step vs PyTorch eager, CPU config (width 16)", get("train_throughput", "jax_over_torch", "cpu"), ">=", 1.0, "x"),
        ("train step vs PyTorch eager, full width (64)", get("train_throughput", "jax_over_torch", "full"), ">=", 2.0, "x"),
        ("host overhead of the training loop", get("host_overhead", "overhead_pct"), "<=", 3.0, "%"),
        ("warm start / cold start", get("cold_warm_start", "warm_over_cold"), "<=", 0.25, ""),
        ("batched Grad-CAM / per-image loop", get("cam_throughput", "batched_over_loop"), ">=", 10.0, "x"),
    ]
    rows = []
    for goal, value, op, target, unit in checks:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append(dict(goal=goal, target=f"{op} {target:g}{unit}", measured=value,
                         met={None: "not run", True: "met", False: "NOT met"}[met]))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--out-dir", default="/tmp/cifar_jax_bench")
    p.add_argument("--workdir", help="trained run for cam_throughput (default: a freshly initialised model)")
    p.add_argument("--only", help="comma-separated subset of " + ",".join(SCRIPTS))
    args = p.parse_args()
    if training_is_running() and not args.quick:
        print("WARNING: a cifar_jax.train run is active; real measurements now would be wrong.", file=sys.stderr)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only.split(",") if args.only else SCRIPTS:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out / f"{name}.json")]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--workdir", args.workdir] if (args.workdir and name == "cam_throughput") else []
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:  # One benchmark failing does not stop the others.
            print(f"{name} FAILED", file=sys.stderr)
            continue
        results[name] = json.loads((out / f"{name}.json").read_text())
    rows = goals(results)
    print("\n" + table(rows, ["goal", "target", "measured", "met"]))
    (out / "results.json").write_text(json.dumps({"quick": args.quick, "machine": machine(), "goals": rows, **results}, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
