"""
Benchmark of the dataset validation on a json the size of COCO train2017, next to the time
of reading that json.

    .venv/bin/python benchmarks/bench_validation.py [--num-files K] [--polygon-points P]
        [--threads T] [--repeats R] [--data-dir DIR]

Generates a COCO-format json of 118,287 images and about 860k annotations (7.27 per image on
average, as in COCO train2017) over COCO's 80 category ids, with valid boxes, and small JPEG
files of the sizes the json states. ``--num-files`` writes only K files and lets the images
share them in turn (every image still has its header decoded), to spare disk and time.
``--polygon-points`` adds a polygon of that many points to every annotation: validation never
reads it, but it makes the json (and its read time) closer to COCO's 448 MB.

Reported, as the median of ``--repeats`` runs: reading the json (``json.load``), checking its
records (``check_coco_dataset(check_files=False)``) and checking records and image headers
(``check_coco_dataset``), each also as a ratio to the read time. The files were just written,
so their headers come from the page cache: on a cold disk the file checks wait for I/O,
which the thread pool overlaps.
"""

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from focal_det2.data import check_coco_dataset

NUM_IMAGES = 118_287
ANNOTATIONS_PER_IMAGE = 860_001 / NUM_IMAGES
# COCO's 80 category ids: 1..90 without the 10 ids that the 2014 release left unused.
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
# (width, height) of the files: small, so that writing 118k of them is quick.
IMAGE_SIZES = [(64, 48), (48, 64), (64, 64), (80, 60)]


def generate(data_dir: Path, num_files: int, polygon_points: int, seed: int = 0) -> Path:
    """Write ``data_dir/train.json`` and ``data_dir/images/``; returns the json's path."""
    rng = np.random.default_rng(seed)
    image_dir = data_dir / "images"
    image_dir.mkdir(parents=True)
    # One encoding per size, written to every file of that size: encoding is not measured.
    encoded = []
    for width, height in IMAGE_SIZES:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="JPEG")
        encoded.append(buffer.getvalue())
    for index in range(num_files):
        (image_dir / f"{index:012d}.jpg").write_bytes(encoded[index % len(IMAGE_SIZES)])
    images = []
    for index in range(NUM_IMAGES):
        width, height = IMAGE_SIZES[index % num_files % len(IMAGE_SIZES)]
        file_name = f"{index % num_files:012d}.jpg"
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
    counts = rng.poisson(ANNOTATIONS_PER_IMAGE, NUM_IMAGES)
    image_index = np.repeat(np.arange(NUM_IMAGES), counts)
    sizes = np.array([IMAGE_SIZES[i % num_files % len(IMAGE_SIZES)] for i in range(NUM_IMAGES)])
    image_wh = sizes[image_index].astype(np.float64)
    box_wh = np.maximum(rng.uniform(0.05, 1.0, (len(image_index), 2)) * image_wh, 1.0)
    box_xy = rng.uniform(0.0, 1.0, (len(image_index), 2)) * (image_wh - box_wh)
    boxes = np.round(np.concatenate([box_xy, box_wh], axis=1), 2).tolist()
    category_ids = rng.choice(CATEGORY_IDS, len(image_index)).tolist()
    image_ids = (image_index + 1).tolist()
    polygon = np.round(rng.uniform(0, 48, 2 * polygon_points), 2).tolist()
    annotations = []
    for index, (box, category_id, image_id) in enumerate(zip(boxes, category_ids, image_ids)):
        annotation = {
            "id": index + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": box,
            "area": round(box[2] * box[3], 2),
            "iscrowd": 0,
        }
        if polygon_points:
            annotation["segmentation"] = [polygon]
        annotations.append(annotation)
    categories = [{"id": i, "name": f"class_{i}", "supercategory": "thing"} for i in CATEGORY_IDS]
    json_file = data_dir / "train.json"
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file


def timed(fn, repeats: int):
    """(median seconds, last result) of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-files", type=int, default=NUM_IMAGES, help="image files written")
    parser.add_argument("--polygon-points", type=int, default=0, help="points per polygon")
    parser.add_argument("--threads", type=int, default=None, help="header-check threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="reuse or keep the data here (default: temp)"
    )
    args = parser.parse_args()

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench_validation_"))
    try:
        json_file = data_dir / "train.json"
        if not json_file.is_file():
            start = time.perf_counter()
            generate(data_dir, args.num_files, args.polygon_points)
            print(f"generated {data_dir} in {time.perf_counter() - start:.1f} s")
        image_root = str(data_dir / "images")
        num_files = len(os.listdir(image_root))

        def read():
            with open(json_file, "rb") as f:
                return json.load(f)

        read_s, dataset = timed(read, args.repeats)
        records_s, report = timed(
            lambda: check_coco_dataset(dataset, str(json_file), image_root, check_files=False),
            args.repeats,
        )
        assert report.ok, report.format()
        full_s, report = timed(
            lambda: check_coco_dataset(
                dataset, str(json_file), image_root, num_threads=args.threads
            ),
            args.repeats,
        )
        assert report.ok, report.format()

        print(
            f"{platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, median of {args.repeats}"
        )
        print(
            f"json: {os.path.getsize(json_file) / 1e6:.0f} MB, {report.num_images:,} images, "
            f"{report.num_annotations:,} annotations, {len(dataset['categories'])} categories; "
            f"{num_files:,} image files"
        )
        print(f"{'step':<40} {'seconds':>8} {'x read':>7}")
        for step, seconds in (
            ("read json (json.load)", read_s),
            ("validate records (check_files=False)", records_s),
            (f"validate records + headers ({args.threads or 'default'} thr.)", full_s),
        ):
            print(f"{step:<40} {seconds:>8.2f} {seconds / read_s:>7.2f}")
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir)


if __name__ == "__main__":
    main()
