"""files.atomic_path: the old file or the new one, never half, and no temporary file left behind; atomic_paths: all
the old files of a group or all the new ones."""

import json
import os
import signal

import pytest

from cifar_jax import files, runtime
from cifar_jax.files import atomic_path, write_json_atomic


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": ')  # Half written when Ctrl-C arrives.
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"a": 1}
    with atomic_path(tmp_path / "data", suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.json"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_the_renames_of_a_group_leaves_all_new_files(tmp_path, monkeypatch, capsys, signum):
    """SIGTERM (or Ctrl-C) right after the table is renamed and before its JSON is: both are replaced, then the
    command stops, in one line; a reader never finds a new table beside an old JSON."""
    table, record = tmp_path / "faithfulness.md", tmp_path / "faithfulness.json"
    table.write_text("old\n")
    record.write_text('{"run": "old"}')
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            os.kill(os.getpid(), signum)  # The moment between the two writes.

    def command():
        monkeypatch.setattr(files.os, "replace", replace)
        with files.atomic_paths(table, record) as (md, js):
            md.write_text("new\n")
            js.write_text('{"run": "new"}')
        monkeypatch.undo()
        return 0

    assert runtime.run_cli(command) == 128 + signum
    assert len(renamed) == 2 and table.read_text() == "new\n" and json.loads(record.read_text()) == {"run": "new"}
    assert capsys.readouterr().err.strip().startswith("interrupted (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faithfulness.json", "faithfulness.md"]


def test_a_group_left_unwritten_or_failed_keeps_every_old_file(tmp_path):
    a, b = tmp_path / "a.md", tmp_path / "b.png"
    a.write_text("old a")
    with pytest.raises(RuntimeError):
        with files.atomic_paths(a, b) as (ta, tb):
            assert ta.suffix == ".md" and tb.suffix == ".png"
            ta.write_text("new a")
            raise RuntimeError("the plot failed")
    assert a.read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.md"]
    with files.atomic_paths(a, b) as (ta, tb):
        ta.write_text("new a")  # b not written this time: the old one (none) stays
    assert a.read_text() == "new a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.md"]
