"""Greedy generation through nnsight, with optional edits of decoder-block outputs, and a
resumable JSONL store for the completions.

``generate_completions`` formats each instruction with the chat template, tokenises it with a
single BOS, pads each batch on the left and decodes greedily (repetition penalty 1.0). Batches
are formed from prompts of similar length to reduce padding, and the completions come back in
input order, one per prompt, holding only the new tokens without special tokens.

Edits are described by a ``HookPlan`` of plain tensors (built by ``lrsafety.steering``), so the
traced code contains no package objects and can run on NDIF. The plan applies at every generation
step: step 0 is the prompt pass ``[batch, seq, d]``, later steps see ``[batch, 1, d]``.

``CompletionStore`` keeps completions of finished groups in one JSONL file with a metadata
sidecar, rewritten atomically after each group, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nnsight
import numpy as np
import torch
from tqdm.auto import tqdm

from lrsafety.prompts import PaddedBatch, encode_prompts, format_prompts, pad_left
from lrsafety.runs import atomic_path, write_json

logger = logging.getLogger("lrsafety")

# nnsight warns when an open `tracer.iter[:]` loop waits for a step the generation never makes.
# That is how every edited generation ends here, so the warning carries no information.
_LOOP_END_WARNING = r".*was never reached.*"


@dataclass(frozen=True)
class HookPlan:
    """Edits of decoder-block outputs ``h`` for one batch, as plain tensors.

    - Directional ablation, ``h <- h - (h . v) v`` with the unit vector ``v =
      ablation_direction``, at every layer in ``ablation_layers``, at every position of the
      prompt pass and at every generated token, on the rows where ``ablation_rows`` is True.
    - Directional addition, ``h <- h + addition_vector`` (``addition_vector = alpha * v``), at
      ``addition_layer``, at the final prompt position of the prompt pass and, when
      ``addition_during_generation`` is set, at every generated token, on the rows where
      ``addition_rows`` is True.

    Both edits are computed in float32 and written back in the model's dtype. A row that gets
    both is ablated first. Row masks are aligned with the rows of the padded batch.
    """

    ablation_layers: tuple[int, ...] = ()
    ablation_direction: torch.Tensor | None = None
    ablation_rows: torch.Tensor | None = None
    addition_layer: int | None = None
    addition_vector: torch.Tensor | None = None
    addition_rows: torch.Tensor | None = None
    addition_during_generation: bool = True

    def __post_init__(self) -> None:
        if self.ablation_layers and (self.ablation_direction is None or self.ablation_rows is None):
            raise ValueError("a plan with ablation layers needs ablation_direction and ablation_rows")
        if self.addition_layer is not None and (self.addition_vector is None or self.addition_rows is None):
            raise ValueError("a plan with an addition layer needs addition_vector and addition_rows")

    @property
    def edited_layers(self) -> tuple[int, ...]:
        layers = set(self.ablation_layers)
        if self.addition_layer is not None:
            layers.add(self.addition_layer)
        return tuple(sorted(layers))

    def check_rows(self, n_rows: int) -> None:
        """Raise if a row mask does not have one entry per batch row."""
        for name, rows in (("ablation_rows", self.ablation_rows), ("addition_rows", self.addition_rows)):
            if rows is not None and tuple(rows.shape) != (n_rows,):
                raise ValueError(f"{name} has shape {tuple(rows.shape)} but the batch has {n_rows} rows")


class Intervention(Protocol):
    """Anything that builds a ``HookPlan`` for a batch made of some of the input prompts."""

    def hook_plan(self, rows: Sequence[int]) -> HookPlan:
        """Return the plan for a batch holding the prompts at positions ``rows`` of the input list."""
        ...


@dataclass
class GenerationOutput:
    """Token ids of one generated batch, and the block outputs captured before and after the edits.

    ``captured[layer]`` (after the edits, as the next block reads them) and
    ``captured_before[layer]`` list one tensor per generation step: ``[batch, seq, d]`` for the
    prompt pass, then ``[batch, 1, d]``.
    """

    prompt_ids: torch.Tensor
    new_ids: torch.Tensor
    captured: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    captured_before: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def generation_settings(loaded, max_new_tokens: int) -> dict[str, Any]:
    """Return the keyword arguments of greedy decoding passed to ``generate``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokenizer = loaded.tokenizer
    return {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": False,
        "num_beams": 1,
        # Qwen2.5-7B-Instruct's generation config sets 1.05, but the authors' greedy decoding uses 1.0.
        "repetition_penalty": 1.0,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }


