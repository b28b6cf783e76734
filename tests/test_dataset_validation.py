"""Validation of the COCO datasets in use before training: each fault reported with its ids,
the report's form, the "error" and "skip" policies in-process and through train_net.py."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from focal_det2 import add_focal_config
from focal_det2.data import (
    DatasetValidationError,
    check_coco_dataset,
    cleaned_coco_dict,
    generate_demo_data,
    validate_coco_dataset,
    validate_datasets,
)
from focal_det2.data.coco_checks import MAX_EXAMPLES

from helpers import REPO, run_train_net, tiny_args

# The faults of faulty_copy(): problems per kind.
EXPECTED_COUNTS = {
    "missing_image": 1,
    "unreadable_image": 2,
    "image_size_mismatch": 1,
    "malformed_image": 1,
    "empty_box": 2,
    "unknown_category": 1,
    "box_outside_image": 1,
    "unknown_image_id": 1,
    "malformed_annotation": 3,
}
# Images 2-6 are bad; 1 and 8 keep their annotations, 7 is a negative (no annotations).
KEPT_IMAGE_IDS = [1, 7, 8]


@pytest.fixture(scope="module")
def clean_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, valid dataset: train.json (8 images 320x320), val.json (4) and their images."""
    root = tmp_path_factory.mktemp("clean") / "data"
    generate_demo_data(root, num_images={"train": 8, "val": 4})
    return root


def _load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _annotation(annotation_id, image_id=1, category_id=1, bbox=(10, 10, 20, 20)) -> dict:
    bbox = list(bbox) if isinstance(bbox, tuple) else bbox
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": bbox}


def faulty_copy(clean_coco: Path, out: Path) -> tuple[Path, Path]:
    """A copy of the train split with one of every record and file fault; (json, image_root)."""
    image_root = out / "images"
    shutil.copytree(clean_coco / "train", image_root)
    dataset = _load(clean_coco / "train.json")
    (image_root / "000001.jpg").unlink()  # image 2: missing
    (image_root / "000002.jpg").write_bytes(b"this is no image" * 64)  # image 3: garbage
    header = (image_root / "000003.jpg").read_bytes()[:60]  # image 4: cut before its size
    (image_root / "000003.jpg").write_bytes(header)
    dataset["images"][4]["width"] = 300  # image 5: the file is 320 wide
    dataset["images"][5]["file_name"] = 6  # image 6: ill-typed file_name
    dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] != 7]
    dataset["annotations"] += [
        _annotation(1001, bbox=(10, 10, 0, 20)),
        _annotation(1002, bbox=(10, 10, 20, -5)),
        _annotation(1003, category_id=99),
        _annotation(1004, bbox=(400, 10, 20, 20)),
        _annotation(1005, bbox=(310, 300, 30, 40)),  # partly outside: valid
        _annotation(1006, image_id=999),
        _annotation(1007, bbox=[1, 2, 3]),
        _annotation("a8"),
        _annotation(1, image_id=8),  # the id of the first annotation
    ]
    json_file = out / "faulty.json"
    json_file.write_text(json.dumps(dataset))
    return json_file, image_root


def _problems(report, kind: str) -> list[tuple]:
    return [
        (p.image_id, p.annotation_id, p.field, p.value, p.file_name)
        for p in report.examples.get(kind, [])
    ]


def test_clean_dataset_has_no_problem(clean_coco: Path) -> None:
    for split in ("train", "val"):
        report = validate_coco_dataset(clean_coco / f"{split}.json", clean_coco / split)
        assert report.ok and report.num_images == {"train": 8, "val": 4}[split]
        assert not report.drop_image_indices and not report.drop_annotation_indices


def test_every_fault_is_reported_with_its_ids_field_and_value(clean_coco, tmp_path) -> None:
    json_file, image_root = faulty_copy(clean_coco, tmp_path)
    report = validate_coco_dataset(json_file, image_root, "faulty")
    assert dict(report.counts) == EXPECTED_COUNTS
    assert not report.fatal
    assert _problems(report, "missing_image") == [
        (2, None, "file_name", "000001.jpg", "000001.jpg")
    ]
    assert [p[0] for p in _problems(report, "unreadable_image")] == [3, 4]
    assert _problems(report, "image_size_mismatch") == [
        (5, None, "width, height", [300, 320], "000004.jpg")
    ]
    assert report.examples["image_size_mismatch"][0].detail == "decoded 320x320"
    assert _problems(report, "malformed_image") == [(6, None, "file_name", 6, 6)]
    assert _problems(report, "empty_box") == [
        (1, 1001, "bbox", [10, 10, 0, 20], "000000.jpg"),
        (1, 1002, "bbox", [10, 10, 20, -5], "000000.jpg"),
    ]
    assert _problems(report, "unknown_category") == [(1, 1003, "category_id", 99, "000000.jpg")]
    assert _problems(report, "box_outside_image") == [
        (1, 1004, "bbox", [400, 10, 20, 20], "000000.jpg")
    ]
    assert _problems(report, "unknown_image_id") == [(999, 1006, "image_id", 999, None)]
    assert _problems(report, "malformed_annotation") == [
        (1, 1007, "bbox", [1, 2, 3], "000000.jpg"),
        (1, "a8", "id", "a8", "000000.jpg"),
        (8, 1, "id", 1, "000007.jpg"),
    ]
    assert report.examples["malformed_annotation"][2].detail == "repeated"
    # Dropped: images 2-6 with all their annotations, and every bad annotation.
    dataset = _load(json_file)
    cleaned = cleaned_coco_dict(dataset, report)
    assert [image["id"] for image in cleaned["images"]] == KEPT_IMAGE_IDS
    originals = [
        (a["image_id"], a["id"])
        for a in _load(clean_coco / "train.json")["annotations"]
        if a["image_id"] in (1, 8)
    ]
    assert [(a["image_id"], a["id"]) for a in cleaned["annotations"]] == originals + [(1, 1005)]
    assert check_coco_dataset(cleaned, str(json_file), str(image_root)).ok


