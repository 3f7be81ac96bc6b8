"""Measure 6: extraction throughput on an NVIDIA GPU at Qwen2.5-7B-Instruct's shape, in bfloat16.

Builds a random-weight Qwen2 model with Qwen2.5-7B-Instruct's shape (28 layers, width 3584, 28
heads, 4 key-value heads, intermediate size 18944, vocabulary 152064) directly on the GPU, wraps
it for nnsight as ``lrsafety.models.load_model`` does, and measures:

- the bf16 matrix throughput of this GPU: a timed 8192 x 8192 x 8192 matmul, in TFLOP/s;
- extraction through the package (``extract_activations``, every layer, both positions, bf16
  activations): real and padded tokens per second, and the fraction of the matmul throughput
  reached, estimating a forward pass at 2 x parameters FLOPs per token;
- the same extraction with plain forward hooks (ratio package / hooks, target <= 1.10) and the
  fixed cost of one nnsight trace in milliseconds;
- peak GPU memory (``torch.cuda.max_memory_allocated``) during the package's extraction;
- unless ``--skip-generation``: routed generation against plain ``generate`` (target <= 1.15).

Prompts are PolyRefuse's when ``$LRSAFETY_POLYREFUSE`` (or ``../shared/data``) is present,
otherwise synthetic English-like texts of PolyRefuse-like lengths. The tokenizer is the stand-ins'
byte-level one (the real Qwen tokenizer needs the Hub): prompts are several times longer in tokens
than with Qwen's own tokenizer, which makes each batch longer but does not change the work per token.

Ratios here use wall time (with the device synchronised), because GPU work does not show in the
process's CPU time; ``--clock`` is ignored.

Without a CUDA device the script stops with an error, unless ``--dry-run`` is given: then a
small model of the same architecture runs the same steps on the CPU, to check the script.

    python -m benchmarks.gpu_extraction              # on a machine with an NVIDIA GPU
    python -m benchmarks.gpu_extraction --dry-run    # anywhere, seconds
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.extraction_overhead import TARGET_RATIO, hook_extraction, package_extraction, trace_only

BENCHMARK = "gpu_extraction"

logger = logging.getLogger("lrsafety")

QWEN25_7B_SHAPE = common.ModelShape(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                                    intermediate_size=18944)
QWEN25_7B_VOCAB = 152064
DRY_RUN_VOCAB = 512
DRY_RUN_SHAPE = common.ModelShape(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)


def matmul_tflops(size: int, device: torch.device, repeats: int = 20) -> float:
    """Return the bf16 throughput of a ``size`` x ``size`` x ``size`` matmul in TFLOP/s (2 size^3 FLOPs each)."""
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    right = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    for _ in range(3):
        torch.matmul(left, right)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(left, right)
    synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    return 2 * size**3 / seconds / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: common.ModelShape, vocab_size: int, device: torch.device, dtype: torch.dtype):
    """Build a random-weight Qwen2 model of ``shape`` on ``device`` and return it as a ``LoadedModel``."""
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM

    from lrsafety.models import LoadedModel, ModelSpec

    tokenizer, config = common.random_qwen2_config(shape, vocab_size)
    config.max_position_embeddings = 32768
    torch.manual_seed(0)
    with device:
        module = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model = TransformersModel(module, tokenizer=tokenizer)
    tokenizer.padding_side = "left"
    spec = ModelSpec(
        name="random-qwen2.5-7b-shape" if shape == QWEN25_7B_SHAPE else shape.name, source="random weights",
        family="qwen2", n_layers=shape.num_layers, d_model=shape.hidden_size, paper_layer=shape.num_layers // 2,
        dtype=str(dtype).removeprefix("torch."), is_standin=True, remote=False, revision=None,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


def benchmark_prompts(languages: list[str], per_cell: int | None, smoke: bool):
    """Return PolyRefuse harmful and harmless train prompts, or synthetic ones when the checkout is absent."""
    import pandas as pd

    try:
        return common.prompt_table(languages, splits=["train"], per_cell=per_cell), "PolyRefuse"
    except FileNotFoundError as error:
        logger.warning("%s; using synthetic prompts instead", error)
    generator = torch.Generator().manual_seed(0)
    words = ("explain", "how", "to", "write", "a", "short", "story", "about", "the", "history", "of", "science",
             "describe", "steps", "for", "making", "plan", "list", "reasons", "why", "people", "should", "learn")
    rows = []
    count = per_cell or (8 if smoke else 230)
    for subset in ("harmful", "harmless"):
        for index in range(count):
            # PolyRefuse train prompts run from about 10 to 120 words.
            n_words = int(torch.randint(10, 120, (1,), generator=generator))
            picks = torch.randint(0, len(words), (n_words,), generator=generator).tolist()
            rows.append({"language": "en", "subset": subset, "split": "train", "prompt_id": index,
                         "text": " ".join(words[pick] for pick in picks)})
    return pd.DataFrame(rows), "synthetic"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step with a small model on the CPU (checks the script, measures nothing)")
    parser.add_argument("--languages", default="en,th",
                        help="PolyRefuse languages, harmful and harmless train cells (default: %(default)s)")
    parser.add_argument("--per-cell", type=int, default=None, help="prompts per cell (default: all)")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="padded tokens per batch (default: the package's DEFAULT_TOKEN_BUDGET)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="rows per batch (default: the package's DEFAULT_MAX_BATCH_SIZE)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the timed bf16 matmul (default: %(default)s)")
    parser.add_argument("--skip-generation", action="store_true", help="do not time routed generation")
    parser.add_argument("--generation-prompts", type=int, default=32,
                        help="prompts for the routed generation check (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="tokens generated per prompt (default: %(default)s, the paper's value)")
    arguments = parser.parse_args(argv)
    dry_run = arguments.dry_run or arguments.smoke
    if not torch.cuda.is_available() and not dry_run:
        print("gpu_extraction: no CUDA device is available. This benchmark measures an NVIDIA GPU; run it on a "
              "machine with one, or pass --dry-run to check the script on the CPU with a small model.",
              file=sys.stderr)
        raise SystemExit(2)
    common.configure_torch(arguments.threads if dry_run else max(1, torch.get_num_threads()))

    from lrsafety.activations import DEFAULT_MAX_BATCH_SIZE, DEFAULT_TOKEN_BUDGET

    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    shape = DRY_RUN_SHAPE if dry_run else QWEN25_7B_SHAPE
    token_budget = arguments.token_budget or DEFAULT_TOKEN_BUDGET
    max_batch_size = arguments.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    per_cell = arguments.per_cell
    if per_cell is None and dry_run:
        per_cell = 3
    repeats = arguments.repeats or (1 if dry_run else 3)

    tflops = matmul_tflops(256 if dry_run else arguments.matmul_size, device, repeats=2 if dry_run else 20)
    # The dry run keeps a small vocabulary: a 152k-row unembedding in bf16 is slow on a CPU.
    vocab_size = DRY_RUN_VOCAB if dry_run else QWEN25_7B_VOCAB
    loaded = random_model(shape, vocab_size, device, torch.bfloat16)
    parameters = common.parameter_count(loaded)
    languages = arguments.languages.split(",")
    table, prompt_source = benchmark_prompts(languages[:1] if dry_run else languages, per_cell, dry_run)

    from lrsafety.activations import plan_batches
    from lrsafety.prompts import encode_prompts, format_prompts

    real_tokens = padded_tokens = 0
    for _, cell in table.groupby(["language", "subset", "split"], sort=False):
        lengths = [len(ids) for ids in encode_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, [str(t) for t in cell["text"]]))]
        real_tokens += sum(lengths)
        padded_tokens += sum(len(rows) * max(lengths[row] for row in rows)
                             for rows in plan_batches(lengths, token_budget, max_batch_size))

    scratch = Path(tempfile.mkdtemp(prefix="lrsafety-bench-gpu-"))
    runs = iter(range(10**6))
    peaks: list[int] = []

    def run_package():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run_dir = scratch / f"package-{next(runs)}"
        package_extraction(loaded, table, token_budget, max_batch_size, run_dir)
        synchronize(device)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))
        shutil.rmtree(run_dir, ignore_errors=True)

    def run_baseline():
        folder = scratch / f"baseline-{next(runs)}"
        folder.mkdir()
        hook_extraction(loaded, table, token_budget, max_batch_size, folder)
        synchronize(device)
        shutil.rmtree(folder, ignore_errors=True)

    try:
        timings = common.interleave({"package": run_package, "baseline": run_baseline}, repeats=repeats,
                                    warmup=0 if dry_run else 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    trace = trace_only(loaded, table, token_budget, max_batch_size, repeats=repeats, max_batches=8)
    trace_package, trace_baseline = trace.pop("timings")

    package_seconds = common.spread(timings["package"].wall)
    flops_per_token = 2 * parameters
    real_rate = real_tokens / package_seconds["median"]
    padded_rate = padded_tokens / package_seconds["median"]
    config = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "shape": shape.__dict__, "vocab_size": vocab_size, "parameters": parameters, "dtype": "bfloat16",
        "activation_dtype": "float32", "prompts": len(table), "prompt_source": prompt_source,
        "real_tokens": real_tokens, "padded_tokens": padded_tokens, "token_budget": token_budget,
        "max_batch_size": max_batch_size, "repeats": repeats, "matmul_size": arguments.matmul_size,
    }
    throughput = {
        "matmul_tflops": tflops,
        "real_tokens_per_second": real_rate,
        "padded_tokens_per_second": padded_rate,
        "flops_per_token_estimate": flops_per_token,
        "fraction_of_matmul_throughput": padded_rate * flops_per_token / (tflops * 1e12),
        "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
        "package_seconds": package_seconds,
    }
    note = "dry run on the CPU with a small model: the numbers check the script only" if dry_run else ""
    ratio = common.ratio_details(timings["package"], timings["baseline"])
    records = [
        common.result_record(BENCHMARK, "extraction throughput, fraction of bf16 matmul rate",
                             throughput["fraction_of_matmul_throughput"], "fraction", None, None, config, throughput,
                             note=note, smoke=dry_run),
        common.result_record(BENCHMARK, "end-to-end extraction ratio (GPU)", ratio["wall_ratio"]["median"],
                             "x plain hooks", TARGET_RATIO, ratio["wall_ratio"], config,
                             {**ratio, "trace_only": {**common.ratio_details(trace_package, trace_baseline), **trace}},
                             note=note, smoke=dry_run),
    ]
    if not arguments.skip_generation:
        from benchmarks.steering_overhead import measure_model

        instructions = [str(text) for text in table["text"]][: (4 if dry_run else arguments.generation_prompts)]
        records += measure_model(loaded.spec.name, loaded, instructions, 16, 4 if dry_run else arguments.max_new_tokens,
                                 repeats, "wall", dry_run)
        records[-1]["benchmark"] = BENCHMARK
        records[-1]["note"] = note
    return common.finish(records, arguments.output, BENCHMARK, arguments.quiet)


if __name__ == "__main__":
    main()
