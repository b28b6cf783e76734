"""Shared fixtures: a tiny dataset of the demo's kind."""

import pytest

from focal_det2.data import generate_demo_data


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A few demo images per split: {"train": (json, image_root), "val": (json, image_root)}."""
    root = tmp_path_factory.mktemp("tiny_coco") / "data"
    generate_demo_data(root, num_images={"train": 16, "val": 6})
    return {split: (str(root / f"{split}.json"), str(root / split)) for split in ("train", "val")}
