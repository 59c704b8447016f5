"""A run's report: one self-contained `report.html` (plots embedded) for a `generate`
or `evaluate` run. A generate run's dataset card is `codeclm_beam/hf_dataset.py`'s."""
from __future__ import annotations

import html
import re
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.metrics import paid_before
from codeclm_beam.pipelines.run.manifest import judge_note
from codeclm_beam.pipelines.report.figures import billed_tokens
from codeclm_beam.pipelines.report.figures import calls_per_stage
from codeclm_beam.pipelines.report.figures import compare_distributions
from codeclm_beam.pipelines.report.figures import dollars
from codeclm_beam.pipelines.report.figures import estimated_cost
from codeclm_beam.pipelines.report.figures import gap_histogram
from codeclm_beam.pipelines.report.figures import kept_by_iteration
from codeclm_beam.pipelines.report.figures import wtl_bars
from codeclm_beam.pricing import merged_prices
from codeclm_beam.pipelines.run.commit import OutputFolder
from codeclm_beam.pipelines.run.outputs import read_jsonl_dir
from codeclm_beam.transforms.evaluate import FAILED




# ---- pages ------------------------------------------------------------------------

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{overflow-wrap:normal}td.n{text-align:right;white-space:nowrap;overflow-wrap:normal}
td.w{overflow-wrap:normal;white-space:nowrap}img{max-width:100%;display:block;margin:1em 0}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}code{white-space:nowrap}.muted{color:#666}
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


_FLAG = re.compile(r"--[a-z][a-z_]+")


def escaped(text: str) -> str:
    """Text as HTML, its command-line flags as code that never breaks at a hyphen."""
    return _FLAG.sub(lambda flag: f"<code>{flag.group()}</code>", html.escape(text))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{escaped(str(h))}</th>" for h in header)
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


CALL_COLUMNS = ["stage", "model", "billed as", "requests sent", "cache hits", "retries",
                "failures", "truncated"]
TOKEN_COLUMNS = ["stage", "prompt tokens", "of which cached", "visible output tokens",
                 "thought tokens", "cost paid now", "tokens paid before (cached)",
                 "cost paid before"]


def _pairs(rows: list[dict], fields: list[str], limit: int = 5) -> str:
    picked = sorted(rows, key=lambda r: r.get("example_id") or r.get("candidate_id"))[:limit]
    return "".join(
        "<pre>" + html.escape("\n".join(f"{f}: {str(r.get(f))[:1200]}" for f in fields))
        + "</pre>" for r in picked) or "<p class='muted'>none</p>"


def _cards(cards: list[tuple[str, str, list[str]]]) -> str:
    """The first screen: a few cards, each a headline figure and its lines (HTML)."""
    return "<div class='cards'>" + "".join(
        f"<div class='card'><h2>{html.escape(title)}</h2><div class='big'>{big}</div>"
        f"<ul>{''.join(f'<li>{line}</li>' for line in lines)}</ul></div>"
        for title, big, lines in cards) + "</div>"


def screening_line(acc: dict, screens: Optional[dict]) -> str:
    """Duplicates and contaminated instructions removed, and the calls that saved."""
    screening = acc.get("screening")
    if not screening or not screens:
        return "screens: not recorded by this run"
    parts = []
    for what, name in (("duplicates", "dedup"), ("contaminated", "decontamination")):
        if screens.get(name) is None:
            parts.append(f"{what}: not checked")
            continue
        counts = screening[what]
        parts.append(f"{counts['before_judging'] + counts['final_pairs']:,} {what} removed"
                     + (f" ({counts['final_pairs']:,} of them kept pairs)"
                        if counts["final_pairs"] else ""))
    return (", ".join(parts) + f"; {screening['calls_saved']:,} model calls saved by "
            "removing them before they were judged")


def counted(number: int, thing: str, things: Optional[str] = None) -> str:
    """'1 dead letter', '2 dead letters'."""
    return f"{number:,} {thing if number == 1 else things or thing + 's'}"


def generate_summary(manifest: dict, rejected: int, dead_letters: list[dict],
                     costs: dict) -> str:
    """What did I get, what did it cost, what failed: before any detail."""
    acc, delivery = manifest["accounting"], manifest["delivery"]
    cand = acc["candidates"]
    totals = manifest["model_calls"]["totals"]
    kept_by_rule = cand["kept"]
    got = [f"{kept_by_rule:,} kept by the gap rule"
           + (f", {cand['unresolved_after_last_round']:,} unresolved kept anyway "
              "(<code>--keep_unresolved</code>)"
              if manifest["options"].get("keep_unresolved") else "")
           + (f"; {cand['surplus']:,} of them cut as surplus beyond the "
              f"{delivery['asked']:,} asked" if cand.get("surplus") else ""),
           f"{rejected:,} candidates in <code>rejected/</code>, each with its reason",
           f"from {acc['metadata_pool']['entries']:,} pool entries and "
           f"{cand['basic_instructions']:,} basic instructions"]
    got.append(screening_line(acc, manifest.get("screens")))
    if "gap" in delivery:
        got.append(f"<span class='bad'>{delivery['gap']:,} short: "
                   f"{escaped(delivery['reason'])}</span>")
    note = judge_note(acc, float(manifest["options"].get("threshold") or 3))
    if note:
        got.insert(0, f"<span class='bad'>{escaped(note[:1].upper() + note[1:])}</span>")
    cost, before = costs["usd"], paid_before(totals)
    paid = [f"{totals.get('requests', 0):,} model requests, "
            f"{billed_tokens(totals):,} tokens "
            f"({totals.get('thoughts_tokens', 0):,} of them thoughts)"]
    if totals.get("cache_hits"):
        paid.append(f"paid before: {dollars(costs['usd_before'])} for "
                    f"{totals['cache_hits']:,} answers read from the cache "
                    f"({before['requests']:,} requests, {billed_tokens(before):,} "
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
    failed.append(f"{counted(totals.get('truncated', 0), 'answer')} cut at the output "
                  f"limit, {counted(totals.get('retries', 0), 'retry', 'retries')}")
    failed.append("<span class='good'>every element accounted for</span>" if acc["balanced"]
                  else "<span class='bad'>the accounting does not balance: see "
                       "manifest.json checks</span>")
    return _cards([
        ("What you got", f"{delivery['delivered']:,} of {delivery['asked']:,} pairs", got),
        ("What it cost", f"{dollars(cost)} paid now", paid),
        ("What failed", counted(len(dead_letters), "dead letter"), failed)])


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
    # Unresolved candidates are kept (--keep_unresolved) in the method's last round.
    last_round = acc["candidates"]["rounds"][-1]["round"] if acc["candidates"]["rounds"] \
        else 0
    kept_anyway = (acc["candidates"]["unresolved_after_last_round"]
                   if options.get("keep_unresolved") else 0)
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
        _table([[r["round"], r["candidates"], r.get("fresh", 0), r.get("duplicate", 0),
                 r.get("contaminated", 0), r["kept"], r["undecided"], r["not_needed"],
                 kept_anyway if r["round"] == last_round else 0]
                for r in acc["candidates"]["rounds"]],
               ["round", "candidates", "of them fresh from the reserve",
                "duplicates removed", "contaminated removed", "kept by the gap rule",
                "within threshold", "of them not needed",
                "kept anyway (--keep_unresolved)"]),
        "<h2>Calls, tokens and cost</h2>",
        _img(calls_per_stage(by_stage), "calls and tokens per stage"),
        _table(call_rows, CALL_COLUMNS),
        _table(token_rows, TOKEN_COLUMNS),
        "<p class='muted'>Thought tokens are billed as output; cached prompt tokens at "
        "the cached-input rate.</p>",
        f"<p>Estimated cost paid now: <b>{'unknown (no price for a model)' if cost is None else f'${cost:,.2f}'}"
        f"</b>; paid before, for the answers read from the cache: "
        f"<b>{dollars(run_costs['usd_before'])}</b> "
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
    return {"report.html": _page("codeclm-beam generate report", sections)}


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


_MIME = {"report.html": "text/html"}


def write_report(outputs: OutputFolder, record: dict,
                 prices: Optional[dict] = None) -> str:
    """Renders a run's report from its record and writes it into the run's folder;
    returns the report's path."""
    if record["tool"] == "codeclm-beam generate":
        pages = generate_report(outputs.run_dir, record, merged_prices(prices))
    else:
        pages = evaluate_report(record)
    for name, text in pages.items():
        outputs.write_text(name, text, _MIME[name])
    return outputs.path("report.html")


