"""The decode loops a plan can predict, and which one runs on a target.

A bundle for an iPhone runs in mlx-swift-lm, whose Qwen 3.5 MTP drafter drafts one token per
round and only under greedy sampling; a Mac runs mlxkit's own loop (k drafts, greedy or
speculative sampling). The speed columns, the manifest's `num_draft` and `mlxkit plan` follow
the runtime that will run the model, and the plan shows mlxkit's loop beside it where the two
differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxkit.generate import MAX_DRAFT

from .devices import Target


@dataclass(frozen=True)
class DecodeRuntime:
    name: str
    max_draft: int  # drafts per MTP round it can run
    greedy_only: bool  # MTP only with temperature 0 (sampled requests decode without drafts)
    summary: str  # for people: what it does with the MTP head
    source: str  # where that was read
    # Its vision tower builds an [N, N] attention mask per image (memory.vision_mask_bytes).
    builds_vision_mask: bool = False


# What mlx-swift-lm does with the Qwen 3.5 MTP head, read through the search tool in stored,
# untagged snapshots of ml-explore/mlx-swift-lm (tag 3.31.4 is commit bd4b743 per the Swift
# Package Index build of that tag; the store does not hold that checkout):
# - Libraries/MLXLLM/Models/Qwen35MTP.swift (snapshot 0182a49): `Qwen35MTPDraftModel` declares
#   `maximumBlockSize: Int? = 2` (a verify block of the last token plus one draft) and
#   `requiresGreedySampling = true`;
# - Libraries/MLXLMCommon/MTPDrafterModel.swift: the two mean "largest total verification
#   block" and "only greedy sampling has exact acceptance" (sampled requests decode on the
#   target alone);
# - Libraries/MLXLMCommon/QwenMTP.swift: `draftMTPTokenBlock` drafts `blockSize - 1` tokens;
#   the two constants are not in this file.
# An older snapshot (9ef240b) of Qwen35MTP.swift conforms to the stateless `MTPDrafterModel`
# without declaring them. Issue 12 states both limits for 3.31.4; the plan follows them.
MLX_SWIFT_LM = DecodeRuntime(
    name="mlx-swift-lm",
    max_draft=1,
    greedy_only=True,
    summary="1 draft per round, greedy sampling only: temperature > 0 decodes without drafts",
    source="mlx-swift-lm 3.31.4: Qwen35MTPDraftModel.maximumBlockSize = 2, "
    "requiresGreedySampling = true (Libraries/MLXLLM/Models/Qwen35MTP.swift); the vision "
    "tower's mask: Libraries/MLXVLM/Models/Qwen3VL.swift, Qwen3VLVision.Attention (read at "
    "snapshot 0155147), which Qwen35.swift's tower is",
    builds_vision_mask=True,
)
MLXKIT = DecodeRuntime(
    name="mlxkit",
    max_draft=MAX_DRAFT,
    greedy_only=False,
    summary="k drafts per round, greedy or speculative sampling",
    source="mlxkit.generate",
)


def runtime_for(target: Target) -> DecodeRuntime:
    """A Mac runs mlxkit; every other target (an iPhone, a tier, a bare memory budget for a
    bundle) runs the bundle in mlx-swift-lm."""
    return MLXKIT if target.kind == "mac" else MLX_SWIFT_LM
