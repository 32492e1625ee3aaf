"""The import rules of the house, checked two ways.

1. Statically: every ``import`` of every module under ``colmap_pipeline/`` (plus ``main.py`` and
   ``database.py``) is read with :mod:`ast` and resolved, then checked against :data:`RULES`:
   which packages may import which, and which third-party libraries each may load.
2. Dynamically: the API process's modules are imported in a fresh interpreter and
   ``sys.modules`` is inspected, so a lazy or transitive import of pycolmap, PyAV or OpenCV into
   the server is caught too; and the core is imported the same way to prove it loads no web or
   database framework.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = "colmap_pipeline"
#: the shared leaves: light modules that every process may import
LEAVES = {"config", "presets", "errors", "layout", "jobs", "job_events", "webhook_outbox",
          "protocol", "results", "photo_rules"}
#: libraries only the core (the stage children) may import
HEAVY = {"pycolmap", "av", "cv2", "PIL", "trimesh", "numpy", "plyfile"}
#: web and database frameworks the core must never import
SERVER_ONLY = {"fastapi", "starlette", "uvicorn", "slowapi", "aiosqlite", "psycopg",
               "procrastinate", "multipart", "python_multipart", "httpx", "database", "main"}

#: part -> parts of this package it may import (a part is a sub-package or "leaf")
ALLOWED_PARTS = {
    "leaf": {"leaf"},
    "web": {"leaf", "web", "intake", "runner"},
    "intake": {"leaf", "intake", "runner"},
    "runner": {"leaf", "runner"},
    "core": {"leaf", "core"},
    "main": {"leaf", "web", "intake", "runner", "database", "stores"},
    "database": {"leaf", "stores"},
    # the job store's implementations (SQLite, PostgreSQL), opened by database.open_store;
    # web/intake/runner see only the JobStore protocol of jobs.py
    "stores": {"leaf", "stores"},
    # storage (issue 12): the object store and the job-folder sync, used by the server's parts
    # around the stage children (intake uploads the input, the runner syncs each stage, web
    # serves artifacts and readiness, housekeeping removes objects); it needs only the leaves
    "storage": {"leaf", "storage"},
}
for _p in ("web", "intake", "runner", "main"):
    ALLOWED_PARTS[_p].add("storage")
#: the Google Cloud client libraries: only storage/ talks to the bucket (the children and the
#: leaves never load them; the rest goes through the storage interface)
GCS_LIBS = {"google"}
#: part -> third-party top-level modules it must not import
FORBIDDEN_LIBS = {
    "leaf": HEAVY | SERVER_ONLY - {"httpx"} | GCS_LIBS,
    "web": HEAVY | GCS_LIBS,
    "intake": HEAVY | {"fastapi"} | GCS_LIBS,
    "runner": HEAVY | {"fastapi", "starlette"} | GCS_LIBS,
    "core": SERVER_ONLY | {"pydantic_settings"} | GCS_LIBS,
    "main": HEAVY | GCS_LIBS,
    "database": HEAVY | {"fastapi", "starlette"} | GCS_LIBS,
    "storage": HEAVY | {"fastapi", "starlette"},
    # a store knows no web framework, no bucket and no queue: the queue's defer comes in as a
    # callback (PostgresJobStore.create_job(in_transaction=...))
    "stores": HEAVY | {"fastapi", "starlette", "procrastinate"} | GCS_LIBS,
}


def _part(module: str) -> str | None:
    """The part a dotted module name belongs to (``None`` for third-party modules)."""
    if module in ("main", "database"):
        return module
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1 or parts[1] in LEAVES:
        return "leaf"
    if parts[1] == "__main__":  # ``python -m colmap_pipeline``: the stage children's entry
        return "core"
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``[(line, absolute module name)]`` of every import in ``path``, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import core`` names a sub-module: count each imported name
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if _is_module(sub) else target))
    return found


def _is_module(dotted: str) -> bool:
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def violations(files: list[Path]) -> list[str]:
    """Every import in ``files`` that breaks :data:`ALLOWED_PARTS` or :data:`FORBIDDEN_LIBS`."""
    out = []
    for path in files:
        me = _part(_module_name(path))
        assert me is not None, path
        for line, target in _imports(path):
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            other = _part(target)
            if other is not None and other not in ALLOWED_PARTS[me]:
                out.append(f"{where}: {me} may not import {other}")
            top = target.split(".")[0]
            if other is None and top in FORBIDDEN_LIBS[me]:
                out.append(f"{where}: {me} may not import {top}")
    return out


def project_files() -> list[Path]:
    return sorted((REPO / PACKAGE).rglob("*.py")) + [REPO / "main.py", REPO / "database.py"]


def test_every_import_follows_the_rules():
    assert violations(project_files()) == []


def test_a_forbidden_import_is_caught(tmp_path):
    """The checker itself: a runner module that imports the core, or a web module that imports
    pycolmap, is reported (so a passing rule test means something)."""
    bad_runner = REPO / PACKAGE / "runner" / "_arch_probe_tmp.py"
    bad_web = REPO / PACKAGE / "web" / "_arch_probe_tmp.py"
    try:
        bad_runner.write_text("from ..core import pipeline\n")
        bad_web.write_text("def f():\n    import pycolmap\n")
        found = violations([bad_runner, bad_web])
    finally:
        bad_runner.unlink(missing_ok=True)
        bad_web.unlink(missing_ok=True)
    assert found == [
        f"{PACKAGE}/runner/_arch_probe_tmp.py:1 imports {PACKAGE}.core.pipeline: "
        "runner may not import core",
        f"{PACKAGE}/web/_arch_probe_tmp.py:2 imports pycolmap: web may not import pycolmap",
    ]


def _loaded(code: str, names: set[str]) -> list[str]:
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps(sorted(m for m in {sorted(names)!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, check=True,
                         env={**os.environ, "DATA_DIR": "/nonexistent-unused"})
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _modules_of(*subpackages: str) -> list[str]:
    mods = []
    for sub in subpackages:
        for p in sorted((REPO / PACKAGE / sub).glob("*.py")):
            mods.append(_module_name(p))
    return mods


def test_api_process_never_loads_pycolmap_av_or_opencv():
    """``main.create_app()`` and every web, intake and runner module, imported together."""
    imports = "\n".join(f"import {m}" for m in _modules_of("web", "intake", "runner"))
    code = f"import main\nmain.create_app()\n{imports}\nimport database"
    assert _loaded(code, {"pycolmap", "av", "cv2", "PIL", "trimesh"}) == []


def test_core_loads_no_web_or_database_framework():
    imports = "\n".join(f"import {m}" for m in _modules_of("core"))
    assert _loaded(imports, {"fastapi", "starlette", "aiosqlite", "uvicorn", "slowapi",
                             "database", "pydantic_settings"}) == []


def test_the_embedded_mode_never_loads_the_gcs_client():
    """Without ``STORAGE_BUCKET`` the server (every web, intake, runner and storage module but
    the GCS one) never imports google-cloud-storage: it loads only in bucket mode."""
    mods = [m for m in _modules_of("web", "intake", "runner", "storage")
            if m != f"{PACKAGE}.storage.gcs"]
    code = "import main\nmain.create_app()\n" + "\n".join(f"import {m}" for m in mods)
    assert _loaded(code, {"google.cloud.storage"}) == []


def test_only_main_and_database_open_a_store_implementation():
    """Issue 12: the web, intake and runner code see the JobStore protocol only; a runner
    module importing the PostgreSQL store (or psycopg's pool through it) is reported."""
    probe = REPO / PACKAGE / "runner" / "_arch_probe_stores_tmp.py"
    try:
        probe.write_text("from ..stores.postgres import PostgresJobStore\n")
        found = violations([probe])
    finally:
        probe.unlink(missing_ok=True)
    assert found == [f"{PACKAGE}/runner/_arch_probe_stores_tmp.py:1 imports "
                     f"{PACKAGE}.stores.postgres: runner may not import stores"]
    assert violations([REPO / "database.py", REPO / "main.py"]) == []
