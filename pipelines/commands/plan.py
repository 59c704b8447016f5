"""`codeclm-beam plan PILOT_RUN`: what a large run will cost, before paying for it.

A small pilot run with the models you mean to use measures what the method leaves open:
the share of candidates kept in each round, the tokens per call of each stage and the
re-asks per call. The plan scales those to `--num_examples` through the method's call
budget (the same rule `generate` follows: each round improves no more candidates than
are still needed), and prices the result with the report's price table.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any
from typing import Optional


from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.outputs import read_json
from codeclm_beam.pipelines.run.commit import read_committed
from codeclm_beam.model.config import parse_vertex_modes
from codeclm_beam.pricing import ASSUMED_DEFAULT_EPOCHS
from codeclm_beam.pricing import PAID_MODES_PREFIX
from codeclm_beam.pricing import PRICE_FACTOR
from codeclm_beam.pricing import cost_usd
from codeclm_beam.pricing import merged_prices
from codeclm_beam.pricing import mode_factor
from codeclm_beam.pricing import price_of
from codeclm_beam.metrics import TOKEN_KINDS
from codeclm_beam.metrics import paid_in_all
from codeclm_beam.model.types import Usage
from codeclm_beam.transforms.codeclm import default_pool_size
from codeclm_beam.transforms.method import IMPROVED
from codeclm_beam.transforms.method import JUDGED
from codeclm_beam.transforms.method import METHOD
from codeclm_beam.transforms.method import POOL_ENTRY
from codeclm_beam.transforms.method import SEED
from codeclm_beam.transforms.method import calls_per
from codeclm_beam.transforms.method import ModelStage
from codeclm_beam.transforms.method import projected_elements
from codeclm_beam.transforms.method import roles
from codeclm_beam.transforms.method import simulate_rounds
from codeclm_beam.transforms.decode import instructions_per_entry
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.options import COUNT
from codeclm_beam.options import POSITIVE
from codeclm_beam.options import RETRIES

# Stages that wait for the one before (each is a wave of batch jobs in batch mode):
# encode, rubrics, decode; then per round the answers (strong and target side by
# side) and the judge, after an improve from the second round on.
FIXED_WAVES, FIRST_ROUND_WAVES, LATER_ROUND_WAVES = 3, 2, 3
# Hours one wave of batch prediction jobs takes: Vertex AI documents no lower bound
# (half an hour is our assumption for queueing and start-up of a job) and cancels work
# not done 24 h after a job starts.
BATCH_WAVE_HOURS = (0.5, 24.0)
# One decode call writes all of an entry's instructions; past this many, long JSON
# answers start to fail or repeat themselves, so the plan says to grow the pool instead.
MAX_SENSIBLE_PER_ENTRY = 20
# Fewer candidates than this in the pilot's first round make its acceptance a guess.
MIN_PILOT_CANDIDATES = 30


@dataclasses.dataclass(frozen=True)
class Pilot:
    """What a finished generate run measured."""
    accept_by_round: tuple[float, ...]   # kept / candidates, per round
    seeds: int
    num_metadata: int
    basic_instructions: int
    max_iterations: int
    keep_unresolved: bool
    by_stage: dict  # manifest["model_calls"]["by_stage"]
    # The pilot's --vertex_mode, as written: the planned run's unless plan is told.
    vertex_mode: str = "online"
    # The pilot left --num_metadata to generate's rule (default_pool_size): a planned
    # run does too, at its own size.
    pool_by_rule: bool = False

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Pilot":
        cand = manifest["accounting"]["candidates"]
        options = manifest["options"]
        rates, last = [], None
        for r in cand["rounds"]:
            if r["candidates"]:
                last = r["kept"] / r["candidates"]
            # A round the pilot never reached takes the rate of the last round it did.
            rates.append(last)
        if not rates or rates[0] is None:
            raise ValueError("the pilot run judged no candidate; run it on more seeds")
        seeds = manifest["accounting"]["seeds"]
        return cls(tuple(rates), int(seeds.get("seeds", seeds.get("encoded", 0))),
                   int(manifest["accounting"]["metadata_pool"]["entries"]),
                   int(cand["basic_instructions"]), int(options["max_iterations"]),
                   bool(options.get("keep_unresolved")),
                   manifest["model_calls"]["by_stage"],
                   options.get("vertex_mode") or "online",
                   "num_metadata" in options and options["num_metadata"] is None)


def basic_instructions_needed(accept: tuple[float, ...], wanted: int, margin: int,
                              keep_unresolved: bool) -> Optional[int]:
    """The fewest basic instructions whose expected pairs reach `wanted` (within half a
    pair), or None when no number does."""
    def enough(basic: int) -> bool:
        return simulate_rounds(accept, basic, wanted, margin, keep_unresolved).pairs \
            >= wanted - 0.5
    # Every basic instruction judged in one round at least: past `high` nothing changes.
    high = math.ceil(wanted / max(min(accept), 1e-9)) + wanted if any(accept) else \
        wanted + margin
    if not enough(high):
        return None
    low = 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle + 1, high)
    return low


def _rounded(cost: Optional[float]) -> Optional[float]:
    return None if cost is None else round(cost, 2)


def project_stages(by_stage: dict, elements: dict[str, float],
                   completion_scale: dict[str, float], prices: dict,
                   modes: Optional[dict[str, str]] = None,
                   method: tuple[ModelStage, ...] = METHOD
                   ) -> tuple[list[dict], dict[str, dict]]:
    """Requests, tokens and cost per stage and model at the planned element counts,
    at the pilot's requests per element and tokens per request; each stage priced in
    the mode of the role that calls it (`modes`: role -> vertex mode)."""
    stages, per_model = [], {}
    role_of = roles(method)
    for stage, n in elements.items():
        role = role_of[stage]
        for metered, counted in by_stage.get(stage, {}).get("models", {}).items():
            # The pilot's counters carry its mode (`ModelConfig.metered_id`); the plan
            # prices the model in the mode planned for the role.
            model = metered.split("~")[0]
            mode = ((modes or {}).get(role, "online")
                    if model.startswith(PAID_MODES_PREFIX) else "online")
            # What the pilot's answers cost, including those a re-run read from the
            # cache (paid for by the run that asked): a cached re-run projects the same.
            measured = paid_in_all(counted)
            done = counted["elements"] or 1
            requests = n * measured["requests"] / done  # re-asks and retries included
            per_request = max(measured["requests"], 1)
            # Output (visible and thought tokens) grows with what a call must write.
            scale = completion_scale.get(stage, 1.0)
            tokens = {kind: requests * measured.get(kind, 0) / per_request
                      * (scale if kind in ("completion_tokens", "thoughts_tokens") else 1)
                      for kind in TOKEN_KINDS}
            by_mode = {mode: cost_usd(tokens, price_of(model, prices),
                                      mode_factor(model, mode)) for mode in PRICE_FACTOR}
            stages.append({"stage": stage, "role": role, "model": model, "mode": mode,
                           "requests": round(requests),
                           **{kind: round(value) for kind, value in tokens.items()},
                           "cost_usd": _rounded(by_mode[mode]),
                           "cost_usd_by_mode": {mode: _rounded(cost)
                                                for mode, cost in by_mode.items()}})
            total = per_model.setdefault(model, {"requests": 0.0, "tokens": 0.0})
            total["requests"] += requests
            total["tokens"] += Usage.from_dict(tokens).quota_tokens(model.partition(":")[0])
    return stages, per_model


def plan(pilot: Pilot, num_examples: int, num_instructions: Optional[int] = None,
         num_seeds: Optional[int] = None, num_metadata: Optional[int] = None,
         prices: Optional[dict] = None, requests_per_minute: Optional[float] = None,
         tokens_per_minute: Optional[float] = None,
         overgenerate_margin: Optional[int] = None,
         vertex_mode: Optional[str] = None,
         method: tuple[ModelStage, ...] = METHOD) -> dict[str, Any]:
    prices = merged_prices(prices)
    modes = parse_vertex_modes(vertex_mode or pilot.vertex_mode)
    accept = pilot.accept_by_round[:pilot.max_iterations]
    warnings = []
    margin = overgenerate_margin or 0
    needed = basic_instructions_needed(accept, num_examples, margin, pilot.keep_unresolved)
    if num_instructions is None:
        num_instructions = num_examples if needed is None else needed
    seeds = pilot.seeds if num_seeds is None else num_seeds
    # The pool keeps every seed's own metadata: at most one entry a seed beyond the rule.
    entries = num_metadata or (max(default_pool_size(num_instructions), seeds)
                               if pilot.pool_by_rule else pilot.num_metadata)
    rounds = simulate_rounds(accept, num_instructions, num_examples, margin,
                             pilot.keep_unresolved)
    expected_pairs = rounds.pairs
    if expected_pairs < num_examples - 0.5:
        warnings.append(
            f"expected pairs ({expected_pairs:,.0f}) fall short of --num_examples; "
            + ("at the pilot's acceptance no number of basic instructions reaches it: "
               "change the models or --threshold"
               if needed is None else f"ask for --num_instructions {needed:,}"))
    pilot_count = instructions_per_entry(pilot.basic_instructions, pilot.num_metadata)
    planned_count = instructions_per_entry(num_instructions, entries)
    elements = projected_elements(rounds, seeds, entries, method)
    completion_scale = {"decode": planned_count / pilot_count if pilot_count else 1.0}
    if planned_count > MAX_SENSIBLE_PER_ENTRY:
        warnings.append(f"decode must write {planned_count:,} instructions per metadata "
                        f"entry in one call; raise --num_metadata to at least "
                        f"{math.ceil(num_instructions / MAX_SENSIBLE_PER_ENTRY):,}")
    if pilot.keep_unresolved and not any(accept):
        warnings.append("the pilot's judge separated none of its candidates: its pairs "
                        "were all kept by --keep_unresolved, not chosen by contrastive "
                        "filtering, and so would this run's be; use a stronger judge or "
                        "a lower --threshold before scaling up")
    if pilot.basic_instructions < MIN_PILOT_CANDIDATES:
        warnings.append(f"the pilot judged {pilot.basic_instructions} basic instructions; "
                        f"acceptance measured on fewer than {MIN_PILOT_CANDIDATES} is a "
                        "rough guess")

    stages, per_model = project_stages(pilot.by_stage, elements, completion_scale, prices,
                                       modes, method)
    costs = [s["cost_usd"] for s in stages]
    minutes = [0.0]
    for total in per_model.values():
        if requests_per_minute:
            minutes.append(total["requests"] / requests_per_minute)
        if tokens_per_minute:
            minutes.append(total["tokens"] / tokens_per_minute)
    fixed = seeds * calls_per(SEED, method) + entries * calls_per(POOL_ENTRY, method)
    per_judged, per_improved = calls_per(JUDGED, method), calls_per(IMPROVED, method)
    quota_hours = (round(max(minutes) / 60, 2)
                   if requests_per_minute or tokens_per_minute else None)
    return {
        "num_examples": num_examples,
        "num_instructions": num_instructions,
        "overgenerate_margin": margin,
        "expected_pairs": round(expected_pairs),
        "pilot_accept_by_round": [round(rate, 4) for rate in accept],
        "candidates_by_round": [round(n) for n in rounds.judged],
        "improved_by_round": [round(n) for n in rounds.improved],
        "calls_bounds": {
            # Every candidate of round 1 kept, and every candidate run through all rounds.
            "all_kept_in_round_1": fixed + per_judged * min(num_instructions,
                                                            num_examples + margin),
            "all_rounds_for_every_candidate": fixed + num_instructions * (
                per_judged + (per_judged + per_improved) * (pilot.max_iterations - 1)),
        },
        "stages": stages,
        "total_requests": sum(s["requests"] for s in stages),
        "total_tokens": sum(Usage.from_dict(s).billed for s in stages),
        "total_thoughts_tokens": sum(s["thoughts_tokens"] for s in stages),
        "vertex_mode": modes,
        "cost_usd": None if None in costs else round(sum(costs), 2),
        "cost_usd_by_role": {role: _total([s["cost_usd"] for s in stages
                                           if s["role"] == role])
                             for role in dict.fromkeys(s["role"] for s in stages)},
        # vertex: models served online, with Flex PayGo, or by batch prediction jobs.
        "cost_usd_by_mode": {mode: _total([s["cost_usd_by_mode"][mode] for s in stages])
                             for mode in PRICE_FACTOR},
        "quota_bound_hours": quota_hours,
        "wall_hours_by_mode": wall_hours_by_mode(quota_hours, rounds.judged),
        "warnings": warnings,
    }


def batch_waves(judged_by_round) -> int:
    """Waves of batch jobs one after the other: the fixed stages, then each round
    that has candidates."""
    rounds = sum(1 for n in judged_by_round if n >= 0.5)
    return FIXED_WAVES + (FIRST_ROUND_WAVES + LATER_ROUND_WAVES * (rounds - 1)
                          if rounds else 0)


def wall_hours_by_mode(quota_hours: Optional[float], judged_by_round) -> dict:
    """The wall time to expect in each mode, as [least, most] hours (None: unknown).
    Online and flex are bound by the quota (flex may be slower: its requests wait for
    shared capacity, up to 30 minutes each); batch by its waves of jobs."""
    waves = batch_waves(judged_by_round)
    low, high = BATCH_WAVE_HOURS
    return {"online": [quota_hours, quota_hours], "flex": [quota_hours, None],
            "batch": [round(waves * low, 1), round(waves * high, 1)],
            "batch_waves": waves}


def _total(costs: list[Optional[float]]) -> Optional[float]:
    return None if None in costs else round(sum(costs), 2)


def render(result: dict) -> str:
    lines = [
        f"plan for {result['num_examples']:,} kept pairs: ask for "
        f"--num_instructions {result['num_instructions']:,} --overgenerate_margin "
        f"{result['overgenerate_margin']:,} "
        f"(expected pairs {result['expected_pairs']:,})",
        f"  pilot acceptance by round: {result['pilot_accept_by_round']}",
        f"  candidates by round: {result['candidates_by_round']}",
        f"  {'stage':<14}{'model':<34}{'mode':<8}{'requests':>14}{'prompt tok':>16}"
        f"{'visible out':>16}{'thoughts':>16}{'USD':>12}",
    ]
    for s in result["stages"]:
        cost = "unknown" if s["cost_usd"] is None else f"{s['cost_usd']:,.2f}"
        lines.append(f"  {s['stage']:<14}{s['model'][:33]:<34}{s['mode']:<8}"
                     f"{s['requests']:>14,}"
                     f"{s['prompt_tokens']:>16,}{s['completion_tokens']:>16,}"
                     f"{s['thoughts_tokens']:>16,}{cost:>12}")
    bounds = result["calls_bounds"]
    cost = "unknown" if result["cost_usd"] is None else f"${result['cost_usd']:,.2f}"
    lines += [
        f"  total: {result['total_requests']:,} requests, {result['total_tokens']:,} "
        f"tokens (of which {result['total_thoughts_tokens']:,} thoughts, priced as "
        f"output), {cost}",
        f"  budget formula bounds (first attempts): {bounds['all_kept_in_round_1']:,} "
        "calls (all kept in "
        f"round 1) to {bounds['all_rounds_for_every_candidate']:,} (every candidate "
        "through every round)",
    ]
    by_mode = result["cost_usd_by_mode"]
    lines.append("  every vertex: model served " + " | ".join(
        f"{mode} {'unknown' if cost is None else f'${cost:,.2f}'}"
        for mode, cost in by_mode.items())
        + " (flex: Flex PayGo on the global endpoint, for the models that offer it;"
          " batch: batch prediction jobs)")
    wall = result["wall_hours_by_mode"]
    online = (f"{result['quota_bound_hours']:,} h (quota-bound)"
              if result["quota_bound_hours"] is not None
              else "bound by your quota (pass --max_requests_per_minute)")
    low, high = wall["batch"]
    lines.append(f"  wall time: online {online} | flex at least as long, slower when "
                 f"shared capacity is busy | batch {low:,}-{high:,} h ({wall['batch_waves']}"
                 f" waves of jobs, one after the other, each {BATCH_WAVE_HOURS[0]}-"
                 f"{BATCH_WAVE_HOURS[1]:.0f} h: queueing varies)")
    lines += [f"  warning: {warning}" for warning in result["warnings"]]
    return "\n".join(lines)


def plan_command(argv: list[str]) -> int:
    parser = SuggestingParser(
        prog="codeclm-beam plan",
        description="Project calls, tokens, cost and quota-bound wall time of a large "
                    "generate run from a small pilot run with the same models.")
    parser.add_argument("pilot_run", help="output_dir of a finished generate run")
    parser.add_argument("--num_examples", type=COUNT, required=True)
    parser.add_argument("--num_instructions", type=COUNT, default=None,
                        help="Default: enough for --num_examples at the pilot's "
                             "acceptance.")
    parser.add_argument("--num_seeds", type=COUNT, default=None,
                        help="Seeds of the large run (default: the pilot's).")
    parser.add_argument("--num_metadata", type=COUNT, default=None,
                        help="Pool size of the large run (default: the pilot's).")
    parser.add_argument("--overgenerate_margin", type=RETRIES, default=None,
                        help="Of the large run (default 0, as generate's).")
    parser.add_argument("--max_requests_per_minute", type=POSITIVE, default=None)
    parser.add_argument("--max_tokens_per_minute", type=POSITIVE, default=None)
    parser.add_argument("--vertex_mode", default=None,
                        help="How each role's vertex: model is served in the large run, "
                             "as generate takes it (batch, or judge=batch,strong=online); "
                             "default: the pilot's.")
    parser.add_argument("--prices", default=None,
                        help='JSON file: {"MODEL URI or prefix": {"input": USD per 1M '
                             'tokens, "cached_input": ..., "output": ...}}')
    parser.add_argument("--tune_base_model", default=None,
                        help="vertex:MODEL: add what tuning it on the pairs would cost "
                             "(`codeclm-beam tune`), at the pilot's tokens per pair.")
    parser.add_argument("--tune_epochs", type=COUNT, default=ASSUMED_DEFAULT_EPOCHS,
                        help="Epochs of that tuning job (default %(default)s, what `tune` "
                             "assumes when the service does not report its own choice).")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    args = parser.parse_args(argv)
    try:
        pilot_run = read_committed(args.pilot_run)
        pilot = Pilot.from_manifest(pilot_run.record)
    except (KeyError, TypeError) as missing:
        raise ConfigurationError(f"{args.pilot_run}/manifest.json lacks {missing}: not "
                                 "a manifest this version can plan from") from None
    except ConfigurationError:
        raise
    except ValueError as unusable:
        raise ConfigurationError(f"{args.pilot_run}: {unusable}") from None
    result = plan(pilot, args.num_examples, args.num_instructions, args.num_seeds,
                  args.num_metadata, read_json(args.prices) if args.prices else None,
                  args.max_requests_per_minute, args.max_tokens_per_minute,
                  args.overgenerate_margin, args.vertex_mode)
    text = render(result)
    if args.tune_base_model:
        result["tuning"] = tuning_projection(
            pilot_run.folder, args.num_examples, args.tune_base_model, args.tune_epochs,
            read_json(args.prices) if args.prices else None)
        text += "\n" + render_tuning(result["tuning"])
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def tuning_projection(pilot_run: str, num_examples: int, base_model: str, epochs: int,
                      prices: Optional[dict] = None) -> dict[str, Any]:
    """A supervised tuning job on `num_examples` pairs like the pilot's kept pairs:
    training tokens (estimated as `tune` checks them) and cost at the tuning price."""
    from apache_beam.io.filesystems import FileSystems

    from codeclm_beam.pipelines.run.outputs import read_jsonl_dir
    from codeclm_beam.pricing import tuning_cost_usd
    from codeclm_beam.tuning import SUPERVISED
    from codeclm_beam.tuning import training_data
    pairs = read_jsonl_dir(FileSystems.join(pilot_run, "examples"))
    per_pair = (training_data(pairs, SUPERVISED).estimated_tokens / len(pairs)
                if pairs else 0.0)
    tokens = round(per_pair * num_examples)
    return {"base_model": base_model, "epochs": epochs, "pairs": num_examples,
            "tokens_per_pair": round(per_pair, 1), "training_tokens_per_epoch": tokens,
            "cost_usd": tuning_cost_usd(base_model, tokens, epochs, prices)}


def render_tuning(tuning: dict[str, Any]) -> str:
    cost = tuning["cost_usd"]
    return (f"  tuning {tuning['base_model']} on {tuning['pairs']:,} pairs: "
            f"{tuning['training_tokens_per_epoch']:,} training tokens an epoch "
            f"({tuning['tokens_per_pair']:,} a pair, estimated) x {tuning['epochs']} "
            f"epochs = {'unknown (no tuning price)' if cost is None else f'${cost:,.2f}'}")
