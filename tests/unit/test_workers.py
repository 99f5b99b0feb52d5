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
    assert rows[0]["state"] == "idle" and rows[0]["own"] == 1 and rows[0]["errors"] == 0
    assert rows[0]["last_error"] is None
    got = reg.settings()
    assert [s["name"] for s in got] == ["dummy-count", "dummy-speed", "other-count", "other-speed"]
    assert got[0] == {"name": "dummy-count", "value": 2, "worker": "dummy",
                      "valid": "an integer from 1 to 10", "help": "how many"}


def test_names_are_unique(dummy):
    with pytest.raises(ValueError, match="two workers"):
        WorkerRegistry([dummy, Dummy(NodeContext(), prefix="x")])
    with pytest.raises(ValueError, match="two settings"):
        WorkerRegistry([dummy, Dummy(NodeContext(), name="x")])


# ------------------------------------------------------------------ supervision


async def test_supervisor_counts_backs_off_exponentially_and_goes_on(autojump_clock, caplog):
    from blocknode.workers.base import Supervisor

    sup = Supervisor("w", NodeContext(now_ms=lambda: 42), base_s=1.0, max_s=8.0)
    outcomes = iter([RuntimeError("a bug"), OSError("disk"), RuntimeError("b"), RuntimeError("c"),
                     RuntimeError("d"), None, RuntimeError("e")])
    rests = []

    async def step() -> None:
        exc = next(outcomes)
        if exc is not None:
            raise exc

    for _ in range(7):
        t0 = trio.current_time()
        ok = await sup.step(step, about="block ab")
        rests.append((ok, trio.current_time() - t0))
    assert [r[0] for r in rests] == [False, False, False, False, False, True, False]
    assert [round(r[1]) for r in rests] == [1, 2, 4, 8, 8, 0, 1]  # doubling, capped, reset
    assert sup.errors == 6 and sup.status()["last_error"] == "block ab: RuntimeError: e"
    assert sup.status()["last_error_at"] == 42
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 5  # the bugs, not the OSError (one warning line)


async def test_a_foundation_failure_is_not_swallowed(autojump_clock):
    from blocknode.workers.base import NodeFoundationError, Supervisor

    sup = Supervisor("w", NodeContext())
    problem: list[str] = []
    sup.health = lambda: problem[0] if problem else None

    async def failing() -> None:
        raise RuntimeError("boom")

    assert not await sup.step(failing)  # healthy: recorded and rested
    problem.append("data_dir /x is gone")
    with pytest.raises(NodeFoundationError, match="data_dir /x is gone"):
        await sup.step(failing)

    async def nested() -> None:  # e.g. from inside a worker's own nursery
        raise ExceptionGroup("g", [NodeFoundationError("metadata gone")])

    problem.clear()
    with pytest.raises(NodeFoundationError, match="metadata gone"):
        await sup.step(nested)


async def test_the_registry_restarts_a_worker_whose_task_raises(autojump_clock):
    class Flaky(Dummy):
        runs = 0

        async def run(self) -> None:
            self.runs += 1
            if self.runs < 3:
                raise RuntimeError(f"run {self.runs} failed")
            await trio.sleep_forever()

    w = Flaky(NodeContext())
    reg = WorkerRegistry([w])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reg.run)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert w.runs == 3 and reg.rows()[0]["errors"] == 2
    assert "run 2 failed" in reg.rows()[0]["last_error"]
