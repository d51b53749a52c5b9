"""Orbax checkpoints of a training run (saving, restoring, choosing a step); nothing else.

A workdir holds ``checkpoints/<step>/`` with two items: ``state`` (params,
batch_stats, opt_state, step, PRNG key data; arrays via tensorstore, no
pickle) and ``meta`` (JSON: config, class names, normalisation, metrics
history, partial-epoch progress, and a sha256 of each top-level state item).
Orbax writes each step to a temporary directory and renames it when complete,
so a crash mid-save never leaves a checkpoint that loads as valid.

Every restore goes through ``load_intact``: a step whose files cannot be read or
whose arrays do not match their saved checksums is *damaged*; it is reported in
one warning line and the next candidate (older, or next best) is used instead.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from cifar_jax import runtime
from cifar_jax.errors import UserError

# Fields that decide the shapes of a checkpoint; a mismatch is an "incompatible workdir".
SHAPE_FIELDS = (("model", "name"), ("model", "width"), ("data", "image_size"))
# Config fields (dotted; a trailing "." is a whole group) that may differ when resuming: they change
# neither the data, its order, the schedule nor the optimizer. The execution fields (cpu_devices,
# distributed.*, steps_per_dispatch, loop) give the same computation up to float rounding, not bitwise.
# data.source may name the same data another way (a run from before "auto" was the default says
# "folder"); the data itself is compared separately (sizes, classes, channel statistics).
RESUMABLE_FIELDS = ("log.", "checkpoint.", "distributed.", "cpu_devices", "steps_per_dispatch", "loop", "eval_batch_size",
                    "model.conv", "fresh", "eval_every", "data.source", "data.path", "data.cache", "data.download", "data.url")


class CheckpointError(UserError):
    """A workdir whose checkpoints cannot be used as asked (one-line message)."""


def checkpoint_dir(workdir) -> Path:
    return Path(workdir).resolve() / "checkpoints"


def make_manager(workdir, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the last ``keep`` steps plus the best by test accuracy."""
    policy = ocm.AnyPreservationPolicy(
        [
            ocm.LatestN(keep),
            ocm.BestN(
                get_metric_fn=lambda m: m["test_accuracy"],
                reverse=False,  # Ascending sort; BestN keeps the last n, i.e. the highest accuracy.
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=False,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # Half-written steps from a crash are removed.
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "meta"))


def state_to_tree(state) -> dict:
    """The arrays of a TrainState as a plain dict (the PRNG key as its uint32 data)."""
    return {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": jax.random.key_data(state.rng),
    }


def tree_to_state(template, tree: dict):
    """Puts restored arrays back into a TrainState shaped like ``template``."""
    return template.replace(
        params=tree["params"],
        batch_stats=tree["batch_stats"],
        opt_state=tree["opt_state"],
        step=tree["step"],
        rng=jax.random.wrap_key_data(tree["rng"]),
    )


def _host_array(x) -> np.ndarray:
    """A leaf as a numpy array; on several hosts from this host's copy of the (replicated) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError("checksums need fully replicated arrays")
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def tree_checksums(tree: dict) -> dict[str, str]:
    """``{item: sha256 hex}`` for each top-level item of ``tree``, over dtype, shape and bytes of its leaves in tree order."""
    sums = {}
    for name in sorted(tree):
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(tree[name]):
            a = np.ascontiguousarray(_host_array(leaf))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        sums[name] = h.hexdigest()
    return sums


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def _disk_error(e: BaseException) -> tuple[int, str] | None:
    """(errno, the OS's words and where) for a write failure anywhere in ``e``'s chain, or None if it is not one."""
    seen = e
    for _ in range(8):  # Orbax may wrap the OSError; follow the chain a few links.
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            return seen.errno, f"{os.strerror(seen.errno)}" + (f" ({seen.filename})" if seen.filename else "")
        text = " ".join(str(seen).split())  # TensorStore reports write failures as ValueError/RuntimeError text.
        for code in DISK_ERRNOS:
            if os.strerror(code) in text:
                written = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'local file "([^"]+)"', text)
                return code, f"{os.strerror(code)} ({written.group(1) if written else text[:160]})"
        seen = seen.__cause__ or seen.__context__
    return None


def save(manager, state, meta: dict, metrics: dict | None = None) -> int:
    """Saves state and JSON meta (plus the state's checksums) at ``state.step``; ``metrics`` ranks best checkpoints.

    A disk error (full, quota, read-only, I/O) is a one-line CheckpointError naming the last good step.
    """
    step = int(jax.device_get(state.step))
    tree = state_to_tree(state)
    last = manager.latest_step()
    with runtime.library_logs_held():  # A failed save is the one line below, not orbax's log of each thread.
        try:
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree),
                    meta=ocp.args.JsonSave({**meta, "checksums": tree_checksums(tree)}),
                ),
                metrics=metrics,
                force=True,
            )
            manager.wait_until_finished()
        except Exception as e:
            disk = _disk_error(e)
            if disk is None:
                raise
            code, why = disk
            good = "none" if last is None else f"step {last}"
            fix = "free space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix the disk"
            raise CheckpointError(f"cannot save checkpoint step {step}: {why}; the last good checkpoint is {good}; "
                                  f"{fix} and run the same command to resume") from None
    return step


def read_meta(manager, step: int) -> dict:
    """The JSON meta of a saved step."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_tree(manager, step: int, template) -> dict:
    """Restores the whole state tree of ``step`` shaped and sharded like the TrainState ``template``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_tree(template))
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]


def describe_mismatch(saved_config: dict, config, num_classes: int, saved_num_classes: int,
                      saved_meta: dict | None = None, meta: dict | None = None) -> str | None:
    """Why a run saved with ``saved_config`` cannot go on with ``config`` (a phrase after "workdir DIR"), or None.

    Shape fields or the class count -> "another model"; any other field outside ``RESUMABLE_FIELDS``, or
    data that differs from what was trained on (``saved_meta`` vs ``meta``: sizes, classes, channel
    statistics) -> "a different config".
    """
    old, new = _flat(saved_config), _flat(json.loads(json.dumps(config.to_dict())))
    resumable = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUMABLE_FIELDS)
    changed = [k for k in sorted(old.keys() & new.keys()) if old[k] != new[k] and not resumable(k)]
    diffs = [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed]
    shape = saved_num_classes != num_classes or any(".".join(f) in changed for f in SHAPE_FIELDS)
    if saved_num_classes != num_classes:
        diffs.append(f"num_classes {saved_num_classes} -> {num_classes}")
    if saved_meta and meta and not diffs:
        for key in ("num_train", "num_test", "class_names", "mean", "std"):
            if key in saved_meta and saved_meta[key] != meta.get(key):
                diffs.append(f"data at data.path differs from the data trained on ({key})")
                break
    if not diffs:
        return None
    if shape:
        return (f"holds a checkpoint of another model ({', '.join(diffs)}); "
                "use another --workdir, or --config.fresh=True to start over there")
    return (f"was trained with a different config ({', '.join(diffs)}); "
            "use the same config to resume, another --workdir, or --config.fresh=True")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def restore_variables(manager, step: int, abstract: dict) -> dict:
    """Restores only ``{"params", "batch_stats"}`` of a step onto the first local device.

    ``abstract`` is a tree of ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of ``model.init``).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          {"params": abstract["params"], "batch_stats": abstract["batch_stats"]})
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
        ),
    )["state"]
    return {"params": restored["params"], "batch_stats": restored["batch_stats"]}


