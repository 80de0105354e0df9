"""Time patterns of a sample's influence over chronological windows: when did it matter?

`classify_patterns(scores, present, rules)` names each sample's pattern: consistently helpful,
consistently harmful, early-important, late-important, sign-flipping or negligible, by the rules
in its docstring and the thresholds of `PatternRules`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigurationError

HELPFUL, HARMFUL = "consistently helpful", "consistently harmful"
EARLY, LATE = "early-important", "late-important"
FLIPPING, NEGLIGIBLE = "sign-flipping", "negligible"
PATTERNS = (HELPFUL, HARMFUL, EARLY, LATE, FLIPPING, NEGLIGIBLE)


@dataclass(frozen=True)
class PatternRules:
    """Thresholds of `classify_patterns`, relative to the score scale.

    tau: a window counts for a sample when |score| >= tau * scale ("above the threshold": a
        threshold on size relative to the typical sample, not a statistical test).
    concentration: share of a sample's influence mass (sum of |z| over windows) that must lie in the
        early (or late) half of the windows for it to be early- (late-) important.
    scale: 'window' divides each window's scores by that window's RMS over present samples, so a
        pattern says how a sample compares with the typical sample of the same window (gradients
        shrink as training converges; without this almost every sample would look early-important);
        'global' divides everything by the RMS over all windows, keeping the raw time profile.
    """

    tau: float = 1.0
    concentration: float = 0.7
    scale: str = "window"

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ConfigurationError(f"tau must be positive, got {self.tau}")
        if not 0.5 < self.concentration <= 1.0:
            raise ConfigurationError(f"concentration must be in (0.5, 1], got {self.concentration}")
        if self.scale not in ("window", "global"):
            raise ConfigurationError(f"scale must be 'window' or 'global', got {self.scale!r}")


def normalized_scores(scores: np.ndarray, present: np.ndarray | None = None, scale: str = "window"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(z [n, W], scales [W]): scores divided by the RMS of the present scores of each window
    (scale='window') or of all windows together (scale='global'). Absent entries become 0."""
    s = np.asarray(scores, np.float64)
    p = np.ones(s.shape, bool) if present is None else np.asarray(present, bool)
    s = np.where(p, s, 0.0)
    if scale == "window":
        cnt = np.maximum(p.sum(0), 1)
        rms = np.sqrt((s ** 2).sum(0) / cnt)
    else:
        rms = np.full(s.shape[1], np.sqrt((s ** 2).sum() / max(p.sum(), 1)))
    rms = np.where(rms > 0, rms, 1.0)
    return s / rms, rms


def classify_patterns(scores: np.ndarray, present: np.ndarray | None = None,
                      rules: PatternRules = PatternRules()) -> np.ndarray:
    """The time pattern of each sample's influence over chronological windows: [n] strings.

    scores: [n, W] influence per window (positive = helpful), windows in time order; present:
    [n, W] whether the sample occurs in the window (absent entries count as 0).
    With z = scores / scale (see PatternRules.scale) and a window *above the threshold* when
    |z| >= tau, the rules, applied in this order:

    1. negligible: no window above the threshold.
    2. sign-flipping: a positive window and a negative one above the threshold.
    3. early-important: at least `concentration` of the sample's mass sum_w |z_w| lies in the early
       half of the windows (w < floor(W/2)).
    4. late-important: at least `concentration` of the mass lies in the late half
       (w >= ceil(W/2); with an odd W the middle window belongs to neither half).
    5. consistently helpful / consistently harmful: the rest, by the sign of its windows above the
       threshold (all the same after rule 2): influence of one sign spread over early and late.

    Early- and late-important samples may be helpful or harmful; the sign is in their scores.
    """
    z, _ = normalized_scores(scores, present, rules.scale)
    n, W = z.shape
    above = np.abs(z) >= rules.tau
    pos = (above & (z > 0)).any(1)
    neg = (above & (z < 0)).any(1)
    mass = np.abs(z)
    total = np.maximum(mass.sum(1), np.finfo(float).tiny)
    early = mass[:, :W // 2].sum(1) / total
    late = mass[:, (W + 1) // 2:].sum(1) / total
    out = np.where(np.where(above, z, 0.0).sum(1) >= 0, HELPFUL, HARMFUL).astype(object)
    out[late >= rules.concentration] = LATE
    out[early >= rules.concentration] = EARLY
    out[pos & neg] = FLIPPING
    out[~above.any(1)] = NEGLIGIBLE
    return out.astype(str)
