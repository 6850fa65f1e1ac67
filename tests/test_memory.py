import pytest

from sparsecode.encoder import MemoryConfig
from sparsecode.memory import memory_budget, parse_memory, rows_within


@pytest.mark.parametrize("text,expected", [("4GB", 4_000_000_000), ("512MiB", 512 * 2 ** 20), ("1.5g", 1_500_000_000),
                                           ("2048", 2048), (4096, 4096), (None, None)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "4 parsecs", "-1GB", "0", True, 0])
def test_parse_memory_rejects(bad):
    with pytest.raises((ValueError, TypeError), match="memory"):
        parse_memory(bad)


def test_budget_default_is_a_share_of_free_memory():
    assert 0 < memory_budget(None, "cpu")
    assert memory_budget("1GB", "cpu") == 1_000_000_000


def test_rows_within_budget():
    assert rows_within(10_000, 1000, fixed=2000) == 8
    assert rows_within(10_000, 1000, at_most=3) == 3
    with pytest.raises(ValueError, match="memory budget 1 KB is too small"):
        rows_within(1000, 5000)


def test_memory_config_field_is_checked():
    MemoryConfig(memory="2GB").validate()
    with pytest.raises(ValueError, match="'lots'"):
        MemoryConfig(memory="lots").validate()
