"""Peak resident memory (ru_maxrss of the child process) of a short real training run via the CLI.

    python benchmarks/peak_memory.py [--quick] [--configs cpu,full] [--out r.json]

cpu: experiments/resnet18_cpu.py (width 16, batch 256), 1 epoch on 5120 images,
evaluated on the full test set (eval batch 1000). full: experiments/resnet18.py
(width 64, batch 512), 1 epoch on 1024 images, 1000 test images. The persistent
compilation cache is off, so compilation happens inside the measured process,
as on a first run. The whole dataset is loaded before subsetting, as always.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from _common import ROOT, finish, parser, warn_if_busy

RUNS = {
    # Pinned to the width-16 float32 step the table measured (the config file is now width 24 in bfloat16).
    "cpu": ("resnet18_cpu.py", ["--config.data.max_train=5120", "--config.model.width=16", "--config.model.dtype=float32"]),
    "full": ("resnet18.py", ["--config.data.max_train=1024", "--config.data.max_test=1000"]),
    "quick": ("smoke.py", ["--config.data.max_train=256"]),
}


def peak_rss_mib(cmd: list[str], env: dict) -> float:
    """Runs ``cmd`` and returns its peak RSS in MiB (wait4 gives the rusage of exactly that child)."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Tell Popen it is reaped.
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # Linux reports KiB.


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default="cpu", help="comma-separated: cpu, full")
    args = p.parse_args()
    busy = warn_if_busy(args)
    env = {**os.environ, "CIFAR_JAX_NO_COMPILE_CACHE": "1"}
    rows = []
    baseline = [sys.executable, "-c", "import jax, flax, optax, orbax.checkpoint; jax.numpy.zeros(1).block_until_ready()"]
    rows.append(dict(run="baseline: import jax/flax/optax/orbax", peak_rss_mib=peak_rss_mib(baseline, env)))
    for name in ["quick"] if args.quick else args.configs.split(","):
        file, overrides = RUNS[name]
        with tempfile.TemporaryDirectory(prefix="cifar_jax_bench_run") as workdir:  # Name keeps warn_if_busy quiet.
            cmd = [sys.executable, "-m", "cifar_jax.train", "--config", f"experiments/{file}", "--workdir", workdir,
                   "--config.epochs=1", "--config.log.report=False", "--config.log.progress_bar=False", *overrides]
            print(" ".join(cmd[1:]), flush=True)
            rows.append(dict(run=f"{name}: {file} " + " ".join(overrides), peak_rss_mib=peak_rss_mib(cmd, env)))
    finish("peak_memory", args, rows, ["run", "peak_rss_mib"], busy=busy)


if __name__ == "__main__":
    sys.exit(main())
