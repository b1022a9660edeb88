"""The budget search: the pruning ratio whose kept fraction of MACs or parameters lands in the asked band."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["BudgetUnreachable", "search_ratio"]

MAX_TRIALS = 12


class BudgetUnreachable(RuntimeError):
    """No ratio in the searched range kept a fraction inside the band; ``trials`` lists what was tried."""

    def __init__(self, message: str, trials: list[tuple[float, float]]) -> None:
        super().__init__(message)
        self.trials = trials


def search_ratio(
    measure: Callable[[float], float], goal: float, tolerance: float, max_ratio: float, *, what: str = "budget"
) -> tuple[float, list[tuple[float, float]]]:
    """Find a ratio ``r`` in ``[0, max_ratio]`` with ``goal * (1 - tolerance) <= measure(r) <= goal``.

    ``measure(r)`` is the kept fraction after pruning at ``r``; it must not increase with ``r``. Secant steps
    inside a bracket (extrapolating from ``(0, 1)`` until the goal is crossed), at most 12 evaluations.

    Returns:
        ``(ratio, trials)`` with ``trials`` the ``(ratio, kept fraction)`` of every evaluation, the last one
        being the accepted ratio.

    Raises:
        BudgetUnreachable: No evaluated ratio landed in the band.

    Example:
        >>> ratio, trials = search_ratio(lambda r: 1.0 - r, 0.5, 0.05, 0.95)
        >>> 0.475 <= 1.0 - ratio <= 0.5
        True
    """
    low, aim = goal * (1.0 - tolerance), goal * (1.0 - tolerance / 2)
    trials: list[tuple[float, float]] = []
    lo, f_lo = 0.0, 1.0  # a ratio keeping more than the goal
    hi, f_hi = None, None  # a ratio keeping less than the band
    r = min(max(1.0 - math.sqrt(aim), 0.0), max_ratio)
    for _ in range(MAX_TRIALS):
        f = measure(r)
        trials.append((r, f))
        if low <= f <= goal:
            return r, trials
        if f > goal:
            lo, f_lo = r, f
        else:
            hi, f_hi = r, f
        if hi is None:
            if lo >= max_ratio:
                break
            slope = (1.0 - f_lo) / lo if lo > 0 else 0.0
            guess = (1.0 - aim) / slope if slope > 0 else max_ratio
            r = min(max(guess, lo + 0.05), max_ratio)
        else:
            width = hi - lo
            if width < 1e-4:
                break
            guess = lo + width * (f_lo - aim) / max(f_lo - f_hi, 1e-12)
            r = min(max(guess, lo + 0.1 * width), hi - 0.1 * width)
    closest = min(trials, key=lambda t: abs(t[1] - aim))
    gap = ""
    if hi is not None:
        gap = (f"; the kept fraction jumps from {f_lo:.3f} (ratio {lo:.4f}) to {f_hi:.3f} (ratio {hi:.4f}), "
               "so no ratio lands in the band: widen the tolerance")
    raise BudgetUnreachable(
        f"could not reach the {what} {goal:.3f} (kept between {low:.3f} and {goal:.3f}): closest was "
        f"{closest[1]:.3f} at ratio {closest[0]:.3f} after {len(trials)} trials (largest ratio allowed "
        f"{max_ratio:.3f}){gap}",
        trials,
    )
