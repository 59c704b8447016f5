"""Two CodecLM stages inside a pipeline you already run.

    python examples/existing_pipeline.py --strong_uri vertex:gemini-2.5-flash \
        --target_uri openai:my-7b@http://10.0.0.5:8000/v1 --output_dir out/mine
"""
import argparse

import apache_beam as beam
from apache_beam.transforms.error_handling import ErrorHandler

from codeclm_beam.model import ModelConfig
from codeclm_beam.sinks import WriteJsonl
from codeclm_beam.records import Candidate
from codeclm_beam.records import Seed
from codeclm_beam.transforms import ContrastiveFilter
from codeclm_beam.transforms import EncodeMetadata

MY_PROMPTS = ["Explain HTTP/3 to a CTO in three paragraphs.",
              "Write a limerick about a forgetful robot."]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--strong_uri", default="llamacpp:smollm2-135m")
    parser.add_argument("--target_uri", default="llamacpp:smollm2-135m")
    parser.add_argument("--output_dir", default="out/existing_pipeline")
    args, beam_args = parser.parse_known_args(argv)
    strong = ModelConfig(args.strong_uri, cache_dir=f"{args.output_dir}/cache")
    target = ModelConfig(args.target_uri, cache_dir=f"{args.output_dir}/cache")

    with beam.Pipeline(argv=beam_args) as p, ErrorHandler(
            WriteJsonl(args.output_dir, "dead_letter")) as failures:
        prompts = p | "MyPrompts" >> beam.Create(MY_PROMPTS)  # your PCollection[str]

        # What kind of task is each prompt, and what skills does it need?
        metadata = (prompts | "ToSeeds" >> beam.Map(Seed.of)
                    | EncodeMetadata(strong).with_error_handler(failures))
        metadata | "SaveMetadata" >> WriteJsonl(args.output_dir, "metadata")

        # Which prompts does the target model clearly answer worse than the strong one?
        filtered = (prompts
                    | "ToCandidates" >> beam.Map(Candidate.of)
                    | ContrastiveFilter(strong, target, judge=strong, threshold=3
                                        ).with_error_handler(failures))
        filtered.kept | "SavePairs" >> WriteJsonl(args.output_dir, "pairs")
        filtered.undecided | "SaveUndecided" >> WriteJsonl(args.output_dir, "undecided")


if __name__ == "__main__":
    main()
