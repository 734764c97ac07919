"""The run configuration: its schema (one dataclass per YAML section), loading from YAML
and overrides, validation, and the generated reference (``docs/config.md``).

Everything a user imports is here: ``from megatron_pwdpo.config import load_config,
RunConfig, ConfigError``.
"""

from megatron_pwdpo.config.load import (
    DEFAULT_CONFIG,
    HUB_PREFIX,
    dump_yaml,
    load_config,
    parse_overrides,
    resolve_file_paths,
    to_dict,
)
from megatron_pwdpo.config.schema import (
    ConfigError,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ReferenceConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "DEFAULT_CONFIG",
    "HUB_PREFIX",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LossConfig",
    "ReferenceConfig",
    "RunConfig",
    "TrainConfig",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "resolve_file_paths",
    "to_dict",
]
