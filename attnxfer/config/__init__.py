"""The run configuration: a typed schema, YAML recipes and dotted overrides (imports only `attnxfer.errors`
and `attnxfer.run_layout`)."""

from .keys import Range as Range
from .loading import (
    NO_CONVERT_TEACHER as NO_CONVERT_TEACHER,
    RECIPES as RECIPES,
    list_recipes as list_recipes,
    load_config as load_config,
    recipe_chain as recipe_chain,
    require_teacher as require_teacher,
    resolve_recipe as resolve_recipe,
)
from .overrides import (
    ConfigError as ConfigError,
    apply_overrides as apply_overrides,
    config_changes as config_changes,
    describe_changes as describe_changes,
    dump_config as dump_config,
    parse_overrides as parse_overrides,
    refuse_unread_sections as refuse_unread_sections,
    to_dict as to_dict,
    validate_config as validate_config,
)
from .renamed import (
    RENAMED_KEYS as RENAMED_KEYS,
    RenamedKeyWarning as RenamedKeyWarning,
    find_key as find_key,
    respell as respell,
)
from .schema import (
    RANGES as RANGES,
    RESUMABLE_KEYS as RESUMABLE_KEYS,
    SEARCH_RESUMABLE_KEYS as SEARCH_RESUMABLE_KEYS,
    AugConfig as AugConfig,
    CheckpointConfig as CheckpointConfig,
    ConvertConfig as ConvertConfig,
    DataConfig as DataConfig,
    DistConfig as DistConfig,
    EMAConfig as EMAConfig,
    EvalConfig as EvalConfig,
    LogConfig as LogConfig,
    MAEConfig as MAEConfig,
    ModelConfig as ModelConfig,
    OptimConfig as OptimConfig,
    ScheduleConfig as ScheduleConfig,
    SearchConfig as SearchConfig,
    TeacherConfig as TeacherConfig,
    TrainConfig as TrainConfig,
    TransferConfig as TransferConfig,
    config_keys as config_keys,
)
