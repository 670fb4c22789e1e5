"""Data: procedural image-caption pairs (`synthetic`) for demos and tests; real loaders come later."""
from .synthetic import SCENES, Batch, Scene, SyntheticShapes, WordTokenizer, caption_vocabulary

__all__ = ["SCENES", "Batch", "Scene", "SyntheticShapes", "WordTokenizer", "caption_vocabulary"]
