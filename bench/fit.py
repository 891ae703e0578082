"""The largest size that still fits: exponential growth, then bisection."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple


@dataclass
class FitResult:
    largest: Optional[int]          # largest size that fitted; None if not even ``start`` did
    capped: bool                    # True when ``limit`` itself fitted (the real limit is higher)
    tried: List[Tuple[int, bool]] = field(default_factory=list)   # (size, fitted) in order


def largest_that_fits(fits: Callable[[int], bool], start: int, limit: int,
                      granularity: int = 1) -> FitResult:
    """Largest n in [start, limit], a multiple of ``granularity`` (or ``start``
    / ``limit`` themselves), with fits(n) True, assuming fits is monotone
    (true up to some size, false beyond). Tries start, 2 start, 4 start, ...
    until a failure or ``limit``, then bisects the last gap down to
    ``granularity``. Each fits(n) call is one real attempt (e.g. a training
    step that may run out of memory)."""
    if not 1 <= start <= limit or granularity < 1:
        raise ValueError(f"need 1 <= start ({start}) <= limit ({limit}) and granularity >= 1")
    result = FitResult(largest=None, capped=False)

    def attempt(n: int) -> bool:
        ok = bool(fits(n))
        result.tried.append((n, ok))
        return ok

    if not attempt(start):
        return result
    good, bad = start, None
    while bad is None and good < limit:
        candidate = min(good * 2, limit)
        if attempt(candidate):
            good = candidate
        else:
            bad = candidate
    if bad is None:                 # limit reached without a failure
        result.largest, result.capped = good, True
        return result
    while bad - good > granularity:
        middle = (good + bad) // 2 // granularity * granularity
        if middle <= good:
            break
        if attempt(middle):
            good = middle
        else:
            bad = middle
    result.largest = good
    return result
