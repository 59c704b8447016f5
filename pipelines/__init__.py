"""End-to-end CodecLM pipelines and the codeclm-beam CLI."""