@pytest.mark.parametrize(
    "text, field",
    [
        ('{"images": [', "(file)"),
        ("[1, 2]", "(top level)"),
        ('{"images": [], "categories": [{"id": 1, "name": "a"}]}', "annotations"),
        ('{"images": [], "annotations": [], "categories": [{"id": "1", "name": "a"}]}', "id"),
        ('{"images": {}, "annotations": [], "categories": []}', "images"),
    ],
)
def test_malformed_json_is_reported_and_fatal(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "bad.json").write_text(text)
    report = validate_coco_dataset(tmp_path / "bad.json", tmp_path)
    assert report.fatal and report.counts["malformed_json"] >= 1
    assert field in report.examples["malformed_json"][0].field


def test_ill_typed_values_are_reported_not_raised() -> None:
    dataset = {
        "images": [
            {"id": [1], "file_name": "a.jpg", "width": 10, "height": 10},
            "no record",
            {"id": 2, "file_name": "b.jpg", "width": "10", "height": True},
        ],
        "annotations": [
            {"id": {}, "image_id": [1], "category_id": None, "bbox": "1,2,3,4"},
            {"id": 7, "image_id": True, "category_id": 1.0, "bbox": [1, 2, float("nan"), 4]},
            {"id": 8, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4], "ignore": 1},
            5,
        ],
        "categories": [{"id": [3], "name": "x"}, {"id": 1, "name": "a"}],
    }
    report = check_coco_dataset(dataset, "x.json", "images", check_files=False)
    assert dict(report.counts) == {
        "malformed_json": 1,
        "malformed_image": 4,
        "malformed_annotation": 9,
    }
    assert report.drop_image_indices == {0, 1, 2}
    assert report.drop_annotation_indices == {0, 1, 2, 3}
    assert "categories[0].id=[3] (not an int)" in report.format()


def test_report_lists_the_first_problems_of_each_kind_and_counts_all(clean_coco) -> None:
    dataset = _load(clean_coco / "val.json")
    dataset["annotations"] += [_annotation(2000 + i, bbox=(1, 1, 0, 0)) for i in range(25)]
    report = check_coco_dataset(dataset, "val.json", str(clean_coco / "val"), "many")
    assert report.counts["empty_box"] == 25 and len(report.examples["empty_box"]) == MAX_EXAMPLES
    text = report.format()
    assert f"empty_box: 25 (box width or height <= 0), the first {MAX_EXAMPLES}" in text
    assert "annotation_id=2019 image_id=1 file_name='000000.jpg'" in text
    assert "annotation_id=2020" not in text
    assert len(report.drop_annotation_indices) == 25


def _cfg(policy: str, train: tuple, output_dir: Path):
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.DATASETS.INVALID_POLICY = policy
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = train, ()
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.fixture
def registered_faulty(clean_coco, tmp_path):
    """A faulty dataset registered as "validation_faulty", removed afterwards."""
    json_file, image_root = faulty_copy(clean_coco, tmp_path / "data")
    register_coco_instances("validation_faulty", {}, str(json_file), str(image_root))
    yield json_file, image_root
    DatasetCatalog.remove("validation_faulty")
    MetadataCatalog.remove("validation_faulty")


def test_error_policy_raises_one_report_and_writes_nothing(registered_faulty, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DatasetValidationError) as error:
        validate_datasets(_cfg("error", ("validation_faulty",), out))
    assert "dataset 'validation_faulty'" in str(error.value)
    assert all(f"  {kind}: {n} (" in str(error.value) for kind, n in EXPECTED_COUNTS.items())
    assert not out.exists()


