"""Residual-stream activations: extraction with nnsight and the per-cell cache on disk.

For every (language, subset, split) cell of the prompt table, each instruction goes through the
model's chat template (generation prompt on) and is traced with nnsight. The decoder-block output
(``loaded.layers[i].output``, the residual stream after block ``i``) is kept at every layer and at
two positions, ``t_inst`` (the instruction's last token) and ``t_post_inst`` (the last prompt
token). One safetensors file per cell holds::

    activations   [N, n_layers, 2, d_model]   float32 or bfloat16
    prompt_ids    [N]                         int64, in the prompt table's row order

with string metadata (model, positions, t_inst offset, shapes, dtype, a content hash of model and
prompts, a checksum of the tensor bytes, format version).

Batches are built from prompts of similar token length and sized in tokens, so long scripts
(Thai, Burmese, Amharic) waste little padding. Each finished batch is checkpointed into a shard
folder next to the cell, so an interrupted run resumes at the first missing batch; a cell file is
written atomically once all batches exist. On a rerun a cell is skipped only when its file is
readable, its checksum holds and its metadata matches the current model, prompts and dtype;
anything else is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lrsafety.prompts import POSITIONS, encode_prompts, find_t_inst_offset, format_prompts, pad_left
from lrsafety.remote import REMOTE_MAX_BATCH_SIZE, REMOTE_MAX_PADDED_TOKENS, remote_call
from lrsafety.runs import RunDir, atomic_path

logger = logging.getLogger("lrsafety")

# Bumped whenever the file layout or the meaning of a field changes; older files are recomputed.
FORMAT_VERSION = "1"

ACTIVATION_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Max padded tokens (rows x padded length) per traced batch, and max rows per batch. A 9B model
# in bf16 handles 8192 tokens per forward pass in well under 10 GiB of activation memory.
DEFAULT_TOKEN_BUDGET = 8192
DEFAULT_MAX_BATCH_SIZE = 64

CELL_COLUMNS = ("language", "subset", "split")
_SHARD_SUFFIX = ".shards"


class CellError(RuntimeError):
    """A cached activation cell is missing, corrupt, empty or does not match its request."""


@dataclass(frozen=True)
class CellKey:
    """One (language, subset, split) cell of the prompt table."""

    language: str
    subset: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.language}_{self.subset}_{self.split}"

    def __str__(self) -> str:
        return f"{self.language}/{self.subset}/{self.split}"


@dataclass(frozen=True)
class CellActivations:
    """The cached activations of one cell, loaded as float32."""

    language: str
    subset: str
    split: str
    activations: torch.Tensor  # [N, n_layers, len(positions), d_model], float32
    prompt_ids: torch.Tensor  # [N], int64
    positions: tuple[str, ...]
    n_layers: int
    d_model: int
    metadata: dict[str, str] = field(repr=False)

    def position_index(self, position: str) -> int:
        """Return the axis-2 index of a position name, with an error naming the valid ones."""
        return _position_index(position, self.positions, self.cell_label)

    def matrix(self, layer: int, position: str = "t_post_inst") -> np.ndarray:
        """Return the ``[N, d_model]`` float32 activations of one layer and position."""
        _check_layer(layer, self.n_layers, self.cell_label)
        return self.activations[:, layer, self.position_index(position), :].numpy()

    @property
    def cell_label(self) -> str:
        return f"{self.language}/{self.subset}/{self.split}"


# ---------------------------------------------------------------------------------------------
# Paths and listing


def cell_path(run_dir: str | Path | RunDir, language: str, subset: str, split: str) -> Path:
    """Return the safetensors path of one cell inside ``DIR/activations``."""
    return _run_dir(run_dir).activations / f"{CellKey(language, subset, split).name}.safetensors"


def available_cells(run_dir: str | Path | RunDir) -> list[tuple[str, str, str]]:
    """Return the (language, subset, split) cells that have an activation file, sorted.

    Only the file name is read; ``load_cell`` checks the contents.
    """
    cells = []
    for path in sorted(_run_dir(run_dir).activations.glob("*.safetensors")):
        parts = path.stem.rsplit("_", 2)
        if len(parts) == 3 and not path.name.startswith("."):
            cells.append((parts[0], parts[1], parts[2]))
    return sorted(cells)


# ---------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class _CellPlan:
    key: CellKey
    prompt_ids: np.ndarray  # int64, in table order
    token_ids: list[list[int]]  # in table order
    batches: list[list[int]]  # row indices into the cell, longest prompts first
    content_hash: str
    metadata: dict[str, str]


def extract_activations(
    loaded,
    prompts,
    run_dir: str | Path | RunDir,
    *,
    activation_dtype: str = "float32",
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    system_prompt: str | None = None,
    remote: bool | str = False,
    progress: bool = True,
) -> list[Path]:
    """Trace every prompt of ``prompts`` and write one activation file per cell.

    ``prompts`` is the tidy prompt table (columns ``language, subset, split, prompt_id, text``).
    Cells whose file is valid for this model, these prompts and this dtype are skipped; an
    interrupted cell resumes from its checkpointed batches. Returns the cell paths in the
    order the cells first appear in the table.
    """
    from tqdm.auto import tqdm

    if activation_dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"unsupported activation_dtype {activation_dtype!r}; expected one of {sorted(ACTIVATION_DTYPES)}")
    if token_budget < 1 or max_batch_size < 1:
        raise ValueError(f"token_budget ({token_budget}) and max_batch_size ({max_batch_size}) must be positive")
    _check_prompt_table(prompts)
    if remote:
        # Keep each request within the size NDIF accepts (estimated limits, see lrsafety.remote).
        token_budget = min(token_budget, REMOTE_MAX_PADDED_TOKENS)
        max_batch_size = min(max_batch_size, REMOTE_MAX_BATCH_SIZE)

    run_dir = _run_dir(run_dir)
    tokenizer = loaded.tokenizer
    t_inst_offset = find_t_inst_offset(tokenizer, system_prompt)
    logger.info("t_inst offset for %s: %d tokens from the end of the prompt", loaded.spec.name, t_inst_offset)

    plans = []
    for key, table in _cells(prompts):
        plans.append(
            _plan_cell(loaded, key, table, t_inst_offset, activation_dtype, token_budget, max_batch_size, system_prompt)
        )

    pending = []
    for plan in plans:
        path = cell_path(run_dir, *_key_tuple(plan.key))
        if path.exists() and _is_valid_cell(path, plan):
            logger.info("Activations for %s are up to date: %s", plan.key, path)
            # Shards survive when a run stops between writing the cell and removing them.
            shutil.rmtree(_shard_root(path), ignore_errors=True)
            continue
        if path.exists():
            logger.warning("Recomputing %s: the existing file is invalid or was made for other inputs", plan.key)
        pending.append(plan)

    n_prompts = sum(len(plan.prompt_ids) for plan in pending)
    logger.info(
        "%d of %d cells need extraction (%d prompts); %d are up to date",
        len(pending), len(plans), n_prompts, len(plans) - len(pending),
    )
    with tqdm(total=n_prompts, desc="activations", unit="prompt", disable=not progress) as bar:
        for plan in pending:
            bar.set_postfix_str(str(plan.key))
            _extract_cell(loaded, plan, run_dir, t_inst_offset, activation_dtype, remote, bar)

    return [cell_path(run_dir, *_key_tuple(plan.key)) for plan in plans]


def _plan_cell(
    loaded,
    key: CellKey,
    table,
    t_inst_offset: int,
    activation_dtype: str,
    token_budget: int,
    max_batch_size: int,
    system_prompt: str | None,
) -> _CellPlan:
    texts = [str(text) for text in table["text"].tolist()]
    empty = [prompt_id for prompt_id, text in zip(table["prompt_id"].tolist(), texts) if not text.strip()]
    if empty:
        raise ValueError(f"cell {key}: prompts {empty[:5]} have empty text; fix the prompt table before extracting")
    prompt_ids = _prompt_ids(table, key)

    token_ids = encode_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, texts, system_prompt))
    shortest = min(len(ids) for ids in token_ids)
    if shortest < -t_inst_offset:
        raise ValueError(f"cell {key}: a prompt has {shortest} tokens, fewer than the t_inst offset {t_inst_offset}")

    spec = loaded.spec
    content = {
        "format_version": FORMAT_VERSION,
        "model_name": spec.name,
        "model_source": spec.source,
        "model_revision": spec.revision,
        "model_dtype": spec.dtype,
        "activation_dtype": activation_dtype,
        "system_prompt": system_prompt,
        "cell": key.name,
        "prompt_ids": prompt_ids.tolist(),
        "texts": texts,
    }
    content_hash = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_name": spec.name,
        "model_source": spec.source,
        "model_revision": spec.revision or "",
        "model_dtype": spec.dtype,
        "is_standin": str(bool(spec.is_standin)).lower(),
        "language": key.language,
        "subset": key.subset,
        "split": key.split,
        "positions": ",".join(POSITIONS),
        "t_inst_offset": str(t_inst_offset),
        "n_prompts": str(len(texts)),
        "n_layers": str(spec.n_layers),
        "d_model": str(spec.d_model),
        "activation_dtype": activation_dtype,
        "system_prompt": system_prompt or "",
        "content_hash": content_hash,
    }
    return _CellPlan(
        key=key,
        prompt_ids=prompt_ids,
        token_ids=token_ids,
        batches=plan_batches([len(ids) for ids in token_ids], token_budget, max_batch_size),
        content_hash=content_hash,
        metadata=metadata,
    )


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Group row indices into batches of similar length, longest first.

    A batch has at most ``max_batch_size`` rows and at most ``token_budget`` tokens once padded
    (rows x length of its longest row). A single row longer than the budget gets a batch of its
    own. Sorting is stable, so the plan depends only on the lengths.
    """
    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    batches: list[list[int]] = []
    current: list[int] = []
    for row in order:
        # Rows arrive longest first, so the batch's padded length is that of its first row.
        width = lengths[current[0]] if current else lengths[row]
        if current and (len(current) + 1 > max_batch_size or (len(current) + 1) * width > token_budget):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def _extract_cell(loaded, plan: _CellPlan, run_dir: RunDir, t_inst_offset: int, activation_dtype: str, remote, bar) -> Path:
    target = cell_path(run_dir, *_key_tuple(plan.key))
    shard_dir = _shard_dir(target, plan)
    _remove_stale_shards(target, keep=shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)

    dtype = ACTIVATION_DTYPES[activation_dtype]
    pad_id = loaded.tokenizer.pad_token_id
    n_rows = len(plan.prompt_ids)
    result = torch.empty((n_rows, loaded.spec.n_layers, len(POSITIONS), loaded.spec.d_model), dtype=dtype)

    for index, rows in enumerate(plan.batches):
        shard = shard_dir / f"batch_{index:05d}.safetensors"
        values = _read_shard(shard, rows, plan.content_hash)
        if values is None:
            batch = pad_left([plan.token_ids[row] for row in rows], pad_id)
            values = remote_call(
                lambda: _trace_batch(loaded, batch, t_inst_offset, remote),
                remote=remote, description=f"{plan.key} batch {index + 1}/{len(plan.batches)}",
            ).to(dtype)
            _write_shard(shard, values, rows, plan.content_hash)
        result[rows] = values
        bar.update(len(rows))

    write_cell(run_dir, plan.key.language, plan.key.subset, plan.key.split, result, plan.prompt_ids, plan.metadata)
    shutil.rmtree(shard_dir.parent, ignore_errors=True)
    logger.info("Wrote %s: %d prompts in %d batches", target, n_rows, len(plan.batches))
    return target


