"""When a pass has too many bad samples: :class:`BadSampleLimit` and :class:`BadDataError`.

The limit is certain, not statistical (bad samples cluster, so binomial bounds over the samples
seen so far raise on clean epochs); a Wilson lower bound is only the logged early warning.
The loader counts, this module decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class BadDataError(RuntimeError):
    """Too many bad samples; the message names the worst shards."""


#: One-sided z of the early-warning Wilson bound (about 1e-6 false-alarm rate per check).
WARN_Z = 4.75


def wilson_lower(bad: int, seen: int, z: float = WARN_Z) -> float:
    """One-sided Wilson score lower bound of a binomial fraction ``bad / seen``."""
    if seen <= 0:
        return 0.0
    p, z2 = bad / seen, z * z
    centre = p + z2 / (2 * seen)
    spread = z * math.sqrt(p * (1 - p) / seen + z2 / (4 * seen * seen))
    return max(0.0, (centre - spread) / (1 + z2 / seen))


@dataclass
class BadSampleLimit:
    """When the bad samples of one pass over a rank's share of a split are too many.

    The pass will read ``planned`` samples. After ``bad`` of them were bad, the pass's bad
    fraction is at least ``bad / planned`` whatever the rest holds: a lower bound that holds
    with certainty rather than at a confidence level, and assumes nothing about order. Bad
    samples come in clusters (a corrupt or truncated shard is a run of them), which is what
    fools binomial bounds on the samples seen so far (Wilson, Clopper-Pearson assume
    independent samples) and the old "bad / seen after 200 samples" rule: both raised on a
    few bad samples at the start of a clean epoch, and the latter never looked at splits under
    200 samples. :meth:`over` is true as soon as ``bad > max_fraction * planned``: the first
    moment a limit breach is certain. A 100 % bad 180-sample split trips on its 2nd bad sample
    at 1 %; a clean epoch with 0.5 % bad samples never trips, however they are ordered.
    A Wilson lower bound over ``max_fraction`` is only a logged early warning (:meth:`likely`).
    """

    max_fraction: float
    planned: int
    bad: int = 0
    seen: int = 0
    warned: bool = False

    def add(self, bad: int, good: int) -> None:
        self.bad += bad
        self.seen += bad + good

    def over(self) -> bool:
        return self.bad > self.max_fraction * self.planned

    def likely(self) -> bool:
        return wilson_lower(self.bad, self.seen) > self.max_fraction
