"""A run's figures for its report: the tailoring figure (metadata distributions and
their Jensen-Shannon divergence), the plots (PNG data), and the cost tables' rows."""
from __future__ import annotations

import base64
import collections
import io
import math
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.metrics import paid_before
from codeclm_beam.model.types import Usage
from codeclm_beam.pricing import run_cost
from codeclm_beam.pipelines.run.outputs import read_jsonl_dir

# ---- the tailoring figure ---------------------------------------------------------

def distribution(values: list[str]) -> dict[str, float]:
    counts = collections.Counter(values)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def jensen_shannon(p: dict[str, float], q: dict[str, float]) -> Optional[float]:
    """Jensen–Shannon divergence in bits: 0 = same distribution, 1 = disjoint."""
    if not p or not q:
        return None
    keys = set(p) | set(q)
    m = {k: (p.get(k, 0) + q.get(k, 0)) / 2 for k in keys}

    def kl(a):
        return sum(a[k] * math.log2(a[k] / m[k]) for k in keys if a.get(k, 0) > 0)

    return round((kl(p) + kl(q)) / 2, 4)


def tailoring(seed_metadata: list[dict], examples: list[dict]) -> dict[str, Any]:
    """How closely the kept examples follow the seeds' use cases and skills."""
    seed_skills = {s for m in seed_metadata for s in m["skills"]}
    kept_skills = {s for e in examples for s in e["skills"]}
    return {
        "use_case_js_divergence": jensen_shannon(
            distribution([m["use_case"] for m in seed_metadata]),
            distribution([e["use_case"] for e in examples])),
        "seed_skill_coverage": round(len(seed_skills & kept_skills) / len(seed_skills), 4)
        if seed_skills else None,
        "seed_use_cases": len({m["use_case"] for m in seed_metadata}),
        "kept_use_cases": len({e["use_case"] for e in examples}),
        "note": "use_case_js_divergence: Jensen-Shannon divergence (bits) between the use "
                "cases of the seeds and of the kept examples, 0 = identical; "
                "seed_skill_coverage: share of the seeds' skills found among the kept "
                "examples' skills.",
    }


# ---- plots ------------------------------------------------------------------------

def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _counts_axis(ax, highest: float) -> None:
    """A y axis of counts: whole-number ticks, and room above the highest bar so that
    no bar touches the frame."""
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(highest, 1) * 1.15)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _figure().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _legend_outside(ax, below: bool = False) -> None:
    # Beside (or under) the plot, never over a bar or a label; bbox_inches="tight"
    # keeps it in the picture.
    if below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.42), frameon=False, ncol=2)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _short(name: str, limit: int = 44) -> str:
    """A long model URI with its start (the backend, the model) and its end (a tag
    such as #rev=...) kept, which is what tells two candidates apart."""
    if len(name) <= limit:
        return name
    head = limit * 2 // 5
    return name[:head] + "…" + name[-(limit - head - 1):]


