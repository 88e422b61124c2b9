"""Atomic writes: the old file survives a failed write, nothing temporary is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab.fileio import write_atomic, write_text_atomic
from mergelab_bench.bench import update_docs


def test_write_text_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "report.md"
    write_text_atomic(path, "old\n")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{}\n")

    def fail(temporary):
        temporary.write_text("half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_temporary_keeps_extension_and_is_unique(tmp_path):
    seen = []
    for _ in range(2):
        write_atomic(tmp_path / "chart.png", lambda temporary: (seen.append(temporary), temporary.write_bytes(b"x")))
    assert all(t.suffix == ".png" and t.parent == tmp_path and t.name.startswith(".chart.") for t in seen)
    assert seen[0] != seen[1]


def test_update_docs_replaces_only_its_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written prose\n")
    update_docs(docs, "text", "table v1")
    update_docs(docs, "vision", "vision table")
    update_docs(docs, "text", "table v2")
    document = docs.read_text()
    assert "hand-written prose" in document and "vision table" in document
    assert "table v2" in document and "table v1" not in document
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]


def test_folders_are_renamed_only_by_the_atomic_folder_helper():
    """Every folder writer goes through mergelab.fileio (atomic_folder / move_into_place): no
    other module of mergelab or mergelab_bench renames or moves paths itself."""
    import re

    import mergelab
    import mergelab_bench

    offenders = []
    for package in (mergelab, mergelab_bench):
        for path in Path(package.__path__[0]).rglob("*.py"):
            if path.name == "fileio.py" and path.parent.name == "mergelab":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"os\.rename\(|os\.replace\(|shutil\.move\(|\w\.rename\(", code):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_atomic_folder_failure_leaves_the_old_folder_and_no_temporary(tmp_path):
    from mergelab.errors import CheckpointError
    from mergelab.fileio import atomic_folder, write_folder_atomic

    out = tmp_path / "out"
    write_folder_atomic(out, lambda folder: (folder / "a.txt").write_text("old"))
    assert (out / "a.txt").read_text() == "old"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(out, overwrite=True) as folder:
            (folder / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    with pytest.raises(CheckpointError, match="appeared while writing"):
        write_folder_atomic(out, lambda folder: (folder / "b.txt").write_text("new"))
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    write_folder_atomic(out, lambda folder: (folder / "b.txt").write_text("new"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
