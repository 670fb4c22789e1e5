"""Data: webdataset shards (`shards`: loader with exact skip counts and a resumable position), captions, image
transforms, tokenisation for stage 1 and stage 2, the shard writer tool, and procedural pairs (`synthetic`) for
the demo and tests. Submodules are imported where used (PIL and tokenizers stay out of `import blip2fast.data`)."""
from .synthetic import SCENES, Batch, Scene, SyntheticShapes, WordTokenizer, caption_vocabulary

__all__ = ["SCENES", "Batch", "Scene", "SyntheticShapes", "WordTokenizer", "caption_vocabulary"]
