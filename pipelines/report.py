"""`codeclm-beam report RUN_DIR`: one self-contained `report.html` (plots embedded as
PNG data) for a `generate` or `evaluate` run, the tailoring figure, and for generate
runs a dataset card (`README.md`, Hugging Face layout) beside the data."""
from __future__ import annotations

import base64
import collections
import html
import io
import json
import math
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.metrics import paid_before
from codeclm_beam.model.types import Usage
from codeclm_beam.pipelines.manifest import judge_note
from codeclm_beam.pricing import run_cost
from codeclm_beam.pricing import merged_prices
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.outputs import OutputDirectory
from codeclm_beam.pipelines.outputs import read_json
from codeclm_beam.pipelines.outputs import read_jsonl_dir
from codeclm_beam.pipelines.outputs import read_run_record
from codeclm_beam.pipelines.args import SuggestingParser
from codeclm_beam.transforms.evaluate import FAILED

CITATION = """@inproceedings{wang2024codeclm,
  title={CodecLM: Aligning Language Models with Tailored Synthetic Data},
  author={Wang, Zifeng and Li, Chun-Liang and Perot, Vincent and Le, Long T. and Miao, Jin
          and Zhang, Zizhao and Lee, Chen-Yu and Pfister, Tomas},
  booktitle={Findings of the Association for Computational Linguistics: NAACL 2024},
  year={2024}
}"""


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
    ax.set_ylabel("kept pairs")
    ax.set_xticks(rounds)
    ax.set_title("Kept pairs per iteration and answer source")
    _legend_outside(ax)
    return _png(fig)


def gap_histogram(gaps: list[float], threshold: float, scale: int) -> str:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = [x / 2 - 0.25 for x in range(-2 * scale, 2 * scale + 2)]
    ax.hist(gaps, bins=bins, color="#4c72b0")
    for x in (threshold, -threshold):
        ax.axvline(x, color="#c44e52", linestyle="--")
    ax.set_xlabel("score gap (strong − target)")
    ax.set_ylabel("candidates (last judgement)")
    ax.set_title(f"Score gaps; threshold ±{threshold:g}")
    return _png(fig)


def _billed_tokens(numbers: dict) -> int:
    return Usage.from_dict(numbers).billed


def calls_per_stage(by_stage: dict) -> str:
    plt = _figure()
    stages = list(by_stage)
    requests = [sum(m["requests"] for m in by_stage[s]["models"].values()) for s in stages]
    hits = [sum(m["cache_hits"] for m in by_stage[s]["models"].values()) for s in stages]
    tokens = [sum(_billed_tokens(m) for m in by_stage[s]["models"].values())
              for s in stages]
    tokens_before = [sum(_billed_tokens(paid_before(m)) for m in by_stage[s]["models"].values())
                     for s in stages]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.bar(stages, requests, label="requests sent")
    left.bar(stages, hits, bottom=requests, label="cache hits")
    left.set_title("Model calls per stage")
    _legend_outside(left, below=True)
    right.bar(stages, tokens, color="#55a868", label="paid now")
    right.bar(stages, tokens_before, bottom=tokens, color="#b3d9bd",
              label="paid before (cached answers)")
    right.set_title("Tokens per stage (prompt + visible output + thoughts)")
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


# ---- pages ------------------------------------------------------------------------

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{overflow-wrap:normal}td.n{text-align:right;white-space:nowrap;overflow-wrap:normal}
td.w{overflow-wrap:normal;white-space:nowrap}img{max-width:100%;display:block;margin:1em 0}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}.muted{color:#666}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}.card{flex:1 1 300px;border:1px solid #ccc;
border-radius:6px;padding:.6em 1em}.card h2{margin:.2em 0 .4em;font-size:1.1em}.card .big{font-size:1.6em;
font-weight:600}.card ul{margin:.3em 0;padding-left:1.2em}.bad{color:#a40000}.good{color:#1a6e1a}"""

# The page reports on itself for headless checks: how many plots decoded, and any
# script error, as attributes on <body>.
_SELF_CHECK = """<script>
window.addEventListener('error', e => { document.body.dataset.errors =
  (document.body.dataset.errors || '') + e.message + ';'; });
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img.plot')];
  document.body.dataset.plots = imgs.length;
  document.body.dataset.plotsDecoded = imgs.filter(i => i.naturalWidth > 0).length;
});
</script>"""


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    # Figures never break mid-number ("$0.00 00"); text (model URIs) may break anywhere.
    figure = isinstance(value, (int, float)) or str(value).startswith("$")
    text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) \
        else str(value)
    if figure:
        return f"<td class='n'>{html.escape(text)}</td>"
    # A short name (a stage, a benchmark) stays whole; a long one (a URI) may break.
    whole = len(text) <= 24 and " " not in text
    return f"<td class='w'>{html.escape(text)}</td>" if whole else f"<td>{html.escape(text)}</td>"