class DamagedCheckpoint(Exception):
    """Internal: one step cannot be used; ``reason`` says which part and why (one line)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is damaged ({reason})")
        self.step, self.reason = step, reason


@dataclasses.dataclass
class Loaded:
    """What ``load_intact`` found: the step used, its meta, the restored (verified) tree, the damaged steps passed over."""

    step: int
    meta: dict
    tree: dict
    damaged: list  # [DamagedCheckpoint], newest/best first


def _short(e: BaseException) -> str:
    """A one-line reason from an orbax/tensorstore/json exception (they run to many lines)."""
    if isinstance(e, FileNotFoundError):
        name = e.filename or str(e).removeprefix("File ").removesuffix(" not found.")
        return f"missing file {Path(name).name}"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg})"
    if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
        return "directory missing"
    while e.__cause__ is not None or (e.__context__ is not None and "See full TensorStore details" in str(e)):
        e = e.__cause__ or e.__context__  # TensorStore's own error names the array and the byte range.
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    return text[:200]


# The keys of a step's meta, with their JSON types: the ones every reader needs, and the others this version
# writes. A key outside both (or of another type) means another version wrote the step: it is damaged here.
REQUIRED_META = {"config": dict, "class_names": list, "mean": list, "std": list}
OPTIONAL_META = {"num_train": int, "num_test": int, "history": list, "progress": dict, "checksums": dict, "conv": str, "backend": str}
# What resuming a run needs besides: its history and where it stopped (the fields of progress.Progress).
TRAINING_META = ("history", "progress")
PROGRESS_FIELDS = {"epoch": int, "step_in_epoch": int, "loss_sum": (int, float), "correct": int, "count": int}


def _json_type_ok(value, kind) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def meta_problem(meta, training: bool = False) -> str | None:
    """Why ``meta`` is not a step's meta as this version writes it (a phrase), or None if it is.

    ``training``: resuming also needs the history and the progress within the epoch, field for field.
    """
    if not isinstance(meta, dict):
        return f"not a JSON object but {type(meta).__name__}"
    needed = [*REQUIRED_META, *(TRAINING_META if training else ())]
    missing = [k for k in needed if k not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    known = {**REQUIRED_META, **OPTIONAL_META}
    unknown = sorted(set(meta) - set(known))
    if unknown:
        return f"has unknown key(s) {', '.join(unknown)} (written by another version?)"
    wrong = [k for k, kind in known.items() if k in meta and not _json_type_ok(meta[k], kind)]
    if wrong:
        return f"{wrong[0]} is a {type(meta[wrong[0]]).__name__}, not a {known[wrong[0]].__name__}"
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3 or not meta["class_names"]:
        return "mean/std are not 3 channels or class_names is empty"
    for r in meta.get("history", []):
        if not (isinstance(r, dict) and _json_type_ok(r.get("step"), int) and _json_type_ok(r.get("epoch"), int)):
            return "a history record lacks its step or epoch"
    if "progress" in meta:
        progress = meta["progress"]
        if set(progress) != set(PROGRESS_FIELDS):
            return (f"progress has fields {', '.join(sorted(progress))}, not {', '.join(PROGRESS_FIELDS)} "
                    "(written by another version?)")
        if not all(_json_type_ok(progress[k], kind) for k, kind in PROGRESS_FIELDS.items()):
            return "progress holds a value of the wrong type"
    return None


def non_finite_items(tree: dict) -> list[str]:
    """The top-level items of ``tree`` holding a NaN or an infinity in any floating-point leaf."""
    bad = []
    for name in sorted(tree):
        for leaf in jax.tree.leaves(tree[name]):
            if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
                continue
            a = _host_array(leaf)
            if not np.isfinite(a if a.dtype.kind in "fc" else a.astype(np.float32)).all():
                bad.append(name)
                break
    return bad


def check_step(manager, step: int, restore: Callable[[int, dict], dict], training: bool = False) -> tuple[dict, dict]:
    """(meta, tree) of ``step`` if it reads, has the meta of this version and finite arrays that match their
    checksums; else raises DamagedCheckpoint.

    ``restore(step, meta)`` restores the items wanted (e.g. the whole state, or params and batch_stats; it may
    raise DamagedCheckpoint itself); each restored top-level item is compared with the checksum saved for it
    (checkpoints written before checksums existed are accepted on a clean read). ``training``: see ``meta_problem``.
    Orbax's logs of a failed read are dropped: the DamagedCheckpoint says it in one line.
    """
    with runtime.library_logs_held() as held:
        try:
            return _check_step(manager, step, restore, training)
        except DamagedCheckpoint:
            gc.collect()  # Orbax's abandoned reads are collected now, their logs held and dropped.
            held.drop()
            raise


def _check_step(manager, step: int, restore, training: bool) -> tuple[dict, dict]:
    try:
        meta = read_meta(manager, step)
    except Exception as e:
        raise DamagedCheckpoint(step, f"meta/metadata: {_short(e)}") from None
    problem = meta_problem(meta, training)
    if problem:
        raise DamagedCheckpoint(step, f"meta/metadata: {problem}")
    try:
        tree = restore(step, meta)
    except DamagedCheckpoint:
        raise
    except Exception as e:
        raise DamagedCheckpoint(step, f"state/: {_short(e)}") from None
    expected = meta.get("checksums")
    if expected is not None:
        actual = tree_checksums(tree)
        bad = [k for k in sorted(actual) if expected.get(k) != actual[k]]
        if bad:
            raise DamagedCheckpoint(step, f"state/: sha256 mismatch in {', '.join(bad)}")
    non_finite = non_finite_items(tree)
    if non_finite:
        raise DamagedCheckpoint(step, f"state/: NaN or infinite values in {', '.join(non_finite)}")
    return meta, tree


def candidate_steps(manager, workdir, which: int | str) -> list[int]:
    """The saved steps to try for ``which``, in order of preference. Raises CheckpointError.

    "latest": newest first. "best": by test accuracy in the run's history (ties: the later; the history
    of the newest readable meta), then the unscored steps newest first; steps newer than that meta
    (their meta is unreadable, so they are damaged) come first, to be reported. An int: only that step.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"workdir {str(workdir)!r} has no complete checkpoint")
    if which == "latest":
        return steps
    if which == "best":
        history, unreadable = [], []
        for s in steps:
            try:
                meta = read_meta(manager, s)
            except Exception:
                meta = None
            if meta is None or meta_problem(meta):
                unreadable.append(s)  # Cannot be ranked; tried first so that load_intact reports it as damaged.
                continue
            history = meta.get("history", [])
            break
        scored = sorted((r for r in history if r["step"] in steps and isinstance(r.get("test_accuracy"), (int, float))),
                        key=lambda r: (r["test_accuracy"], r["step"]), reverse=True)
        ranked = list(dict.fromkeys(r["step"] for r in scored))
        return unreadable + ranked + [s for s in steps if s not in ranked and s not in unreadable]
    try:
        step = int(which)
    except (TypeError, ValueError):
        raise CheckpointError(f"step must be best, latest or a step number, not {which!r}") from None
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {str(workdir)!r}; saved steps: {sorted(steps)}")
    return [step]


