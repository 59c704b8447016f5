"""Pipeline options: Beam `PipelineOptions` subclasses, so every runner flag
(`--runner`, `--project`, `--region`, `--temp_location`, ...) passes straight through.
"""
from __future__ import annotations

import argparse
import math
import uuid
from typing import Optional

from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.options.pipeline_options import WorkerOptions

from codeclm_beam.model.concurrency import ADAPTIVE
from codeclm_beam.model.concurrency import CONCURRENCY_MODES
from codeclm_beam.model.config import BatchConfig
from codeclm_beam.model.config import ONLINE
from codeclm_beam.model.config import parse_vertex_modes
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.ratelimit import QuotaConfig
from codeclm_beam.model.uri import DEFAULT_MODEL_URI


def _vertex_modes(text: str) -> str:
    """Checks --vertex_mode as argparse reads it; kept as text, so the manifest and a
    Flex Template carry the flag as the user wrote it."""
    try:
        parse_vertex_modes(text)
    except ValueError as bad:
        raise argparse.ArgumentTypeError(str(bad)) from None
    return text


def bounded(kind: type, low: Optional[float] = None, high: Optional[float] = None,
            above: bool = False):
    """An argparse `type` for a number within bounds (`low` excluded where `above`):
    a value out of them stops the command at parsing, with one line and exit 2,
    before anything is read, written or asked of a model."""
    def parse(text: str):
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: not a finite number")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(
                f"{text}: must be {'over' if above else 'at least'} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text}: must be at most {high:g}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


COUNT = bounded(int, 1)           # a number of things: 1 or more
RETRIES = bounded(int, 0)         # 0 or more
SHARE = bounded(float, 0, 1)      # a share, 0 to 1
TEMPERATURE = bounded(float, 0, 2)
POSITIVE = bounded(float, 0, above=True)


