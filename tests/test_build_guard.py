"""The stale-build guard: a compiled module older than its source must not be imported silently."""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest

from policies.compiled import check_fresh

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def make_checkout(root: Path, *, with_setup: bool = True) -> Path:
    package = root / "pkg"
    package.mkdir()
    if with_setup:
        (root / "setup.py").write_text("")
    (package / "hot.py").write_text("x = 1\n")
    (package / f"hot{SUFFIX}").write_bytes(b"")
    return package


def age(path: Path, seconds: float) -> None:
    stat = path.stat()
    os.utime(path, (stat.st_atime - seconds, stat.st_mtime - seconds))


def test_a_source_edited_after_compiling_refuses_to_import(tmp_path: Path) -> None:
    package = make_checkout(tmp_path)
    age(package / f"hot{SUFFIX}", 60)
    with pytest.raises(ImportError, match=r"hot\.py changed after it was compiled"):
        check_fresh(package)


def test_a_fresh_build_and_an_installed_package_import(tmp_path: Path) -> None:
    package = make_checkout(tmp_path)
    age(package / "hot.py", 60)
    check_fresh(package)  # compiled after its source: fine
    installed = (
        make_checkout(tmp_path / "site", with_setup=False) if (tmp_path / "site").mkdir() is None else None
    )
    assert installed is not None
    age(installed / f"hot{SUFFIX}", 60)
    check_fresh(installed)  # no setup.py beside it: an installed wheel is never checked
