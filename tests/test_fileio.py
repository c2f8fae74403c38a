"""expedit_d2.fileio.atomic_write: whole files only, also with concurrent writers."""
import json
import multiprocessing as mp

import pytest

from expedit_d2.fileio import atomic_write


def _writer(path, tag, n):
    for i in range(n):
        atomic_write(path, json.dumps({"tag": tag, "i": i, "pad": "x" * 20000}))


def test_concurrent_writers_never_collide(tmp_path):
    """Two real processes rewriting one file: no crash, never half a file, no leftovers
    (a fixed temporary name made one writer's rename fail with FileNotFoundError)."""
    path = tmp_path / "results.jsonl"
    ctx = mp.get_context("fork")  # real processes; fork keeps the start cheap
    procs = [ctx.Process(target=_writer, args=(path, tag, 200)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            json.loads(path.read_text())  # always a whole document
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert json.loads(path.read_text())["i"] == 199
    assert seen > 0
    assert [f.name for f in tmp_path.iterdir()] == ["results.jsonl"]


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    atomic_write(path, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["table.md"]
