"""`report`: a run's figures (`figures.py`) and their rendering (`render.py`)."""
