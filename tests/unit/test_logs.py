"""The node's log (issue 13 part 2): time, level, node id and logger on every line; JSON lines."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from blocknode.config import config_from_dict
from blocknode.errors import ConfigError
from blocknode.logs import configure_logging

TEXT_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>[A-Z]+) (?P<node>\S+) "
    r"(?P<logger>[\w.]+): (?P<message>.*)$"
)


@pytest.fixture
def root_logging():
    """Restore the root logger (handlers, level) after a test configures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)


def test_a_text_line_carries_time_level_node_and_logger(root_logging):
    out = io.StringIO()
    configure_logging("node7", level="info", stream=out)
    logging.getLogger("blocknode.scrub").info("scrub complete: %d blocks checked", 12)
    logging.getLogger("blocknode.resync").debug("not shown at info")
    logging.getLogger("blocknode.rpc").warning("connection with %s closed", "node2")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    m = TEXT_LINE.match(lines[0])
    assert m, lines[0]
    assert m["level"] == "INFO" and m["node"] == "node7" and m["logger"] == "blocknode.scrub"
    assert m["message"] == "scrub complete: 12 blocks checked"
    m = TEXT_LINE.match(lines[1])
    assert m and m["level"] == "WARNING" and m["message"] == "connection with node2 closed"


def test_json_lines_parse(root_logging):
    out = io.StringIO()
    configure_logging("node3", level="debug", fmt="json", stream=out)
    log = logging.getLogger("blocknode.repair")
    log.debug("a \"quoted\"\nmulti-line message")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("repair failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # one object per line, whatever the message holds
    objs = [json.loads(line) for line in lines]
    for obj in objs:
        assert {"time", "level", "node", "logger", "message"} <= obj.keys()
        assert obj["node"] == "node3" and obj["logger"] == "blocknode.repair"
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", obj["time"])
    assert objs[0]["level"] == "DEBUG" and objs[0]["message"] == 'a "quoted"\nmulti-line message'
    assert objs[1]["level"] == "ERROR" and "RuntimeError: boom" in objs[1]["exception"]


def test_configuring_twice_does_not_double_lines(root_logging):
    first, second = io.StringIO(), io.StringIO()
    configure_logging("n", stream=first)
    configure_logging("n", level="warning", stream=second)
    logging.getLogger("blocknode.x").info("dropped at warning")
    logging.getLogger("blocknode.x").warning("kept")
    assert first.getvalue() == "" and second.getvalue().count("\n") == 1


def test_bad_level_or_format_is_refused(root_logging):
    with pytest.raises(ValueError, match="log level"):
        configure_logging("n", level="loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("n", fmt="xml")


@pytest.mark.parametrize("key, value", [("log_level", "loud"), ("log_format", "xml"), ("log_level", 3)])
def test_config_log_fields_are_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({key: value}, source="t.toml")
    ok = config_from_dict({"log_level": "debug", "log_format": "json"}, source="t.toml")
    assert (ok.log_level, ok.log_format) == ("debug", "json")
