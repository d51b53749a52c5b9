"""README and docs/: the front page stays short, its test command is CI's, links resolve, snippets run."""

import re

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_page_with_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[dev]" && python -m pytest'
    assert f"\n{command}\n" in readme  # the test command README gives ...
    assert 'pip install --quiet -e ".[dev]"' in ci and "\npython -m pytest\n" in ci  # ... is what CI runs
    assert "python -m cifar_jax.train --config experiments/resnet18_cpu.py --workdir runs/resnet18_cpu" in readme


def test_every_relative_link_and_image_in_readme_and_docs_exists():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_docs_pages_open_with_what_they_answer():
    for page in sorted((ROOT / "docs").glob("*.md")):
        first_paragraph = page.read_text().split("\n\n")[1]
        assert first_paragraph.startswith("This page answers:"), page.name


def test_explaining_snippet_runs_as_written(smoke_workdir, tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs" / "explaining.md").read_text()
    start = text.index("```python") + len("```python")
    snippet = text[start: text.index("```", start)]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace("runs/resnet18_cpu", str(smoke_workdir)), "docs/explaining.md", "exec"), {})
    assert "(8, 32, 32) (8, 4, 4)" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(tmp_path / "overlay.png").size[0] >= 600  # a labelled figure, not a 32-pixel thumbnail
