"""The novelty score's Cholesky factor and triangular solve: SciPy's results to the bit, without the GIL."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from scipy.linalg import cholesky, solve_triangular

from daemon.nogil_lapack import cholesky_lower, solve_lower

RNG = np.random.default_rng(0)


def _covariance(dim: int) -> np.ndarray:
    rows = RNG.standard_normal((2 * dim, dim), dtype=np.float32)
    return (rows.T @ rows / len(rows) + 0.3 * np.eye(dim)).astype(np.float32)


def test_the_factor_and_the_solve_are_scipys_to_the_bit() -> None:
    covariance = _covariance(300)
    expected = cholesky(covariance, lower=True, check_finite=False)
    factor = cholesky_lower(covariance.copy())
    assert np.array_equal(factor, expected) and factor.flags.f_contiguous
    rows = RNG.standard_normal((700, 300), dtype=np.float32)
    expected_solved = solve_triangular(expected, rows.T, lower=True, check_finite=False)
    assert np.array_equal(solve_lower(factor, rows.copy()), expected_solved)
    assert solve_lower(factor, rows[:0].copy()).shape == (300, 0)


def test_a_matrix_that_is_not_positive_definite_or_not_float32_is_refused() -> None:
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        cholesky_lower(-_covariance(20))
    with pytest.raises(ValueError, match="float32"):
        cholesky_lower(_covariance(20).astype(np.float64))
    with pytest.raises(ValueError, match="C-ordered float32 rows"):
        solve_lower(cholesky_lower(_covariance(20)), RNG.standard_normal((5, 20)))


def _longest_stall(call: Callable[[], object]) -> float:
    """The longest stretch of `call`'s run, as a share of it, in which another Python thread made no step."""
    stamps: list[float] = []
    stop, started = threading.Event(), threading.Event()

    def step() -> None:
        started.set()
        while not stop.is_set():
            stamps.append(time.perf_counter())

    other = threading.Thread(target=step, name="stepper")
    other.start()
    try:
        assert started.wait(timeout=30)
        begun = time.perf_counter()
        call()
        ended = time.perf_counter()
    finally:
        stop.set()
        other.join()
    inside = [begun, *(t for t in stamps if begun < t < ended), ended]
    return max(b - a for a, b in itertools.pairwise(inside)) / (ended - begun)


def test_other_python_threads_run_during_the_factor_and_the_solve() -> None:
    """While the trust fit's held-out novelty groups are factored and solved on one core, the heads' L-BFGS
    steps (Python between their products) run on the other: the calls release the GIL. (SciPy's own
    wrappers hold it for the whole LAPACK call: the other thread stalls for ~95 % of it.)"""
    from threadpoolctl import threadpool_limits

    noise = RNG.uniform(-1.0, 1.0, (2560, 2560)).astype(np.float32)
    dominant = noise + noise.T + np.float32(4 * 2560) * np.eye(2560, dtype=np.float32)  # positive definite
    # one BLAS thread, as the trust fit runs them: a core is left to the other thread, so what stalls it is the
    # GIL, not the scheduler
    with threadpool_limits(limits=1, user_api="blas"):
        assert _longest_stall(lambda: cholesky_lower(dominant.copy())) < 0.35
        factor = cholesky_lower(dominant[:1280, :1280].copy())
        rows = RNG.standard_normal((8000, 1280), dtype=np.float32)
        assert _longest_stall(lambda: solve_lower(factor, rows.copy())) < 0.35
