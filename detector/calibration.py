"""The operating threshold for a target false-positive rate on clean scores.

One implementation for training (the bundle's threshold, on validation images) and for
``sentinel calibrate`` (a site's threshold, on its own clean images), so both mean the same:
flagging is ``score >= t``, and at most ``floor(target_fpr * n)`` of the n clean images may
score at or above t.
"""

from __future__ import annotations

import numpy as np

TARGET_FPR = 0.01


def calibrate_threshold(clean_scores: np.ndarray, target_fpr: float = TARGET_FPR) -> float:
    """Smallest threshold t with share(clean score >= t) <= target_fpr.

    t is placed just above the k-th highest clean score, where k = floor(target_fpr * n)
    clean images may still be flagged.
    """
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("threshold calibration needs at least one clean score")
    k = int(np.floor(target_fpr * len(s)))
    if k >= len(s):
        return 0.0
    t = float(np.nextafter(s[k], np.inf))  # the (k+1)-th highest must not be flagged
    return min(t, 1.0)
