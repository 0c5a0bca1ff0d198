"""mlxkit.convert: Qwen 3.5 checkpoints (Hugging Face layout) → MLX model directories, in
bounded memory, with the MTP head kept as a separate drafter in OUT/mtp/.

`convert` runs a conversion; `planned_tensors` says, from a config alone, every tensor a
conversion writes (the contract the iPhone planner budgets with); `load_recipe` reads the
quantization recipes in `recipes/`.
"""

from mlxkit.layout import PlannedTensor, planned_tensors

from .converter import ConvertResult, convert
from .quantize import Recipe, load_recipe

__all__ = ["ConvertResult", "PlannedTensor", "Recipe", "convert", "load_recipe", "planned_tensors"]
