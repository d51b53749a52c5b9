"""Orbax checkpoints of a training run (saving, restoring, choosing a step); nothing else.

A workdir holds ``checkpoints/<step>/`` with two items: ``state`` (params,
batch_stats, opt_state, step, PRNG key data; arrays via tensorstore, no
pickle) and ``meta`` (JSON: config, class names, normalisation, metrics
history, partial-epoch progress). Orbax writes each step to a temporary
directory and renames it when complete, so a crash mid-save never leaves a
checkpoint that loads as valid.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from cifar_jax.errors import UserError

# Fields that decide the shapes of a checkpoint; a mismatch is an "incompatible workdir".
SHAPE_FIELDS = (("model", "name"), ("model", "width"), ("data", "image_size"))


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


def save(manager, state, meta: dict, metrics: dict | None = None) -> int:
    """Saves state and JSON meta at ``state.step``; ``metrics`` (with test_accuracy) ranks best checkpoints."""
    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_to_tree(state)),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
    )
    manager.wait_until_finished()
    return step


def best_step(manager) -> int:
    """The saved step with the highest test accuracy in the run's history (the latest if none was evaluated)."""
    steps = list(manager.all_steps())
    history = read_meta(manager, steps[-1]).get("history", [])
    scored = [r for r in history if r["step"] in steps]
    return max(scored, key=lambda r: (r["test_accuracy"], r["step"]))["step"] if scored else steps[-1]  # Ties: the later, as BestN keeps.


def read_meta(manager, step: int) -> dict:
    """The JSON meta of a saved step."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_state(manager, step: int, template):
    """Restores step into a TrainState shaped and sharded like ``template``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_tree(template))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return tree_to_state(template, restored["state"])


def describe_mismatch(saved_config: dict, config, num_classes: int, saved_num_classes: int) -> str | None:
    """Says what makes a saved run incompatible with ``config``, or None if compatible."""
    diffs = []
    for group, field in SHAPE_FIELDS:
        old, new = saved_config[group][field], config[group][field]
        if old != new:
            diffs.append(f"{group}.{field} {old!r} -> {new!r}")
    if saved_num_classes != num_classes:
        diffs.append(f"num_classes {saved_num_classes} -> {num_classes}")
    return ", ".join(diffs) or None


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


def resolve_step(manager, workdir, step: int | str) -> int:
    """"best" (highest test accuracy), "latest" or an int -> a saved step. Raises CheckpointError."""
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"workdir {str(workdir)!r} has no complete checkpoint")
    if step == "best":
        return best_step(manager)
    if step == "latest":
        return steps[-1]
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise CheckpointError(f"step must be best, latest or a step number, not {step!r}") from None
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {str(workdir)!r}; saved steps: {list(steps)}")
    return step


def write_json_atomic(path: Path, obj) -> None:
    """Writes JSON to ``path`` via a temporary file and rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
