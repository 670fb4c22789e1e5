"""Checkpoint interop: LAVIS `.pth` and BERT initialisation (transformers folders come with the interop issue)."""
