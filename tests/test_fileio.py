"""Atomic writes: the old file survives a failed write, nothing temporary is left behind."""

from __future__ import annotations

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
