"""Manifests: the size of one is known before any block is uploaded (issue 9 C.14)."""

from __future__ import annotations

import os

import pytest

from blocknode.client.manifest import (
    block_count,
    encode_manifest,
    manifest_size,
    max_manifest_blocks,
)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40])
@pytest.mark.parametrize("count", [0, 1, 15, 16, 100, 65535, 65536])
def test_manifest_size_is_the_encoded_length(size, count):
    assert manifest_size(size, count) == len(encode_manifest(size, [os.urandom(32)] * count))


@pytest.mark.parametrize("block_size", [1024, 4096, 1 << 20])
def test_max_manifest_blocks_is_the_largest_that_fits(block_size):
    for size in (block_size * 10, 2**64 - 1):
        n = max_manifest_blocks(block_size, size)
        assert manifest_size(size, n) <= block_size < manifest_size(size, n + 1)
    assert max_manifest_blocks(1 << 20) == 30839  # about 30 GiB of data with 1 MiB blocks


def test_block_count():
    assert [block_count(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]
