"""Atomic writes through a temporary sibling path."""

from __future__ import annotations

import pytest

from models.files import atomic_path, remove_stale_temporaries

pytestmark = pytest.mark.unit


def test_atomic_path_replaces_the_file_only_when_the_writer_succeeds(tmp_path):
    target = tmp_path / "out" / "scores.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".parquet"  # format by suffix
        tmp.write_text("first")
        assert not target.exists()
    assert target.read_text() == "first"

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["scores.parquet"]


def test_atomic_path_temporary_left_by_a_kill_is_cleaned(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        # What kill -9 in the middle of the write would leave: the temporary, no target.
        kept = tmp.with_name("kept-" + tmp.name)
        tmp.write_text("interrupted")
        tmp.rename(kept)
        tmp.write_text("complete")
    kept.rename(kept.with_name(kept.name.removeprefix("kept-")))
    assert [p.name for p in remove_stale_temporaries(target)] == [kept.name.removeprefix("kept-")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
