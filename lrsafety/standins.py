"""Offline stand-in models: tiny random-weight Qwen2, Llama and Gemma2 with their own tokenizer.

No model weights can be downloaded on every machine, so the package builds small models of the
three real architectures from a seed. They keep each family's chat-template shape (role
markers, system turn, generation prompt) and a byte-level tokenizer that encodes every script,
so every notebook runs on them unchanged. Their numbers are meaningless: the weights are random.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("lrsafety")

STANDIN_WARNING = (
    "Stand-in model with random weights: every number and figure from it is meaningless "
    "and only shows that the pipeline runs."
)

# Bumped whenever the builder changes what it writes, so stale cache folders are rebuilt.
_BUILDER_VERSION = 1


@dataclass(frozen=True)
class StandinRecipe:
    """Architecture and tokenizer shape of one stand-in family."""

    family: str
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    # Extra ids that end a chat turn, besides eos (Gemma-2 stops on <end_of_turn>).
    extra_eos_tokens: tuple[str, ...]
    chat_template: str


# Chat templates written for the stand-ins. They reproduce the shape of the real families'
# templates: Qwen2.5 inserts a default system turn, Llama-3.1 a dated system header, and
# Gemma-2 has no system role and starts with <bos>.
_QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' -}}"
    "{{- system_message + '<|eot_id|>' -}}"
    "{%- for message in loop_messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_GEMMA2_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- raise_exception('System role not supported') -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

RECIPES: dict[str, StandinRecipe] = {
    "tiny-qwen2": StandinRecipe(
        family="qwen2",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_eos_tokens=("<|endoftext|>",),
        chat_template=_QWEN2_TEMPLATE,
    ),
    "tiny-llama": StandinRecipe(
        family="llama",
        special_tokens=(
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        # Llama-3.1 ships without a pad token; the loader falls back to eos as it must for the real model.
        pad_token=None,
        extra_eos_tokens=("<|end_of_text|>",),
        chat_template=_LLAMA_TEMPLATE,
    ),
    "tiny-gemma2": StandinRecipe(
        family="gemma2",
        special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_eos_tokens=("<end_of_turn>",),
        chat_template=_GEMMA2_TEMPLATE,
    ),
}

# Width and depth shared by the three stand-ins: small enough for a 2-core CPU, with enough
# width (64) for a rank-10 subspace of ten high-resource directions.
HIDDEN_SIZE = 64
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 128
MAX_POSITIONS = 4096


def default_cache_dir() -> Path:
    """Return the folder that holds built stand-ins (``$LRSAFETY_CACHE`` or ``~/.cache/lrsafety``)."""
    root = os.environ.get("LRSAFETY_CACHE")
    if root:
        return Path(root).expanduser() / "standins"
    return Path.home() / ".cache" / "lrsafety" / "standins"


def build_tokenizer(name: str):
    """Build the byte-level tokenizer of one stand-in: 256 byte tokens plus the family's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    recipe = _recipe(name)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(recipe.special_tokens))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=recipe.bos_token,
        eos_token=recipe.eos_token,
        pad_token=recipe.pad_token,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = recipe.chat_template
    return tokenizer


def build_config(name: str, tokenizer):
    """Build the transformers config of one stand-in, with ids taken from its tokenizer."""
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    recipe = _recipe(name)
    eos_ids = [tokenizer.convert_tokens_to_ids(recipe.eos_token)]
    eos_ids += [tokenizer.convert_tokens_to_ids(token) for token in recipe.extra_eos_tokens]
    pad_id = tokenizer.convert_tokens_to_ids(recipe.pad_token) if recipe.pad_token else None
    bos_id = tokenizer.convert_tokens_to_ids(recipe.bos_token) if recipe.bos_token else None
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        tie_word_embeddings=recipe.family == "gemma2",
    )
    if recipe.family == "qwen2":
        config = Qwen2Config(**common)
    elif recipe.family == "llama":
        config = LlamaConfig(**common)
    else:
        # Gemma-2 needs eager attention for its logit soft-capping, as the real model does.
        config = Gemma2Config(
            **common,
            head_dim=HIDDEN_SIZE // NUM_HEADS,
            query_pre_attn_scalar=HIDDEN_SIZE // NUM_HEADS,
            sliding_window=256,
            attn_implementation="eager",
        )
    return config


def build_standin(name: str, cache_dir: str | Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) a stand-in model folder and return its path.

    The folder holds ``config.json``, the safetensors weights and the tokenizer files, so it loads
    through the same ``from_pretrained`` path as a Hub checkpoint. The same name and seed always
    give the same weights; a finished folder is reused unless ``force`` is set.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    recipe = _recipe(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-seed{seed}"
    stamp = target / "lrsafety_standin.json"
    if target.is_dir() and stamp.is_file() and not force:
        try:
            if json.loads(stamp.read_text()).get("builder_version") == _BUILDER_VERSION:
                return target
        except json.JSONDecodeError:
            logger.warning("Rebuilding stand-in %s: unreadable stamp file %s", name, stamp)

    tokenizer = build_tokenizer(name)
    config = build_config(name, tokenizer)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(_seed_for(name, seed))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id[0],
        do_sample=False,
    )

    # Write into a temporary sibling and rename, so an interrupted build never leaves a folder
    # that looks finished.
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "lrsafety_standin.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "family": recipe.family,
                    "seed": seed,
                    "builder_version": _BUILDER_VERSION,
                    "warning": STANDIN_WARNING,
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Built stand-in %s (seed %d) in %s", name, seed, target)
    return target


def _recipe(name: str) -> StandinRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown stand-in {name!r}; expected one of {sorted(RECIPES)}") from None


def _seed_for(name: str, seed: int) -> int:
    # Each family gets its own weights stream from one user-facing seed.
    digest = hashlib.sha256(f"{name}|{seed}".encode()).hexdigest()
    return int(digest[:8], 16)
