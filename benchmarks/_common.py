"""Shared helpers for the benchmark scripts: arguments, timing, machine info, table and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # The project root (configs' relative data paths start here).
sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` works without installing cifar_jax.


def benchmark_config():
    """The benchmarks' fixed CPU setting: experiments/resnet18_cpu.py at width 16 in float32.

    Fixed rather than read from the config file as it stands, so that figures taken on different days compare.
    """
    from cifar_jax.config import load_config

    config = load_config(ROOT / "experiments" / "resnet18_cpu.py")
    config.model.width, config.model.dtype = 16, "float32"
    return config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs, measures nothing useful")
    p.add_argument("--out", help="write the results as JSON to this file")
    return p


def machine() -> dict:
    """CPU model, core count and library versions, recorded next to every result."""
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    info = {"cpu": model, "cores": os.cpu_count(), "isa": isa(), "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name in ("jax", "jaxlib", "flax", "torch"):
        mod = sys.modules.get(name)
        if mod is not None:
            info[name] = getattr(mod, "__version__", "?")
    return info


def isa() -> str:
    """The widest x86 vector extensions the CPU reports, e.g. "AVX-512 (+BF16, VNNI)", "AVX2+FMA" or "AVX+FMA (no AVX2)"."""
    flags = set(next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), []))
    if "avx512f" in flags:
        extra = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI"), ("amx_tile", "AMX")) if flag in flags]
        return "AVX-512" + (f" (+{', '.join(extra)})" if extra else "")
    if "avx2" in flags:
        return "AVX2+FMA" if "fma" in flags else "AVX2"
    if "avx" in flags:
        return "AVX+FMA (no AVX2)" if "fma" in flags else "AVX"
    return "SSE" if flags else platform.machine()


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Median and all wall times (s) of ``repeats`` calls of ``fn`` (which must block until done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns; floats get 4 significant digits."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def finish(name: str, args, rows: list[dict], columns: list[str], **extra) -> dict:
    """Prints the table and writes ``{"benchmark", "quick", "machine", "rows", ...}`` to ``args.out``."""
    print(table(rows, columns))
    result = {"benchmark": name, "quick": args.quick, "machine": machine(), "rows": rows, **extra}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


def training_is_running() -> bool:
    """True while another training run (python -m cifar_jax.train) is using the cores: numbers would be wrong."""
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(pid) != me and "cifar_jax.train" in cmd and "--config" in cmd and "cifar_jax_bench" not in cmd:  # Our own child runs are not "another run".
            return True
    return False


def warn_if_busy(args) -> bool:
    busy = training_is_running()
    if busy:
        print("WARNING: a cifar_jax.train run is active on this machine; timings are not representative.", file=sys.stderr)
    return busy