def load_intact(manager, workdir, which: int | str, restore: Callable[[int, dict], dict], warn: bool = True,
                training: bool = False) -> Loaded:
    """THE way to load a checkpoint: the first intact step among ``candidate_steps(which)``.

    Each damaged step passed over is reported on stderr in one line (``warning: checkpoint step 16 is
    damaged (...); using step 8``) when ``warn``; nothing is deleted or moved. Raises a one-line
    CheckpointError if no candidate is intact (for an explicit step number: if that step is damaged).
    ``training``: the step must also hold what resuming needs (``meta_problem``).
    """
    damaged = []
    for step in candidate_steps(manager, workdir, which):
        try:
            meta, tree = check_step(manager, step, restore, training)
        except DamagedCheckpoint as d:
            damaged.append(d)
            continue
        if warn:
            for d in damaged:
                print(f"warning: {d}; using step {step}", file=sys.stderr)
        return Loaded(step, meta, tree, damaged)
    what = "; ".join(str(d) for d in damaged)
    if isinstance(which, int) or str(which).lstrip("-").isdigit():
        raise CheckpointError(f"{what} in {str(workdir)!r}; choose another --step (best, latest or a saved step)")
    raise CheckpointError(f"no intact checkpoint in {str(workdir)!r}: {what}; "
                          "restore the files, or start over with --config.fresh=True")


def move_aside(workdir, step: int) -> Path:
    """Renames the damaged ``checkpoints/<step>/`` to ``checkpoints/damaged-<step>-<time>/`` (which orbax ignores)."""
    src = checkpoint_dir(workdir) / str(step)
    dst = src.with_name(f"damaged-{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while dst.exists():
        dst, n = src.with_name(f"damaged-{step}-{time.strftime('%Y%m%dT%H%M%S')}-{n}"), n + 1
    src.rename(dst)
    return dst
