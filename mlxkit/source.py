"""Where a checkpoint comes from: a local directory, a published size fetched through the
Hugging Face cache, or "micro" (the small trained model shipped with mlxkit). Every
entry point — the CLI's --hf-path / --size, `convert(src, ...)`, `generate` and `serve`'s
--size — resolves through `resolve_source`, so a new kind of source is added here and nowhere
else. It is in the core, not the converter, because the runtime's commands read it too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxkit.errors import CheckpointError, ConfigError, MlxkitError
from mlxkit.fields import local_path
from mlxkit.presets import HUB_REPOS

MICRO = "micro"
# What to do without the Hub, for callers that name no option of their own (the Python API,
# `bundle build SRC`); the commands with a directory option name it ("pass --model DIR").
LOCAL_INSTEAD = "pass the checkpoint's directory instead"
# What a conversion needs from a hub repo (no README, no vision preprocessor files).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


@dataclass(frozen=True)
class Source:
    directory: Path
    name: str  # for the default output name: "Qwen3.5-2B", or the directory's name


@dataclass(frozen=True)
class Size:
    """A size to resolve (and maybe download) only once everything else is checked."""

    size: str
    instead: str = LOCAL_INSTEAD  # what the offline error tells the user to do

    @property
    def name(self) -> str:
        """The name `Source.name` will have (for default output names): "Qwen3.5-2B"."""
        repo = HUB_REPOS.get(self.size.lower())
        return repo.split("/")[-1] if repo else self.size.lower()


def size_names() -> list[str]:
    return [*HUB_REPOS, MICRO]


def resolve_source(src: str | Path | Source | Size) -> Source:
    """A local directory if `src` is one; otherwise a size name ("0.8b", "2b", "4b", "9b",
    "micro"); anything else is an error that says what would work."""
    if isinstance(src, Source):
        return src
    if isinstance(src, Size):
        return resolve_size(src.size, src.instead)
    path = local_path(src, "source", CheckpointError)
    if path.is_dir():
        return resolve_local(path)
    key = str(src).lower()
    if key in HUB_REPOS or key == MICRO:
        return resolve_size(key)
    if path.exists():
        raise CheckpointError(f"{path}: not a directory; pass a model directory")
    raise CheckpointError(
        f"{src}: no such directory, and not a size (choose one of {', '.join(size_names())})"
    )


def local_source(src: str | Path | Source | Size) -> Source | None:
    """`src` as a Source when it is one or names an existing directory (no download)."""
    if isinstance(src, Source):
        return src
    if isinstance(src, Size) or not local_path(src, "source", CheckpointError).is_dir():
        return None
    return resolve_local(src)


def resolve_local(path: str | Path) -> Source:
    """--hf-path: a directory, never a size name."""
    path = local_path(path, "--hf-path", CheckpointError)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a local checkpoint directory")
    return Source(path, path.resolve().name)


def resolve_size(size: str, instead: str = LOCAL_INSTEAD) -> Source:
    """A size name's checkpoint; `instead` ends the error when the Hub cannot be reached:
    what the caller's user passes instead ("pass --model DIR")."""
    key = size.lower()
    if key == MICRO:
        return _micro()
    if key not in HUB_REPOS:
        raise ConfigError(f"unknown size {size!r}; choose one of {', '.join(size_names())}")
    repo = HUB_REPOS[key]
    return Source(download(repo, instead), repo.split("/")[-1])


def download(repo: str, instead: str) -> Path:
    """The repo's files from the Hugging Face cache, downloading what is missing. Honours
    HF_HUB_OFFLINE and HF_HOME like every other huggingface_hub client."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise MlxkitError(f"getting {repo} needs huggingface_hub; or {instead}") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - the hub raises many types (offline, HTTP, network)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlxkitError(
            f"could not get {repo} from the Hugging Face Hub or its cache ({reason}); "
            f"download it where you have network and {instead}"
        ) from None


def _micro() -> Source:
    try:
        from mlxkit.load import resolve_model_dir

        return Source(resolve_model_dir(MICRO), "micro")
    except ImportError:
        raise MlxkitError("the embedded micro model is not part of this build") from None