def compare_distributions(title: str, series: dict[str, list[str]], top: int) -> str:
    plt = _figure()
    totals = collections.Counter(v for values in series.values() for v in values)
    labels = [k for k, _ in totals.most_common(top)]
    fig, ax = plt.subplots(figsize=(10, 0.32 * max(4, len(labels)) + 1.2))
    height = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        share = distribution(values)
        ax.barh([y + i * height for y in range(len(labels))],
                [100 * share.get(k, 0) for k in labels], height=height, label=name)
    ax.set_yticks([y + height * (len(series) - 1) / 2 for y in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("share (%)")
    ax.set_title(title)
    _legend_outside(ax)
    return _png(fig)


def kept_by_iteration(examples: list[dict], iterations: int) -> str:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    rounds = list(range(1, iterations + 1))
    bottom = [0] * len(rounds)
    for source in ("strong", "target"):
        counts = [sum(1 for e in examples if e["iteration"] == r
                      and e["response_source"] == source) for r in rounds]
        ax.bar(rounds, counts, bottom=bottom, label=f"{source} answer")
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("iteration")
    ax.set_ylabel("delivered pairs")
    ax.set_xticks(rounds)
    _counts_axis(ax, max(bottom, default=0))
    ax.set_title("Delivered pairs per iteration and answer source")
    _legend_outside(ax)
    return _png(fig)


def gap_histogram(gaps: list[float], threshold: float, scale: int) -> str:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = [x / 2 - 0.25 for x in range(-2 * scale, 2 * scale + 2)]
    heights, _, _ = ax.hist(gaps, bins=bins, color="#4c72b0")
    _counts_axis(ax, max(heights, default=0))
    for x in (threshold, -threshold):
        ax.axvline(x, color="#c44e52", linestyle="--")
    ax.set_xlabel("score gap (strong − target)")
    ax.set_ylabel("candidates (last judgement)")
    ax.set_title(f"Score gaps; threshold ±{threshold:g}")
    return _png(fig)


def billed_tokens(numbers: dict) -> int:
    return Usage.from_dict(numbers).billed


def calls_per_stage(by_stage: dict) -> str:
    plt = _figure()
    stages = list(by_stage)
    requests = [sum(m["requests"] for m in by_stage[s]["models"].values()) for s in stages]
    hits = [sum(m["cache_hits"] for m in by_stage[s]["models"].values()) for s in stages]
    tokens = [sum(billed_tokens(m) for m in by_stage[s]["models"].values())
              for s in stages]
    tokens_before = [sum(billed_tokens(paid_before(m)) for m in by_stage[s]["models"].values())
                     for s in stages]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.bar(stages, requests, label="requests sent")
    left.bar(stages, hits, bottom=requests, label="cache hits")
    left.set_title("Model calls per stage")
    _counts_axis(left, max([r + h for r, h in zip(requests, hits)], default=0))
    _legend_outside(left, below=True)
    right.bar(stages, tokens, color="#55a868", label="paid now")
    right.bar(stages, tokens_before, bottom=tokens, color="#b3d9bd",
              label="paid before (cached answers)")
    right.set_title("Tokens per stage (prompt + visible output + thoughts)")
    _counts_axis(right, max([t + b for t, b in zip(tokens, tokens_before)], default=0))
    _legend_outside(right, below=True)
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=45)
    return _png(fig)


def wtl_bars(summary: dict) -> str:
    plt = _figure()
    rows = [(row["candidate_model"], bench, row["benchmarks"][bench])
            for row in summary["candidates"] for bench in summary["benchmarks"]]
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(3, len(rows)) + 1))
    labels = [f"{bench} · {_short(model)}" for model, bench, _ in rows]
    left = [0.0] * len(rows)
    for outcome, color in (("win", "#55a868"), ("tie", "#ccb974"), ("loss", "#c44e52"),
                           ("failed", "#8c8c8c")):
        values = [100 * c[outcome] / c["total"] if c["total"] else 0 for _, _, c in rows]
        ax.barh(labels, values, left=left, color=color, label=outcome)
        left = [a + b for a, b in zip(left, values)]
    for y, (_, _, c) in enumerate(rows):
        if c["crr"] is not None:
            ax.text(101, y, f"CRR {c['crr']:.1f}%", va="center")
    ax.set_xlim(0, 118)
    ax.invert_yaxis()
    ax.set_xlabel("% of items (candidate vs reference)")
    ax.set_title("Wins / ties / losses and CRR")
    _legend_outside(ax)
    return _png(fig)


def estimated_cost(by_stage: dict, prices: dict, modes: dict
                   ) -> tuple[list[list[Any]], list[list[Any]], dict]:
    """The calls table's rows, the tokens-and-cost table's rows, and the run's cost
    (`pricing.run_cost`). Two tables of eight columns each stay readable at 1280 px,
    where one of fifteen broke headers and figures mid-word."""
    cost = run_cost(by_stage, modes, prices)
    calls, tokens = [], []
    for row in cost["rows"]:
        m = by_stage[row["stage"]]["models"][row["model"]]
        before = paid_before(m)
        calls.append([row["stage"], row["model"].split("~")[0], row["mode"], m["requests"],
                      m["cache_hits"], m["retries"], m["failures"], m.get("truncated", 0)])
        tokens.append([row["stage"], m["prompt_tokens"], m.get("cached_prompt_tokens", 0),
                       m["completion_tokens"], m.get("thoughts_tokens", 0),
                       dollars(row["usd"], 4), billed_tokens(before),
                       dollars(row["usd_before"], 4)])
    return calls, tokens, cost


def run_tailoring(run_dir: str) -> dict[str, Any]:
    """The tailoring figure of a generate run's outputs (it goes into the manifest)."""
    return tailoring(read_jsonl_dir(FileSystems.join(run_dir, "seed_metadata")),
                     read_jsonl_dir(FileSystems.join(run_dir, "examples")))




def dollars(usd: Optional[float], places: int = 2) -> str:
    return "unknown" if usd is None else f"${usd:,.{places}f}"
