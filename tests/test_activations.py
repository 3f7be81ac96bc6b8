"""Activation extraction on the stand-ins: positions, padding, cache files, resume and corruption."""

from __future__ import annotations

import pytest
import torch

from lrsafety import activations
from lrsafety.activations import (
    CellError,
    available_cells,
    cell_matrix,
    cell_path,
    extract_activations,
    load_cell,
    plan_batches,
)
from lrsafety.data import first_per_cell, load_prompts
from lrsafety.models import load_model
from lrsafety.prompts import encode_prompts, find_t_inst_offset, format_prompts

FAMILIES = ("tiny-qwen2", "tiny-llama", "tiny-gemma2")


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def mixed_prompts(prepared_data_dir):
    """Six harmful train prompts in four scripts, with lengths that force left padding."""
    table = load_prompts(prepared_data_dir, languages=["en", "th", "ja", "yo"], subsets=["harmful"], splits=["train"])
    return first_per_cell(table, 2).query("language in ['en', 'th'] or prompt_id == 0").reset_index(drop=True)


@pytest.fixture(scope="module")
def small_table(prepared_data_dir):
    """Two cells of twelve prompts each, with batches small enough to give several per cell."""
    table = load_prompts(prepared_data_dir, languages=["en", "th"], subsets=["harmless"], splits=["val"])
    return first_per_cell(table, 12)


def reference_activations(loaded, text: str) -> torch.Tensor:
    """Trace one prompt alone (no padding) and read both positions from the full block outputs.

    ``t_inst`` is located here by decoding, independently of ``find_t_inst_offset``.
    """
    tokenizer = loaded.tokenizer
    ids = encode_prompts(tokenizer, format_prompts(tokenizer, [text]))[0]
    t_inst = next(end for end in range(1, len(ids) + 1) if tokenizer.decode(ids[:end]).endswith(text)) - 1
    outputs = []
    with torch.no_grad():
        with loaded.model.trace({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}):
            for layer in range(loaded.spec.n_layers):
                outputs.append(loaded.layers[layer].output.save())
    full = torch.stack([output[0] for output in outputs])  # [n_layers, seq, d]
    return torch.stack([full[:, t_inst], full[:, -1]], dim=1)  # [n_layers, 2, d]


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_matches_single_prompts(name, models, mixed_prompts, tmp_path):
    loaded = models[name]
    extract_activations(loaded, mixed_prompts, tmp_path, progress=False)

    for (language, subset, split), table in mixed_prompts.groupby(["language", "subset", "split"]):
        cell = load_cell(tmp_path, language, subset, split)
        assert cell.prompt_ids.tolist() == table["prompt_id"].tolist()
        for row, text in enumerate(table["text"]):
            expected = reference_activations(loaded, text)
            torch.testing.assert_close(cell.activations[row], expected, atol=1e-5, rtol=1e-5)


def test_mixed_prompts_share_one_padded_batch(models, mixed_prompts):
    tokenizer = models["tiny-qwen2"].tokenizer
    lengths = [len(ids) for ids in encode_prompts(tokenizer, format_prompts(tokenizer, mixed_prompts["text"]))]
    assert len(set(lengths)) > 1
    assert plan_batches(lengths, token_budget=10**6, max_batch_size=64) == [sorted(range(len(lengths)), key=lambda row: -lengths[row])]


@pytest.mark.parametrize("name", FAMILIES)
def test_t_inst_is_last_instruction_token(name, models, mixed_prompts):
    tokenizer = models[name].tokenizer
    offset = find_t_inst_offset(tokenizer)
    texts = list(mixed_prompts["text"]) + ["Explain photosynthesis."]
    for text, ids in zip(texts, encode_prompts(tokenizer, format_prompts(tokenizer, texts))):
        position = len(ids) + offset
        assert tokenizer.decode(ids[: position + 1]).endswith(text)
        assert not tokenizer.decode(ids[:position]).endswith(text)
    # Byte-level stand-ins: the token at t_inst is the instruction's last byte.
    ascii_ids = encode_prompts(tokenizer, format_prompts(tokenizer, ["Explain photosynthesis."]))[0]
    assert tokenizer.decode([ascii_ids[len(ascii_ids) + offset]]) == "."


