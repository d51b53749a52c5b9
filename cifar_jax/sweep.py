"""Train config variants x seeds side by side and print one table: python -m cifar_jax.sweep

    python -m cifar_jax.sweep --config experiments/resnet18.py --variants experiments/sweeps/recipe.py \
        --seeds 0 1 2 --workdir runs/sweep

Each (variant, seed) is one ``python -m cifar_jax.train`` process in ``WORKDIR/VARIANT/seedS`` (its log beside
it), all of them at once by default: on one GPU each takes ``--memory-fraction`` of its memory, and their XLA
compiles run in parallel on the host's cores. A variants file holds ``get_variants()`` returning
``{name: [override, ...]}`` with overrides written as on the train command line without ``--config.``
(``"optim.lr=0.4"``); ``--variant NAME=a.b=1,c=2`` adds one from the command line and ``--set a.b=1``
applies to every variant. The table gives, per
variant, the final test accuracy (mean ± std over seeds, min), the single-view accuracy where the config has
test-time views, the median seconds per training epoch and the mean time to result (the whole command);
``WORKDIR/sweep.json`` and ``WORKDIR/sweep.md`` keep it. A run that is already finished in its workdir is read,
not trained again.
"""

from __future__ import annotations

if __name__ == "__main__":  # Run as a command: a signal from here on ends it in one line (cifar_jax.early).
    from cifar_jax import early

    early.install()

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cifar_jax import runtime
from cifar_jax.errors import UserError


class SweepError(UserError):
    """A sweep that cannot start (one-line message, exit code 1)."""


