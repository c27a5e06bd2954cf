"""Discovering an efficient attention for a teacher: evolutionary search over formula attentions, scored by
fit after a short stage 1 and by speed. Objects only (no config, no files): `attnxfer.apps.search` wires it."""

from .evolution import (
    PREFIX as PREFIX,
    SearchSettings as SearchSettings,
    SearchState as SearchState,
    objectives as objectives,
    pareto_front as pareto_front,
    precheck as precheck,
    run_search as run_search,
)
from .fitness import (
    CandidateEvaluator as CandidateEvaluator,
    FitSettings as FitSettings,
    SpeedSettings as SpeedSettings,
    cache_teacher as cache_teacher,
)
from .pareto import (
    crowding_distance as crowding_distance,
    dominates as dominates,
    pareto_ranks as pareto_ranks,
    select_survivors as select_survivors,
)
