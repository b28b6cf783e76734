"""Tests of the embedded demo dataset: determinism, COCO validity, its stated properties,
Detectron2 registration and concurrent generation."""

import filecmp
import json
import math
import multiprocessing
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO
from sklearn.datasets import load_digits

from focal_det2.data import demo, ensure_demo_data, generate_demo_data, register_demo_datasets


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-size dataset, generated once for the module."""
    return ensure_demo_data(root=tmp_path_factory.mktemp("demo_root"))


def _load_json(data_dir: Path, split: str) -> dict:
    with open(data_dir / f"{split}.json") as f:
        return json.load(f)


def _assert_same_tree(a: Path, b: Path) -> None:
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []


def _overlap(a: list[int], b: list[int]) -> float:
    """Intersection over the smaller box's area (an upper bound of the IoU)."""
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def test_generation_is_deterministic(tmp_path: Path, data_dir: Path) -> None:
    num_images = {"train": 6, "val": 3}
    generate_demo_data(tmp_path / "a", num_images=num_images)
    generate_demo_data(tmp_path / "b", num_images=num_images)
    _assert_same_tree(tmp_path / "a", tmp_path / "b")
    # Each image has its own generator, so a reduced set is a prefix of the full one.
    for split, count in num_images.items():
        names = [f"{index:06d}.jpg" for index in range(count)]
        _, mismatch, errors = filecmp.cmpfiles(
            tmp_path / "a" / split, data_dir / split, names, shallow=False
        )
        assert mismatch == [] and errors == []
        small, full = _load_json(tmp_path / "a", split), _load_json(data_dir, split)
        assert small["annotations"] == full["annotations"][: len(small["annotations"])]
    generate_demo_data(tmp_path / "c", num_images=num_images, seed=1)
    assert (tmp_path / "a/train.json").read_bytes() != (tmp_path / "c/train.json").read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_validity(data_dir: Path, split: str) -> None:
    assert data_dir.name == demo.DEMO_VERSION
    coco = COCO(str(data_dir / f"{split}.json"))
    assert len(coco.imgs) == demo.NUM_IMAGES[split]
    assert len(coco.dataset["images"]) == len(coco.imgs)
    assert len(coco.dataset["annotations"]) == len(coco.anns)
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [
        (k + 1, str(k)) for k in range(10)
    ]
    for ann in coco.anns.values():
        x, y, w, h = ann["bbox"]
        image = coco.imgs[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert ann["area"] == w * h and ann["iscrowd"] == 0
        assert 1 <= ann["category_id"] <= 10
    for image in coco.imgs.values():
        with Image.open(data_dir / split / image["file_name"]) as pil:
            pil.load()
            assert pil.mode == "RGB"
            assert pil.size == (image["width"], image["height"]) == (320, 320)


def test_class_imbalance(data_dir: Path) -> None:
    counts = Counter(ann["category_id"] for ann in _load_json(data_dir, "train")["annotations"])
    assert sorted(counts) == list(range(1, 11))
    assert max(counts.values()) >= 5 * min(counts.values())
    # Frequencies fall with the digit, as CLASS_DECAY**k.
    assert counts[1] == max(counts.values()) and counts[10] == min(counts.values())


@pytest.mark.parametrize("split", ["train", "val"])
def test_object_count_size_and_overlap(data_dir: Path, split: str) -> None:
    dataset = _load_json(data_dir, split)
    boxes: dict[int, list[list[int]]] = {image["id"]: [] for image in dataset["images"]}
    for ann in dataset["annotations"]:
        boxes[ann["image_id"]].append(ann["bbox"])
    assert all(2 <= len(image_boxes) <= 8 for image_boxes in boxes.values())
    sizes = [math.sqrt(w * h) for image_boxes in boxes.values() for _, _, w, h in image_boxes]
    # w and h are rounded to pixels, which moves sqrt(w * h) by less than a pixel.
    assert 15 <= min(sizes) < 20 and 110 < max(sizes) <= 129
    for image_boxes in boxes.values():
        assert all(_overlap(a, b) <= demo.MAX_OVERLAP for a, b in combinations(image_boxes, 2))


def test_digit_scans_match_labels_and_are_disjoint(data_dir: Path) -> None:
    targets = load_digits().target
    scans = {}
    for split in ("train", "val"):
        annotations = _load_json(data_dir, split)["annotations"]
        assert all(targets[ann["digit_index"]] + 1 == ann["category_id"] for ann in annotations)
        scans[split] = {ann["digit_index"] for ann in annotations}
    assert not scans["train"] & scans["val"]


def test_boxes_are_exact() -> None:
    """Before JPEG coding, pasting changes pixels inside the boxes only, up to every edge."""
    photos, (inks, labels) = demo._background_photos(), demo._digit_inks()
    pools = demo._split_scans(labels, demo.SEED)["train"]
    for index in range(10):
        key = (demo.SEED, 0, index)
        # The background is the first thing drawn, so the same key reproduces it alone.
        background = demo._background(np.random.default_rng(key), photos)
        pixels, objects = demo._render_image(np.random.default_rng(key), photos, inks, pools)
        changed = (pixels != np.rint(background)).any(axis=-1)
        inside = np.zeros_like(changed)
        for (x, y, w, h), _, _ in objects:
            inside[y : y + h, x : x + w] = True
            box = changed[y : y + h, x : x + w]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        assert not (changed & ~inside).any()


def test_registered_datasets(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Re-register from scratch, pointed at an empty root: registration must generate nothing.
    for name in demo.DATASET_NAMES.values():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
    monkeypatch.setenv(demo.DATA_ENV_VAR, str(tmp_path))
    register_demo_datasets()
    register_demo_datasets()
    assert list(tmp_path.iterdir()) == []
    assert MetadataCatalog.get("focal_demo_val").json_file == str(tmp_path / "demo_v1/val.json")

    # The loader reads the variable when called, and re-points the metadata accordingly.
    monkeypatch.setenv(demo.DATA_ENV_VAR, str(data_dir.parent))
    for split, name in demo.DATASET_NAMES.items():
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == demo.NUM_IMAGES[split]
        assert dicts[0]["file_name"] == str(data_dir / split / "000000.jpg")
        assert (dicts[0]["height"], dicts[0]["width"]) == (320, 320)
        annotations = [ann for record in dicts for ann in record["annotations"]]
        assert len(annotations) == len(_load_json(data_dir, split)["annotations"])
        assert all(ann["bbox_mode"] == BoxMode.XYWH_ABS for ann in annotations)
        assert {ann["category_id"] for ann in annotations} == set(range(10))
        metadata = MetadataCatalog.get(name)
        assert metadata.json_file == str(data_dir / f"{split}.json")
        assert metadata.image_root == str(data_dir / split)
        assert metadata.evaluator_type == "coco"
        assert metadata.thing_classes == [str(k) for k in range(10)]
    assert list(tmp_path.iterdir()) == []


def test_concurrent_generation(tmp_path: Path, data_dir: Path) -> None:
    # A temporary folder left by a crashed generation must be ignored and cleaned up.
    stale = tmp_path / ".demo_v1.tmp-999999"
    (stale / "train").mkdir(parents=True)
    (stale / "train.json").write_text("{")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=ensure_demo_data, args=(tmp_path,)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_v1", "demo_v1.lock"]
    _assert_same_tree(tmp_path / "demo_v1", data_dir)
