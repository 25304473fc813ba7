"""The cross-validation protocol of benchmarks/dialogsum.py: which dialogues go where."""

from __future__ import annotations

import pytest

from benchmarks.dialogsum import fold_splits, spread

pytestmark = pytest.mark.unit


def test_every_dialogue_is_tested_exactly_once_and_never_trained_on_in_its_fold():
    splits = fold_splits(500, folds=5, validation=50, seed=0)
    tested = [i for split in splits for i in split["test"]]
    assert sorted(tested) == list(range(500))
    for split in splits:
        parts = [set(split[name]) for name in ("train", "validation", "test")]
        assert sum(map(len, parts)) == 500 and set().union(*parts) == set(range(500))
        assert len(split["test"]) == 100 and len(split["validation"]) == 50
    assert fold_splits(500, 5, 50, seed=0) == splits
    assert fold_splits(500, 5, 50, seed=1) != splits


def test_uneven_folds_and_bad_settings():
    splits = fold_splits(11, folds=3, validation=2, seed=0)
    assert sorted(len(s["test"]) for s in splits) == [3, 4, 4]
    with pytest.raises(ValueError, match="folds"):
        fold_splits(10, folds=1, validation=2, seed=0)
    with pytest.raises(ValueError, match="validation"):
        fold_splits(10, folds=2, validation=5, seed=0)


def test_spread_reports_mean_and_sample_standard_deviation():
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert spread([4.0])["std"] == 0.0