def test_plan_batches_respects_token_budget():
    lengths = [5, 40, 12, 12, 7, 30, 3, 3, 3, 3]
    batches = plan_batches(lengths, token_budget=48, max_batch_size=3)
    assert sorted(row for batch in batches for row in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[row] for row in batch) <= 48
    assert batches[0] == [1]


def test_resume_after_interruption_gives_identical_files(models, small_table, tmp_path, monkeypatch):
    loaded = models["tiny-llama"]
    options = dict(token_budget=1200, max_batch_size=4, progress=False)
    batches_en = _count_batches(loaded, small_table, "en", options)
    batches_th = _count_batches(loaded, small_table, "th", options)
    interrupt_after = batches_en + 1
    # The interruption must fall inside the second cell for the test to check a mid-cell resume.
    assert batches_th > 1
    reference_paths = extract_activations(loaded, small_table, tmp_path / "reference", **options)

    real_trace = activations._trace_batch
    calls = []

    def interrupted_trace(*args, **kwargs):
        if len(calls) == interrupt_after:
            raise KeyboardInterrupt(f"simulated interruption after {interrupt_after} batches")
        calls.append(1)
        return real_trace(*args, **kwargs)

    resumed_dir = tmp_path / "resumed"
    monkeypatch.setattr(activations, "_trace_batch", interrupted_trace)
    with pytest.raises(KeyboardInterrupt):
        extract_activations(loaded, small_table, resumed_dir, **options)
    assert cell_path(resumed_dir, "en", "harmless", "val").exists()
    assert not cell_path(resumed_dir, "th", "harmless", "val").exists()
    assert available_cells(resumed_dir) == [("en", "harmless", "val")]

    resumed_calls = []

    def counting_trace(*args, **kwargs):
        resumed_calls.append(1)
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(activations, "_trace_batch", counting_trace)
    resumed_paths = extract_activations(loaded, small_table, resumed_dir, **options)

    # Only the batches missing at the interruption are traced again.
    assert len(resumed_calls) == batches_th - 1
    # Compared as tensors and metadata: safetensors writes the metadata keys in hash-map order.
    for reference, resumed in zip(reference_paths, resumed_paths, strict=True):
        reference_tensors, reference_metadata = activations._load_safetensors(reference)
        resumed_tensors, resumed_metadata = activations._load_safetensors(resumed)
        assert resumed_metadata == reference_metadata
        assert torch.equal(resumed_tensors["activations"], reference_tensors["activations"])
        assert torch.equal(resumed_tensors["prompt_ids"], reference_tensors["prompt_ids"])
    assert not list((resumed_dir / "activations").glob(".*"))


def _count_batches(loaded, table, language, options) -> int:
    texts = table.query("language == @language")["text"]
    lengths = [len(ids) for ids in encode_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, texts))]
    return len(plan_batches(lengths, options["token_budget"], options["max_batch_size"]))


@pytest.fixture(scope="module")
def one_cell(prepared_data_dir):
    table = load_prompts(prepared_data_dir, languages=["yo"], subsets=["harmful"], splits=["val"])
    return first_per_cell(table, 6)


def _count_traces(monkeypatch) -> list[int]:
    real_trace = activations._trace_batch
    calls: list[int] = []

    def counting_trace(*args, **kwargs):
        calls.append(1)
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(activations, "_trace_batch", counting_trace)
    return calls


def test_valid_cell_is_skipped(models, one_cell, tmp_path, monkeypatch):
    loaded = models["tiny-qwen2"]
    extract_activations(loaded, one_cell, tmp_path, progress=False)
    calls = _count_traces(monkeypatch)
    extract_activations(loaded, one_cell, tmp_path, progress=False)
    assert calls == []


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_corrupt_cell_is_detected_and_recomputed(damage, models, one_cell, tmp_path, monkeypatch):
    loaded = models["tiny-qwen2"]
    (path,) = extract_activations(loaded, one_cell, tmp_path, progress=False)
    original = load_cell(tmp_path, "yo", "harmful", "val").activations

    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[-10] ^= 0xFF
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))

    with pytest.raises(CellError, match="yo/harmful/val.*corrupt"):
        load_cell(tmp_path, "yo", "harmful", "val")

    calls = _count_traces(monkeypatch)
    extract_activations(loaded, one_cell, tmp_path, progress=False)
    assert len(calls) >= 1
    assert torch.equal(load_cell(tmp_path, "yo", "harmful", "val").activations, original)


