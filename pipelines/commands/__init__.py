"""The CLI's commands other than the two pipelines (`generate.py`, `evaluate.py`)."""
