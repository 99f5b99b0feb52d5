"""Issue 10 part 3: what `serve` creates is private to its user, and a secret file
others can read is refused."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from blocknode.config import load_config
from tests.cluster.harness import ServeProcesses, cli, write_cluster

pytestmark = pytest.mark.slow


def _without_inline_secret(config: Path, extra: str = "") -> None:
    text = re.sub(r'rpc_secret = "[0-9a-f]+"\n', "", config.read_text())
    config.write_text(text + extra)


def test_every_file_serve_creates_is_private(tmp_path):
    (config,) = write_cluster(tmp_path, 1, rf=1, inline_threshold=1024)
    _without_inline_secret(config)  # serve makes the default secret file
    cfg = load_config(config)
    procs = ServeProcesses([config])
    old = os.umask(0o022)  # a usual umask: serve must not depend on it
    try:
        procs.start(0)
    finally:
        os.umask(old)
    try:
        procs.wait_ready(0)
        for name, size in (("file", 50_000), ("inline", 100)):
            src = tmp_path / name
            src.write_bytes(os.urandom(size))
            r = cli("put", str(src), "--ref", name, config=config)
            assert r.returncode == 0, r.stderr
    finally:
        procs.close()
    seen: dict[str, int] = {}
    for top in (cfg.data_dir, cfg.metadata_dir):
        for root, _dirs, files in os.walk(top):
            seen[root] = stat.S_IMODE(os.stat(root).st_mode)
            for f in files:
                p = os.path.join(root, f)
                seen[p] = stat.S_IMODE(os.stat(p).st_mode)
    seen[cfg.secret_file] = stat.S_IMODE(os.stat(cfg.secret_file).st_mode)
    names = {os.path.basename(p) for p in seen}
    assert {"data.mdb", "lock.mdb", "blocknode.lock", "rpc_secret"} <= names
    assert any(len(n) == 64 for n in names)  # a block file, under its fan-out directories
    wrong = {p: f"{m:04o}" for p, m in seen.items()
             if m != (0o700 if os.path.isdir(p) else 0o600)}
    assert wrong == {}, wrong


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    (config,) = write_cluster(tmp_path, 1, rf=1)
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex() + "\n")
    _without_inline_secret(config, f'rpc_secret_file = "{secret}"\n')
    for mode, who in ((0o644, "its group and other users"), (0o640, "its group"),
                      (0o604, "other users")):
        secret.chmod(mode)
        for args in (("serve",),):  # a client holds a key, not the cluster secret
            r = cli(*args, config=config, timeout=30)
            err = r.stderr.decode()
            assert r.returncode == 2 and err.count("\n") == 1, err
            assert (f"cluster secret file {secret} is accessible to {who} (mode {mode:04o}, "
                    f"expected 0600): run `chmod 600 {secret}`") in err, err
            assert "allow_world_readable_secrets" in err
    # the operator who must can say so
    config.write_text(config.read_text() + "allow_world_readable_secrets = true\n")
    procs = ServeProcesses([config])
    try:
        procs.start_all()
        r = cli("status", config=config)
        assert r.returncode == 0, r.stderr
    finally:
        procs.close()
    secret.chmod(0o600)
