"""Layer 1, configuration: the typed schema, the strict converter, resolution, lock, migration.

May import: ``trainer_core.errors`` and third-party libraries (attrs, cattrs). Nothing here
imports torch or transformers.
"""

from trainer_core.config.recorded import read_recorded_config
from trainer_core.config.sections import (
    CONFIG_VERSION,
    SECTIONS,
    Adapter,
    Daemon,
    Data,
    Environment,
    HyperParams,
    Locked,
    Model,
    Monitoring,
    Output,
    ProfileSection,
    TrainerConfig,
    config_hash,
    field_paths,
    from_dict,
    schema,
    to_dict,
)
from trainer_core.config.sources import (
    Resolved,
    flatten,
    load_config,
    parse_set,
    read_config_file,
    read_json,
    resolve,
    set_dotted,
)

__all__ = [
    "CONFIG_VERSION", "SECTIONS", "Adapter", "Daemon", "Data", "Environment", "HyperParams", "Locked", "Model",
    "Monitoring", "Output", "ProfileSection", "Resolved", "TrainerConfig", "config_hash",
    "field_paths", "flatten", "from_dict", "load_config", "parse_set", "read_config_file",
    "read_json", "read_recorded_config", "resolve", "schema", "set_dotted", "to_dict",
]
