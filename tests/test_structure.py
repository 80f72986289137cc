"""The module map's rules, checked on the source (README, "How it is built").

* only ``scp/net/`` imports pynetdicom;
* a module imports only from the layers below its own (:data:`LAYERS`): so
  ``layout.py`` and ``dicom/`` import neither the store nor the network, and
  ``store/`` nothing from the network nor from the layers above it; ``events/``
  (hooks, manifests, metrics) reads the index and is called by the network,
  never the reverse;
* inside ``scp/net/``, only ``_pynetdicom.py`` touches a pynetdicom internal
  (an underscored attribute of something that is not ours).

Each rule is also shown to fail on a module written to break it, and the
start-up check of pynetdicom's internals is shown to stop ``sortscp serve``
with one line when one is missing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, cli_env

PACKAGE = REPO / "scp"

#: The layers of README's "How it is built", top to bottom: a module imports
#: only from lower layers (and from its own sub-package). ``scp`` itself (the
#: package's constants) is the bottom layer.
LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),
    ("sort", "net"),
    ("jobs", "sort_jobs", "pool", "events"),
    ("store", "config", "report", "log"),
    ("layout", "dicom"),
    ("enums", "errors", "_process", "_datadict", "__init__"),
]
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}
BOTTOM = len(LAYERS) - 1


def _unit(module: str) -> str:
    """The layer unit of a dotted ``scp...`` name: the sub-package or the module
    (``scp.net.handlers`` -> ``net``; ``scp.IMPLEMENTATION_CLASS_UID`` -> ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_OF else "__init__"


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def internal_uses(path: Path) -> list[str]:
    """``x._name`` attribute uses where `x` is not ``self``/``cls`` (dunders allowed)."""
    tree = ast.parse(path.read_text(), str(path))
    uses = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "_pynetdicom"))
        ):
            uses.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return uses


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        inside = path.relative_to(root).parts
        unit = inside[0] if len(inside) > 1 else path.stem
        depth = LAYER_OF.get(unit, BOTTOM)
        for name in sorted(imports_of(path)):
            top = name.split(".")[0]
            if top == "pynetdicom" and unit != "net":
                found.append(f"{rel} imports {name}: only scp/net imports pynetdicom")
            elif top == "scp" and _unit(name) != unit and LAYER_OF[_unit(name)] <= depth:
                found.append(f"{rel} imports {name}: {unit} may import only from the layers below it")
        if unit == "net" and path.name != "_pynetdicom.py":
            found.extend(f"{rel}: {use}: a pynetdicom internal outside net/_pynetdicom.py"
                         for use in internal_uses(path))
    return found


def test_the_package_follows_the_module_map() -> None:
    assert PACKAGE.is_dir()
    assert violations(PACKAGE) == []


def _broken_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "scp"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.mark.parametrize(
    "rel, text, expected",
    [
        ("jobs.py", "import pynetdicom\n", "scp/jobs.py imports pynetdicom"),
        ("store/commit.py", "from scp.net.status import SUCCESS\n", "scp/store/commit.py imports scp.net.status"),
        ("dicom/walk.py", "from scp.store import tmp\n", "scp/dicom/walk.py imports scp.store"),
        ("layout.py", "import scp.net.server\n", "scp/layout.py imports scp.net.server"),
        ("events/pipeline.py", "from scp.net.status import SUCCESS\n", "scp/events/pipeline.py imports scp.net.status"),
        ("events/hooks.py", "import pynetdicom\n", "scp/events/hooks.py imports pynetdicom"),
        ("store/index.py", "from scp.events import pipeline\n", "scp/store/index.py imports scp.events"),
        ("net/handlers.py", "def f(assoc):\n    return assoc.dul._run_loop_delay\n",
         "._run_loop_delay: a pynetdicom internal"),
        ("pool.py", "from scp.net.status import SUCCESS\n", "scp/pool.py imports scp.net.status"),
        ("config.py", "from scp.jobs import sort_file\n", "scp/config.py imports scp.jobs"),
        ("dicom/header.py", "from scp.layout import Template\n", "scp/dicom/header.py imports scp.layout"),
    ],
)
def test_each_rule_fails_when_broken_on_purpose(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    found = violations(_broken_tree(tmp_path, {rel: text}))
    assert any(expected in v for v in found), found


def test_serve_stops_with_one_line_when_a_pynetdicom_internal_is_missing(tmp_path: Path) -> None:
    """A pynetdicom whose internals moved (simulated by removing one at start-up
    through ``sitecustomize``) stops ``serve`` before it listens: exit 2, one
    line naming what is missing and the tested version, no traceback."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import pynetdicom.dul as dul\n"
        "del dul.DULServiceProvider.assoc\n"
    )
    env = cli_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    proc = subprocess.run(
        [sys.executable, "-m", "scp", "serve", "--out", str(tmp_path / "out"), "--port", "0",
         "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "lacks DULServiceProvider.assoc" in lines[0] and "tested with pynetdicom 3.0" in lines[0]
    assert "Traceback" not in proc.stderr


def test_the_state_folder_has_one_name() -> None:
    """store/tmp.py repeats the index's folder and file names (sort knows them
    without importing the index): they must agree."""
    from scp.store import index, tmp

    assert (tmp.STATE_DIRNAME, tmp.INDEX_FILENAME) == (index.STATE_DIRNAME, index.INDEX_FILENAME)
