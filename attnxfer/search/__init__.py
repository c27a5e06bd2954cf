"""Discovering an efficient attention for a teacher: evolutionary search over formula attentions, each
candidate scored by its fit to the teacher's maps after a short stage 1 and by its measured speed.

Algorithm code on objects (no config, no files): `evolution` (population, rejection protocol,
generations), `pareto` (NSGA-II ranks, crowding, survivors), `fitness` (the cached teacher, stage-1 fit
and held-out KL, speed of one layer). `attnxfer.apps.search` wires it to a config, files and SLURM.
"""

from .evolution import PREFIX, SearchSettings, SearchState, objectives, pareto_front, precheck, run_search
from .fitness import (
    SPEED_MODES,
    CandidateEvaluator,
    FitSettings,
    SpeedSettings,
    TeacherCache,
    cache_teacher,
    fit_candidate,
    layer_speed,
)
from .pareto import crowding_distance, dominates, pareto_ranks, select_survivors, tournament_key

__all__ = [
    "PREFIX",
    "SPEED_MODES",
    "CandidateEvaluator",
    "FitSettings",
    "SearchSettings",
    "SearchState",
    "SpeedSettings",
    "TeacherCache",
    "cache_teacher",
    "crowding_distance",
    "dominates",
    "fit_candidate",
    "layer_speed",
    "objectives",
    "pareto_front",
    "pareto_ranks",
    "precheck",
    "run_search",
    "select_survivors",
    "tournament_key",
]
