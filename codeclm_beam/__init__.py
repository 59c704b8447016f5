"""codeclm-beam: CodecLM synthetic instruction data on Apache Beam."""
from codeclm_beam.version import __version__
