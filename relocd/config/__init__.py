"""Configuration: the sxp syntax, the option table, settings, domain configs."""

from relocd.config.domain import config_from_sxp, config_to_sxp, format_vif_spec, parse_vif_spec
from relocd.config.options import OPTIONS, Option
from relocd.config.settings import Settings, check_config, load_settings
from relocd.config.sxp import SxpList, SxpValue, dumps, parse

__all__ = [
    "OPTIONS",
    "Option",
    "Settings",
    "SxpList",
    "SxpValue",
    "check_config",
    "config_from_sxp",
    "config_to_sxp",
    "dumps",
    "format_vif_spec",
    "load_settings",
    "parse",
    "parse_vif_spec",
]
