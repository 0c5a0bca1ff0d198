"""`micro`: the small trained Qwen 3.5-architecture model shipped inside the package.

A real Hugging Face-layout checkpoint (config.json with `text_config`, bf16 safetensors with
`model.language_model.*` and `mtp.*`, tokenizer files) made by `benchmarks/train_micro.py`;
see `mlxkit/data/micro/MODEL_CARD.md`. It loads through the ordinary loader: only where to find
it is special.
"""

from __future__ import annotations

from pathlib import Path

from mlxkit.errors import CheckpointError

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def micro_dir() -> Path:
    """The directory of the embedded `micro` checkpoint."""
    path = Path(__file__).resolve().parent / "data" / "micro"
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: the embedded micro model is missing {', '.join(missing)}; reinstall "
            "mlxkit, or regenerate it with `python benchmarks/train_micro.py`"
        )
    return path
