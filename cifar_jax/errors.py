"""The one error type a user sees: a one-line message and an exit code, never a traceback.

Every module raises a subclass (``ConfigError``, ``DataError``, ``CheckpointError``,
``TrainError``, ``ExplainError``); the command-line front ends catch ``UserError``
once (``runtime.run_cli``) and print ``error: <message>``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, damaged state): one line, exit code ``exit_code``."""

    exit_code = 1
    prefix = "error: "  # What the CLI prints before the message.

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # Always one line, whatever was interpolated.

    @property
    def message(self) -> str:
        return self.args[0]


class ConfigError(UserError):
    """A config file or override that cannot be used (one-line message, exit code 2)."""

    exit_code = 2