class ModelOptions(PipelineOptions):
    """How models are called: the same flags for every pipeline."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("models")
        group.add_argument("--strong_model", default=DEFAULT_MODEL_URI,
                           help="Model URI of the strong model (the codec).")
        group.add_argument("--target_model", default=DEFAULT_MODEL_URI,
                           help="Model URI of the target model.")
        group.add_argument("--judge_model", default=None,
                           help="Model URI of the judge (default: the strong model).")
        for role in ("strong", "target", "judge"):
            group.add_argument(
                f"--{role}_thinking", default=None,
                help=f"How much the {role} model thinks: a budget in tokens (Gemini "
                     "2.5: e.g. 1024, -1 or dynamic, 0 or off), a level (Gemini 3, "
                     "OpenAI reasoning_effort: minimal, low, medium, high), 'least' or "
                     "'default'. Unset: structured stages and the judge think as little "
                     "as the model allows; answers keep the model's default.")
        group.add_argument("--vertex_project", default=None,
                           help="Vertex AI project (default: --project, then "
                                "GOOGLE_CLOUD_PROJECT).")
        group.add_argument("--vertex_location", default=None,
                           help="Vertex AI location (default: GOOGLE_CLOUD_LOCATION, "
                                "then us-central1).")
        group.add_argument("--vertex_mode", default=ONLINE, type=_vertex_modes,
                           help="How vertex: models are served and billed: online "
                                "(standard pay-as-you-go), flex (Flex PayGo: the same "
                                "requests on the global endpoint at half price, slower, "
                                "for the models that offer it) or batch (each stage's "
                                "requests as Vertex AI batch prediction jobs at half "
                                "price; needs --batch_dir). One mode for every role, or "
                                "per role: judge=batch,strong=online (roles not named: "
                                "online), batch,strong=online (all but strong in batch). "
                                "Other models ignore it.")
        group.add_argument("--batch_dir", default=None,
                           help="gs:// folder for --vertex_mode batch: request shards, "
                                "the record of every submitted job (a re-run resumes "
                                "them instead of paying twice) and the jobs' answers.")
        group.add_argument("--batch_timeout", type=float, default=48 * 3600.0,
                           help="Seconds after its creation a batch job that has not "
                                "finished is cancelled (default 48 h; Vertex AI itself "
                                "stops a job's work 24 h after it starts). Its finished "
                                "requests are kept; see --batch_fallback for the rest.")
        group.add_argument("--batch_fallback", default="none", choices=("none", "online"),
                           help="What becomes of requests a timed-out batch job did not "
                                "answer: none (dead letters, reason timeout) or online "
                                "(sent online, billed at the online price).")
        group.add_argument("--batch_max_requests", type=COUNT, default=200_000,
                           help="Requests per batch job (Vertex AI takes up to 200,000 "
                                "and 1 GB a job).")
        group.add_argument("--batch_poll_seconds", type=POSITIVE, default=300.0,
                           help="Longest wait between two looks at a running batch job "
                                "(the waits grow from a tenth of it).")
        group.add_argument("--model_base_url", default=None,
                           help="Endpoint override for vertex:/gemini: models (proxies).")
        group.add_argument("--max_concurrency", type=COUNT, default=64,
                           help="Most requests in flight per worker process and model "
                                "(with --concurrency fixed: exactly this many).")
        group.add_argument("--concurrency", default=ADAPTIVE, choices=CONCURRENCY_MODES,
                           help="adaptive (default): start at 8 requests in flight "
                                "(at --max_concurrency where you give a quota), "
                                "grow while answers come back clean, halve on "
                                "429s, timeouts and 5xx, never above --max_concurrency "
                                "nor over a quota you give; for quotas you cannot type "
                                "in (Vertex AI's dynamic shared quota, a self-hosted "
                                "server). fixed: always --max_concurrency.")
        group.add_argument("--max_retries", type=RETRIES, default=6,
                           help="Retries of a request on 408/429/5xx/timeouts.")
        group.add_argument("--max_parse_retries", type=RETRIES, default=2,
                           help="Re-asks (with another seed) of an answer that is "
                                "cut, off its JSON schema, empty or unusable.")
        group.add_argument("--max_truncation_retries", type=RETRIES, default=1,
                           help="Re-sends of an answer cut at its output limit with "
                                "the limit's room added (0: a cut answer is only "
                                "re-asked; right for a small model that rambles).")
        group.add_argument("--max_error_share", type=SHARE, default=0.5,
                           help="Stop the run when more than this share of the last "
                                "20 calls to a model failed at the service (after all "
                                "retries; answers off their schema do not count), "
                                "leaving its cache to resume from; 1 never stops.")
        group.add_argument("--request_timeout", type=POSITIVE, default=300.0,
                           help="Seconds before a request counts as timed out.")
        group.add_argument("--max_requests_per_minute", type=POSITIVE, default=None,
                           help="Job-wide request quota per model endpoint.")
        group.add_argument("--max_tokens_per_minute", type=POSITIVE, default=None,
                           help="Job-wide token quota per model endpoint.")
        group.add_argument("--envoy_rate_limit_address", default=None,
                           help="host:port of an Envoy rate-limit service: a global "
                                "limit instead of the per-VM share.")
        group.add_argument("--cache_dir", default=None,
                           help="Response cache (local path or gs://). Default: "
                                "OUTPUT_DIR/cache.")
        group.add_argument("--no_cache", action="store_true", default=False,
                           help="Send every request, store nothing.")
        group.add_argument("--seed", type=int, default=0,
                           help="Seed for sampling and every random choice.")
        group.add_argument("--n_ctx", type=int, default=4096,
                           help="Context window for embedded llama.cpp models.")


def num_vms(options: PipelineOptions) -> int:
    """VMs a job-wide quota is split over (see codeclm_beam.model.ratelimit)."""
    runner = (options.view_as(StandardOptions).runner or "DirectRunner").lower()
    if "dataflow" not in runner:
        return 1
    workers = options.view_as(WorkerOptions)
    return max(1, workers.max_num_workers or workers.num_workers or 1)


def model_configs(options: PipelineOptions, default_cache_dir: Optional[str] = None,
                  run_id: Optional[str] = None) -> dict[str, ModelConfig]:
    """The strong, target and judge ModelConfigs the options describe."""
    opts = options.view_as(ModelOptions)
    cloud = options.view_as(GoogleCloudOptions)
    run_id = run_id or cloud.job_name or uuid.uuid4().hex[:12]
    quota = QuotaConfig(
        requests_per_minute=opts.max_requests_per_minute,
        tokens_per_minute=opts.max_tokens_per_minute,
        num_vms=num_vms(options),
        run_id=run_id,
        envoy_address=opts.envoy_rate_limit_address)
    cache_dir = None if opts.no_cache else (opts.cache_dir or default_cache_dir)
    base = dict(
        project=opts.vertex_project or cloud.project,
        location=opts.vertex_location,
        base_url=opts.model_base_url,
        request_timeout_s=opts.request_timeout,
        max_concurrency=opts.max_concurrency,
        concurrency=opts.concurrency,
        max_retries=opts.max_retries,
        max_parse_retries=opts.max_parse_retries,
        max_truncation_retries=opts.max_truncation_retries,
        max_error_share=opts.max_error_share,
        quota=quota,
        cache_dir=cache_dir,
        batch=BatchConfig(
            batch_dir=opts.batch_dir, timeout_s=opts.batch_timeout,
            fallback=None if opts.batch_fallback == "none" else opts.batch_fallback,
            max_requests_per_job=opts.batch_max_requests,
            poll_initial_s=opts.batch_poll_seconds / 10,
            poll_max_s=opts.batch_poll_seconds),
        n_ctx=opts.n_ctx)
    modes = parse_vertex_modes(opts.vertex_mode)
    return {
        "strong": ModelConfig(uri=opts.strong_model, thinking=opts.strong_thinking,
                              vertex_mode=modes["strong"], **base),
        "target": ModelConfig(uri=opts.target_model, thinking=opts.target_thinking,
                              vertex_mode=modes["target"], **base),
        "judge": ModelConfig(uri=opts.judge_model or opts.strong_model,
                             thinking=opts.judge_thinking, vertex_mode=modes["judge"],
                             **base),
    }
