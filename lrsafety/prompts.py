"""Chat formatting, tokenisation and the two token positions every analysis reads.

Prompts are a single user turn through the model's own chat template with the generation
prompt on, tokenised without adding special tokens (the template already holds BOS where the
family has one) and padded on the left, so that position -1 is always the last prompt token.

Positions:
- ``t_post_inst``: the last prompt token (index -1), read by every direction, gate and intervention.
- ``t_inst``: the last token of the user's instruction, found from the template itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

POSITIONS: tuple[str, ...] = ("t_inst", "t_post_inst")

# A word that no template contains, used to locate the instruction inside the templated text.
_PLACEHOLDER = "qzxjvplaceholderwqk"


def chat_messages(instruction: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Return the chat messages of one prompt: an optional system turn, then the user turn."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": instruction})
    return messages


def format_prompts(tokenizer, instructions: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Apply the chat template with the generation prompt to each instruction."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; lrsafety needs an instruction-tuned chat model")
    return [
        tokenizer.apply_chat_template(
            chat_messages(text, system_prompt), tokenize=False, add_generation_prompt=True
        )
        for text in instructions
    ]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Tokenise templated prompts without adding a second BOS token."""
    return tokenizer(list(prompts), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class PaddedBatch:
    """Left-padded token ids and attention mask of one batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def as_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_left(token_ids: Sequence[Sequence[int]], pad_token_id: int) -> PaddedBatch:
    """Pad a batch of token id lists on the left into tensors."""
    if not token_ids:
        raise ValueError("cannot pad an empty batch")
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {row} of the batch has no tokens")
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return PaddedBatch(input_ids, attention_mask)


def find_t_inst_offset(tokenizer, system_prompt: str | None = None) -> int:
    """Return the (negative) offset of the instruction's last token from the end of the prompt.

    The template is applied to a placeholder word; the last token whose character span overlaps
    the placeholder is the instruction's last token. The text after the instruction is fixed by
    the template, so the offset holds for every prompt of this model, padded on the left or not.
    """
    prompt = format_prompts(tokenizer, [_PLACEHOLDER], system_prompt)[0]
    start = prompt.rindex(_PLACEHOLDER)
    end = start + len(_PLACEHOLDER)
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    overlapping = [index for index, (lo, hi) in enumerate(offsets) if lo < end and hi > start]
    if not overlapping:
        raise ValueError("could not locate the instruction in the templated prompt (no token overlaps it)")
    offset = overlapping[-1] - len(offsets)
    _check_suffix_is_fixed(tokenizer, system_prompt, offset)
    return offset


def _check_suffix_is_fixed(tokenizer, system_prompt: str | None, offset: int) -> None:
    # Templated prompts ending in different instructions must share the tokens after t_inst.
    # Byte-level tokenizers can merge the instruction's last character with the template, so
    # check on instructions that end in different scripts.
    probes = ["Explain photosynthesis.", "Eleza usanisinuru", "光合作用を説明して", "อธิบาย"]
    suffixes = {tuple(ids[offset + 1:]) for ids in encode_prompts(tokenizer, format_prompts(tokenizer, probes, system_prompt))}
    if len(suffixes) != 1:
        raise ValueError(
            "the template's tokens after the instruction depend on the instruction's text; "
            "t_inst cannot be found by a fixed offset for this tokenizer"
        )
