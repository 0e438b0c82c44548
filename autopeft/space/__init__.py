"""Search spaces: YAML files in `search_spaces/`, their Optuna distributions, and decoding params to a spec."""

from autopeft.space.encode import SPACES_DIR, SearchSpace, available_spaces, layer_param
from autopeft.space.schema import LAYER_MODES, Setting, SpaceDef, parse_space

__all__ = ["LAYER_MODES", "SPACES_DIR", "SearchSpace", "Setting", "SpaceDef", "available_spaces", "layer_param",
           "parse_space"]
