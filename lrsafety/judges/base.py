"""The refusal-judge interface and the registry behind ``get_judge``.

A judge labels a batch of (prompt, response, language) items as refusal (1) or not (0). Each
result may carry a score (the judge's confidence that the response is a refusal, in [0, 1]) and,
when the judge could not decide, ``refusal=None`` with an error message. ``Judge.judge`` cuts
the items into batches, shows a tqdm progress bar and counts the errors.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("lrsafety")


@dataclass(frozen=True)
class JudgeItem:
    """One response to judge: the instruction the model was given, its response and the
    language code of the instruction."""

    prompt: str
    response: str
    language: str


@dataclass(frozen=True)
class JudgeResult:
    """A judge's label for one item: ``refusal`` is 1, 0 or None (undecided, see ``error``);
    ``score`` is the judge's refusal score in [0, 1] when it has one."""

    refusal: int | None
    score: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.refusal is not None


class Judge(ABC):
    """Base class of every judge. Subclasses implement ``judge_batch``."""

    name: str = "judge"
    batch_size: int = 64
    # Items the last ``judge`` call could not label.
    error_count: int = 0

    @abstractmethod
    def judge_batch(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        """Return one result per item, in order. Failures of single items become results with
        ``refusal=None`` and an error message, not exceptions."""

    def describe(self) -> dict[str, Any]:
        """Return the judge's settings for the metadata written next to its labels (no secrets)."""
        return {"judge": self.name}

    def judge(
        self,
        items: Iterable[JudgeItem],
        *,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> list[JudgeResult]:
        """Judge every item in batches of ``batch_size`` and return the results in input order."""
        items = list(items)
        size = int(batch_size or self.batch_size)
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")

        results: list[JudgeResult] = []
        with tqdm(total=len(items), desc=f"judge ({self.name})", unit="response", disable=not progress) as bar:
            for start in range(0, len(items), size):
                batch = items[start : start + size]
                batch_results = self.judge_batch(batch)
                if len(batch_results) != len(batch):
                    raise RuntimeError(
                        f"judge {self.name} returned {len(batch_results)} results for a batch of {len(batch)}"
                    )
                results.extend(batch_results)
                bar.update(len(batch))

        n_errors = sum(not result.ok for result in results)
        self.error_count = n_errors
        if n_errors:
            logger.warning("Judge %s could not label %d of %d responses", self.name, n_errors, len(results))
        return results


_REGISTRY: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str) -> Callable[[Callable[..., Judge]], Callable[..., Judge]]:
    """Register a judge factory (usually the class) under ``name`` for ``get_judge``."""

    def decorate(factory: Callable[..., Judge]) -> Callable[..., Judge]:
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_judges() -> list[str]:
    """Return the registered judge names."""
    _load_builtin_judges()
    return sorted(_REGISTRY)


def get_judge(name: str, **options: Any) -> Judge:
    """Build the judge registered as ``name`` (``offline``, ``guard`` or ``llm``) with ``options``."""
    _load_builtin_judges()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown judge {name!r}; expected one of {sorted(_REGISTRY)}") from None
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        raise ValueError(f"invalid options for judge {name!r}: {error}") from None
    return factory(**options)


def _load_builtin_judges() -> None:
    # The modules register themselves on import; guard.py imports torch only when a judge is built.
    from lrsafety.judges import guard, llm, offline  # noqa: F401
