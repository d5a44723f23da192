"""The layering of the packages, read from the source and checked in a fresh interpreter.

The rules (README, "Layout"):

- the core imports neither ``mbt_node`` nor ``mbt_aggregator``, and node and aggregator never
  import each other: the processes meet on the wire only;
- inside the core, a layer imports only itself and the layers below it:
  base (``errors``, ``fileio``, ``paths``, ``jsonfields``) < ``model`` < ``training``, ``trust``
  < ``artifacts`` < ``wire`` < ``cluster`` < ``cli``;
- ``model``, ``training``, ``artifacts`` and ``trust`` import no gRPC and no protobuf.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: an import hidden
in a function body still runs back up.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mbt_core", "mbt_node", "mbt_aggregator")
BASE = ("errors", "fileio", "paths", "jsonfields")
# rank of each core layer; a module may import its own layer or a lower rank
RANK = {"model": 1, "training": 2, "trust": 2, "artifacts": 3, "wire": 4, "cluster": 5, "cli": 6}
NO_GRPC = ("model", "training", "artifacts", "trust")
GRPC = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf")


def imports(path: Path) -> list[tuple[int, list[str]]]:
    """Each import statement of ``path``, wherever in the file: its line and the module names
    it may load (``from a.b import c`` may load ``a.b`` or ``a.b.c``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.append((node.lineno, [node.module, *names]))
    return sorted(found)


def _layer(module: str) -> str | None:
    """The core layer of a ``mbt_core`` module name ("base" for the base modules)."""
    parts = module.split(".")
    if parts[0] != "mbt_core" or len(parts) == 1:
        return None
    return "base" if parts[1] in BASE else parts[1] if parts[1] in RANK else None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """One line per import that breaks a rule, in the tree below ``root``."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            if "protocol" in rel.parts:
                continue  # generated gRPC code: the wire layer by definition
            module = ".".join(rel.with_suffix("").parts)
            layer = _layer(module)
            for line, names in imports(path):
                problem = next(filter(None, (_problem(package, layer, n) for n in names)), None)
                if problem:
                    found.append(f"{rel}:{line}: imports {names[0]}: {problem}")
    return found


def _problem(package: str, layer: str | None, name: str) -> str | None:
    others = {"mbt_core": ("mbt_node", "mbt_aggregator"), "mbt_node": ("mbt_aggregator",)}
    others["mbt_aggregator"] = ("mbt_node",)
    if any(_within(name, other) for other in others[package]):
        return f"{package} must not import that package"
    if layer is None:
        return None
    if layer in NO_GRPC and any(_within(name, g) for g in GRPC):
        return f"mbt_core.{layer} must not know gRPC or protobuf"
    target = _layer(name)
    if target is None or target == "base" or target == layer:
        return None
    if layer == "base" or RANK[target] >= RANK[layer]:
        return f"mbt_core.{layer} must not import the layer mbt_core.{target} (not below it)"
    return None


def test_the_tree_keeps_every_rule() -> None:
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("mbt_core/model/bad.py", "import grpc\n", "must not know gRPC"),
        ("mbt_core/trust/bad.py", "from google.protobuf import message\n", "must not know gRPC"),
        ("mbt_core/cli/bad.py", "def f():\n    from mbt_aggregator import cli\n", "mbt_core must"),
        ("mbt_node/bad.py", "from mbt_aggregator.engine import Engine\n", "mbt_node must"),
        ("mbt_aggregator/bad.py", "import mbt_node.servicer\n", "mbt_aggregator must"),
        ("mbt_core/model/bad.py", "from mbt_core.artifacts import manifest\n", "not below it"),
        ("mbt_core/training/bad.py", "from mbt_core.trust.keys import key_id\n", "not below it"),
        ("mbt_core/errors.py", "from mbt_core.model.lm import MBTLanguageModel\n", "not below it"),
    ],
)
def test_a_wrong_import_is_caught(tmp_path: Path, path: str, source: str, expected: str) -> None:
    """The checker run on a copy of the rules' shape with one bad import added."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    bad = tmp_path / path
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found


def _fresh(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_lower_layers_load_no_grpc_in_a_fresh_interpreter() -> None:
    loaded = json.loads(
        _fresh(
            "import json, sys\n"
            "import mbt_core, mbt_core.model, mbt_core.training, mbt_core.artifacts, "
            "mbt_core.trust\n"
            "print(json.dumps(sorted(sys.modules)))"
        )
    )
    assert "mbt_core.model.lm" in loaded  # the imports did run
    assert [m for m in loaded if any(_within(m, g) for g in GRPC)] == []
    assert [m for m in loaded if _within(m, "mbt_core.wire") and m != "mbt_core.wire"] == []


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """No circular import hides behind an import order that tests happen to use."""
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if rel.name != "__main__":
                modules.append(".".join(rel.parts).removesuffix(".__init__"))
    out = _fresh(
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(sys.modules))"
    )
    assert int(out) > len(modules)


def test_each_package_exports_what_its_all_names() -> None:
    code = (
        "import importlib, json\n"
        "out = {}\n"
        "for name in ['mbt_core', 'mbt_core.model', 'mbt_core.training', 'mbt_core.artifacts',"
        " 'mbt_core.trust', 'mbt_core.wire', 'mbt_node', 'mbt_aggregator']:\n"
        "    m = importlib.import_module(name)\n"
        "    names = getattr(m, '__all__', [])\n"
        "    missing = [n for n in names if not hasattr(m, n)]\n"
        "    out[name] = missing + (['<empty>'] if not names else [])\n"
        "print(json.dumps(out))"
    )
    assert json.loads(_fresh(code)) == {
        name: []
        for name in [
            "mbt_core",
            "mbt_core.model",
            "mbt_core.training",
            "mbt_core.artifacts",
            "mbt_core.trust",
            "mbt_core.wire",
            "mbt_node",
            "mbt_aggregator",
        ]
    }
