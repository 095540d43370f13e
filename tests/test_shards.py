"""./run-tests's shards (tests/shards.py): every test file runs, in exactly one shard."""

from __future__ import annotations

import pytest

from tests import shards


@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_test_file_is_in_exactly_one_shard(count: int) -> None:
    files = sorted(p.stem for p in shards.HERE.glob("test_*.py"))
    chosen = shards.shards(count)
    assert sorted(name for shard in chosen for name in shard) == files
    for together in shards.TOGETHER:
        assert sum(set(together) <= set(shard) for shard in chosen) == 1, together


def test_two_shards_are_about_even() -> None:
    loads = [sum(shards.WEIGHTS.get(n, shards.DEFAULT_S) for n in shard)
             for shard in shards.shards(2)]
    assert max(loads) - min(loads) <= max(shards.WEIGHTS.values()), loads
