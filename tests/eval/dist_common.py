"""Model and data shared by the 2-rank retrieval worker and the single-process side of its test."""
from __future__ import annotations

import torch

from tests.eval.helpers import images, texts, tiny_model

N_IMG = 5
IMAGE_SPLIT = ((0, 3), (3, 5))  # rank 0 holds images 0-2, rank 1 images 3-4 (uneven on purpose)
K = 3


def model():
    return tiny_model(seed=41, dtype=torch.float64)


def data():
    """5 images; 9 captions (images 0 and 3 have 3 each), listed image by image."""
    text_image = torch.tensor([0, 0, 0, 1, 2, 3, 3, 3, 4])
    ids, mask = texts(text_image.shape[0], seed=42)
    return images(N_IMG, seed=43, dtype=torch.float64), ids, mask, text_image
