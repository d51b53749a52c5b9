"""Where a run is and how long it still needs: the epoch's running metrics, the run's ETA, seconds per phase."""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class Progress:
    """Where the run is inside an epoch, with the running sums of that epoch's training metrics."""

    epoch: int = 0  # 0-based epoch in progress
    step_in_epoch: int = 0  # batches of it already done
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, metrics: dict, steps: int) -> None:
        """Adds one dispatch's summed metrics ({"loss_sum", "correct", "count"}) covering ``steps`` batches."""
        self.loss_sum += float(metrics["loss_sum"])
        self.correct += int(metrics["correct"])
        self.count += int(metrics["count"])
        self.step_in_epoch += steps

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> float:
        return self.correct / self.count


def run_left_s(history: list[dict], epochs: int, epoch: int, steps_done: int, steps_left: int, elapsed: float) -> float:
    """Seconds the whole run still needs: the rest of (0-based) ``epoch`` at its pace so far (``steps_done`` steps in
    ``elapsed`` s), then each later epoch at the mean ``epoch_time_s`` of ``history`` (evaluation included), or at
    this epoch's pace before one has finished."""
    per_step = elapsed / max(steps_done, 1)
    later = epochs - epoch - 1
    per_epoch = (sum(r["epoch_time_s"] for r in history) / len(history)) if history else per_step * (steps_done + steps_left)
    return per_step * steps_left + later * per_epoch


def format_duration(seconds: float) -> str:
    """``1h05m``, ``12m30s`` or ``45s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PhaseClock:
    """Seconds per phase of one invocation (startup, data, setup, compile, epochs, report), printed in one line."""

    def __init__(self, started: float):
        self.last, self.started, self.seconds = started, started, {}

    def lap(self, phase: str) -> float:
        """Charges the time since the previous lap to ``phase``; returns those seconds."""
        now = time.time()
        lap, self.last = now - self.last, now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + lap
        return lap

    def summary(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}s" for name, s in self.seconds.items())
        return f"Time: {parts}; total {self.last - self.started:.1f}s"
