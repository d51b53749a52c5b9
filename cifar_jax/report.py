"""Rebuild a run's report: python -m cifar_jax.report --workdir DIR

Writes REPORT.md and its plots into DIR (see ``cifar_jax.reporting``); training does
this at the end of every run. This file is intentionally kept short.
"""

from __future__ import annotations

if __name__ == "__main__":  # Run as a command: a signal from here on ends it in one line (cifar_jax.early).
    from cifar_jax import early

    early.install()

import argparse
import sys

from cifar_jax import runtime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar_jax.report", description="Build REPORT.md and plots for a training workdir.")
    p.add_argument("--workdir", required=True, help="training workdir with metrics.jsonl and checkpoints")
    p.add_argument("--data", help="data path, if not the one the model was trained with")
    p.add_argument("--num", type=int, default=20, help="misclassified images in the grids (default 20)")
    p.add_argument("--step", default="best", help="checkpoint: best, latest or a step number (default best)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        from cifar_jax import reporting

        runtime.enable_compilation_cache()
        step = int(args.step) if args.step.isdigit() else args.step
        report = reporting.build_report(args.workdir, args.data, args.num, step=step, progress=True)
        print(f"Report written to {report.path} (plots beside it)")
        return 0

    return runtime.run_cli(run)


if __name__ == "__main__":
    runtime.exit_process(main())
