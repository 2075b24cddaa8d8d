"""ibkit: InstructBLIP instruction tuning, evaluation and serving."""

from ibkit.models import InstructBLIP, LanguageModel, QFormerConfig
from ibkit.processor import Processor

__all__ = ["InstructBLIP", "LanguageModel", "Processor", "QFormerConfig"]
__version__ = "0.1.0"
