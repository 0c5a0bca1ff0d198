"""mlxkit: Qwen 3.5 small models on MLX, with their multi-token-prediction head."""

from mlxkit.errors import CheckpointError, ConfigError, MlxkitError
from mlxkit.load import load

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "MlxkitError", "__version__", "load"]
