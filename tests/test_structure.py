"""The module map's rules, checked on the source (README, "How it is built").

* only ``scp/net/`` imports pynetdicom;
* ``scp/layout.py`` and ``scp/dicom/`` import neither the store nor the network;
* ``scp/store/`` imports nothing from the network, nor from the layers above it;
* ``scp/events/`` imports nothing from the network (nor pynetdicom), and neither
  ``scp/store/`` nor ``scp/dicom/`` imports it;
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

#: (modules the rule applies to, imported names they must not use, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    ("scp/", ("pynetdicom",), "only scp/net imports pynetdicom"),
    ("scp/layout.py", ("scp.store", "scp.net", "scp.jobs", "scp.pool", "scp.sort", "scp.cli"),
     "the layout engine is pure"),
    ("scp/dicom/", ("scp.store", "scp.net", "scp.jobs", "scp.pool", "scp.sort", "scp.cli"),
     "dicom/ reads bytes; it neither stores nor talks to the network"),
    ("scp/store/", ("scp.net", "scp.jobs", "scp.pool", "scp.sort", "scp.cli"),
     "the store imports nothing from the network or the layers above it"),
    ("scp/events/", ("scp.net", "scp.jobs", "scp.pool", "scp.sort", "scp.cli"),
     "events/ reads the index; the network calls into it, never the reverse"),
    ("scp/store/", ("scp.events",), "the store knows nothing of events"),
    ("scp/dicom/", ("scp.events",), "dicom/ knows nothing of events"),
]
#: Where a rule does not apply (the package that faces the network).
EXEMPT = {"only scp/net imports pynetdicom": "scp/net/"}


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
        imported = imports_of(path)
        for scope, banned, why in RULES:
            if not (rel == scope or rel.startswith(scope)):
                continue
            exempt = EXEMPT.get(why)
            if exempt and rel.startswith(exempt):
                continue
            for name in sorted(imported):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    found.append(f"{rel} imports {name}: {why}")
        if rel.startswith("scp/net/") and path.name != "_pynetdicom.py":
            found.extend(f"{rel}: {use}: a pynetdicom internal outside net/_pynetdicom.py"
                         for use in internal_uses(path) if _touches_pynetdicom(use))
    return found


#: Underscored attributes that are ours, not pynetdicom's (private helpers of our own objects).
OUR_PRIVATE = {"._stats", "._lock", "._file", "._head", "._folder", "._write", "._fail",
               "._stop", "._executor", "._closed"}


def _touches_pynetdicom(use: str) -> bool:
    return use.rsplit(": ", 1)[1] not in OUR_PRIVATE


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
