"""Reports: compare influence across windows of training, plot it, write report.md; the demo."""

from .compare import (
    PATTERNS,
    PatternRules,
    WindowComparison,
    classify_patterns,
    compare_windows,
    detection_quality,
    spearman_matrix,
)

__all__ = ["compare_windows", "WindowComparison", "PatternRules", "PATTERNS", "classify_patterns",
           "spearman_matrix", "detection_quality"]
