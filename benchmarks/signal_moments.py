"""Signals at evenly spaced moments of every command: exit status, stderr lines, anything half-written.

For each command it first times one uninterrupted run (T; after one more that fills the compilation cache, so T
is what the interrupted runs take), then runs it again N times and sends SIGINT, SIGTERM or
SIGHUP (in turn) at k * T / (N + 1), k = 1..N, from the process's first instant to its last. A moment passes when
the command exits 128 + signal (0 only if it had ended before the signal was sent), prints at most one stderr line (progress bars
aside), leaves no
temporary file, and, for explain --evaluate, leaves faithfulness.md and faithfulness.json from the same run.

    python benchmarks/signal_moments.py --moments 10          # ~15 min on 2 cores (trains a smoke workdir first)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")  # A tqdm bar's line ("| 1/7 [00:11<01:09, ...]"): progress, not a message.


def commands(work: Path, trained: Path) -> dict[str, tuple[list[str], Path]]:
    """{name: (python -m arguments, the folder it writes)}; {run} in a path is replaced per run."""
    data = f"--config.data.path={DATA}"
    return {
        "train": (["cifar_jax.train", "--config", "experiments/smoke.py", "--workdir", "{run}", data,
                   "--config.log.progress_bar=false"], work),
        "report": (["cifar_jax.report", "--workdir", "{run}"], trained),
        "explain": (["cifar_jax.explain", "--workdir", "{run}"], trained),
        # Each moment's run has its own seed ({seed}), over the table and JSON of the clean run (seed 0).
        "explain --evaluate": (["cifar_jax.explain", "--workdir", "{run}", "--evaluate", "--eval-images", "64",
                                "--seed", "{seed}"], trained),
        "sweep": (["cifar_jax.sweep", "--config", "experiments/smoke.py", "--workdir", "{run}", "--variant", "a=",
                   "--set", f"data.path={DATA}", "--set", "epochs=1"], work),
    }


def run_once(args: list[str], folder: Path, at: float | None, signum: int, seed: int = 0) -> dict:
    """Runs ``python -m args`` with {run} = folder; signals it ``at`` seconds after the start (None: never)."""
    cmd = [a.replace("{run}", str(folder)).replace("{seed}", str(seed)) for a in args]
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    sent = False
    if at is not None:
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signum)
            sent = True
    out, err = proc.communicate(timeout=600)
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    temporary = [str(p) for p in folder.rglob("*") if ".tmp" in p.name] if folder.exists() else []
    paired = True
    md, js = folder / "explain" / "faithfulness.md", folder / "explain" / "faithfulness.json"
    if md.exists() and js.exists():  # The table names the seed of its run: the JSON's.
        paired = f"seed {json.loads(js.read_text())['seed']}." in md.read_text()
    return {"rc": proc.returncode, "seconds": time.time() - start, "stderr": lines, "temporary": temporary,
            "paired": paired, "sent": sent}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moments", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=[])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="signal_moments_"))
    trained = work / "trained"
    first = run_once(commands(work, trained)["train"][0], trained, None, 0)
    if first["rc"] != 0:
        print("training the smoke workdir failed:", first["stderr"][-3:])
        return 1
    failures = 0
    print("| command | T s | moment | signal | exit | stderr lines | ok |")
    print("|---|---:|---:|---|---:|---:|---|")
    for name, (cmd, base) in commands(work, trained).items():
        if args.only and name not in args.only:
            continue
        fresh = lambda: work / f"{name.replace(' ', '_')}_run"

        def folder():
            target = fresh()
            shutil.rmtree(target, ignore_errors=True)
            if base == trained:
                shutil.copytree(trained, target)
            return target

        run_once(cmd, folder(), None, 0)  # Fills the compilation cache: the moments' runs are warm ones.
        clean = run_once(cmd, folder(), None, 0)
        total = clean["seconds"]
        if base == trained:  # The next runs start from what the clean run wrote (explain's outputs included).
            shutil.rmtree(trained)
            shutil.copytree(fresh(), trained)
        for k in range(1, args.moments + 1):
            signum = SIGNALS[(k - 1) % len(SIGNALS)]
            at = k * total / (args.moments + 1)
            r = run_once(cmd, folder(), at, signum, seed=k)
            # Exit 0 only where the command had ended before the signal: one sent to a running command must tell.
            ok = (r["rc"] == (128 + signum if r["sent"] else 0) and len(r["stderr"]) <= 1 and not r["temporary"] and r["paired"]
                  and not any("Traceback" in line for line in r["stderr"]))
            failures += not ok
            print(f"| {name} | {total:.1f} | {at:.1f} | {signal.Signals(signum).name} | {r['rc']} | {len(r['stderr'])} | "
                  f"{'yes' if ok else 'NO: ' + ' / '.join(r['stderr'][-2:])[:200] + ' ' + ' '.join(r['temporary'][:2])} |",
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"{failures} moment(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