def load_variants(path: str | None, inline: list[str], only: list[str] = ()) -> dict[str, list[str]]:
    """``{name: overrides}`` from a variants file's ``get_variants()`` and ``NAME=a.b=1,c=2`` strings, in order;
    with ``only``, just those names (each must exist)."""
    variants: dict[str, list[str]] = {}
    if path:
        if not Path(path).is_file():
            raise SweepError(f"variants file {path!r} does not exist")
        spec = importlib.util.spec_from_file_location("_cifar_jax_variants", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            found = module.get_variants()
        except Exception as e:
            raise SweepError(f"variants file {path!r} failed: {type(e).__name__}: {e}") from None
        if not isinstance(found, dict) or not all(isinstance(v, (list, tuple)) for v in found.values()):
            raise SweepError(f"get_variants() in {path!r} must return {{name: [override, ...]}}")
        variants.update({str(k): [str(o) for o in v] for k, v in found.items()})
    for item in inline:
        name, sep, rest = item.partition("=")
        if not sep or not name:
            raise SweepError(f"--variant {item!r} must look like NAME=field=value,field=value (or NAME= for the config as is)")
        variants[name] = [o for o in rest.split(",") if o]
    for name in variants:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SweepError(f"variant name {name!r} may hold only letters, digits, '-', '_' and '.'")
    missing = [name for name in only if name not in variants]
    if missing:
        raise SweepError(f"--only {', '.join(missing)}: no such variant; the variants are {', '.join(variants)}")
    if only:
        variants = {name: variants[name] for name in only}
    if not variants:
        raise SweepError("no variants: give --variants FILE and/or --variant NAME=overrides")
    return variants


def train_command(config: str, workdir: Path, seed: int, overrides: list[str]) -> list[str]:
    """The train command of one (variant, seed): its overrides, the seed, no progress bar and no report."""
    return [sys.executable, "-m", "cifar_jax.train", "--config", config, "--workdir", str(workdir),
            f"--config.seed={seed}", "--config.log.progress_bar=false", "--config.log.report=false",
            *(f"--config.{o}" for o in overrides)]


def read_result(workdir: Path) -> dict | None:
    """The finished run's final accuracy, single-view accuracy, median epoch seconds; None if it did not finish."""
    metrics = workdir / "metrics.jsonl"
    config = workdir / "config.json"
    if not metrics.exists() or not config.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = json.loads(config.read_text())["epochs"]
    if len(records) < epochs or "test_accuracy" not in records[-1]:
        return None
    last = records[-1]
    times = [r["train_time_s"] for r in records[1:]] or [records[0]["train_time_s"]]  # Epoch 1 may hold stragglers.
    timings = workdir / "timings.json"
    return {
        "test_accuracy": last["test_accuracy"],
        "single_view": last.get("test_accuracy_single_view", last["test_accuracy"]),
        "train_accuracy": last["train_accuracy"],
        "epoch_s": statistics.median(times),
        "total_s": json.loads(timings.read_text())["total"] if timings.exists() else None,
    }


def prepare_data(config_path: str, variants: dict[str, list[str]]) -> None:
    """Decodes each distinct data source of the variants once into the data cache, before the runs start together."""
    from cifar_jax.config import apply_overrides, load_config
    from cifar_jax.data import load_dataset

    base, seen = load_config(config_path), set()
    for overrides in variants.values():
        data = apply_overrides(base, overrides).data
        key = json.dumps(data.to_dict(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            load_dataset(data)


def run_jobs(jobs: list[dict], parallel: int, memory_fraction: float, deadline: float, grace: float = 15.0) -> None:
    """Starts up to ``parallel`` train processes at a time; fills each job's ``rc`` and ``wall_s``.

    At ``deadline`` (a ``time.time()``) unfinished runs get SIGTERM (they save and exit), and SIGKILL ``grace``
    seconds later, so the table is still written within ``grace`` seconds of the deadline. A signal to the sweep
    itself (Ctrl-C, SIGTERM, SIGHUP) stops its runs the same way before it exits 128 + signal.
    """
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{memory_fraction:.3f}", "PYTHONUNBUFFERED": "1"}
    running = []
    try:
        _run_jobs(list(jobs), running, parallel, env, deadline, grace)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP to the sweep: its runs save and stop as well.
        runtime.interruption_caught()
        for job in running:
            job["proc"].terminate()
        for job in running:
            try:
                job["proc"].wait(timeout=grace)
            except subprocess.TimeoutExpired:
                job["proc"].kill()
                job["proc"].wait()
            job["log"].close()
        raise


def _run_jobs(pending: list[dict], running: list[dict], parallel: int, env: dict, deadline: float, grace: float):
    while (pending and time.time() < deadline) or running:
        while pending and len(running) < parallel and time.time() < deadline:
            job = pending.pop(0)
            job["workdir"].mkdir(parents=True, exist_ok=True)
            log = open(job["workdir"].parent / f"{job['workdir'].name}.log", "w")
            job["proc"] = subprocess.Popen(job["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env)
            job["start"], job["log"] = time.time(), log
            running.append(job)
        time.sleep(0.2)
        for job in list(running):
            rc = job["proc"].poll()
            if rc is None and time.time() > deadline + grace:
                job["proc"].kill()
                rc = job["proc"].wait()
            elif rc is None and time.time() > deadline and not job.get("stopped"):
                job["proc"].terminate()  # The trainer saves and exits 143; the run can be resumed later.
                job["stopped"] = True
            if rc is not None:
                job["rc"], job["wall_s"] = rc, time.time() - job["start"]
                job["log"].close()
                running.remove(job)


def summarize(variants: dict[str, list[str]], jobs: list[dict]) -> list[dict]:
    """One row per variant: seeds done, accuracy mean/std/min, single view, epoch seconds, time to result."""
    rows = []
    for name, overrides in variants.items():
        done = [j for j in jobs if j["variant"] == name and j["result"]]
        failed = [j for j in jobs if j["variant"] == name and not j["result"]]
        acc = [100 * j["result"]["test_accuracy"] for j in done]
        single = [100 * j["result"]["single_view"] for j in done]
        totals = [j["result"]["total_s"] or j.get("wall_s") for j in done if j["result"]["total_s"] or j.get("wall_s")]
        rows.append({
            "variant": name, "overrides": overrides, "seeds": [j["seed"] for j in done],
            "failed": [{"seed": j["seed"], "rc": j.get("rc"), "log": str(j["workdir"]) + ".log"} for j in failed],
            "accuracy": acc, "single_view": single,
            "mean": statistics.mean(acc) if acc else None, "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "min": min(acc) if acc else None,
            "single_mean": statistics.mean(single) if single else None,
            "single_std": statistics.stdev(single) if len(single) > 1 else 0.0,
            "epoch_s": statistics.median(j["result"]["epoch_s"] for j in done) if done else None,
            "total_s": statistics.mean(totals) if totals else None,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of ``summarize``'s rows."""
    lines = ["| variant | seeds | test accuracy % (mean ± std) | min | single view % | s/epoch | time to result s | overrides |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["mean"] is None:
            acc = single = low = epoch = total = "failed"
        else:
            acc, low = f"{r['mean']:.2f} ± {r['std']:.2f}", f"{r['min']:.2f}"
            single = f"{r['single_mean']:.2f} ± {r['single_std']:.2f}"
            epoch = f"{r['epoch_s']:.2f}"
            total = f"{r['total_s']:.0f}" if r["total_s"] is not None else "-"
        seeds = f"{len(r['seeds'])}" + (f" ({len(r['failed'])} failed)" if r["failed"] else "")
        lines.append(f"| {r['variant']} | {seeds} | {acc} | {low} | {single} | {epoch} | {total} | "
                     f"{' '.join(r['overrides']) or '(config as is)'} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m cifar_jax.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the base config file, e.g. experiments/resnet18.py")
    parser.add_argument("--workdir", required=True, help="the sweep's folder: one run folder and log per (variant, seed)")
    parser.add_argument("--variants", help="a file whose get_variants() returns {name: [override, ...]}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=a.b=1,c=2",
                        help="one more variant (repeatable); NAME= alone runs the config as it is")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these variants (in this order)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an override for every variant (repeatable), e.g. --set data.path=/data/cifar10-jpg.tar.gz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every variant (default: 0)")
    parser.add_argument("--parallel", type=int, default=0, help="processes at once (default 0: all)")
    parser.add_argument("--memory-fraction", type=float, default=0.0,
                        help="GPU memory fraction of each process (default: 0.9 / processes at once)")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds from the start after which unfinished runs are stopped (and killed 15 s later); the table is still written")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return runtime.run_cli(lambda: _run(args))


def _run(args) -> int:
    if not Path(args.config).is_file():
        raise SweepError(f"config file {args.config!r} does not exist")
    variants = load_variants(args.variants, args.variant, args.only)
    root = Path(args.workdir)
    jobs = [{"variant": name, "seed": seed, "workdir": root / name / f"seed{seed}",
             "cmd": train_command(args.config, root / name / f"seed{seed}", seed, [*args.set, *overrides])}
            for seed in args.seeds for name, overrides in variants.items()]  # Seed-major: every variant gets a seed first.
    deadline = time.time() + args.timeout  # Counted from the start: filling the data cache is part of it.
    todo = [j for j in jobs if read_result(j["workdir"]) is None]
    if todo:  # A rerun of a finished sweep only reads the results.
        prepare_data(args.config, {name: [*args.set, *overrides] for name, overrides in variants.items()})
    parallel = args.parallel if args.parallel > 0 else max(len(todo), 1)
    fraction = args.memory_fraction or 0.9 / parallel
    print(f"Sweep: {len(variants)} variant(s) x {len(args.seeds)} seed(s); {len(todo)} run(s) to train, "
          f"{parallel} at a time, memory fraction {fraction:.3f} each; logs in {root}/VARIANT/seedS.log", flush=True)
    t0 = time.time()
    run_jobs(todo, parallel, fraction, deadline)
    for job in jobs:
        job["result"] = read_result(job["workdir"])
    rows = summarize(variants, jobs)
    table = format_table(rows)
    print(table)
    print(f"Sweep wall time {time.time() - t0:.0f}s")
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(rows, indent=1))
    common = f", every variant with {' '.join(args.set)}" if args.set else ""
    (root / "sweep.md").write_text(f"Base config `{args.config}`{common}, seeds {args.seeds}.\n\n{table}\n")
    failed = sum(len(r["failed"]) for r in rows)
    if failed:
        print(f"warning: {failed} run(s) did not finish; see their logs ({root}/VARIANT/seedS.log)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    runtime.exit_process(main())
