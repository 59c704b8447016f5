"""Prices, and the cost of tokens as providers bill them: the one place the report and
`plan` turn tokens into money.

Thought (reasoning) tokens are billed as output; prompt tokens served from context
cache are billed at the cached-input rate.
"""
from __future__ import annotations

from typing import Mapping, Optional

from codeclm_beam.metrics import paid_before
from codeclm_beam.model.types import Usage

# USD per million tokens: input, cached input, output (Vertex AI standard online
# prices for prompts up to 200k tokens, as published when this was written).
# Estimates to replace with your contract's: pass --prices FILE with
# {"MODEL URI or prefix": {"input": x, "cached_input": y, "output": z}}.
# The longest matching prefix wins, so "gemini-2.5-flash-lite" is not priced as Flash.
DEFAULT_PRICES = {
    "vertex:gemini-2.5-pro": {"input": 1.25, "cached_input": 0.125, "output": 10.0},
    "vertex:gemini-2.5-flash": {"input": 0.30, "cached_input": 0.03, "output": 2.50},
    "vertex:gemini-2.5-flash-lite": {"input": 0.10, "cached_input": 0.01, "output": 0.40},
    "vertex:gemini-3-pro": {"input": 2.00, "cached_input": 0.20, "output": 12.0},
    "vertex:gemini-3-flash": {"input": 0.50, "cached_input": 0.05, "output": 3.00},
    "gemini:gemini-2.5-pro": {"input": 1.25, "cached_input": 0.125, "output": 10.0},
    "gemini:gemini-2.5-flash": {"input": 0.30, "cached_input": 0.03, "output": 2.50},
    "gemini:gemini-2.5-flash-lite": {"input": 0.10, "cached_input": 0.01, "output": 0.40},
    "llamacpp:": {"input": 0.0, "output": 0.0},
}

# USD per million training tokens (the training file's tokens times the epochs) of
# Vertex AI supervised and preference tuning of a base model, as published when this
# was written; a tuned model's endpoint is then billed at its base model's online
# price. Override with --prices FILE's "tuning" entry: {"tuning": {"vertex:MODEL": x}}.
DEFAULT_TUNING_PRICES = {
    "vertex:gemini-2.5-pro": 25.0,
    "vertex:gemini-2.5-flash": 5.0,
    "vertex:gemini-2.5-flash-lite": 1.5,
    "vertex:gemini-2.0-flash": 3.0,
    "vertex:gemini-2.0-flash-lite": 1.0,
}


# Vertex AI documents no number for the epochs it runs when a job leaves epochCount
# unset ("the recommended value", adjusted to the dataset) and need not echo its choice;
# Google's Gemini API tuning documents 5 (Hyperparameters.epoch_count). A tuning cost
# without the service's own figure or --epochs assumes that, and says it is assumed.
ASSUMED_DEFAULT_EPOCHS = 5


def tuning_cost_usd(base_model_uri: str, tokens_per_epoch: float, epochs: Optional[int],
                    overrides: Optional[Mapping] = None) -> Optional[float]:
    """What a tuning job costs; None when the price or the epochs are unknown."""
    prices = {**DEFAULT_TUNING_PRICES, **((overrides or {}).get("tuning") or {})}
    price = price_of(base_model_uri, prices)
    if price is None or not epochs:
        return None
    return round(tokens_per_epoch * epochs * price / 1e6, 4)


# What each way of serving a model costs against its online price: Flex PayGo and
# Vertex AI batch prediction bill the same tokens at half.
PRICE_FACTOR = {"online": 1.0, "flex": 0.5, "batch": 0.5}
# The modes that apply to a model: only Vertex AI's Gemini has flex and batch.
PAID_MODES_PREFIX = "vertex:"


def mode_factor(model: str, mode: str) -> float:
    return PRICE_FACTOR[mode] if model.startswith(PAID_MODES_PREFIX) else 1.0


def merged_prices(overrides: Optional[Mapping] = None) -> dict:
    return {**DEFAULT_PRICES, **(overrides or {})}


def price_of(uri: str, prices: Mapping) -> Optional[dict]:
    if uri in prices:
        return prices[uri]
    matches = [k for k in prices if uri.startswith(k)]
    return prices[max(matches, key=len)] if matches else None


def cost_usd(tokens: Mapping[str, float], price: Optional[Mapping],
             factor: float = 1.0) -> Optional[float]:
    """What `tokens` (a mapping with the `Usage` kinds, such as a stage's counters)
    cost at `price` times `factor` (`mode_factor`); None when the price is unknown."""
    if price is None:
        return None
    usage = Usage.from_dict(tokens)
    prompt = usage.prompt_tokens
    cached = min(usage.cached_prompt_tokens, prompt)
    output = usage.completion_tokens + usage.thoughts_tokens
    return factor * ((prompt - cached) * price["input"]
                     + cached * price.get("cached_input", price["input"])
                     + output * price["output"]) / 1e6


def run_cost(by_stage: Mapping, modes: Mapping[str, str],
             prices: Optional[Mapping] = None) -> dict:
    """A run's estimated cost from its calls per stage and model
    (manifest["model_calls"]["by_stage"]): as run (each model at its billing mode,
    `modes`: model id -> mode) and, for comparison, with every vertex: model in each
    mode. "usd" is what this run paid; "usd_before" what earlier runs paid for the
    answers this one read from the cache. Rows per stage and model for the report.
    None where a price is unknown."""
    prices = merged_prices(prices)
    rows, as_run, before = [], 0.0, 0.0
    by_mode = dict.fromkeys(PRICE_FACTOR, 0.0)
    for stage, entry in by_stage.items():
        for model, tokens in entry["models"].items():
            price, mode = price_of(model, prices), modes.get(model, "online")
            cost = cost_usd(tokens, price, mode_factor(model, mode))
            # Cached answers: what the runs that asked paid for them, at this run's mode.
            cost_before = cost_usd(paid_before(tokens), price, mode_factor(model, mode))
            rows.append({"stage": stage, "model": model, "mode": mode, "usd": cost,
                         "usd_before": cost_before})
            as_run = None if cost is None or as_run is None else as_run + cost
            before = None if cost_before is None or before is None else before + cost_before
            for each in by_mode:
                each_cost = cost_usd(tokens, price, mode_factor(model, each))
                by_mode[each] = (None if each_cost is None or by_mode[each] is None
                                 else by_mode[each] + each_cost)
    return {"usd": _round(as_run), "usd_before": _round(before), "by_mode": {m: _round(c) for m, c in by_mode.items()},
            "rows": rows}


def _round(cost: Optional[float]) -> Optional[float]:
    return None if cost is None else round(cost, 4)
