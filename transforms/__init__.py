"""CodecLM stages as composite Beam PTransforms, each usable on its own.

    from codeclm_beam.transforms import EncodeMetadata, ContrastiveFilter
"""
from codeclm_beam.transforms.codeclm import CodecLM
from codeclm_beam.transforms.codeclm import CodecLMConfig
from codeclm_beam.transforms.codeclm import CodecLMOutput
from codeclm_beam.transforms.contrastive_filter import ContrastiveFilter
from codeclm_beam.transforms.contrastive_filter import FilterOutput
from codeclm_beam.transforms.decode import DecodeInstructions
from codeclm_beam.transforms.decontaminate import Decontaminate
from codeclm_beam.transforms.decontaminate import DecontaminationRule
from codeclm_beam.transforms.dedup import DedupRule
from codeclm_beam.transforms.dedup import DeduplicateInstructions
from codeclm_beam.transforms.encode import EncodeMetadata
from codeclm_beam.transforms.improve import ImproveInstructions
from codeclm_beam.transforms.judge import Contest
from codeclm_beam.transforms.judge import JudgeBothOrders
from codeclm_beam.transforms.metadata_pool import BuildMetadataPool
from codeclm_beam.transforms.metadata_pool import MetadataPool
from codeclm_beam.transforms.read_seeds import ReadMetadata
from codeclm_beam.transforms.read_seeds import ReadSeeds
from codeclm_beam.transforms.rubrics import GenerateRubrics



def import_stage_modules() -> None:
    """Imports every module of this package, so that every `Stage` is registered
    (`codeclm-beam prompts`, the Beam YAML factories): a new stage module needs no
    entry anywhere else."""
    import importlib
    import pkgutil
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


__all__ = [
    "BuildMetadataPool", "CodecLM", "CodecLMConfig", "CodecLMOutput", "ContrastiveFilter",
    "DecodeInstructions", "Decontaminate", "DecontaminationRule", "DedupRule",
    "DeduplicateInstructions", "EncodeMetadata", "FilterOutput", "GenerateRubrics",
    "ImproveInstructions", "Contest", "JudgeBothOrders", "MetadataPool", "ReadMetadata",
    "ReadSeeds",
    "import_stage_modules",
]
