"""The launcher's orphan clock, on its own, with the time passed in."""

from __future__ import annotations

from ssh_provisioner.host.orphan import OrphanClock

GONE, TERMINATE, KILL = OrphanClock.GONE, OrphanClock.TERMINATE, OrphanClock.KILL


def clock(liveness: float = 10.0, orphan: float = 60.0, grace: float = 5.0) -> OrphanClock:
    return OrphanClock(liveness, orphan, grace, now=0.0)


def test_a_client_that_pings_is_never_counted_gone() -> None:
    c = clock()
    for now in range(0, 1000, 9):
        c.heard(float(now))
        assert c.due(float(now)) == []
        wakeup = c.next_wakeup(float(now))
        assert wakeup is not None
        assert 0 < wakeup <= 10


def test_silence_then_orphan_timeout_then_grace() -> None:
    c = clock()
    assert c.due(9.99) == []
    assert c.next_wakeup(0.0) == 10.0
    assert c.due(10.0) == [GONE]
    assert c.due(10.0) == []  # reported once
    assert c.next_wakeup(10.0) == 60.0
    assert c.due(69.9) == []
    assert c.due(70.0) == [TERMINATE]
    assert c.next_wakeup(70.0) == 5.0
    assert c.due(74.9) == []
    assert c.due(75.0) == [KILL]
    assert c.next_wakeup(75.0) is None  # nothing more until an event


def test_late_wakeup_reports_everything_due_in_order() -> None:
    c = clock()
    assert c.due(1000.0) == [GONE]  # the countdown starts when silence is noticed
    assert c.due(1060.0) == [TERMINATE]
    assert c.due(2000.0) == [KILL]


def test_a_slow_client_that_speaks_again_stops_the_countdown() -> None:
    c = clock()
    assert c.due(10.0) == [GONE]
    c.heard(30.0)
    assert c.due(100.0) == [GONE]  # 10 s after it last spoke, not orphan at 70
    c.heard(101.0)
    assert c.due(150.0) == [GONE]


def test_speaking_after_sigterm_does_not_save_the_kernel() -> None:
    c = clock()
    c.due(10.0)
    assert c.due(70.0) == [TERMINATE]
    c.heard(71.0)
    assert c.due(75.0) == [KILL]


def test_eof_starts_the_countdown_at_once_and_a_line_does_not_stop_it() -> None:
    c = clock()
    c.left(3.0)
    c.heard(4.0)  # from a client that is gone: only reattach brings one back
    assert c.due(62.9) == []
    assert c.due(63.0) == [TERMINATE]


def test_reattach_stops_everything_even_after_sigterm() -> None:
    c = clock()
    c.left(0.0)
    assert c.due(60.0) == [TERMINATE]
    c.attached(61.0)
    assert c.due(66.0) == []  # no SIGKILL
    assert c.next_wakeup(66.0) == 5.0  # listening again: 10 s after the attach


def test_no_liveness_means_silence_never_counts() -> None:
    c = clock(liveness=0)
    assert c.next_wakeup(0.0) is None
    assert c.due(1e9) == []
    c.left(1e9)
    assert c.due(1e9 + 60) == [TERMINATE]


def test_after_sigkill_nothing_more_is_due() -> None:
    c = clock()
    c.left(0.0)
    c.due(60.0)
    assert c.due(65.0) == [KILL]
    c.left(66.0)  # a late EOF
    assert c.due(1e6) == []
    assert c.next_wakeup(1e6) is None
