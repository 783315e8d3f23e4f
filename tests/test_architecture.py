"""The house rules of ARCHITECTURE.md, checked on the source: imports go one way, no module reaches
into another's private names, the generic engine never asks which model family it runs, and every
engine module stays small enough to read in one sitting."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "alignit_core"
OURS = ("alignit_core", "visualize", "app", "scripts", "benchmarks", "tests")
GENERIC = ("generate.py", "conditioning.py", "scores.py", "sweep.py", "record.py", "settings.py", "kv.py",
           "attention.py")
MAX_LINES = 450


def _sources() -> list[Path]:
    files = [ROOT / "app.py"]
    for folder in ("alignit_core", "visualize", "scripts", "benchmarks", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path):
    """(module imported, names taken from it) of every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_of(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_of(path)[:-9]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            yield base, tuple(alias.name for alias in node.names)


def test_no_module_imports_a_private_name_of_another():
    offenders = [f"{path.relative_to(ROOT)}: from {module} import {name}"
                 for path in _sources() for module, names in _imports(path)
                 if module.split(".")[0] in OURS and module != _module_of(path)
                 for name in names if name.startswith("_") and not name.startswith("__")]
    assert offenders == []


def test_the_engine_and_visualize_never_import_gradio_or_the_ui():
    for folder in ("alignit_core", "visualize"):
        for path in (ROOT / folder).rglob("*.py"):
            top = {module.split(".")[0] for module, _ in _imports(path)}
            assert not top & {"gradio", "app", "spaces"}, path


def test_visualize_takes_arrays_and_images_not_models():
    for path in (ROOT / "visualize").rglob("*.py"):
        top = {module.split(".")[0] for module, _ in _imports(path)}
        assert not top & {"alignit_core", "diffusers", "transformers", "torch"}, path


def test_the_ui_does_not_depend_on_the_cli():
    assert not [m for m, _ in _imports(ROOT / "app.py") if m.startswith("alignit_core.cli")]


@pytest.mark.parametrize("name", GENERIC)
def test_the_generic_engine_never_asks_which_model_family_it_runs(name):
    text = (ENGINE / name).read_text()
    assert "is_xl" not in text and "text_encoder_2" not in text and "added_cond_kwargs" not in text


def test_engine_modules_stay_under_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in ENGINE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_nothing_edits_the_import_path():
    assert [str(p.relative_to(ROOT)) for p in _sources() if "sys.path.insert" in p.read_text()
            and p.name != "test_architecture.py"] == []
