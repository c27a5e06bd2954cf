"""The run configuration: a typed schema, YAML recipes and dotted overrides (imports only `attnxfer.errors`
and `attnxfer.run_layout`).

`schema.py` declares every key once (`keys.py`: its range and resume rule are field metadata);
`overrides.py` coerces, overrides and range-checks values; `loading.py` reads recipes, through
`strict_yaml.py`, the one YAML reader for what users write (a key given twice is an error at its line);
`renamed.py` reads the old spellings of keys merged into others.
"""

from .keys import Range
from .loading import RECIPES, list_recipes, load_config, recipe_chain, resolve_recipe
from .overrides import (
    ConfigError,
    apply_overrides,
    config_changes,
    describe_changes,
    dump_config,
    parse_overrides,
    to_dict,
    validate_config,
)
from .renamed import RENAMED_KEYS, RenamedKeyWarning, find_key, respell
from .schema import (
    RANGES,
    RESUMABLE_KEYS,
    SEARCH_RESUMABLE_KEYS,
    AugConfig,
    CheckpointConfig,
    ConvertConfig,
    DataConfig,
    DistConfig,
    EMAConfig,
    EvalConfig,
    LogConfig,
    MAEConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    SearchConfig,
    TeacherConfig,
    TrainConfig,
    TransferConfig,
    config_keys,
)

__all__ = [
    "RANGES",
    "RECIPES",
    "RENAMED_KEYS",
    "RESUMABLE_KEYS",
    "SEARCH_RESUMABLE_KEYS",
    "AugConfig",
    "CheckpointConfig",
    "ConfigError",
    "ConvertConfig",
    "DataConfig",
    "DistConfig",
    "EMAConfig",
    "EvalConfig",
    "LogConfig",
    "MAEConfig",
    "ModelConfig",
    "OptimConfig",
    "Range",
    "RenamedKeyWarning",
    "ScheduleConfig",
    "SearchConfig",
    "TeacherConfig",
    "TrainConfig",
    "TransferConfig",
    "apply_overrides",
    "config_changes",
    "config_keys",
    "describe_changes",
    "dump_config",
    "find_key",
    "list_recipes",
    "load_config",
    "parse_overrides",
    "recipe_chain",
    "resolve_recipe",
    "respell",
    "to_dict",
    "validate_config",
]
