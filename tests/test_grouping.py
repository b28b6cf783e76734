"""Training batches grouped by image size (DATALOADER.SIZE_GROUPING)."""

import itertools

import pytest
import torch
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.utils.events import EventStorage

from focal_det2.config import load_config
from focal_det2.data import SizeGroupedDataset, register_coco_datasets
from focal_det2.data.grouping import size_group
from focal_det2.engine import FocalTrainer

from helpers import REPO


def sample(height, width, index):
    # A mapped dict: the resized image; "height" and "width" are the original's, here twice the
    # resized ones (the orientation Detectron2's grouping reads).
    return {
        "image": torch.zeros(3, height, width),
        "height": 2 * height,
        "width": 2 * width,
        "index": index,
    }


def test_size_group_is_orientation_and_padded_short_side():
    assert size_group(torch.zeros(3, 256, 256)) == (False, 8)
    assert size_group(torch.zeros(3, 256, 384)) == (True, 8)
    assert size_group(torch.zeros(3, 384, 257)) == (False, 9)
    assert size_group(torch.zeros(3, 224, 300)) == (True, 7)


def test_batches_hold_one_size_and_every_sample_once():
    sizes = [224, 256, 288, 256, 288, 288, 224, 256, 256, 224, 288, 224, 288, 256, 224, 288]
    stream = [sample(s, s, i) for i, s in enumerate(sizes)]
    batches = list(SizeGroupedDataset(stream, 4))
    assert len(batches) == 3  # 5 of 224, 5 of 256, 6 of 288: 1, 1 and 2 left over
    for batch in batches:
        assert len(batch) == 4 and len({tuple(s["image"].shape) for s in batch}) == 1
    indices = [s["index"] for batch in batches for s in batch]
    assert len(set(indices)) == len(indices)
    # A batch is yielded as soon as its 4th image arrives, its images in stream order.
    assert [[s["index"] for s in b] for b in batches] == [
        [1, 3, 7, 8],
        [2, 4, 5, 10],
        [0, 6, 9, 11],
    ]


def test_one_training_size_batches_as_detectron2():
    # One size, both orientations: Detectron2's aspect-ratio grouping, batch for batch.
    shapes = [(256, 384), (384, 256), (256, 384), (256, 384), (384, 256), (256, 341)] * 3
    stream = [sample(h, w, i) for i, (h, w) in enumerate(shapes)]
    ours = [[s["index"] for s in b] for b in SizeGroupedDataset(stream, 2)]
    theirs = [[s["index"] for s in b] for b in AspectRatioGroupedDataset(stream, 2)]
    assert ours == theirs and len(ours) == 9


@pytest.mark.parametrize("grouping", [True, False])
def test_trainer_loader_groups_by_size_with_the_key(tiny_coco, grouping):
    register_coco_datasets([("grouping_tiny_train", *tiny_coco["train"])])
    cfg = load_config(
        str(REPO / "configs" / "demo.yaml"),
        [
            "DATASETS.TRAIN", "('grouping_tiny_train',)",
            "DATALOADER.SAMPLER_TRAIN", "TrainingSampler",
            "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.SIZE_GROUPING", str(grouping),
            "INPUT.MIN_SIZE_TRAIN", "(64, 96, 128)",
            "INPUT.MAX_SIZE_TRAIN", "128",
        ],
    )  # fmt: skip
    loader = FocalTrainer.build_train_loader(cfg)
    with EventStorage():
        batches = list(itertools.islice(loader, 12))
    sizes_per_batch = [{tuple(s["image"].shape) for s in batch} for batch in batches]
    assert all(len(batch) == cfg.SOLVER.IMS_PER_BATCH for batch in batches)
    if grouping:
        assert all(len(sizes) == 1 for sizes in sizes_per_batch)
        # The size still varies, from batch to batch.
        assert len(set().union(*sizes_per_batch)) == 3
    else:
        # Detectron2's batches mix the sizes (12 batches of 4 from 3 sizes, fixed seed).
        assert any(len(sizes) > 1 for sizes in sizes_per_batch)
    loader.close()
