"""Size fields take Garage's forms ("1T", "256M", "64K", "1MiB"); ints keep working (issue 13 part 5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blocknode.config import SIZE_FIELDS, config_from_dict, load_config
from blocknode.errors import ConfigError
from blocknode.sizes import format_size, parse_size


@pytest.mark.parametrize("text, n", [
    ("1T", 10**12), ("256M", 256 * 10**6), ("64K", 64_000), ("1MiB", 1 << 20), ("1mib", 1 << 20),
    ("256MiB", 256 << 20), ("1 GiB", 1 << 30), ("2gi", 2 << 30), ("16KiB", 16384), ("1KB", 1000),
    ("4096", 4096), ("10B", 10), ("1.5K", 1500), ("0.5MiB", 1 << 19), ("1.1T", 1_100_000_000_000),
    (" 3 M ", 3_000_000), ("1TiB", 1 << 40), ("2P", 2 * 10**15),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "1 2M", "-1M", "1X", "1ZB", "1e6", "one", "1MiBs", "0x10"])
def test_not_a_size(text):
    assert parse_size(text) is None


@given(st.integers(min_value=0, max_value=1 << 60))
def test_format_size_reads_back(n):
    assert parse_size(format_size(n)) == n


def test_format_size_picks_the_largest_exact_binary_unit():
    assert [format_size(n) for n in (1 << 20, 16 << 10, 16 << 30, 1000, 0)] == \
        ["1MiB", "16KiB", "16GiB", "1000", "0"]


def test_every_size_field_takes_strings_and_ints(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text('block_size = "1MiB"\ninline_threshold = "16KiB"\nlmdb_map_size = "1T"\n'
                 'block_ram_buffer_max = "256M"\n')
    cfg = load_config(p)
    assert (cfg.block_size, cfg.inline_threshold, cfg.lmdb_map_size, cfg.block_ram_buffer_max) == \
        (1 << 20, 16 << 10, 10**12, 256 * 10**6)
    p.write_text("block_size = 65536\ninline_threshold = 0\n")
    cfg = load_config(p)
    assert (cfg.block_size, cfg.inline_threshold) == (65536, 0)
    assert SIZE_FIELDS == {"block_size", "inline_threshold", "lmdb_map_size", "block_ram_buffer_max"}


@pytest.mark.parametrize("field", sorted(SIZE_FIELDS))
@pytest.mark.parametrize("value", ["lots", "-1M", "1ZB", 1.5, True])
def test_a_bad_size_names_the_field_and_the_forms(field, value):
    with pytest.raises(ConfigError) as info:
        config_from_dict({field: value}, source="n.toml")
    msg = str(info.value)
    assert msg.startswith(f"n.toml: field {field!r}: expected a size") and "MiB" in msg
    assert msg.endswith(f"got {value!r}")


def test_zero_is_refused_where_a_size_must_be_positive():
    with pytest.raises(ConfigError, match="'block_size'.*got '0'"):
        config_from_dict({"block_size": "0"}, source="n.toml")
    assert config_from_dict({"inline_threshold": "0K"}, source="n.toml").inline_threshold == 0
    # the relation between fields is checked on the parsed values
    with pytest.raises(ConfigError, match="inline_threshold.*at most block_size"):
        config_from_dict({"block_size": "64KiB", "inline_threshold": "1MiB"}, source="n.toml")