def test_skip_policy_registers_a_cleaned_copy(registered_faulty, tmp_path, caplog) -> None:
    json_file, image_root = registered_faulty
    original = json_file.read_bytes()
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        reports = validate_datasets(_cfg("skip", ("validation_faulty",), out))
    assert [dict(report.counts) for report in reports] == [EXPECTED_COUNTS]
    cleaned_file = out / "validated_datasets" / "validation_faulty.json"
    metadata = MetadataCatalog.get("validation_faulty")
    assert metadata.json_file == str(cleaned_file) and metadata.image_root == str(image_root)
    assert [r["image_id"] for r in DatasetCatalog.get("validation_faulty")] == KEPT_IMAGE_IDS
    assert json_file.read_bytes() == original, "the user's json is left alone"
    assert [p.name for p in cleaned_file.parent.iterdir()] == [cleaned_file.name]
    for kind in EXPECTED_COUNTS:
        assert (
            f"dataset 'validation_faulty': {kind}: dropped {EXPECTED_COUNTS[kind]} " in caplog.text
        )
    assert "kept 3 of 8 images" in caplog.text


def test_demo_datasets_are_validated_where_their_loader_reads(clean_coco, tmp_path, monkeypatch):
    shutil.copytree(clean_coco, tmp_path / "demo_v1")
    (tmp_path / "demo_v1" / "val" / "000002.jpg").unlink()
    monkeypatch.setenv("FOCAL_DET2_DATA", str(tmp_path))
    cfg = _cfg("error", ("focal_demo_train",), tmp_path / "out")
    cfg.DATASETS.TEST = ("focal_demo_val",)
    with pytest.raises(DatasetValidationError) as error:
        validate_datasets(cfg)
    assert "dataset 'focal_demo_val'" in str(error.value)
    assert "dataset 'focal_demo_train'" not in str(error.value)
    assert "image_id=3 file_name='000002.jpg'" in str(error.value)


def test_invalid_policy_names_the_key_and_the_allowed_values(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(REPO / "configs" / "demo.yaml"), "DATASETS.INVALID_POLICY", "drop"]
    )
    args.opts += ["OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        train_net.setup(args)
    message = str(exit_info.value.code)
    assert "DATASETS.INVALID_POLICY" in message and "'error', 'skip'" in message
    assert "'drop'" in message and not (tmp_path / "out").exists()


def _coco_args(clean_coco: Path) -> dict:
    return {
        split: (str(clean_coco / f"{split}.json"), str(clean_coco / split))
        for split in ("train", "val")
    }


def test_train_net_stops_with_one_report_of_every_fault(clean_coco, tmp_path) -> None:
    json_file, image_root = faulty_copy(clean_coco, tmp_path / "data")
    (tmp_path / "broken.json").write_text('{"images": [')
    out = tmp_path / "out"
    result = run_train_net(
        *("--register-coco", "faulty", str(json_file), str(image_root)),
        *("--register-coco", "broken", str(tmp_path / "broken.json"), str(image_root)),
        *tiny_args(_coco_args(clean_coco), out, "DATASETS.TRAIN", "('faulty',)"),
        *("DATASETS.TEST", "('broken',)"),
    )
    log = result.stdout
    assert result.returncode != 0 and "Traceback" not in log, log[-3000:]
    assert log.count("invalid datasets") == 1
    assert "dataset 'faulty'" in log and "dataset 'broken'" in log
    for kind, count in {**EXPECTED_COUNTS, "malformed_json": 1}.items():
        assert f"  {kind}: {count} (" in log, kind
    assert "image_id=2 file_name='000001.jpg' images[1]: file_name='000001.jpg' (no file" in log
    assert "annotation_id=1006 image_id=999 annotations[44]: image_id=999" in log
    assert (
        "annotation_id=1003 image_id=1 file_name='000000.jpg' annotations[41]: category_id=99"
        in log
    )
    assert not out.exists() or not any(out.iterdir())


def test_train_net_skip_policy_trains_on_the_rest_in_two_processes(clean_coco, tmp_path) -> None:
    json_file, image_root = faulty_copy(clean_coco, tmp_path / "data")
    out = tmp_path / "out"
    result = run_train_net(
        # A free port: the default one is the same for every run of this user.
        *("--num-gpus", "2", "--dist-url", "auto"),
        *("--register-coco", "faulty", str(json_file), str(image_root)),
        *tiny_args(_coco_args(clean_coco), out, "DATASETS.TRAIN", "('faulty',)"),
        *("DATASETS.TEST", "()", "DATASETS.INVALID_POLICY", "skip"),
        *("SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0"),
    )
    log = result.stdout
    assert result.returncode == 0, log[-3000:]
    assert "World size: 2" in log
    for kind, count in EXPECTED_COUNTS.items():
        assert f"dataset 'faulty': {kind}: dropped {count} " in log, kind
    assert "dataset 'faulty': kept 3 of 8 images" in log
    cleaned = _load(out / "validated_datasets" / "faulty.json")
    assert [image["id"] for image in cleaned["images"]] == KEPT_IMAGE_IDS
    assert (out / "model_final.pth").is_file()
