"""Greedy generation on the stand-in models: one completion per prompt, input order, early EOS,
and the resumable completion store."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lrsafety.generation import (
    CompletionStore,
    decode_new_tokens,
    generate_batch,
    generate_completions,
    length_sorted_batches,
    stop_token_ids,
)
from lrsafety.models import load_model
from lrsafety.prompts import encode_prompts, format_prompts, pad_left

os.environ.setdefault("LRSAFETY_CACHE", "/tmp/lrcache")

INSTRUCTIONS = [
    "Explain photosynthesis in two sentences.",
    "Eleza usanisinuru kwa sentensi mbili.",
    "hi",
    "光合作用を説明して",
    "Write a short poem about the sea and the wind at night.",
]


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-llama"])
def any_model(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-qwen2")


def _batch(loaded, instructions):
    tokenizer = loaded.tokenizer
    return pad_left(encode_prompts(tokenizer, format_prompts(tokenizer, instructions)), tokenizer.pad_token_id)


def test_completions_one_per_prompt_in_order(any_model):
    loaded = any_model
    batched = generate_completions(loaded, INSTRUCTIONS, batch_size=2, max_new_tokens=5, progress=False)
    alone = [generate_completions(loaded, [text], max_new_tokens=5, progress=False)[0] for text in INSTRUCTIONS]
    assert len(batched) == len(INSTRUCTIONS)
    assert all(isinstance(text, str) for text in batched)
    assert batched == alone


def test_generate_batch_holds_prompt_and_new_tokens(loaded):
    batch = _batch(loaded, INSTRUCTIONS[:3])
    output = generate_batch(loaded, batch, max_new_tokens=4)
    assert torch.equal(output.prompt_ids, batch.input_ids)
    assert output.new_ids.shape == (3, 4)


def test_single_bos_in_prompt(any_model):
    loaded = any_model
    batch = _batch(loaded, ["one"])
    bos = loaded.tokenizer.bos_token_id
    # Qwen2's template has no BOS; Llama-3.1's starts with one that must not be doubled.
    expected = 0 if bos is None else 1
    count = 0 if bos is None else int((batch.input_ids[0] == bos).sum())
    assert count == expected
    assert (bos is None) == (loaded.spec.family == "qwen2")


def test_early_eos_still_returns_every_row(loaded):
    # Random weights rarely emit EOS, so pick a token that one row generates early and let
    # generate treat it as EOS: that row stops while the others go on.
    batch = _batch(loaded, INSTRUCTIONS)
    free = generate_batch(loaded, batch, max_new_tokens=6).new_ids
    candidates = [
        (row, step) for row in range(free.shape[0]) for step in range(1, 5)
        if int(free[row, step]) not in free[:, : step + 1][torch.arange(free.shape[0]) != row].flatten().tolist()
    ]
    if not candidates:
        candidates = [(0, 1)]
    row, step = candidates[0]
    eos = int(free[row, step])

    stopped = generate_batch(loaded, batch, max_new_tokens=6, generation_kwargs={"eos_token_id": eos})
    assert stopped.new_ids.shape[0] == len(INSTRUCTIONS)
    assert int(stopped.new_ids[row, step]) == eos
    assert torch.equal(stopped.new_ids[row, :step], free[row, :step])

    texts = generate_completions(
        loaded, INSTRUCTIONS, batch_size=len(INSTRUCTIONS), max_new_tokens=6, progress=False,
        generation_kwargs={"eos_token_id": eos},
    )
    assert len(texts) == len(INSTRUCTIONS)
    expected = decode_new_tokens(loaded.tokenizer, free[row:row + 1, :step], stop_token_ids(loaded))[0]
    # Completions come back in input order although batches are formed by length.
    assert texts[row] == expected


def test_decode_cuts_at_stop_token(loaded):
    tokenizer = loaded.tokenizer
    text_ids = tokenizer("ab", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    new_ids = torch.tensor([text_ids + [eos] + text_ids])
    assert decode_new_tokens(tokenizer, new_ids, {eos}) == ["ab"]


def test_length_sorted_batches_cover_every_index():
    batches = length_sorted_batches([3, 9, 1, 7, 7], batch_size=2)
    assert sorted(index for batch in batches for index in batch) == [0, 1, 2, 3, 4]
    assert batches[0] == [1, 3]
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([1], batch_size=0)


def test_completion_store_resumes_and_rejects_stale(tmp_path):
    path = tmp_path / "completions" / "steering.jsonl"
    metadata = {"model": "tiny-qwen2", "max_new_tokens": 4}
    store = CompletionStore(path, metadata, group_keys=("condition", "language"))
    store.add_group([{"condition": "none", "language": "sw", "completion": "a"},
                     {"condition": "none", "language": "sw", "completion": "b"}])
    with pytest.raises(ValueError, match="exactly one group"):
        store.add_group([{"condition": "none", "language": "am"}, {"condition": "ablation", "language": "am"}])
    with pytest.raises(ValueError, match="already stored"):
        store.add_group([{"condition": "none", "language": "sw", "completion": "c"}])

    reopened = CompletionStore(path, metadata, group_keys=("condition", "language"))
    assert reopened.has_group("none", "sw")
    assert [record["completion"] for record in reopened.records] == ["a", "b"]
    assert json.loads(path.with_name("steering.meta.json").read_text()) == metadata

    reopened.add_group([{"condition": "none", "language": "sw", "completion": "c"}], replace=True)
    assert [record["completion"] for record in reopened.records] == ["c"]

    changed = CompletionStore(path, {**metadata, "max_new_tokens": 8}, group_keys=("condition", "language"))
    assert changed.records == []
    assert len(list(path.parent.glob("steering.jsonl.stale-*"))) == 1
    assert not path.exists()