def _page(title: str, sections: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"{_SELF_CHECK}<h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")


def _img(src: str, alt: str) -> str:
    return f"<img class='plot' alt='{html.escape(alt)}' src='{src}'>"


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
        calls.append([row["stage"], row["model"], row["mode"], m["requests"],
                      m["cache_hits"], m["retries"], m["failures"], m.get("truncated", 0)])
        tokens.append([row["stage"], m["prompt_tokens"], m.get("cached_prompt_tokens", 0),
                       m["completion_tokens"], m.get("thoughts_tokens", 0),
                       _dollars(row["usd"], 4), _billed_tokens(before),
                       _dollars(row["usd_before"], 4)])
    return calls, tokens, cost


CALL_COLUMNS = ["stage", "model", "billed as", "requests sent", "cache hits", "retries",
                "failures", "truncated"]
TOKEN_COLUMNS = ["stage", "prompt tokens", "of which cached", "visible output tokens",
                 "thought tokens", "cost paid now", "tokens paid before (cached)",
                 "cost paid before"]


def _dollars(usd: Optional[float], places: int = 2) -> str:
    return "unknown" if usd is None else f"${usd:,.{places}f}"


def _pairs(rows: list[dict], fields: list[str], limit: int = 5) -> str:
    picked = sorted(rows, key=lambda r: r.get("example_id") or r.get("candidate_id"))[:limit]
    return "".join(
        "<pre>" + html.escape("\n".join(f"{f}: {str(r.get(f))[:1200]}" for f in fields))
        + "</pre>" for r in picked) or "<p class='muted'>none</p>"


def run_tailoring(run_dir: str) -> dict[str, Any]:
    """The tailoring figure of a generate run's outputs (it goes into the manifest)."""
    return tailoring(read_jsonl_dir(FileSystems.join(run_dir, "seed_metadata")),
                     read_jsonl_dir(FileSystems.join(run_dir, "examples")))


def _cards(cards: list[tuple[str, str, list[str]]]) -> str:
    """The first screen: a few cards, each a headline figure and its lines (HTML)."""
    return "<div class='cards'>" + "".join(
        f"<div class='card'><h2>{html.escape(title)}</h2><div class='big'>{big}</div>"
        f"<ul>{''.join(f'<li>{line}</li>' for line in lines)}</ul></div>"
        for title, big, lines in cards) + "</div>"


def generate_summary(manifest: dict, rejected: int, dead_letters: list[dict],
                     costs: dict) -> str:
    """What did I get, what did it cost, what failed: before any detail."""
    acc, delivery = manifest["accounting"], manifest["delivery"]
    cand = acc["candidates"]
    totals = manifest["model_calls"]["totals"]
    kept_by_rule = cand["kept"]
    got = [f"{kept_by_rule:,} kept by the gap rule"
           + (f", {cand['unresolved_after_last_round']:,} unresolved kept anyway "
              "(--keep_unresolved)" if manifest["options"].get("keep_unresolved") else ""),
           f"{rejected:,} candidates in <code>rejected/</code>, each with its reason",
           f"from {acc['metadata_pool']['entries']:,} pool entries and "
           f"{cand['basic_instructions']:,} basic instructions"]
    if "gap" in delivery:
        got.append(f"<span class='bad'>{delivery['gap']:,} short: "
                   f"{html.escape(delivery['reason'])}</span>")
    note = judge_note(acc, float(manifest["options"].get("threshold") or 3))
    if note:
        got.insert(0, f"<span class='bad'>{html.escape(note[:1].upper() + note[1:])}</span>")
    cost, before = costs["usd"], paid_before(totals)
    paid = [f"{totals.get('requests', 0):,} model requests, "
            f"{_billed_tokens(totals):,} tokens "
            f"({totals.get('thoughts_tokens', 0):,} of them thoughts)"]
    if totals.get("cache_hits"):
        paid.append(f"paid before: {_dollars(costs['usd_before'])} for "
                    f"{totals['cache_hits']:,} answers read from the cache "
                    f"({before['requests']:,} requests, {_billed_tokens(before):,} "
                    "tokens, paid by the run that asked)")
    paid += [f"wall time {manifest['wall_time_seconds']:,} s",
             "<span class='muted'>" + ("no per-token price for these models"
                                       if cost == 0 and not costs["usd_before"]
                                       else "prices are estimates; see the table below")
             + "</span>"]
    by_reason: dict[tuple[str, str], int] = {}
    for letter in dead_letters:
        key = (letter.get("stage", "?"), letter.get("reason", "error"))
        by_reason[key] = by_reason.get(key, 0) + 1
    failed = [f"{count:,} at {html.escape(stage)}: {html.escape(reason)}"
              for (stage, reason), count in sorted(by_reason.items())] or [
        "<span class='good'>no dead letters</span>"]
    failed.append(f"{totals.get('truncated', 0):,} answers cut at the output limit, "
                  f"{totals.get('retries', 0):,} retries")
    failed.append("<span class='good'>every element accounted for</span>" if acc["balanced"]
                  else "<span class='bad'>the accounting does not balance: see "
                       "manifest.json checks</span>")
    return _cards([
        ("What you got", f"{delivery['delivered']:,} of {delivery['asked']:,} pairs", got),
        ("What it cost", f"{_dollars(cost)} paid now", paid),
        ("What failed", f"{len(dead_letters):,} dead letters", failed)])


