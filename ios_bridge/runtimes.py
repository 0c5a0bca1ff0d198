"""The decode loops a plan can predict, and which one runs on a target.

A bundle for an iPhone runs in mlx-swift-lm, whose Qwen 3.5 MTP drafter drafts one token per
round and only under greedy sampling; a Mac runs mlxkit's own loop (k drafts, greedy or
speculative sampling). The speed columns, the manifest's `num_draft` and `mlxkit plan` follow
the runtime that will run the model, and the plan shows mlxkit's loop beside it where the two
differ.

`SwiftRuntime` is the mlx-swift-lm version a bundle's Swift is written against (the
`--swift-runtime` knob, recorded in the manifest's `runtime`): each is one commit of
ml-explore/mlx-swift-lm, and tests/swift_api.toml holds every name the Swift uses with the file
and line where that commit declares it.
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


# What mlx-swift-lm does with the Qwen 3.5 MTP head, read in ml-explore/mlx-swift-lm at commit
# 1441444 (the default Swift runtime below; tag 3.31.4 has no MTP drafter at all):
# - Libraries/MLXLLM/Models/Qwen35MTP.swift:70,73 and Libraries/MLXVLM/Models/Qwen35MTP.swift:80,83:
#   both Qwen 3.5 drafters declare `maximumBlockSize: Int? = 2` (a verify block of the last token
#   plus one draft) and `requiresGreedySampling = true`;
# - Libraries/MLXLMCommon/MTPSpeculativeTokenIterator.swift:141 clamps the block to the drafter's
#   maximum, and :181-185 switches a request with temperature != 0 to plain decoding.
MLX_SWIFT_LM = DecodeRuntime(
    name="mlx-swift-lm",
    max_draft=1,
    greedy_only=True,
    summary="1 draft per round, greedy sampling only: temperature > 0 decodes without drafts",
    source="mlx-swift-lm 1441444: Qwen35MTPDraftModel / Qwen35VLMNextNDraftModel "
    "maximumBlockSize = 2, requiresGreedySampling = true (Libraries/MLXLLM/Models/Qwen35MTP.swift:"
    "70,73; Libraries/MLXVLM/Models/Qwen35MTP.swift:80,83); the vision tower's mask: "
    "Libraries/MLXVLM/Models/Qwen3VL.swift, Qwen3VLVision.Attention (read at snapshot 0155147), "
    "which Qwen35.swift's tower is",
    builds_vision_mask=True,
)
MLXKIT = DecodeRuntime(
    name="mlxkit",
    max_draft=MAX_DRAFT,
    greedy_only=False,
    summary="k drafts per round, greedy or speculative sampling",
    source="mlxkit.generate",
)


@dataclass(frozen=True)
class SwiftRuntime:
    """One mlx-swift-lm version the bundle's Swift can be written against."""

    version: str  # the --swift-runtime value: a tag, or the short hash of a main-branch commit
    commit: str  # the commit of ml-explore/mlx-swift-lm it is
    swiftpm: str  # the rule Xcode's "Add Package Dependencies" takes for it
    mlx_swift: str  # the mlx-swift rule its Package.swift declares (the app adds it for MLX)
    mtp_drafter: bool  # it has MTPDrafterModelFactory and the Qwen 3.5 drafters
    # it has the MLXGuidedGeneration product (xgrammar: GrammarConstraint, GuidedGenerationLoop),
    # which a bundle that carries a JSON Schema (`--json-schema`) uses in its Swift
    guided_generation: bool
    prefill_step: str  # the GenerateParameters property that sets the prefill step
    note: str  # for people: why pick it


# Read in ml-explore/mlx-swift-lm's history (snapshot of 2026-08-22, HEAD 1441444): the Qwen 3.5
# MTP drafters (Qwen35TextMTPRegistration, Qwen35VLMMTPRegistration) and
# `GenerateParameters.prefill` arrived on main (PR #351, commit 01472a78, 2026-08-13) after the
# newest tag, 3.31.4 (2026-06-29, commit bd4b743), which has MTPDrafterModelFactory and
# generate(…, mtpDrafter:) for Gemma 4 assistants only, and sets the prefill
# step with `prefillStepSize` (Libraries/MLXLMCommon/Evaluate.swift:57 at 3.31.4; deprecated,
# renamed `prefill.stepSize`, at Evaluate.swift:86-87 on main). mlx-swift pins: Package.swift:64
# at 1441444, :39 at 3.31.4. Guided generation (the MLXGuidedGeneration product, Package.swift:38
# at 1441444: xgrammar vendored and compiled by SwiftPM, Libraries/MLXGuidedGeneration) is on
# main only too: 3.31.4's Package.swift has no such product.
SWIFT_RUNTIME_DETAILS = {
    "1441444": SwiftRuntime(
        version="1441444",
        commit="14414441fa44f45eee35a61e9fa0bab577cf9734",
        swiftpm="Branch/Commit: revision 14414441fa44f45eee35a61e9fa0bab577cf9734",
        mlx_swift="Up to Next Minor from 0.31.6",
        mtp_drafter=True,
        guided_generation=True,
        prefill_step="prefill.stepSize",
        note="a main-branch commit of 2026-08-22 with the Qwen 3.5 MTP drafters (no release "
        "has them yet)",
    ),
    "3.31.4": SwiftRuntime(
        version="3.31.4",
        commit="bd4b7434e6bdb588c7ef55706ff8904cb7fd4c57",
        swiftpm="Exact Version 3.31.4",
        mlx_swift="Up to Next Minor from 0.31.4",
        mtp_drafter=False,
        guided_generation=False,
        prefill_step="prefillStepSize",
        note="the newest release (2026-06-29): no Qwen 3.5 MTP drafter, so its bundles leave "
        "mtp/ out",
    ),
}


def swift_runtime(version: str) -> SwiftRuntime:
    """The runtime `--swift-runtime` names (Settings validates the name first)."""
    return SWIFT_RUNTIME_DETAILS[version]


def runtime_record(version: str) -> dict:
    """manifest.json's `runtime`: what the bundle's Swift was written and checked against."""
    r = swift_runtime(version)
    return {
        "name": MLX_SWIFT_LM.name,
        "version": r.version,
        "commit": r.commit,
        "mtp_drafter": r.mtp_drafter,
    }


def runtime_for(target: Target) -> DecodeRuntime:
    """A Mac runs mlxkit; every other target (an iPhone, a tier, a bare memory budget for a
    bundle) runs the bundle in mlx-swift-lm."""
    return MLXKIT if target.kind == "mac" else MLX_SWIFT_LM
