"""The config reference is generated from the config code and committed as deploy/CONFIG.md
(issue 13 part 5): every field documented, the committed file up to date."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from blocknode.cluster_config import ClusterConfig, ClusterNode
from blocknode.config import NodeConfig
from blocknode.config_doc import (
    CLUSTER_DOCS,
    CLUSTER_NODE_DOCS,
    FIELD_DOCS,
    SECTIONS,
    config_reference,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG_MD = REPO / "deploy" / "CONFIG.md"
REGENERATE = "python -m blocknode.config_doc > deploy/CONFIG.md"


def test_every_field_is_documented_once():
    names = {f.name for f in fields(NodeConfig)} - {"source"}
    assert set(FIELD_DOCS) == names, f"document the new field(s) in blocknode/config_doc.py: " \
        f"{sorted(names ^ set(FIELD_DOCS))}"
    assert all(doc[0] in SECTIONS for doc in FIELD_DOCS.values())
    assert set(CLUSTER_DOCS) == {f.name for f in fields(ClusterConfig)}
    assert set(CLUSTER_NODE_DOCS) == {f.name for f in fields(ClusterNode)}
    text = config_reference().split("## The cluster file")[0]
    for name in names:
        assert text.count(f"| `{name}` |") == 1, name


def test_the_committed_reference_is_up_to_date():
    assert CONFIG_MD.read_text(encoding="utf-8") == config_reference(), \
        f"deploy/CONFIG.md is stale: run `{REGENERATE}`"


def test_the_module_prints_the_reference():
    r = subprocess.run([sys.executable, "-m", "blocknode.config_doc"], capture_output=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == config_reference()


def test_readme_points_to_the_reference():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "deploy/CONFIG.md" in readme
