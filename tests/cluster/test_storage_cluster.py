"""Issue 14 on 3-node clusters in one process over loopback TCP: compressed blocks
healed by scrub, and a data directory whose disk is not mounted at start."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import trio

from blocknode import block, fastpath
from blocknode.config import DataDir
from blocknode.storage.block_files import MARKER_NAME, ZST_SUFFIX
from tests.cluster.harness import ServeProcesses, cli, cluster3, settled, write_cluster


def text(n: int) -> bytes:
    """Compressible data: numbered English-like lines."""
    return b"".join(b"line %d of a block that compresses well\n" % i for i in range(n // 30 + 1))[:n]


async def test_a_corrupt_compressed_block_is_found_by_scrub_and_healed(tmp_path, monkeypatch):
    verified: list[bytes] = []
    real = block.verify_compressed

    def counting(raw, hash, *, block_size):
        verified.append(hash)
        return real(raw, hash, block_size=block_size)

    monkeypatch.setattr(block, "verify_compressed", counting)
    with trio.fail_after(30):
        async with cluster3(tmp_path, compression_level=3) as cl:
            data = text(300_000)
            async with cl.client("node1") as c:
                h = bytes.fromhex(await c.put(data, "obj"))
                assert await c.get(h.hex()) == data
            await settled(cl, [h])
            frames = set()
            for n in cl.nodes.values():
                path = fastpath.block_path(n.files.data_dir, h) + ZST_SUFFIX
                with open(path, "rb") as f:
                    frames.add(f.read())
            assert len(frames) == 1  # one compression, the same frame on every replica
            (frame,) = frames
            assert len(frame) < len(data) / 3
            assert verified.count(h) >= 2  # each remote replica decompressed and hashed it

            n2 = cl.nodes["node2"]
            path = n2.files.path(h)
            assert path.endswith(ZST_SUFFIX)
            with open(path, "r+b") as f:
                f.seek(len(frame) // 2)
                byte = f.read(1)
                f.seek(len(frame) // 2)
                f.write(bytes([byte[0] ^ 0x40]))
            scrub = n2.scrub
            await scrub.start(0)
            await scrub.run_to_completion()
            assert scrub.status()["corruptions"] == 1
            assert os.path.exists(path + ".corrupted")
            await n2.resync.run_once()
            with open(path, "rb") as f:
                assert f.read() == frame  # the stored form came back, not re-compressed
            assert await n2.blocks.read(h) == data
            assert n2.meta.errors_list() == []


async def test_an_unmounted_data_dir_is_out_of_service_and_its_blocks_come_back(tmp_path):
    with trio.fail_after(60):
        async with cluster3(tmp_path, inline_threshold=0) as cl:
            root = Path(cl.cfg("node1").metadata_dir).parent
            a, b = root / "disk-a", root / "disk-b"
            two = (DataDir(str(a), 1000), DataDir(str(b), 1000))
            i = next(k for k, c in enumerate(cl.configs) if c.node_id == "node1")
            cl.configs[i] = dataclasses.replace(cl.configs[i], data_dir=two)
            await cl.stop("node1")
            n1 = await cl.start("node1")
            assert (a / MARKER_NAME).exists() and (b / MARKER_NAME).exists()
            datas = [os.urandom(3000) for _ in range(60)]
            async with cl.client("node2") as c:
                hashes = [bytes.fromhex(await c.put(d, "obj")) for d in datas]
            await settled(cl, hashes)
            on_b = [h for h in hashes if n1.files.primary(h).path == str(b)]
            assert 10 < len(on_b) < 50
            st = {d["path"]: d for d in n1.status()["data_dirs"]}
            assert st[str(a)]["blocks"] + st[str(b)]["blocks"] == len(hashes)

            await cl.stop("node1")
            os.rename(b, f"{b}.elsewhere")  # the disk is not mounted: an empty mount point
            b.mkdir()
            n1 = await cl.start("node1")
            st = {d["path"]: d for d in n1.status()["data_dirs"]}
            assert st[str(b)]["state"] == "failed" and "marker" in st[str(b)]["failure"]
            assert st[str(a)]["state"] == "ok"
            assert not (b / MARKER_NAME).exists()  # nothing is written into the mount point
            # the rebalance worker queued the lost blocks; the resync workers fetch them
            with trio.fail_after(30):
                while n1.rebalance.status()["refetch_queued"] < len(on_b):
                    await trio.sleep(0.01)
            assert n1.rebalance.status()["refetch_queued"] == len(on_b)
            await n1.resync.run_once()
            for h, d in zip(hashes, datas, strict=True):
                assert await n1.blocks.read(h) == d
            assert not list(b.iterdir())


@pytest.mark.slow
def test_cli_repair_rebalance_and_status_per_data_dir(tmp_path):
    (cfg,) = write_cluster(tmp_path, 1, rf=1, inline_threshold=100)
    procs = ServeProcesses([cfg])
    try:
        procs.start_all()
        datas = [os.urandom(5000) for _ in range(12)] + [text(200_000)]
        hashes = []
        for i, d in enumerate(datas):
            src = tmp_path / f"f{i}"
            src.write_bytes(d)
            r = cli("put", str(src), "--ref", "r", config=cfg)
            assert r.returncode == 0, r.stderr
            hashes.append(r.stdout.decode().strip())
        procs.kill(0)
        # a second disk, twice as large: half the blocks or more now belong there
        body = cfg.read_text().replace(
            'data_dir = "data"',
            'data_dir = [{ path = "data", capacity = "1T" }, { path = "data2", capacity = "2T" }]')
        cfg.write_text(body)
        procs.start(0)
        procs.wait_ready(0)
        st = json.loads(cli("status", "--json", config=cfg).stdout)
        dirs = {Path(d["path"]).name: d for d in st["data_dirs"]}
        assert dirs["data"]["blocks"] == len(datas) and dirs["data2"]["blocks"] == 0
        assert {"path", "state", "blocks", "bytes", "free", "errors"} <= set(dirs["data"])
        r = cli("repair", "rebalance", "--wait", config=cfg)
        assert r.returncode == 0, r.stderr
        assert "rebalance done" in r.stdout.decode() and b"moved" in r.stdout
        for h, d in zip(hashes, datas, strict=True):
            r = cli("get", h, config=cfg)
            assert r.returncode == 0 and r.stdout == d
        st = json.loads(cli("status", "--json", config=cfg).stdout)
        dirs = {Path(d["path"]).name: d for d in st["data_dirs"]}
        assert dirs["data2"]["blocks"] > 0
        assert dirs["data"]["blocks"] + dirs["data2"]["blocks"] == len(datas)
        text_out = cli("status", config=cfg).stdout.decode()
        assert text_out.count("data dir") == 2 and "free" in text_out
        assert cli("repair", "rebalance", "--rc", config=cfg).returncode == 2
    finally:
        procs.close()
