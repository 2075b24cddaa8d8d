"""Pure-PyTorch model code: no Lightning in here."""

from ibkit.models.blip2 import Blip2Stage1, build_stage2
from ibkit.models.instructblip import InstructBLIP, InstructBLIPOutput
from ibkit.models.language import LanguageModel, LoraSettings
from ibkit.models.qformer import QFormer, QFormerConfig
from ibkit.models.vision.base import VisionEncoder
from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

__all__ = [
    "Blip2Stage1",
    "EVAViT",
    "EVAViTConfig",
    "InstructBLIP",
    "InstructBLIPOutput",
    "LanguageModel",
    "LoraSettings",
    "QFormer",
    "QFormerConfig",
    "VisionEncoder",
    "build_stage2",
]
