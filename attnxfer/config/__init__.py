"""The run configuration: a typed schema, YAML recipes and dotted overrides. Imports nothing of attnxfer."""
from .schema import (
    ConfigError, ModelConfig, TeacherConfig, TransferConfig, DataConfig, AugConfig, OptimConfig,
    ScheduleConfig, EMAConfig, LogConfig, CheckpointConfig, ConvertConfig, TrainConfig, load_config, to_dict,
    apply_overrides, parse_overrides, dump_config, list_recipes, resolve_recipe, RECIPES,
)

__all__ = [
    "ConfigError", "ModelConfig", "TeacherConfig", "TransferConfig", "DataConfig", "AugConfig",
    "OptimConfig", "ScheduleConfig", "EMAConfig", "LogConfig", "CheckpointConfig", "ConvertConfig",
    "TrainConfig", "load_config", "to_dict", "apply_overrides", "parse_overrides", "dump_config",
    "list_recipes", "resolve_recipe", "RECIPES",
]