def generate_report(run_dir: str, manifest: dict, prices: dict) -> dict[str, str]:
    """report.html and the dataset card of a generate run: rendered, not written."""
    examples = read_jsonl_dir(FileSystems.join(run_dir, "examples"))
    rejected = read_jsonl_dir(FileSystems.join(run_dir, "rejected"))
    seed_metadata = read_jsonl_dir(FileSystems.join(run_dir, "seed_metadata"))
    pool = read_jsonl_dir(FileSystems.join(run_dir, "metadata_pool"))
    options = manifest["options"]
    tailor = manifest["tailoring"]

    by_stage = manifest["model_calls"]["by_stage"]
    call_rows, token_rows, run_costs = estimated_cost(by_stage, prices,
                                                      manifest.get("billing", {}))
    cost = run_costs["usd"]
    acc = manifest["accounting"]
    gaps = [r["gap"] for r in examples + rejected if r.get("gap") is not None]
    dead_letters = read_jsonl_dir(FileSystems.join(run_dir, "dead_letter"))
    sections = [
        generate_summary(manifest, len(rejected), dead_letters, run_costs),
        f"<p>Models: strong <b>{html.escape(manifest['models']['strong'])}</b>, target "
        f"<b>{html.escape(manifest['models']['target'])}</b>, judge "
        f"<b>{html.escape(manifest['models']['judge'])}</b>. Wall time "
        f"{manifest['wall_time_seconds']} s. Accounting balanced: {acc['balanced']}.</p>",
        (f"<p>To close the gap: <code>"
         f"{html.escape(manifest['delivery']['to_close_the_gap'])}</code></p>"
         if "gap" in manifest["delivery"] else ""),
        "<h2>Tailoring</h2>",
        _table([[k, v] for k, v in tailor.items() if k != "note"], ["figure", "value"]),
        f"<p class='muted'>{html.escape(tailor['note'])}</p>",
        _img(compare_distributions("Use cases: seeds, pool, kept examples", {
            "seeds": [m["use_case"] for m in seed_metadata],
            "pool": [m["use_case"] for m in pool],
            "kept": [e["use_case"] for e in examples]}, 15), "use case distributions"),
        _img(compare_distributions("Skills: seeds, pool, kept examples", {
            "seeds": [s for m in seed_metadata for s in m["skills"]],
            "pool": [s for m in pool for s in m["skills"]],
            "kept": [s for e in examples for s in e["skills"]]}, 20), "skill distributions"),
        "<h2>Filtering</h2>",
        _img(kept_by_iteration(examples, int(options.get("max_iterations") or 4)),
             "kept pairs per iteration"),
        _img(gap_histogram(gaps, float(options.get("threshold") or 3),
                           int(options.get("score_scale") or 10)), "score gaps"),
        _table([[r["round"], r["candidates"], r.get("fresh", 0), r["kept"], r["undecided"],
                 r["not_needed"]] for r in acc["candidates"]["rounds"]],
               ["round", "candidates", "of them fresh from the reserve", "kept",
                "within threshold", "not needed"]),
        "<h2>Calls, tokens and cost</h2>",
        _img(calls_per_stage(by_stage), "calls and tokens per stage"),
        _table(call_rows, CALL_COLUMNS),
        _table(token_rows, TOKEN_COLUMNS),
        "<p class='muted'>Thought tokens are billed as output; cached prompt tokens at "
        "the cached-input rate.</p>",
        f"<p>Estimated cost paid now: <b>{'unknown (no price for a model)' if cost is None else f'${cost:,.2f}'}"
        f"</b>; paid before, for the answers read from the cache: "
        f"<b>{_dollars(run_costs['usd_before'])}</b> "
        "(prices are estimates; override with <code>--prices</code>). The same "
        "calls with every vertex: model served "
        + ", ".join(f"{mode}: {'unknown' if usd is None else f'${usd:,.2f}'}"
                    for mode, usd in run_costs["by_mode"].items())
        + " (flex and batch prediction bill at half the online price).</p>",
        "<h2>Sample of kept pairs</h2>",
        _pairs(examples, ["instruction", "response", "response_source", "iteration",
                          "use_case", "skills", "gap"]),
        "<h2>Sample of rejected candidates</h2>",
        _pairs(rejected, ["instruction", "reason", "iteration", "strong_score",
                          "target_score", "gap"]),
    ]
    return {"report.html": _page("codeclm-beam generate report", sections),
            "README.md": dataset_card(manifest, len(examples))}


