"""MFU's peak: a peak measured while the machine was busy rises to the idle machine's, at a
bounded cost, and MFU never reads above 100%."""

import functools
import json

import numpy as np
from pytest import approx

from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.training import data, metrics, trainer
from test_train import TINY, hp

SHAPE = (64, 64, 64)


def reported(rates: list[float]):
    """A timer for measure_peak_flops that runs the matmul and reports, call by call, the
    seconds it would take at rates.pop(0) FLOP/s: the machine busy or idle, by script."""
    def timer(fn):
        fn()
        return 2 * np.prod(SHAPE) / rates.pop(0)
    return timer


def test_a_peak_measured_on_a_busy_machine_rises_and_mfu_stays_at_most_100_percent():
    busy, idle = 1e9, 4e9
    rates = [busy, idle, busy, idle]  # start-up, then the re-measurements
    measure = functools.partial(metrics.measure_peak_flops, (SHAPE,), timer=reported(rates))
    peak = metrics.Peak(measure(), measure=measure)
    assert peak.flops == approx(busy)  # against it, steps at half the idle peak would read 200%
    assert peak.mfu(2e9, seconds=60.0) == approx(0.5)  # re-measured idle
    assert peak.mfu(2e9, seconds=60.0) == approx(0.5) and peak.flops == approx(idle)  # busy again: it only rises
    # A step faster than any measurement proves the peak low: it becomes the peak.
    assert peak.mfu(6e9, seconds=60.0) == 1.0 and peak.flops == 6e9 and not rates
    fixed = metrics.Peak(1e9, fixed=True)  # --peak-flops: the user's word
    assert fixed.mfu(2e9, seconds=60.0) == 2.0 and fixed.flops == 1e9


def test_re_measuring_takes_a_budget_of_the_training_time():
    now = [0.0]
    calls = []

    def measure():  # each measurement takes a second of the fake clock
        calls.append(peak.trained)
        now[0] += 1.0
        return 1e9

    peak = metrics.Peak(1e9, measure=measure, budget=0.05, clock=lambda: now[0])
    for _ in range(10):
        peak.mfu(5e8, seconds=10.0)
    assert calls == [10, 30, 50, 70, 90]  # each time 1 s more of measuring fits in 5% of the training
    assert peak.spent <= peak.budget * peak.trained


def test_fit_never_reports_mfu_above_100_percent(tmp_path):
    """train.py's loop with a peak a busy start-up measured absurdly low (1 FLOP/s)."""
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 20_000).astype(np.int32)
    peak = metrics.Peak(1.0)
    trainer.fit(TINY, hp(steps=4), data.TokenBatches(tokens, 32, 8), make_mesh(""), str(tmp_path),
                trainer.Schedule(log_every=1, eval_every=100, save_every=100), peak_flops=peak)
    mfus = [json.loads(line)["mfu"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(mfus) == 4 and max(mfus) == 1.0 and peak.flops > 1e6
