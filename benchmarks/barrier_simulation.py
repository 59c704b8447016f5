"""Quota use of a run whose stages wait for one another (arithmetic, not a
measurement): each stage's requests for the binding model sent at the quota's pace,
answers taking a lognormal time (median 3 s, p99 30 s, as the realistic step's
server draws them), the next stage starting at the slowest answer. Quota use is the
ideal (requests at the quota's pace) over the span. docs/scaling.md's table comes
from this.

    python benchmarks/barrier_simulation.py [--scales 1,2.5,10,30,100]
"""
from __future__ import annotations

import argparse
import math
import random
from statistics import NormalDist

MEDIAN_S, P99_S, RATE_PER_S = 3.0, 30.0, 25.0
SIGMA = math.log(P99_S / MEDIAN_S) / NormalDist().inv_cdf(0.99)
# The realistic step's stages, in strong-model requests: encode; rubrics and decode (one
# stage: they read the pool side by side);
# then each round's answers and judgements (3 a candidate) and the improvements
# before the next round (its manifest's rounds: 400, 674, 288 and 61 candidates).
STAGES = (100, 160, 1200, 274, 2022, 288, 864, 61, 183)


def span_s(stages, rng: random.Random) -> float:
    total = 0.0
    for size in stages:
        total += max(i / RATE_PER_S + MEDIAN_S * math.exp(SIGMA * rng.gauss(0, 1))
                     for i in range(max(1, round(size))))
    return total


def quota_use(scale: float, runs: int = 3, seed: int = 1) -> tuple[float, float, float]:
    """(ideal s, mean span s, quota use) of the stages scaled by `scale`."""
    rng = random.Random(seed)
    stages = [size * scale for size in STAGES]
    ideal = sum(stages) / RATE_PER_S
    span = sum(span_s(stages, rng) for _ in range(runs)) / runs
    return ideal, span, ideal / span


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="1,2.5,10,30,100")
    for scale in map(float, parser.parse_args().scales.split(",")):
        ideal, span, use = quota_use(scale)
        print(f"x{scale:g}: ideal {ideal:,.0f} s, span {span:,.0f} s, quota use {use:.3f}")


if __name__ == "__main__":
    main()
