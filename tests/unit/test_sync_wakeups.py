"""The blocking client's result hand-off (`blocknode.client.sync._Wakeups`): one
wakeup per Trio tick, passed on by the woken thread; a thread that stops waiting
(interrupted) never strands the threads it was to wake."""

from __future__ import annotations

import threading
from collections.abc import Callable

import outcome

from blocknode.client.sync import _Waiter, _Wakeups


class FakeThread:
    """Stands for `ClientThread`: `after_tick` functions run when the test says."""

    def __init__(self) -> None:
        self.due: list[Callable[[], None]] = []

    def after_tick(self, fn: Callable[[], None]) -> None:
        self.due.append(fn)

    def tick(self) -> None:
        due, self.due = self.due, []
        for fn in due:
            fn()


def woken(w: _Waiter) -> bool:
    """Whether `w` was woken (its lock released), without waiting."""
    got = w._lock.acquire(timeout=0.5)
    if got:
        w.pass_on()
    return got


def test_one_wakeup_per_tick_passed_on_by_the_head():
    t = FakeThread()
    wk = _Wakeups(t)  # type: ignore[arg-type]
    ws = [_Waiter() for _ in range(4)]
    for i, w in enumerate(ws):
        wk.put(w, outcome.Value(i))
    assert len(t.due) == 1  # one flush for the tick, however many results
    t.tick()
    assert ws[0].chain == ws[1:]
    assert not ws[1]._lock.acquire(blocking=False)  # not woken by the Trio thread
    results: list[int] = []
    threads = [threading.Thread(target=lambda w=w: results.append(w.wait().unwrap())) for w in ws[1:]]
    for th in threads:
        th.start()
    assert ws[0].wait().unwrap() == 0  # the head wakes the others
    for th in threads:
        th.join(5)
    assert sorted(results) == [1, 2, 3]


def test_a_head_that_gave_up_before_the_tick_is_skipped():
    t = FakeThread()
    wk = _Wakeups(t)  # type: ignore[arg-type]
    a, b, c = _Waiter(), _Waiter(), _Waiter()
    for w in (a, b, c):
        wk.put(w, outcome.Value(None))
    wk.give_up(a)  # a's thread was interrupted before its wakeup came
    t.tick()
    assert b.chain == [c] and a.chain == []
    assert woken(a)  # woken directly, as one that gave up
    assert woken(b) and woken(c)


def test_a_head_interrupted_after_it_was_chosen_passes_the_chain_on():
    t = FakeThread()
    wk = _Wakeups(t)  # type: ignore[arg-type]
    a, b, c = _Waiter(), _Waiter(), _Waiter()
    for w in (a, b, c):
        wk.put(w, outcome.Value(None))
    t.tick()
    assert a.chain == [b, c]
    a._lock.acquire()  # a's thread woke, then was interrupted before passing it on
    wk.give_up(a)
    assert woken(b) and woken(c)
    # A later result for a thread that gave up wakes it directly; waking twice is harmless.
    wk.put(a, outcome.Value(None))
    t.tick()
    a.wake()
    a.wake()


def test_later_waiters_after_a_give_up_still_chain():
    t = FakeThread()
    wk = _Wakeups(t)  # type: ignore[arg-type]
    gone = _Waiter()
    wk.give_up(gone)
    x, y = _Waiter(), _Waiter()
    for w in (gone, x, y):
        wk.put(w, outcome.Value(None))
    t.tick()
    assert x.chain == [y]
    assert woken(gone) and woken(x) and woken(y)
