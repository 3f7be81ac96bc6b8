"""Figure helpers shared by the notebooks: one seaborn style, PNG + SVG output, stand-in banner."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from lrsafety.runs import RunDir, atomic_path
from lrsafety.standins import STANDIN_WARNING

TIER_PALETTE = {"high": "#1b7837", "mid": "#f1a340", "low": "#b2182b"}


def set_style() -> None:
    """Apply the package's plotting style (seaborn whitegrid, readable font sizes)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=1.0)
    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["figure.dpi"] = 110


def mark_standin(fig, is_standin: bool) -> None:
    """Print the stand-in warning across the top of a figure when the run used a stand-in model."""
    if is_standin:
        fig.text(
            0.5, 0.995, "STAND-IN MODEL, RANDOM WEIGHTS: NUMBERS ARE MEANINGLESS",
            ha="center", va="top", fontsize=9, color="white", weight="bold",
            bbox={"facecolor": "#b2182b", "edgecolor": "none", "pad": 3},
        )


def save_figure(fig, run_dir: RunDir | str | Path, name: str, is_standin: bool = False) -> dict[str, Path]:
    """Save a figure as ``figures/NAME.png`` and ``figures/NAME.svg`` and return both paths."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    mark_standin(fig, is_standin)
    paths = {}
    for suffix in ("png", "svg"):
        target = run_dir.figures / f"{name}.{suffix}"
        with atomic_path(target) as temporary:
            fig.savefig(temporary, format=suffix, bbox_inches="tight", dpi=150)
        paths[suffix] = target
    return paths


__all__ = ["STANDIN_WARNING", "TIER_PALETTE", "mark_standin", "save_figure", "set_style"]
