"""CodecLM stages as composite Beam PTransforms."""
