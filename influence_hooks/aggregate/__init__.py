"""Aggregators: turn a recorded run into influence scores (README, "Which samples mattered, and when").

    from influence_hooks.aggregate import tracin, dit, dvemb, self_influence, InfluenceScores
    s = tracin(run, window=(0, 500))
    d = dit(run, window=(400, 500), mode="removal", curvature="fisher")
    e = dvemb(run); e.scores(run.query_gradients(run.final_step))
    si = self_influence(run, window=(400, 500))

Every aggregator takes a Run (influence_hooks.storage.open_run) and returns InfluenceScores
(a list of them for windows=[...] / epochs=[...], computed in one pass over the shards).
Sign: positive = removing the training sample raises the query loss (it helped).

The pieces: rows.py (streaming the recorded rows), scores.py (the accumulated state), tasks.py
(removal tasks of windowed influence), curvature.py (the curvatures by name), notes.py (what
results say they approximate), fullspace/ (curvature recomputed from the model).
"""

from .curvature import (
    CURVATURES,
    CurvatureOperator,
    FisherCurvature,
    FullSpaceCurvature,
    NoCurvature,
    register_curvature,
)
from .dit import dit
from .dvemb import DataValueEmbeddings, dvemb
from .results import InfluenceScores
from .tracin import self_influence, tracin

__all__ = [
    "tracin", "dit", "dvemb", "self_influence", "InfluenceScores", "DataValueEmbeddings",
    "CurvatureOperator", "FullSpaceCurvature", "NoCurvature", "FisherCurvature", "register_curvature",
    "CURVATURES",
]
