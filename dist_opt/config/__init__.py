from dist_opt.config.loader import ConfigError, dump_yaml, load_config, to_dict
from dist_opt.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "dump_yaml", "to_dict"]
