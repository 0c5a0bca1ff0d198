"""mlx-vlm's MTP speculative decoding (what `mlx_vlm.generate --draft-model OUT/mtp
--draft-kind mtp` runs), driven through its `generate_step` on a model converted by
`mlxkit convert` (main model in OUT, drafter in OUT/mtp), for benchmarks/decode.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx


def mlx_vlm_mtp_generator(
    converted_dir: str, max_tokens: int, num_draft: int
) -> Callable[[str, dict], Iterator[int]]:
    """A function (prompt, counts) → token stream; it leaves the stream's drafted and accepted
    totals in `counts`. mlx-vlm stops on its own EOS ids; we also stop on the tokenizer's."""
    import mlx_vlm
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.speculative.drafters import load_drafter

    from mlxkit.tokenizer import load_tokenizer

    model, _ = mlx_vlm.load(converted_dir)
    drafter, kind = load_drafter(f"{converted_dir}/mtp", kind="mtp")
    tokenizer = load_tokenizer(converted_dir)
    eos = set(tokenizer.eos_token_ids)

    def stream(prompt: str, counts: dict) -> Iterator[int]:
        drafter.accept_lens.clear()
        drafter.draft_lens.clear()
        ids = mx.array([tokenizer.encode(prompt)])
        n = 0
        try:
            for token, _ in generate_step(
                ids,
                model,
                None,
                None,
                max_tokens=max_tokens,
                temperature=0.0,
                draft_model=drafter,
                draft_kind=kind,
                draft_block_size=num_draft + 1,
            ):
                for t in mx.array(token).reshape(-1).tolist():
                    yield t
                    n += 1
                    if t in eos or n >= max_tokens:
                        return
        finally:
            counts["drafted"], counts["accepted"] = (
                sum(drafter.draft_lens),
                sum(drafter.accept_lens),
            )

    return stream
