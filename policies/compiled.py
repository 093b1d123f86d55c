"""Guard for a source checkout built with mypyc (see setup.py): a compiled module shadows its `.py`.

An editable install puts `module.cpython-*.so` next to `module.py`, and Python imports the `.so`. Edit
the `.py` without rebuilding and the old code runs, silently. So a package refuses to import when one of
its sources is newer than its compiled form. Only in a checkout (a `setup.py` beside the package): an
installed wheel is never edited in place.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path


def check_fresh(package_dir: Path) -> None:
    """Raise ImportError if a compiled module of the package is older than its source."""
    if not (package_dir.parent / "setup.py").exists():
        return
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for built in package_dir.glob(f"*{suffix}"):
            source = built.with_name(built.name[: -len(suffix)] + ".py")
            if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
                raise ImportError(
                    f"{source} changed after it was compiled to {built.name}: rebuild "
                    "(`make test` does, or `pip install -e .`), or delete the package's .so files "
                    "to run pure Python"
                )
