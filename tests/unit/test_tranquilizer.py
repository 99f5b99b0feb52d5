"""The tranquilizer: rest = tranquility × mean recent step time (pure, fake clock, mock clock)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from blocknode.tranquilizer import Tranquilizer


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("tranquility", [0.5, 1, 2, 4, 10])
def test_sleep_work_ratio_equals_tranquility(tranquility):
    clock = Clock()
    tq = Tranquilizer(30, clock=clock)
    rng = random.Random(tranquility)
    work = rest = 0.0
    tq.begin()
    for _ in range(2000):
        step = rng.uniform(0.001, 0.02)  # steps of varying length
        clock.t += step
        work += step
        delay = tq.observe(tranquility)
        clock.t += delay
        rest += delay
        tq.begin()
    assert rest / work == pytest.approx(tranquility, rel=0.10)


def test_zero_tranquility_never_rests_and_window_bounds_memory():
    clock = Clock()
    tq = Tranquilizer(5, clock=clock)
    for d in (1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0):
        tq.begin()
        clock.t += d
        assert tq.observe(0) == 0.0
    assert tq.mean_step() == 3.0  # only the last 5 steps count


def test_reset_excludes_idle_time():
    clock = Clock()
    tq = Tranquilizer(clock=clock)
    tq.begin()
    clock.t += 1.0
    assert tq.observe(2) == 2.0
    tq.reset()
    clock.t += 100.0  # idle, not timed
    assert tq.observe(2) == 2.0  # no new observation: mean still 1 s


async def test_tranquilize_sleeps_on_the_trio_clock(autojump_clock):
    with trio.fail_after(100):
        tq = Tranquilizer()
        assert await tq.tranquilize(3) == 0.0  # first call only starts timing
        work = rest = 0.0
        for _ in range(20):
            autojump_clock.jump(0.5)  # a step of 0.5 s of "work"
            work += 0.5
            t0 = trio.current_time()
            await tq.tranquilize(3)
            rest += trio.current_time() - t0
        assert rest / work == pytest.approx(3, rel=0.10)


def test_short_steps_merge_until_min_step():
    clock = FakeClockForMinStep()
    tq = Tranquilizer(30, clock=clock, min_step=0.005)
    rests = []

    async def run():
        await tq.tranquilize(1.0)  # starts timing
        for _ in range(10):
            clock.t += 0.001  # a 1 ms step
            rests.append(await tq.tranquilize(1.0))

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    # only every fifth 1 ms step ends a 5 ms step, and rests as long as it took
    assert [r > 0 for r in rests] == [False, False, False, False, True] * 2
    assert all(abs(r - 0.005) < 1e-9 for r in rests if r > 0)


class FakeClockForMinStep:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t
