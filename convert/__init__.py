"""mlxkit.convert: Qwen 3.5 checkpoints (Hugging Face layout) → MLX model directories, in
bounded memory, with the MTP head kept as a separate drafter in OUT/mtp/."""

from .layout import PlannedTensor, planned_tensors
from .quantize import Recipe, load_recipe

__all__ = ["PlannedTensor", "Recipe", "load_recipe", "planned_tensors"]