def _trace_batch(loaded, batch, t_inst_offset: int, remote) -> torch.Tensor:
    """Trace one left-padded batch and return ``[B, n_layers, 2, d_model]`` float32 on the CPU."""
    # Position indices count from the right edge, which left padding leaves in place.
    import nnsight

    from lrsafety.remote import trace_options

    positions = [t_inst_offset, -1]
    options = trace_options(loaded, remote, description=f"activations of {batch.input_ids.shape[0]} prompts") if remote else {}
    with torch.no_grad():
        with loaded.model.trace(batch.as_inputs(), **options) as tracer:
            # The list itself is saved: a server returns only saved values, so a list filled
            # inside the block would come back empty from NDIF.
            saved = nnsight.save([loaded.layers[layer].output[:, positions, :] for layer in range(loaded.spec.n_layers)])
            # Nothing after the last block is needed; stopping skips the final norm and the
            # unembedding, whose logits for a 256k vocabulary dominate memory on long batches.
            tracer.stop()
    return torch.stack([value.detach().to("cpu", torch.float32) for value in saved], dim=1)


def write_cell(
    run_dir: str | Path | RunDir,
    language: str,
    subset: str,
    split: str,
    activations: torch.Tensor,
    prompt_ids: Sequence[int] | np.ndarray | torch.Tensor,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write one cell file atomically and return its path.

    ``activations`` is ``[N, n_layers, len(POSITIONS), d_model]`` (float32 or bfloat16, stored
    as given). Metadata fields the file format needs (positions, shapes, dtype, checksum,
    format version, the cell's names) are filled in; ``metadata`` adds or overrides the rest,
    e.g. the model name. Extraction writes through this function, and so can tests or
    analyses that build activations another way.
    """
    activations = activations.detach().cpu().contiguous()
    dtype_names = {dtype: name for name, dtype in ACTIVATION_DTYPES.items()}
    if activations.ndim != 4 or activations.shape[2] != len(POSITIONS) or activations.dtype not in dtype_names:
        raise ValueError(
            f"cell {CellKey(language, subset, split)}: expected float32 or bfloat16 activations of shape "
            f"[N, n_layers, {len(POSITIONS)}, d_model], got {activations.dtype} {tuple(activations.shape)}"
        )
    prompt_ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64))
    if prompt_ids.shape != (activations.shape[0],):
        raise ValueError(
            f"cell {CellKey(language, subset, split)}: {prompt_ids.numel()} prompt ids for {activations.shape[0]} rows"
        )
    fields = {
        "format_version": FORMAT_VERSION,
        "model_name": "unknown",
        "model_source": "unknown",
        "language": language,
        "subset": subset,
        "split": split,
        "positions": ",".join(POSITIONS),
        "n_prompts": str(activations.shape[0]),
        "n_layers": str(activations.shape[1]),
        "d_model": str(activations.shape[3]),
        "activation_dtype": dtype_names[activations.dtype],
    }
    fields.update(metadata or {})
    fields["checksum"] = _checksum(activations)
    target = cell_path(run_dir, language, subset, split)
    with atomic_path(target) as temporary:
        _save_cell_file(temporary, activations, prompt_ids, fields)
    return target


# ---------------------------------------------------------------------------------------------
# Checkpoint shards of an unfinished cell


def _shard_root(target: Path) -> Path:
    return target.parent / f".{target.stem}{_SHARD_SUFFIX}"


def _shard_dir(target: Path, plan: _CellPlan) -> Path:
    # The folder name carries the content hash and the batch plan, so shards made for other
    # prompts, another model or another batching never mix with this run's.
    plan_hash = hashlib.sha256(json.dumps(plan.batches).encode()).hexdigest()[:12]
    return _shard_root(target) / f"{plan.content_hash[:16]}-{plan_hash}"


def _remove_stale_shards(target: Path, keep: Path) -> None:
    root = _shard_root(target)
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder != keep:
            logger.info("Removing checkpoint shards made for other inputs: %s", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _write_shard(path: Path, values: torch.Tensor, rows: list[int], content_hash: str) -> None:
    from safetensors.torch import save_file

    tensors = {"activations": values.contiguous(), "rows": torch.tensor(rows, dtype=torch.int64)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"content_hash": content_hash, "checksum": _checksum(values)})


def _read_shard(path: Path, rows: list[int], content_hash: str) -> torch.Tensor | None:
    """Return a checkpointed batch, or None (after a warning when the file is damaged)."""
    if not path.exists():
        return None
    try:
        tensors, metadata = _load_safetensors(path)
        values = tensors["activations"]
        valid = (
            metadata.get("content_hash") == content_hash
            and tensors["rows"].tolist() == rows
            and metadata.get("checksum") == _checksum(values)
        )
    except Exception as error:  # noqa: BLE001 - any unreadable shard is recomputed
        logger.warning("Recomputing checkpoint %s: unreadable (%s)", path, error)
        return None
    if not valid:
        logger.warning("Recomputing checkpoint %s: it does not match this batch", path)
        return None
    return values


# ---------------------------------------------------------------------------------------------
# Reading cells


def load_cell(run_dir: str | Path | RunDir, language: str, subset: str, split: str) -> CellActivations:
    """Load one cell's activations as float32, after checking its file completely.

    Raises ``CellError`` naming the cell when the file is missing, unreadable, fails its
    checksum, or holds no prompts.
    """
    key = CellKey(language, subset, split)
    path = cell_path(run_dir, language, subset, split)
    if not path.exists():
        raise CellError(f"no activations for cell {key}: {path} does not exist; run notebook 02_extraction for this cell")
    try:
        tensors, metadata = _load_safetensors(path)
        activations = tensors["activations"]
        prompt_ids = tensors["prompt_ids"]
    except Exception as error:  # noqa: BLE001 - reported as a corrupt cell
        raise CellError(f"activations for cell {key} are corrupt ({path}): {error}; delete the file and rerun extraction") from error
    _check_metadata(metadata, key, path)
    if metadata.get("checksum") != _checksum(activations):
        raise CellError(f"activations for cell {key} are corrupt ({path}): checksum mismatch; delete the file and rerun extraction")

    n_layers, d_model = int(metadata["n_layers"]), int(metadata["d_model"])
    positions = tuple(metadata["positions"].split(","))
    expected = (len(prompt_ids), n_layers, len(positions), d_model)
    if tuple(activations.shape) != expected:
        raise CellError(f"activations for cell {key} have shape {tuple(activations.shape)}, expected {expected} ({path})")
    if len(prompt_ids) == 0:
        raise CellError(f"cell {key} is empty: {path} contains no prompts")
    return CellActivations(
        language=language,
        subset=subset,
        split=split,
        activations=activations.to(torch.float32),
        prompt_ids=prompt_ids.to(torch.int64),
        positions=positions,
        n_layers=n_layers,
        d_model=d_model,
        metadata=metadata,
    )


def cell_matrix(
    run_dir: str | Path | RunDir,
    language: str,
    subset: str,
    split: str,
    layer: int,
    position: str = "t_post_inst",
) -> np.ndarray:
    """Return the ``[N, d_model]`` float32 activations of one cell at one layer and position.

    Reads only that slice from disk. The file's header and size are checked (safetensors
    rejects truncated files), but not the checksum of the whole tensor: use ``load_cell`` for
    that, or when several layers of one cell are needed.
    """
    from safetensors import safe_open

    key = CellKey(language, subset, split)
    metadata = cell_metadata(run_dir, language, subset, split)
    path = cell_path(run_dir, language, subset, split)
    _check_metadata(metadata, key, path)
    position_index = _position_index(position, tuple(metadata["positions"].split(",")), str(key))
    _check_layer(layer, int(metadata["n_layers"]), str(key))
    try:
        with safe_open(str(path), framework="pt") as handle:
            block = handle.get_slice("activations")[:, layer, position_index, :].clone()
    except Exception as error:  # noqa: BLE001 - reported as a corrupt cell
        raise CellError(f"activations for cell {key} are corrupt ({path}): {error}; delete the file and rerun extraction") from error
    if block.shape[0] == 0:
        raise CellError(f"cell {key} is empty: {path} contains no prompts")
    return block.to(torch.float32).numpy()


def cell_prompt_ids(run_dir: str | Path | RunDir, language: str, subset: str, split: str) -> np.ndarray:
    """Return the int64 prompt ids of one cell in stored row order (reads only that tensor)."""
    from safetensors import safe_open

    path = cell_path(run_dir, language, subset, split)
    if not path.exists():
        raise CellError(f"no activations for cell {CellKey(language, subset, split)}: {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("prompt_ids").numpy().astype(np.int64, copy=True)


def cell_metadata(run_dir: str | Path | RunDir, language: str, subset: str, split: str) -> dict[str, str]:
    """Return the string metadata of one cell file (header only)."""
    from safetensors import safe_open

    key = CellKey(language, subset, split)
    path = cell_path(run_dir, language, subset, split)
    if not path.exists():
        raise CellError(f"no activations for cell {key}: {path} does not exist; run notebook 02_extraction for this cell")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - reported as a corrupt cell
        raise CellError(f"activations for cell {key} are corrupt ({path}): {error}") from error


def activation_inventory(run_dir: str | Path | RunDir) -> pd.DataFrame:
    """Return one row per cell file with its prompt count, shape, dtype and size (headers only)."""
    rows = []
    for language, subset, split in available_cells(run_dir):
        metadata = cell_metadata(run_dir, language, subset, split)
        path = cell_path(run_dir, language, subset, split)
        rows.append({
            "language": language,
            "subset": subset,
            "split": split,
            "n_prompts": int(metadata.get("n_prompts", 0)),
            "n_layers": int(metadata.get("n_layers", 0)),
            "d_model": int(metadata.get("d_model", 0)),
            "activation_dtype": metadata.get("activation_dtype"),
            "megabytes": round(path.stat().st_size / 2**20, 2),
        })
    return pd.DataFrame(rows, columns=["language", "subset", "split", "n_prompts", "n_layers", "d_model", "activation_dtype", "megabytes"])


def position_preview(loaded, instruction: str = "Explain photosynthesis.", system_prompt: str | None = None) -> pd.DataFrame:
    """Return the last prompt tokens of a templated instruction, marking ``t_inst`` and ``t_post_inst``.

    One row per token from a few tokens before ``t_inst`` to the end, with its index from the
    end, the decoded text and the position name (if any), to check the offset by eye.
    """
    tokenizer = loaded.tokenizer
    offset = find_t_inst_offset(tokenizer, system_prompt)
    ids = encode_prompts(tokenizer, format_prompts(tokenizer, [instruction], system_prompt))[0]
    rows = []
    for index in range(max(offset - 3, -len(ids)), 0):
        names = {offset: "t_inst", -1: "t_post_inst"}
        rows.append({"index_from_end": index, "token": repr(tokenizer.decode([ids[index]])), "position": names.get(index, "")})
    return pd.DataFrame(rows)


def activation_model_info(run_dir: str | Path | RunDir) -> dict[str, Any]:
    """Return model facts read from the activation files, for runs without ``model.json``.

    Gives ``name, source, n_layers, d_model, is_standin`` and ``paper_layer`` (the preset's
    layer when the name is a preset, otherwise the middle layer).
    """
    from lrsafety.models import resolve_preset

    cells = available_cells(run_dir)
    if not cells:
        raise CellError(f"no activation files in {_run_dir(run_dir).activations}; run notebook 02_extraction first")
    metadata = cell_metadata(run_dir, *cells[0])
    n_layers = int(metadata["n_layers"])
    preset = resolve_preset(metadata["model_name"])
    return {
        "name": metadata["model_name"],
        "source": metadata["model_source"],
        "n_layers": n_layers,
        "d_model": int(metadata["d_model"]),
        "is_standin": metadata.get("is_standin") == "true",
        "paper_layer": preset.paper_layer if preset is not None else n_layers // 2,
    }


# ---------------------------------------------------------------------------------------------
# Helpers


def _run_dir(run_dir: str | Path | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def _key_tuple(key: CellKey) -> tuple[str, str, str]:
    return key.language, key.subset, key.split


def _check_prompt_table(prompts) -> None:
    required = (*CELL_COLUMNS, "prompt_id", "text")
    missing = [column for column in required if column not in prompts.columns]
    if missing:
        raise ValueError(f"prompt table lacks columns {missing}; expected at least {list(required)}")
    if len(prompts) == 0:
        raise ValueError("prompt table is empty: no cell to extract (check the language and split filters)")


def _cells(prompts) -> Iterator[tuple[CellKey, Any]]:
    # Cells in order of first appearance, rows in table order within each cell.
    for values, table in prompts.groupby(list(CELL_COLUMNS), sort=False):
        yield CellKey(*values), table


def _prompt_ids(table, key: CellKey) -> np.ndarray:
    try:
        prompt_ids = np.asarray(table["prompt_id"].tolist(), dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cell {key}: prompt_id values must be integers ({error})") from None
    if len(set(prompt_ids.tolist())) != len(prompt_ids):
        raise ValueError(f"cell {key}: prompt_id values are not unique")
    return prompt_ids


def _position_index(position: str, positions: tuple[str, ...], cell: str) -> int:
    if position not in positions:
        raise ValueError(f"unknown position {position!r} for cell {cell}; expected one of {list(positions)}")
    return positions.index(position)


def _check_layer(layer: int, n_layers: int, cell: str) -> None:
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer!r} is out of range for cell {cell}, which has layers 0..{n_layers - 1}")


def _check_metadata(metadata: dict[str, str], key: CellKey, path: Path) -> None:
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CellError(
            f"activations for cell {key} have format version {metadata.get('format_version')!r}, "
            f"expected {FORMAT_VERSION!r} ({path}); rerun extraction"
        )
    for name in ("n_layers", "d_model", "positions", "checksum"):
        if name not in metadata:
            raise CellError(f"activations for cell {key} lack metadata field {name!r} ({path}); rerun extraction")


def _is_valid_cell(path: Path, plan: _CellPlan) -> bool:
    """Return True when a cell file is complete, intact and made from these inputs."""
    try:
        tensors, metadata = _load_safetensors(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is recomputed
        logger.warning("Cell file %s is unreadable (%s)", path, error)
        return False
    activations = tensors.get("activations")
    prompt_ids = tensors.get("prompt_ids")
    if activations is None or prompt_ids is None:
        return False
    expected_metadata = {name: value for name, value in metadata.items() if name != "checksum"}
    return (
        expected_metadata == plan.metadata
        and metadata.get("checksum") == _checksum(activations)
        and np.array_equal(prompt_ids.numpy(), plan.prompt_ids)
    )


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    # Copied out of the memory map: a mapped tensor would fault (SIGBUS) if the file were
    # later truncated or rewritten in place.
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    return tensors, metadata


def _save_cell_file(path: Path, activations: torch.Tensor, prompt_ids: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(
        {"activations": activations.contiguous(), "prompt_ids": prompt_ids.to(torch.int64).contiguous()},
        str(path),
        metadata=metadata,
    )


def _checksum(tensor: torch.Tensor) -> str:
    """Return the SHA-256 of a tensor's raw bytes (any dtype, including bfloat16)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw).hexdigest()
