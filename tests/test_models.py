"""Stand-in builder and model loader: determinism, chat templates, nnsight tracing and generation."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from lrsafety import models, prompts, standins

FAMILIES = ["tiny-qwen2", "tiny-llama", "tiny-gemma2"]

# One short phrase per study script, written for these tests.
SCRIPT_SAMPLES = {
    "Latin": "Habari ya asubuhi, ọ̀rẹ́ mi",
    "Cyrillic": "Привет, как дела",
    "Han": "今天天气很好",
    "Japanese": "こんにちは、カタカナ",
    "Arabic": "مرحبا بالعالم",
    "Hangul": "안녕하세요 세계",
    "Thai": "สวัสดีชาวโลก",
    "Greek": "Γειά σου κόσμε",
    "Hebrew": "שלום עולם",
    "Devanagari": "नमस्ते दुनिया",
    "Ethiopic": "ሰላም ለዓለም",
    "Myanmar": "မင်္ဂလာပါ ကမ္ဘာ",
    "Khmer": "សួស្តី​ពិភពលោក",
    "Sinhala": "ආයුබෝවන් ලෝකය",
}


def _weights_digest(folder) -> str:
    tensors = load_file(str(folder / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", FAMILIES)
def test_standin_build_is_deterministic(name, tmp_path):
    first = standins.build_standin(name, cache_dir=tmp_path / "a", seed=3)
    second = standins.build_standin(name, cache_dir=tmp_path / "b", seed=3)
    other_seed = standins.build_standin(name, cache_dir=tmp_path / "c", seed=4)
    assert _weights_digest(first) == _weights_digest(second)
    assert _weights_digest(first) != _weights_digest(other_seed)


def test_standin_build_leaves_no_partial_folder(tmp_path):
    standins.build_standin("tiny-llama", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama-seed0"]


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizer_round_trips_every_script(name):
    tokenizer = standins.build_tokenizer(name)
    for script, text in SCRIPT_SAMPLES.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text, script
        assert tokenizer.unk_token_id not in ids if tokenizer.unk_token_id is not None else True


@pytest.mark.parametrize(
    "name, opening, generation_prompt",
    [
        ("tiny-qwen2", "<|im_start|>system\n", "<|im_start|>assistant\n"),
        ("tiny-llama", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("tiny-gemma2", "<bos><start_of_turn>user\n", "<start_of_turn>model\n"),
    ],
)
def test_chat_template_shape(name, opening, generation_prompt):
    loaded = models.load_model(name)
    text = prompts.format_prompts(loaded.tokenizer, ["Eleza usanisinuru"])[0]
    assert text.startswith(opening)
    assert text.endswith(generation_prompt)
    assert "Eleza usanisinuru" in text
    ids = prompts.encode_prompts(loaded.tokenizer, [text])[0]
    # One BOS at most: the template holds it, tokenisation must not add another.
    if loaded.tokenizer.bos_token_id is not None:
        assert ids.count(loaded.tokenizer.bos_token_id) == 1


def test_gemma_rejects_system_prompt():
    loaded = models.load_model("tiny-gemma2")
    with pytest.raises(Exception, match="System role not supported"):
        prompts.format_prompts(loaded.tokenizer, ["hi"], system_prompt="Be brief.")


@pytest.mark.parametrize("name", FAMILIES)
def test_loader_spec_and_padding(name):
    loaded = models.load_model(name)
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.spec.is_standin
    assert loaded.spec.n_layers == standins.NUM_LAYERS
    assert loaded.spec.d_model == standins.HIDDEN_SIZE
    assert 0 <= loaded.spec.paper_layer < loaded.spec.n_layers


@pytest.mark.parametrize("name", FAMILIES)
def test_t_inst_is_instruction_last_token(name):
    loaded = models.load_model(name)
    offset = prompts.find_t_inst_offset(loaded.tokenizer)
    for instruction in ["Tell me a story", "สวัสดีชาวโลก", "ሰላም ለዓለም!"]:
        ids = prompts.encode_prompts(loaded.tokenizer, prompts.format_prompts(loaded.tokenizer, [instruction]))[0]
        head = loaded.tokenizer.decode(ids[: len(ids) + offset + 1])
        assert head.endswith(instruction)
        assert not loaded.tokenizer.decode(ids[: len(ids) + offset]).endswith(instruction)


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_through_nnsight(name):
    loaded = models.load_model(name)
    texts = prompts.format_prompts(loaded.tokenizer, ["Write a haiku", "Andika shairi fupi kuhusu bahari"])
    batch = prompts.pad_left(prompts.encode_prompts(loaded.tokenizer, texts), loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        with loaded.model.generate(batch.as_inputs(), max_new_tokens=4, min_new_tokens=4, do_sample=False) as tracer:
            result = tracer.result.save()
    assert result.shape == (2, batch.input_ids.shape[1] + 4)
    assert torch.equal(result[:, : batch.input_ids.shape[1]], batch.input_ids)


@pytest.mark.parametrize("name", FAMILIES)
def test_block_output_matches_hidden_states(name):
    loaded = models.load_model(name)
    texts = prompts.format_prompts(loaded.tokenizer, ["Name three rivers"])
    batch = prompts.pad_left(prompts.encode_prompts(loaded.tokenizer, texts), loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        with loaded.model.trace(batch.as_inputs()):
            block = loaded.layers[1].output.save()
        reference = loaded.model._module(**batch.as_inputs(), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(block, reference)


def test_loader_rejects_unknown_name():
    with pytest.raises(ValueError, match="neither a preset"):
        models.load_model("no such model")


def test_loader_rejects_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.load_model(str(tmp_path))


def test_standin_cannot_run_remotely():
    with pytest.raises(ValueError, match="NDIF serves only Hub models"):
        models.load_model("tiny-qwen2", remote=True)


def test_presets_carry_paper_layers():
    assert models.PRESETS["qwen2.5-7b-instruct"].paper_layer == 15
    assert models.PRESETS["gemma-2-9b-it"].paper_layer == 20
    assert models.PRESETS["llama-3.1-8b-instruct"].paper_layer == 10
    assert models.PRESETS["gemma-2-9b-it"].hub_id == "google/gemma-2-9b-it"
