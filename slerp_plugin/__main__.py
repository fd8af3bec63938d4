"""``python -m slerp_plugin`` = ``slerp-merge``."""

from .cli.main import entry

entry()
