"""blip2fast: BLIP-2 pre-training (stage 1 and 2) with fused kernels and a lean training loop.

`import blip2fast` is cheap: it never imports transformers (only the HF interop and HF vision towers do).
"""
from .config import Blip2Config, QFormerConfig, VisionConfig
from .models.blip2 import Blip2, Stage1Output

__all__ = ["Blip2", "Blip2Config", "QFormerConfig", "VisionConfig", "Stage1Output"]
__version__ = "0.1.0"
