"""What speeds up the CPU train step: XLA:CPU flags, steps_per_dispatch, data-parallel host devices, bfloat16.

    python benchmarks/xla_flags_sweep.py [--quick] [--configs cpu] [--only NAME,...] [--out r.json]

Each variant is train_throughput.py (JAX only) in a fresh process with its own
XLA_FLAGS and arguments; the baseline runs first and last so drift is visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import finish, parser, warn_if_busy

HERE = Path(__file__).resolve().parent
# name: (XLA_FLAGS, extra train_throughput.py arguments)
VARIANTS = {
    "baseline": ("", []),
    "steps_per_dispatch=4": ("", ["--steps-per-dispatch", "4"]),
    "2 host devices (data parallel)": ("", ["--devices", "2"]),
    "bfloat16 compute": ("", ["--dtype", "bfloat16"]),
    "no augmentation (as the PyTorch reference)": ("", ["--no-augment"]),
    "ynn: individual_convolution,individual_dot": ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot", []),
    "onednn thunks": ("--xla_cpu_use_onednn=true", []),
    "onednn custom call": ("--xla_cpu_experimental_onednn_custom_call=true", []),
    "xnnpack off": ("--xla_cpu_use_xnnpack=false", []),
    "xnn graph fusion greedy": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", []),
    "opt preset fast runtime": ("--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME", []),
    "concurrency-optimized scheduler": ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED", []),
    "fast math": ("--xla_cpu_enable_fast_math=true", []),
    "vector width 512": ("--xla_cpu_prefer_vector_width=512", []),
}


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default="cpu", help="train_throughput configs (cpu, full)")
    p.add_argument("--only", help="comma-separated variant names (baseline always runs)")
    args = p.parse_args()
    busy = warn_if_busy(args)
    names = [n for n in VARIANTS if n != "baseline" and (not args.only or n in args.only.split(","))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["baseline", *names, "baseline"]:
            flags, extra = VARIANTS[name]
            out = Path(tmp, "r.json")
            env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
            cmd = [sys.executable, str(HERE / "train_throughput.py"), "--skip-torch", "--configs", args.configs,
                   "--out", str(out), *(["--quick"] if args.quick else []), *extra]
            print(f"=== {name}: XLA_FLAGS={flags!r} {' '.join(extra)}", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(dict(variant=name, xla_flags=flags, error=proc.stderr.strip().splitlines()[-1][:120]))
                print(rows[-1]["error"], flush=True)
                continue
            for r in json.loads(out.read_text())["rows"]:
                rows.append(dict(variant=name, xla_flags=flags, config=r["config"], images_per_s=r["images_per_s"],
                                 compile_s=r["compile_s"]))
                print(f"  {r['config']}: {r['images_per_s']:.1f} img/s", flush=True)
    base = {}
    for r in rows:  # Relative to the mean of the two baseline runs of the same config.
        if r["variant"] == "baseline" and "images_per_s" in r:
            base.setdefault(r["config"], []).append(r["images_per_s"])
    for r in rows:
        if "images_per_s" in r:
            r["vs_baseline"] = r["images_per_s"] / (sum(base[r["config"]]) / len(base[r["config"]]))
    finish("xla_flags_sweep", args, rows, ["variant", "config", "images_per_s", "vs_baseline", "compile_s", "error"], busy=busy)


if __name__ == "__main__":
    sys.exit(main())
