"""The randomized fault soak (tools/chaos.py): a short fixed-seed run by default, a longer one on demand."""

import itertools

import pytest

from tools.chaos import (EXIT_COULD_NOT_RUN, EXIT_EXACT, FAULT_KINDS, HOLD_S, ChaosSoak, fault_schedule,
                          run_chaos)

SHORT_SEED = 9          # its first faults touch the primary, the local Redis, a process and the websocket
SHORT_MINUTES = 0.8
SOAK_SEED = 75          # all fourteen kinds in its first three minutes
SOAK_MINUTES = 3.0
RATE = 1000


def test_same_seed_same_faults_and_every_kind_drawn():
    first = list(itertools.islice(fault_schedule(5), 300))
    assert first == list(itertools.islice(fault_schedule(5), 300))
    assert first != list(itertools.islice(fault_schedule(6), 300))
    assert {fault.kind for fault in first} == set(FAULT_KINDS)
    for fault in first:
        assert 2.0 <= fault.gap_s <= 8.0
        low, high = HOLD_S.get(fault.kind, (0.0, 0.0))
        assert low <= fault.hold_s <= high


def test_bad_arguments_are_one_readable_line():
    lines = []
    assert run_chaos(minutes=0, seed=1, rate=1000, echo=lines.append) == EXIT_COULD_NOT_RUN
    assert len(lines) == 1 and "--minutes" in lines[0]


def run_soak(minutes: float, seed: int) -> ChaosSoak:
    lines = []

    def echo(line):
        lines.append(line)
        print(line)

    soak = ChaosSoak(minutes=minutes, seed=seed, rate=RATE, echo=echo)
    code = soak.run()
    report = "\n".join(lines)
    assert code == EXIT_EXACT, report
    verdict = soak.verdict
    assert verdict.expected > 0 and verdict.present == verdict.expected, report
    assert not verdict.missing and not verdict.duplicated, report
    assert not verdict.unexpected and not verdict.mismatched and not soak.derived, report
    assert soak.local_verdict.exact(), report
    return soak


@pytest.mark.integration
def test_short_fixed_seed_soak_is_exact():
    soak = run_soak(SHORT_MINUTES, SHORT_SEED)
    assert len(soak.fault_counts) >= 4, dict(soak.fault_counts)
    assert any(kind.startswith("primary-") for kind in soak.fault_counts), dict(soak.fault_counts)


@pytest.mark.chaos
def test_three_minute_soak_is_exact():
    soak = run_soak(SOAK_MINUTES, SOAK_SEED)
    assert len(soak.fault_counts) >= 10, dict(soak.fault_counts)
