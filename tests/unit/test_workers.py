"""The worker interface: settings parse and validate, the registry generates list/get/set."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio

from blocknode.context import NodeContext
from blocknode.workers.base import InvalidSetting, Setting, Worker, WorkerRegistry


class Dummy(Worker):
    """A worker with one integer and one float setting, stored in memory."""

    name = "dummy"

    def __init__(self, ctx: NodeContext, name: str = "dummy", prefix: str = "dummy") -> None:
        self.name = name  # type: ignore[misc]
        super().__init__(ctx)
        self.count = 2
        self.speed = 1.5
        self.applied: list[Any] = []
        self._settings = (
            Setting(f"{prefix}-count", int, 1, 10, lambda: self.count, self._set_count, help="how many"),
            Setting(f"{prefix}-speed", float, 0, math.inf, lambda: self.speed, self._set_speed),
        )

    async def _set_count(self, v: int) -> None:
        self.applied.append(v)
        self.count = v

    async def _set_speed(self, v: float) -> None:
        self.applied.append(v)
        self.speed = v

    async def run(self) -> None:
        await trio.sleep_forever()

    def status(self) -> dict[str, Any]:
        return {"state": "idle", "tranquility": None, "own": 1}

    def settings(self) -> tuple[Setting, ...]:
        return self._settings


@pytest.fixture
def dummy() -> Dummy:
    return Dummy(NodeContext())


@pytest.mark.parametrize(("value", "expected"), [
    (3, 3), (3.0, 3), ("3", 3), (" 7 ", 7), ("1e1", 10), (10, 10), (1, 1),
])
def test_int_setting_accepts_integers_and_their_text(dummy, value, expected):
    v = dummy.settings()[0].parse(value)
    assert v == expected and type(v) is int


@pytest.mark.parametrize("value", [
    0, 11, 100000, 1e300, -1, 3.5, "3.5", True, False, None, "abc", "", [1], {"a": 1}, b"3",
    math.inf, -math.inf, math.nan, "inf", "nan", "-inf", 2**70,
])
def test_int_setting_refuses_wrong_types_bounds_and_non_finite(dummy, value):
    with pytest.raises(InvalidSetting) as e:
        dummy.settings()[0].parse(value)
    msg = str(e.value)
    assert msg.startswith("dummy-count: expected an integer from 1 to 10, got ")


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (2, 2.0), ("0.25", 0.25), (1e300, 1e300)])
def test_float_setting(dummy, value, expected):
    v = dummy.settings()[1].parse(value)
    assert v == expected and type(v) is float


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan, "inf", "nan", "x", None, True])
def test_float_setting_refuses(dummy, value):
    with pytest.raises(InvalidSetting, match="dummy-speed: expected a number >= 0"):
        dummy.settings()[1].parse(value)


async def test_registry_set_validates_then_applies(dummy):
    reg = WorkerRegistry([dummy])
    assert await reg.set("dummy-count", "4") == 4
    assert dummy.count == 4 and dummy.applied == [4]
    for bad in ("0", "inf", 2.5, "many"):
        with pytest.raises(InvalidSetting):
            await reg.set("dummy-count", bad)
    assert dummy.applied == [4]  # nothing refused was applied
    with pytest.raises(InvalidSetting) as e:
        await reg.set("nope", 1)
    assert "unknown setting 'nope'" in str(e.value)
    assert "valid settings: dummy-count, dummy-speed" in str(e.value)
    with pytest.raises(InvalidSetting):
        await reg.set(None, 1)


def test_rows_and_settings_are_generated_from_the_workers(dummy):
    other = Dummy(NodeContext(), name="other", prefix="other")
    reg = WorkerRegistry([dummy, other])
    rows = reg.rows()
    assert [r["name"] for r in rows] == ["dummy", "other"]
    assert rows[0]["settings"] == {"dummy-count": 2, "dummy-speed": 1.5}
    assert rows[1]["settings"] == {"other-count": 2, "other-speed": 1.5}
    assert rows[0]["state"] == "idle" and rows[0]["own"] == 1
    got = reg.settings()
    assert [s["name"] for s in got] == ["dummy-count", "dummy-speed", "other-count", "other-speed"]
    assert got[0] == {"name": "dummy-count", "value": 2, "worker": "dummy",
                      "valid": "an integer from 1 to 10", "help": "how many"}


def test_names_are_unique(dummy):
    with pytest.raises(ValueError, match="two workers"):
        WorkerRegistry([dummy, Dummy(NodeContext(), prefix="x")])
    with pytest.raises(ValueError, match="two settings"):
        WorkerRegistry([dummy, Dummy(NodeContext(), name="x")])
