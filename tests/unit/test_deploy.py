"""deploy/: the systemd unit passes `systemd-analyze verify`, is hardened, and agrees with the
example config and cluster files, which the config code accepts (issue 13 part 5)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blocknode.config import load_cluster_file, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "blocknode.service"
INSTALLED_COMMAND = "/opt/blocknode/bin/blocknode"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd; .ci/run tries to)",
)


def _settings(text: str) -> dict[str, list[str]]:
    """Unit file settings: key -> every value given (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at this checkout's command: `verify` checks that
    the executable exists, and /opt/blocknode is where an install puts it, not this machine."""
    text = UNIT.read_text()
    assert INSTALLED_COMMAND in text
    here = Path(sys.executable).parent / "blocknode"
    command = str(here) if here.exists() else f"{sys.executable} -m blocknode"
    unit = tmp_path / "blocknode.service"
    unit.write_text(text.replace(INSTALLED_COMMAND, command))
    return unit


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    unit = _verifiable_copy(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    # verify exits 0 even for unknown keys or unparsable values: it only warns, naming the unit
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "blocknode.service" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@needs_systemd_analyze
def test_unit_exposure_is_low(tmp_path):
    unit = _verifiable_copy(tmp_path)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    m = re.search(r"Overall exposure level for blocknode\.service: (\d+\.\d+)", r.stdout)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {r.stderr.strip()[:200]}")
    assert float(m[1]) < 2.0, r.stdout


def test_unit_settings():
    s = _settings(UNIT.read_text())
    assert s["User"] == ["blocknode"] and s["Group"] == ["blocknode"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert int(s["LimitNOFILE"][0]) >= 65536
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "PrivateDevices": "yes"}.items():
        assert s[key] == [value], key
    assert s["CapabilityBoundingSet"] == [""]
    assert s["ExecStart"] == [f"{INSTALLED_COMMAND} serve --config /etc/blocknode/config.toml"]


def test_unit_may_write_exactly_the_example_configs_dirs():
    cfg = load_config(DEPLOY / "config.example.toml")
    writable = _settings(UNIT.read_text())["ReadWritePaths"][0].split()
    assert sorted(writable) == sorted([cfg.data_dir, cfg.metadata_dir])
    # paths the read-only rest of the file system must hold
    assert cfg.rpc_secret_file.startswith("/etc/blocknode/")
    assert cfg.admin_key_path.startswith("/etc/blocknode/")  # the node cannot make its own
    assert cfg.cluster_file == "/etc/blocknode/cluster.toml"
    assert not cfg.rpc_bind_addr.startswith("127.") and cfg.rpc_public_addr


def test_example_cluster_file_lists_the_example_node():
    cluster = load_cluster_file(DEPLOY / "cluster.example.toml")
    cfg = load_config(DEPLOY / "config.example.toml")
    assert len(cluster.nodes) == 3 and cluster.replication_factor == 3
    assert cluster.node(cfg.node_id).addr == cfg.rpc_public_addr
    assert len({n.zone for n in cluster.nodes}) == 3
