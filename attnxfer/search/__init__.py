"""Discovering an efficient attention for a teacher: evolutionary search over formula attentions, scored by
fit after a short stage 1 and by speed. Objects only (no config, no files): `attnxfer.apps.search` wires it."""

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