def generate_batch(
    loaded,
    batch: PaddedBatch,
    *,
    max_new_tokens: int,
    plan: HookPlan | None = None,
    capture_layers: Iterable[int] = (),
    remote: bool | str = False,
    generation_kwargs: Mapping[str, Any] | None = None,
) -> GenerationOutput:
    """Generate greedily for one left-padded batch, applying ``plan`` at every step.

    ``capture_layers`` names blocks whose outputs are saved at every step, before and after the edits.
    """
    n_rows, prompt_length = batch.input_ids.shape
    capture_layers = tuple(sorted(set(int(layer) for layer in capture_layers)))
    n_layers = loaded.spec.n_layers
    for layer in capture_layers + (plan.edited_layers if plan else ()):
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range for {loaded.spec.name} with {n_layers} layers")
    if plan is not None:
        plan.check_rows(n_rows)

    settings = generation_settings(loaded, max_new_tokens)
    settings.update(generation_kwargs or {})

    # Plain locals only inside the trace: remote execution ships the block's source and the
    # values it reads, and the server has torch but not lrsafety.
    blocks = loaded.layers
    touched = sorted(set(capture_layers) | set(plan.edited_layers if plan else ()))
    ablation_layers = set(plan.ablation_layers) if plan else set()
    ablation_direction = plan.ablation_direction if plan else None
    ablation_rows = plan.ablation_rows if plan else None
    addition_layer = plan.addition_layer if plan else None
    addition_vector = plan.addition_vector if plan else None
    addition_rows = plan.addition_rows if plan else None
    addition_during_generation = plan.addition_during_generation if plan else False
    settings.update(remote_trace_options(loaded, remote))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LOOP_END_WARNING, category=UserWarning)
        with loaded.model.generate(**settings) as tracer:
            with tracer.invoke(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
                # Saved containers: a server returns only values marked with save().
                captured_steps = nnsight.save({layer: [] for layer in capture_layers})
                captured_before_steps = nnsight.save({layer: [] for layer in capture_layers})
                # An open loop: it ends when the generation stops (all rows at EOS or the token
                # limit), and nothing after it in this invoke would run. Each step reads every
                # touched block, so the loop waits for the model instead of spinning.
                for step in tracer.iter[:] if touched else ():
                    for layer in touched:
                        hidden = blocks[layer].output
                        if layer in captured_before_steps:
                            captured_before_steps[layer].append(hidden.detach().clone())
                        edit_ablation = layer in ablation_layers
                        edit_addition = layer == addition_layer and (step == 0 or addition_during_generation)
                        if edit_ablation or edit_addition:
                            edited = hidden.to(torch.float32).clone()
                            if edit_ablation:
                                direction = ablation_direction.to(hidden.device, torch.float32)
                                rows = ablation_rows.to(hidden.device)[:, None, None]
                                projection = (edited @ direction)[..., None]
                                edited = torch.where(rows, edited - projection * direction, edited)
                            if edit_addition:
                                vector = addition_vector.to(hidden.device, torch.float32)
                                shift = addition_rows.to(hidden.device, torch.float32)[:, None] * vector
                                # Prompt pass: the final prompt token only (index -1 under left
                                # padding). Later steps hold just the new token.
                                edited[:, -1, :] = edited[:, -1, :] + shift
                            blocks[layer].output = edited.to(hidden.dtype)
                        if layer in captured_steps:
                            captured_steps[layer].append(blocks[layer].output.detach().clone())
            # A separate invoke over the whole batch still runs when the loop above is cut short.
            with tracer.invoke():
                output_ids = tracer.result.save()

    output_ids = torch.as_tensor(output_ids).cpu()
    return GenerationOutput(
        prompt_ids=output_ids[:, :prompt_length],
        new_ids=output_ids[:, prompt_length:],
        captured={layer: [tensor.cpu() for tensor in steps] for layer, steps in captured_steps.items()},
        captured_before={layer: [tensor.cpu() for tensor in steps] for layer, steps in captured_before_steps.items()},
    )


def remote_trace_options(loaded, remote: bool | str) -> dict[str, Any]:
    """Return the keyword arguments that send one trace to NDIF or through the local round trip
    (``remote="local"``); empty for a local run. Call it once per trace."""
    if not remote:
        return {}
    from lrsafety.remote import trace_options

    return trace_options(loaded, remote)


def stop_token_ids(loaded) -> set[int]:
    """Return the token ids that end a completion (the generation config's EOS ids and the tokenizer's)."""
    ids: set[int] = set()
    config = getattr(loaded.model._module, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(value) for value in configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return ids


def decode_new_tokens(tokenizer, new_ids: torch.Tensor, stop_ids: set[int]) -> list[str]:
    """Decode each row's new tokens up to its first stop token, skipping special tokens."""
    texts = []
    for row in new_ids.tolist():
        end = next((index for index, token in enumerate(row) if token in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split prompt indices into batches of similar length, longest first (an OOM shows early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def generate_completions(
    loaded,
    instructions: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    system_prompt: str | None = None,
    intervention: Intervention | None = None,
    remote: bool | str = False,
    progress: bool = True,
    generation_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Generate one greedy completion per instruction, in input order.

    Each completion holds only the new tokens, cut at the first stop token and decoded without
    special tokens. ``intervention`` builds the per-batch edits (see ``lrsafety.steering``).
    """
    instructions = list(instructions)
    if not instructions:
        return []
    tokenizer = loaded.tokenizer
    token_ids = encode_prompts(tokenizer, format_prompts(tokenizer, instructions, system_prompt))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = stop_token_ids(loaded)
    if generation_kwargs and generation_kwargs.get("eos_token_id") is not None:
        configured = generation_kwargs["eos_token_id"]
        stop_ids = {int(configured)} if isinstance(configured, int) else {int(value) for value in configured}

    completions: list[str | None] = [None] * len(instructions)
    batches = length_sorted_batches([len(ids) for ids in token_ids], batch_size)
    for rows in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        batch = pad_left([token_ids[row] for row in rows], pad_id)
        plan = intervention.hook_plan(rows) if intervention is not None else None
        output = generate_batch(
            loaded, batch, max_new_tokens=max_new_tokens, plan=plan, remote=remote,
            generation_kwargs=generation_kwargs,
        )
        if output.new_ids.shape[0] != len(rows):
            raise RuntimeError(f"generate returned {output.new_ids.shape[0]} rows for a batch of {len(rows)}")
        for row, text in zip(rows, decode_new_tokens(tokenizer, output.new_ids, stop_ids)):
            completions[row] = text
    return [text if text is not None else "" for text in completions]


class CompletionStore:
    """Completions of finished groups in one JSONL file, with the run metadata in a sidecar.

    ``steering.jsonl`` contains one JSON record per completion and ``steering.meta.json`` the
    metadata the records were generated under. A group (for example one condition, language
    and subset) is added whole; the file is rewritten atomically each time, so it never contains
    a partial group. Opening a store whose sidecar differs from ``metadata`` moves the old
    files aside (suffix ``.stale-<time>``) and starts empty, so results of different settings never mix.
    """

    def __init__(self, path: str | Path, metadata: Mapping[str, Any], group_keys: Sequence[str]):
        self.path = Path(path)
        self.metadata_path = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".meta.json")
        self.metadata = json.loads(json.dumps(dict(metadata), default=str))
        self.group_keys = tuple(group_keys)
        self.records: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        stored = json.loads(self.metadata_path.read_text()) if self.metadata_path.is_file() else None
        if stored != self.metadata:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for source in (self.path, self.metadata_path):
                if source.exists():
                    source.replace(source.with_name(f"{source.name}.stale-{stamp}"))
            logger.warning(
                "Records in %s were written with other settings; moved them to *.stale-%s and starting afresh",
                self.path, stamp,
            )
            return
        with self.path.open(encoding="utf-8") as handle:
            self.records = [json.loads(line) for line in handle if line.strip()]
        logger.info("Resuming from %s: %d completions in %d finished groups", self.path, len(self.records), len(self.groups()))

    def group_of(self, record: Mapping[str, Any]) -> tuple:
        return tuple(record[key] for key in self.group_keys)

    def groups(self) -> set[tuple]:
        """Return the keys of the groups already stored."""
        return {self.group_of(record) for record in self.records}

    def has_group(self, *key: Any) -> bool:
        return tuple(key) in self.groups()

    def group_records(self, *key: Any) -> list[dict[str, Any]]:
        """Return the stored records of one group (empty if it is not stored)."""
        return [record for record in self.records if self.group_of(record) == tuple(key)]

    def add_group(self, records: Sequence[Mapping[str, Any]], replace: bool = False) -> None:
        """Append the records of one finished group and rewrite the file atomically.

        With ``replace`` set, stored records of the same group are dropped first; otherwise
        adding a stored group raises ValueError.
        """
        records = [dict(record) for record in records]
        keys = {self.group_of(record) for record in records}
        if len(keys) != 1:
            raise ValueError(f"add_group takes exactly one group, got {sorted(keys)}")
        key = next(iter(keys))
        if key in self.groups():
            if not replace:
                raise ValueError(f"group {key} is already stored in {self.path}")
            self.records = [record for record in self.records if self.group_of(record) != key]
        self.records.extend(records)
        write_json(self.metadata_path, self.metadata)
        with atomic_path(self.path) as temporary:
            with temporary.open("w", encoding="utf-8") as handle:
                for record in self.records:
                    handle.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")

    def to_frame(self):
        """Return the stored records as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