def test_changed_dtype_recomputes_as_bfloat16(models, one_cell, tmp_path, monkeypatch):
    loaded = models["tiny-qwen2"]
    extract_activations(loaded, one_cell, tmp_path, progress=False)
    float32 = load_cell(tmp_path, "yo", "harmful", "val")
    calls = _count_traces(monkeypatch)
    extract_activations(loaded, one_cell, tmp_path, activation_dtype="bfloat16", progress=False)
    bfloat16 = load_cell(tmp_path, "yo", "harmful", "val")
    assert len(calls) >= 1
    assert bfloat16.metadata["activation_dtype"] == "bfloat16"
    assert bfloat16.activations.dtype == torch.float32
    torch.testing.assert_close(bfloat16.activations, float32.activations, atol=0.05, rtol=0.02)


def test_cell_matrix_reads_one_layer(models, one_cell, tmp_path):
    extract_activations(models["tiny-qwen2"], one_cell, tmp_path, progress=False)
    cell = load_cell(tmp_path, "yo", "harmful", "val")
    for layer in range(cell.n_layers):
        for index, position in enumerate(cell.positions):
            matrix = cell_matrix(tmp_path, "yo", "harmful", "val", layer, position)
            assert matrix.dtype.name == "float32"
            assert (matrix == cell.activations[:, layer, index].numpy()).all()


def test_bad_requests_name_the_value(models, one_cell, tmp_path):
    extract_activations(models["tiny-qwen2"], one_cell, tmp_path, progress=False)
    with pytest.raises(IndexError, match=r"layer 4 .*yo/harmful/val"):
        cell_matrix(tmp_path, "yo", "harmful", "val", 4)
    with pytest.raises(IndexError, match=r"layer -1 "):
        cell_matrix(tmp_path, "yo", "harmful", "val", -1)
    with pytest.raises(ValueError, match="'t_last'"):
        cell_matrix(tmp_path, "yo", "harmful", "val", 0, position="t_last")
    with pytest.raises(CellError, match="sw/harmful/test"):
        load_cell(tmp_path, "sw", "harmful", "test")
    with pytest.raises(ValueError, match="empty"):
        extract_activations(models["tiny-qwen2"], one_cell.iloc[:0], tmp_path, progress=False)
    blank = one_cell.assign(text=["   "] + list(one_cell["text"][1:]))
    with pytest.raises(ValueError, match="yo/harmful/val"):
        extract_activations(models["tiny-qwen2"], blank, tmp_path / "blank", progress=False)


def test_empty_cell_file_is_rejected(models, one_cell, tmp_path):
    (path,) = extract_activations(models["tiny-qwen2"], one_cell, tmp_path, progress=False)
    tensors, metadata = activations._load_safetensors(path)
    metadata.pop("checksum")
    activations.write_cell(tmp_path, "yo", "harmful", "val", tensors["activations"][:0], [], dict(metadata, n_prompts="0"))
    with pytest.raises(CellError, match="yo/harmful/val is empty"):
        load_cell(tmp_path, "yo", "harmful", "val")
    with pytest.raises(CellError, match="yo/harmful/val is empty"):
        cell_matrix(tmp_path, "yo", "harmful", "val", 0)


def test_remote_path_gives_same_activations(models, one_cell, tmp_path):
    # remote="local" serialises the trace and runs it as NDIF would, in this process.
    loaded = models["tiny-qwen2"]
    extract_activations(loaded, one_cell, tmp_path / "local", progress=False)
    extract_activations(loaded, one_cell, tmp_path / "remote", remote="local", progress=False)
    local = load_cell(tmp_path / "local", "yo", "harmful", "val")
    remote = load_cell(tmp_path / "remote", "yo", "harmful", "val")
    assert torch.equal(local.activations, remote.activations)
