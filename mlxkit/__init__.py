"""mlxkit: Qwen 3.5 small models on MLX, with their multi-token-prediction head."""

from mlxkit.errors import CheckpointError, ConfigError, MlxkitError
from mlxkit.generate import PromptCache, Video, generate, stream_generate
from mlxkit.load import load, load_model
from mlxkit.quality import measure_quality

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MlxkitError",
    "PromptCache",
    "Video",
    "__version__",
    "generate",
    "load",
    "load_model",
    "measure_quality",
    "stream_generate",
]
