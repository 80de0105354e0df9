"""Reports: compare influence across windows of training, plot it, write report.md.

patterns.py (time patterns), stats.py (correlations, detection quality), compare.py
(compare_windows and its result), files.py (CSV and HDF5), plots.py and render.py (report.md).
"""

from .compare import WindowComparison, compare_windows
from .patterns import PATTERNS, PatternRules, classify_patterns
from .stats import detection_quality, spearman_matrix

__all__ = ["compare_windows", "WindowComparison", "PatternRules", "PATTERNS", "classify_patterns",
           "spearman_matrix", "detection_quality"]
