"""Training batches of images of one size: less padding when the training sizes vary.

Detectron2 pads the images of a batch to the largest one. Its ``AspectRatioGroupedDataset``
batches images of one orientation together, so a batch is not padded to a square; with several
``INPUT.MIN_SIZE_TRAIN`` (scale jitter) a batch still mixes sizes, and the more images a batch
holds, the more often it is padded to the largest size. With ``DATALOADER.SIZE_GROUPING`` the
batches are grouped by orientation and by the resized short side (:func:`size_group`), so the
size jitters from batch to batch instead of within one.
"""

from collections import defaultdict
from typing import Dict, Iterator, List, Tuple

import torch
from detectron2.data.common import AspectRatioGroupedDataset

__all__ = ["SHORT_SIDE_STEP", "SizeGroupedDataset", "size_group"]

# Short sides in one group differ by less than this (pixels): the size divisibility of an FPN
# backbone, the step in which batches are padded anyway.
SHORT_SIDE_STEP = 32


def size_group(image: torch.Tensor) -> Tuple[bool, int]:
    """
    The group of a mapped image (C, H, W): its orientation, as Detectron2's aspect-ratio
    grouping takes it (width > height), and its short side in steps of ``SHORT_SIDE_STEP``
    (rounded up, as the padding rounds it).
    """
    height, width = image.shape[-2:]
    return width > height, -(-min(height, width) // SHORT_SIDE_STEP)


class SizeGroupedDataset(AspectRatioGroupedDataset):
    """
    ``AspectRatioGroupedDataset`` whose batches hold images of one :func:`size_group`: with one
    training size it forms the same batches as Detectron2's (orientation only), except for an
    image whose short side ``INPUT.MAX_SIZE_TRAIN`` shortened.

    It reads the shape of the resized image, where Detectron2's reads the original "width" and
    "height".
    """

    def __iter__(self) -> Iterator[List[Dict]]:
        buckets: Dict[Tuple[bool, int], List[Dict]] = defaultdict(list)
        for sample in self.dataset:
            bucket = buckets[size_group(sample["image"])]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                # Emptied before the yield: code after a yield may never run.
                del bucket[:]
                yield batch
