"""Refusal judges behind one interface: ``offline`` (phrase families, no model), ``guard``
(WildGuard, Qwen3Guard-Gen or PolyGuard through transformers) and ``llm`` (any
OpenAI-compatible chat-completions endpoint).

``get_judge(name, **options)`` builds a judge; ``judge.judge(items)`` labels a list of
``JudgeItem(prompt, response, language)`` and returns one ``JudgeResult`` per item.
"""

from lrsafety.judges.base import (
    Judge,
    JudgeItem,
    JudgeResult,
    available_judges,
    get_judge,
    register_judge,
)

__all__ = ["Judge", "JudgeItem", "JudgeResult", "available_judges", "get_judge", "register_judge"]