def markdown_table(summary: dict) -> str:
    """Rows = candidates, columns = benchmarks: CRR % with W/T/L/F, as in the paper
    (plus F), headed by who judged and which part of each benchmark was used."""
    benches = summary["benchmarks"]
    lines = [f"Judge: {summary['models']['judge']} ({summary['judge_independence']})", ""]
    lines += [f"- {bench}: {summary['splits'].get(bench, 'unknown')}" for bench in benches]
    lines += ["", "| candidate | " + " | ".join(benches) + " | overall |",
              "| --- |" + " --- |" * (len(benches) + 1)]
    for row in summary["candidates"]:
        cells = [row["benchmarks"][b] for b in benches] + [row["overall"]]
        lines.append(f"| {row['candidate_model']} | " + " | ".join(
            (f"{c['crr']:.2f}" if c["crr"] is not None else "n/a")
            + f" ({c['win']}/{c['tie']}/{c['loss']}/{c[FAILED]})" for c in cells) + " |")
    if summary["differences"]:
        lines += ["", "| benchmark | from | to | ΔCRR | 95% CI |", "| --- | --- | --- | --- | --- |"]
        for d in summary["differences"]:
            lines.append(f"| {d['benchmark']} | {d['from']} | {d['to']} | "
                         f"{d['difference']:+.2f} | [{d['ci95_low']:+.2f}, "
                         f"{d['ci95_high']:+.2f}] |")
    lines += ["", "Cells: CRR % (wins/ties/losses/failed of the candidate against the "
              "reference; a win or loss needs the same verdict in both answer orders). "
              "CRR = (W + T) / (W + T + L): the denominator is the judged items; failed "
              "items (no answer or judgement could be had, see dead_letter/) are counted "
              "in F and left out of it."]
    return "\n".join(lines) + "\n"


def evaluate_report(summary: dict) -> dict[str, str]:
    rows = []
    for row in summary["candidates"]:
        for bench in summary["benchmarks"]:
            c = row["benchmarks"][bench]
            rows.append([row["candidate_model"], bench, c["win"], c["tie"], c["loss"],
                         c["failed"], c["crr"]])
    sections = [
        f"<p>Reference <b>{html.escape(summary['models']['reference'])}</b>, judge "
        f"<b>{html.escape(summary['models']['judge'])}</b> "
        f"(<b>{html.escape(summary['judge_independence'])}</b>).</p>",
        "<ul>" + "".join(f"<li>{html.escape(bench)}: {html.escape(split)}</li>"
                         for bench, split in summary["splits"].items()) + "</ul>",
        _img(wtl_bars(summary), "wins ties losses"),
        _table(rows, ["candidate", "benchmark", "wins", "ties", "losses", "failed",
                      "CRR %"]),
        "<p class='muted'>CRR = (wins + ties) / (wins + ties + losses); failed items "
        "(no answer or judgement could be had) are not in the denominator.</p>",
        "<h2>As in the paper</h2><pre>" + html.escape(markdown_table(summary)) + "</pre>",
    ]
    return {"report.html": _page("codeclm-beam evaluate report", sections)}


