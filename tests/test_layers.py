"""Rules of the house that a test can check: SQL lives only in the store layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The store layer: the schema, the database, the change feed and one module per aggregate.
STORE_LAYER = {"models", "db", "change_feed", "stores", "task_manager", "worker_store", "limits",
               "inventory_store", "schedule_store", "people_store", "engagement_store",
               "approval_store", "evidence_store", "result_store"}
DATABASE_PACKAGES = {"sqlalchemy", "psycopg", "alembic"}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, wherever in it (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_store_layer_speaks_to_the_database() -> None:
    modules = sorted([*ROOT.glob("*.py"), *ROOT.glob("deploy/*.py")])
    assert {path.stem for path in modules} >= STORE_LAYER | {"server", "worker", "scanner", "scans"}
    offenders = {path.name: sorted(imported_packages(path) & DATABASE_PACKAGES)
                 for path in modules if path.stem not in STORE_LAYER}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_rule_sees_an_import_hidden_in_a_function(tmp_path: Path) -> None:
    module = tmp_path / "sneaky.py"
    module.write_text("def f():\n    from sqlalchemy.engine import make_url\n    import psycopg.rows\n")
    assert imported_packages(module) == {"sqlalchemy", "psycopg"}
