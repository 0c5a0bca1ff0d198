"""A published size with no network and nothing cached: every entry point that can fetch
one ends in one line that names what that entry point takes instead (issue 21 item 9:
`generate --size` told the user to pass --hf-path, an option of convert only)."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from mlxkit.errors import MlxkitError
from tests.badinput import api, cli, run_row

OFFLINE = (
    "Cannot find an appropriate cached snapshot folder for the specified revision on the local "
    "disk and outgoing traffic has been disabled."
)


def _convert(size: str) -> None:
    from mlxkit.convert import convert

    convert(size, "out")


def _bundle(size: str) -> None:
    from mlxkit.ios_bridge import build_bundle

    build_bundle(size, "out", "iphone15")


# fmt: off
ROWS = [
    cli("generate --size", "generate", "--size", "0.8b", "--prompt", "hi", message="pass --model DIR", needs=()),
    cli("serve --size", "serve", "--size", "2b", message="pass --model DIR", needs=()),
    cli("convert --size", "convert", "--size", "0.8b", "-o", "{out}", message="pass --hf-path DIR", needs=()),
    cli("convert --size --target", "convert", "--size", "0.8b", "--target", "iphone15", "-o", "{out}", message="pass --hf-path DIR", needs=()),
    cli("bundle build SIZE", "bundle", "build", "0.8b", "{out}", "--target", "iphone15", message="pass the checkpoint's directory instead", needs=()),
    api("convert(size)", lambda i: _convert("0.8b"), message="pass the checkpoint's directory instead", needs=()),
    api("build_bundle(size)", lambda i: _bundle("4b"), message="pass the checkpoint's directory instead", needs=()),
]
# fmt: on


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub as it is with HF_HUB_OFFLINE=1 and an empty cache (the real
    variable is read when huggingface_hub is imported, which this process already did)."""
    import huggingface_hub

    def snapshot_download(repo_id: str, **kwargs) -> str:
        raise LocalEntryNotFoundError(OFFLINE)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_offline_size_names_the_option_of_its_entry_point(row, tmp_path, monkeypatch, offline):
    run_row(row, tmp_path, monkeypatch, {})


def test_the_offline_message_says_which_repo_and_why(tmp_path, monkeypatch, offline):
    from mlxkit.source import resolve_size

    with pytest.raises(MlxkitError) as e:
        resolve_size("9b", "pass --model DIR")
    assert str(e.value) == (
        f"could not get Qwen/Qwen3.5-9B from the Hugging Face Hub or its cache ({OFFLINE}); "
        "download it where you have network and pass --model DIR"
    )
