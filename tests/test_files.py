"""files.atomic_path: the old file or the new one, never half, and no temporary file left behind."""

import json

import pytest

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