def dataset_card(manifest: dict, num_examples: int) -> str:
    options = manifest["options"]
    acc = manifest["accounting"]
    tailor = manifest.get("tailoring", {})
    size = ("n<1K" if num_examples < 1000 else "1K<n<10K" if num_examples < 10_000
            else "10K<n<100K" if num_examples < 100_000 else "100K<n<1M"
            if num_examples < 1_000_000 else "n>1M")
    return f"""---
pretty_name: CodecLM synthetic instructions ({manifest['run_id']})
language:
- en
license: other
task_categories:
- text-generation
tags:
- synthetic
- instruction-tuning
- codeclm
size_categories:
- {size}
configs:
- config_name: default
  data_files: examples/*.jsonl
---

# CodecLM synthetic instruction data

{num_examples} instruction–response pairs generated by codeclm-beam
{manifest['code_version']}, an implementation of
[CodecLM](https://arxiv.org/abs/2404.05875), tailored to the distribution of the seed
instructions.

## How it was made

- Strong model (codec, answers, rubrics, improvements): `{manifest['models']['strong']}`
- Target model: `{manifest['models']['target']}`
- Judge: `{manifest['models']['judge']}`
- Metadata pool: {acc['metadata_pool']['entries']} entries; {options.get('num_rubrics')}
  rubrics each; up to {options.get('max_iterations')} iterations; threshold
  {options.get('threshold')} on a {options.get('score_scale')}-point scale; seed
  {options.get('seed')}.
- Candidates: {acc['candidates']['basic_instructions']} basic instructions;
  {acc['candidates']['kept']} kept by the gap rule,
  {acc['candidates']['unresolved_after_last_round']} still within the threshold after
  the last round ({'kept anyway' if options.get('keep_unresolved') else 'rejected'}),
  {acc['candidates']['lost_to_dead_letters']} lost to errors (see `dead_letter/`).

## Tailoring

Jensen–Shannon divergence between the use cases of the seeds and of the kept examples:
{tailor.get('use_case_js_divergence')} bits (0 = identical). Share of the seeds' skills
found among the kept examples: {tailor.get('seed_skill_coverage')}.

## Fields

`instruction`, `response`, `response_source` (strong or target), `iteration`,
`use_case`, `skills`, `actions_applied`, `strong_score`, `target_score`, `gap`,
`strong_model`, `target_model`, `judge_model`.

## Limitations

Synthetic data inherits the strong model's errors, biases and blind spots, and the
judge's: an LLM judge prefers long and confident answers and can be wrong. The data is
tailored to the seed instructions; it is no better than they are at representing your
users. Check a sample by hand before training, and evaluate the tuned model on held-out
instructions (`codeclm-beam evaluate`). Respect the terms of use of the models that
produced it.

## Citation

```bibtex
{CITATION}
```
"""


_MIME = {"report.html": "text/html", "README.md": "text/markdown"}


def write_report(outputs: OutputDirectory, record: dict,
                 prices: Optional[dict] = None) -> str:
    """Renders a run's report (and a generate run's card) from its record and writes
    them through the run's OutputDirectory; returns the report's path."""
    if record["tool"] == "codeclm-beam generate":
        pages = generate_report(outputs.root, record, merged_prices(prices))
    else:
        pages = evaluate_report(record)
    for name, text in pages.items():
        outputs.write_text(name, text, _MIME[name])
    return outputs.path("report.html")


def report_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam report",
                                     description="Rewrite report.html (and a generate "
                                                 "run's dataset card) for a run "
                                                 "directory.")
    parser.add_argument("run_dir")
    parser.add_argument("--prices", default=None,
                        help='JSON file: {"MODEL URI or prefix": {"input": USD per 1M '
                             'tokens, "cached_input": ..., "output": ...}}')
    args = parser.parse_args(argv)
    prices = read_json(args.prices) if args.prices else None
    name, record = read_run_record(args.run_dir, ("manifest.json", "summary.json"))
    outputs = OutputDirectory(args.run_dir, "report", name, force=True)
    outputs.claim()  # no run writes into the folder meanwhile
    try:
        outputs.check()  # names the user's own files, which are not overwritten
        outputs.written = list(record.get("written_files") or [])
        try:
            report = write_report(outputs, record, prices)
        except (KeyError, TypeError) as missing:
            raise ConfigurationError(f"{args.run_dir}/{name} lacks {missing}: not a "
                                     "record this version can report on") from None
        if "tailoring" in record:
            record["tailoring"] = run_tailoring(args.run_dir)
        outputs.commit(record)
    finally:
        outputs.release()
    print(json.dumps({"report": report}, indent=2))
    return 0
