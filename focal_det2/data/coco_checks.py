"""Checks of a COCO-format dataset: its json's records and its image files, and the report.

The checks are pure: they read the json and the images' headers (their pixels too on request,
``full_decode``), never Detectron2's catalogs or
a config, and return a :class:`DatasetReport` of every problem and of the records to drop.
:func:`cleaned_coco_dict` drops them. Which datasets are checked and what a problem stops is
the policy of :mod:`focal_det2.data.validation`.
"""

import functools
import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = [
    "DatasetReport",
    "Problem",
    "check_coco_dataset",
    "cleaned_coco_dict",
    "read_and_check_coco_dataset",
    "validate_coco_dataset",
]

# Problems listed per kind in a report; the counts cover all of them.
MAX_EXAMPLES = 20
# Kind of problem -> (the list its records are in, what is wrong), in report order.
KINDS = {
    "malformed_json": (
        None,
        "not COCO json: unreadable, or a top-level list or a category missing or ill-typed",
    ),
    "malformed_image": (
        "images",
        "image record with a missing or ill-typed id, file_name, width or height, or a repeated id",
    ),
    "missing_image": ("images", "image file does not exist"),
    "unreadable_image": (
        "images",
        "image file whose header (with full decoding: whose pixels) cannot be decoded",
    ),
    "image_size_mismatch": ("images", "decoded image size differs from the json's width, height"),
    "malformed_annotation": (
        "annotations",
        "annotation with a missing or ill-typed id, image_id, category_id or bbox (4 finite "
        "numbers), a repeated id, or ignore != 0",
    ),
    "unknown_image_id": ("annotations", "image_id is not among the images"),
    "unknown_category": ("annotations", "category_id is not among the categories"),
    "empty_box": ("annotations", "box width or height <= 0"),
    "box_outside_image": ("annotations", "box wholly outside its image"),
}
# Header checks per thread-pool task: large enough that scheduling costs nothing next to it.
_FILES_PER_TASK = 256
# EXIF orientations that swap width and height (transpose and 90-degree rotations).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# bool is an int subclass but no JSON number, so types are compared exactly.
_NUMBER_TYPES = (int, float)


@dataclass(frozen=True)
class Problem:
    """One invalid value of a dataset's json or one bad image file.

    Attributes:
        kind: a key of ``KINDS``.
        field: the json key holding the bad value (for a bad image file: "file_name").
        value: the bad value.
        image_id: the image's id, or the annotation's image_id, where known.
        annotation_id: the annotation's id, where known.
        file_name: the image's file_name, where known.
        index: position of the record in the json's "images" or "annotations" list, which
            locates records whose id is missing or repeated.
        detail: what was found instead, e.g. PIL's error or the decoded size.
    """

    kind: str
    field: str
    value: Any
    image_id: Any = None
    annotation_id: Any = None
    file_name: Any = None
    index: int | None = None
    detail: str | None = None

    def __str__(self) -> str:
        parts = []
        if self.annotation_id is not None:
            parts.append(f"annotation_id={self.annotation_id!r}")
        if self.image_id is not None:
            parts.append(f"image_id={self.image_id!r}")
        if self.file_name is not None:
            parts.append(f"file_name={_short_repr(self.file_name)}")
        records = KINDS[self.kind][0]
        if records is not None and self.index is not None:
            parts.append(f"{records}[{self.index}]")
        text = f"{self.field}={_short_repr(self.value)}"
        if parts:
            text = f"{' '.join(parts)}: {text}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass
class DatasetReport:
    """Problems of one dataset: counts and the first ``MAX_EXAMPLES`` of each kind, and the
    records to drop.

    Records are named by their position in the json's lists, not by id: an id may be missing,
    ill-typed or repeated.

    Attributes:
        dataset_name: name in Detectron2's catalogs ("" when validated on its own).
        json_file, image_root: the files validated.
        num_images, num_annotations: records in the json.
        counts: problems per kind, all of them.
        examples: the first ``MAX_EXAMPLES`` problems per kind.
        drop_image_indices: images that are bad, by position in "images".
        drop_annotation_indices: annotations that are bad or belong to a dropped image, by
            position in "annotations".
    """

    dataset_name: str
    json_file: str
    image_root: str
    num_images: int = 0
    num_annotations: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[Problem]] = field(default_factory=dict)
    drop_image_indices: set[int] = field(default_factory=set)
    drop_annotation_indices: set[int] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.counts

    @property
    def fatal(self) -> bool:
        """True when dropping records cannot repair the dataset (malformed json)."""
        return self.counts["malformed_json"] > 0

    def add(self, kind: str, field: str, value: Any, **where: Any) -> None:
        """Count a problem of ``kind``; keep it as an example while there are few.

        Args:
            kind, field, value: see :class:`Problem`.
            where: the other attributes of :class:`Problem`.
        """
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(Problem(kind, field, value, **where))

    def format(self) -> str:
        """The report: a header line, then per kind its count and its first problems."""
        name = f"dataset {self.dataset_name!r}" if self.dataset_name else "dataset"
        lines = [
            f"{name} (json {self.json_file}, images {self.image_root}): "
            f"{sum(self.counts.values())} problem(s) in {self.num_images} images and "
            f"{self.num_annotations} annotations"
        ]
        for kind, (_, description) in KINDS.items():
            count = self.counts[kind]
            if not count:
                continue
            shown = f", the first {MAX_EXAMPLES}" if count > MAX_EXAMPLES else ""
            lines.append(f"  {kind}: {count} ({description}){shown}")
            lines.extend(f"    {problem}" for problem in self.examples[kind])
        return "\n".join(lines)

    def summary(self) -> list[str]:
        """One line per kind of problem and one of what is left, as the "skip" policy logs."""
        lines = []
        for kind, (records, description) in KINDS.items():
            if self.counts[kind]:
                dropped = (
                    "image(s) and their annotations" if records == "images" else "annotation(s)"
                )
                lines.append(
                    f"dataset {self.dataset_name!r}: {kind}: dropped {self.counts[kind]} {dropped} "
                    f"({description})"
                )
        lines.append(
            f"dataset {self.dataset_name!r}: kept "
            f"{self.num_images - len(self.drop_image_indices)} of {self.num_images} images and "
            f"{self.num_annotations - len(self.drop_annotation_indices)} of "
            f"{self.num_annotations} annotations"
        )
        return lines


def validate_coco_dataset(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    dataset_name: str = "",
    *,
    num_threads: int | None = None,
    full_decode: bool = False,
) -> DatasetReport:
    """
    Read a COCO-format json and check it and the headers of its images.

    Args:
        json_file: the json, as given to ``register_coco_instances``.
        image_root: folder that the images' file_name are relative to.
        dataset_name: name shown in the report.
        num_threads: threads reading image headers; default: ThreadPoolExecutor's.
        full_decode: decode every image's pixels too, which finds damaged image data (a
            truncated file) that the header does not show, at the cost of reading every file.

    Returns:
        The report; ``report.ok`` when nothing is wrong.
    """
    return read_and_check_coco_dataset(
        json_file, image_root, dataset_name, num_threads=num_threads, full_decode=full_decode
    )[1]


def read_and_check_coco_dataset(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    dataset_name: str = "",
    *,
    num_threads: int | None = None,
    full_decode: bool = False,
) -> tuple[Any, DatasetReport]:
    """
    Read a COCO-format json and check it and the headers of its images.

    Args:
        json_file, image_root, dataset_name, num_threads, full_decode: see
            :func:`validate_coco_dataset`.

    Returns:
        The parsed json (None when it cannot be read), for :func:`cleaned_coco_dict`, and
        the report.
    """
    json_file, image_root = str(json_file), str(image_root)
    try:
        with open(json_file, "rb") as f:
            dataset = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        report = DatasetReport(dataset_name, json_file, image_root)
        report.add("malformed_json", "(file)", json_file, detail=f"{type(e).__name__}: {e}")
        return None, report
    return dataset, check_coco_dataset(
        dataset,
        json_file,
        image_root,
        dataset_name,
        num_threads=num_threads,
        full_decode=full_decode,
    )


def check_coco_dataset(
    dataset: Any,
    json_file: str,
    image_root: str,
    dataset_name: str = "",
    *,
    check_files: bool = True,
    num_threads: int | None = None,
    full_decode: bool = False,
) -> DatasetReport:
    """
    Check a parsed COCO-format json and, unless ``check_files`` is False, its image files.

    Images must have an int id, a file_name, and positive width and height (Detectron2's
    ``load_coco_json`` reads them) matching the file's size after its EXIF orientation (as
    Detectron2's ``check_image_size`` compares them); only the header is decoded. Annotations
    must have int id, image_id and category_id naming known records, and a bbox of 4 finite
    numbers (XYWH) with positive width and height overlapping its image; a box partly outside
    is valid (Detectron2 clips it), and so is an image without annotations (a negative).

    Args:
        dataset: the parsed json.
        json_file, image_root, dataset_name: see :func:`validate_coco_dataset`.
        check_files: also open every image file.
        num_threads, full_decode: see :func:`validate_coco_dataset`.

    Returns:
        The report.
    """
    report = DatasetReport(dataset_name, json_file, image_root)
    if type(dataset) is not dict:
        report.add("malformed_json", "(top level)", type(dataset).__name__, detail="not an object")
        return report
    records = {}
    for key in ("images", "annotations", "categories"):
        records[key] = dataset.get(key)
        if type(records[key]) is not list:
            report.add("malformed_json", key, records[key], detail="not a list")
            records[key] = []
    report.num_images, report.num_annotations = len(records["images"]), len(records["annotations"])
    category_ids = _check_categories(records["categories"], report)
    images_by_id, files = _check_images(records["images"], report)
    if check_files:
        _check_image_files(files, image_root, report, num_threads, full_decode)
    # Ids of dropped images; those without a usable id have no annotations to drop with them.
    dropped_ids = {
        image_id
        for image_id in (_image_id(records["images"][i]) for i in report.drop_image_indices)
        if type(image_id) is int
    }
    _check_annotations(
        records["annotations"], records["images"], images_by_id, category_ids, dropped_ids, report
    )
    return report


def cleaned_coco_dict(dataset: dict, report: DatasetReport) -> dict:
    """
    The json without the records the report drops (a shallow copy; other keys are kept).

    Args:
        dataset: the parsed json that ``report`` was made from.
        report: its report, without malformed_json problems.
    """
    drop_images, drop_annotations = report.drop_image_indices, report.drop_annotation_indices
    return {
        **dataset,
        "images": [r for i, r in enumerate(dataset["images"]) if i not in drop_images],
        "annotations": [
            r for i, r in enumerate(dataset["annotations"]) if i not in drop_annotations
        ],
    }


def _check_categories(categories: list, report: DatasetReport) -> set[int]:
    """The category ids; reports ill-typed, repeated or no categories as malformed_json."""
    category_ids: set[int] = set()
    for index, category in enumerate(categories):
        if type(category) is not dict:
            report.add("malformed_json", f"categories[{index}]", category, detail="not an object")
            continue
        category_id = category.get("id")
        if type(category_id) is not int or category_id in category_ids:
            detail = "not an int" if type(category_id) is not int else "repeated"
            report.add("malformed_json", f"categories[{index}].id", category_id, detail=detail)
        elif type(category.get("name")) is not str:
            report.add(
                "malformed_json",
                f"categories[{index}].name",
                category.get("name"),
                detail="not a string",
            )
        else:
            category_ids.add(category_id)
    if not categories:
        report.add("malformed_json", "categories", categories, detail="empty")
    return category_ids


def _check_images(
    images: list, report: DatasetReport
) -> tuple[dict[int, tuple[int, tuple | None]], list[tuple[int, int, str, tuple | None]]]:
    """
    Check the image records.

    Returns:
        id -> (position of its first record, (width, height) or None when they are bad);
        the files to check, as (position, id, file_name, (width, height) or None).
    """
    images_by_id: dict[int, tuple[int, tuple | None]] = {}
    files = []
    repeated_ids = set()
    for index, image in enumerate(images):
        if type(image) is not dict:
            report.add("malformed_image", "(record)", image, index=index, detail="not an object")
            report.drop_image_indices.add(index)
            continue
        image_id, file_name = image.get("id"), image.get("file_name")
        where = {"image_id": image_id, "file_name": file_name, "index": index}
        if type(image_id) is not int:
            report.add("malformed_image", "id", image_id, **where, detail="not an int")
            report.drop_image_indices.add(index)
        elif image_id in images_by_id:
            # Which of the records an annotation belongs to is unknown: all are dropped.
            report.add("malformed_image", "id", image_id, **where, detail="repeated")
            report.drop_image_indices.add(index)
            repeated_ids.add(image_id)
        size = (image.get("width"), image.get("height"))
        for key, value in zip(("width", "height"), size):
            if type(value) not in _NUMBER_TYPES or not value > 0:
                report.add("malformed_image", key, value, **where, detail="not a positive number")
                report.drop_image_indices.add(index)
                size = None
        if type(file_name) is not str or not file_name:
            report.add("malformed_image", "file_name", file_name, **where, detail="not a name")
            report.drop_image_indices.add(index)
        else:
            files.append((index, image_id, file_name, size))
        if type(image_id) is int and image_id not in images_by_id:
            images_by_id[image_id] = (index, size)
    for image_id in repeated_ids:
        report.drop_image_indices.add(images_by_id[image_id][0])
    return images_by_id, files


def _check_image_files(
    files: list[tuple[int, int, str, tuple | None]],
    image_root: str,
    report: DatasetReport,
    num_threads: int | None,
    full_decode: bool,
) -> None:
    """Decode every file's header (or whole image), in threads: opening many files is mostly
    waiting, and PIL's decoders release the GIL."""
    jobs = [(os.path.join(image_root, file_name), size) for _, _, file_name, size in files]
    tasks = [jobs[i : i + _FILES_PER_TASK] for i in range(0, len(jobs), _FILES_PER_TASK)]
    check = functools.partial(_check_files, full_decode=full_decode)
    with ThreadPoolExecutor(num_threads) as pool:
        results = [result for task in pool.map(check, tasks) for result in task]
    for (index, image_id, file_name, size), result in zip(files, results):
        if result is not None:
            kind, detail = result
            where = {"image_id": image_id, "file_name": file_name, "index": index}
            if kind == "image_size_mismatch":
                report.add(kind, "width, height", list(size), **where, detail=detail)
            else:
                report.add(kind, "file_name", file_name, **where, detail=detail)
            report.drop_image_indices.add(index)


def _check_files(
    jobs: list[tuple[str, tuple | None]], full_decode: bool
) -> list[tuple[str, str] | None]:
    return [_check_file(path, size, full_decode) for path, size in jobs]


def _check_file(path: str, size: tuple | None, full_decode: bool) -> tuple[str, str] | None:
    """None for a good file, else (kind of problem, what was found)."""
    try:
        with Image.open(path) as image:
            decoded = image.size
            if full_decode:
                image.load()
            try:
                orientation = image.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # Detectron2's read_image ignores unreadable EXIF the same way
                orientation = None
    except (FileNotFoundError, NotADirectoryError):
        return "missing_image", f"no file {path}"
    except Exception as e:  # PIL's parsers raise many types on bad bytes
        return "unreadable_image", f"{type(e).__name__}: {e}"
    if orientation in _TRANSPOSING_ORIENTATIONS:
        decoded = decoded[::-1]
    if size is not None and decoded != size:
        return "image_size_mismatch", f"decoded {decoded[0]}x{decoded[1]}"
    return None


def _check_annotations(
    annotations: list,
    images: list,
    images_by_id: dict[int, tuple[int, tuple | None]],
    category_ids: set[int],
    dropped_image_ids: set[int],
    report: DatasetReport,
) -> None:
    """Check the annotations; mark the bad ones and those of dropped images to be dropped."""
    seen_ids: set[int] = set()
    for index, annotation in enumerate(annotations):
        if type(annotation) is dict:
            annotation_id, image_id = annotation.get("id"), annotation.get("image_id")
            category_id = annotation.get("category_id")
            # Types first: True and 1.0 hash like the id 1, and a list cannot be looked up.
            image = images_by_id.get(image_id) if type(image_id) is int else None
            if (
                type(annotation_id) is int
                and annotation_id not in seen_ids
                and image is not None
                and type(category_id) is int
                and category_id in category_ids
                and _bbox_kind(annotation.get("bbox"), image[1]) is None
                and annotation.get("ignore", 0) == 0
            ):
                seen_ids.add(annotation_id)
                if image_id in dropped_image_ids:
                    report.drop_annotation_indices.add(index)
                continue
        _report_annotation(annotation, index, images, images_by_id, category_ids, seen_ids, report)
        report.drop_annotation_indices.add(index)


def _report_annotation(
    annotation: Any,
    index: int,
    images: list,
    images_by_id: dict[int, tuple[int, tuple | None]],
    category_ids: set[int],
    seen_ids: set[int],
    report: DatasetReport,
) -> None:
    """Report every problem of an annotation known to have one."""
    if type(annotation) is not dict:
        report.add(
            "malformed_annotation", "(record)", annotation, index=index, detail="not an object"
        )
        return
    annotation_id, image_id = annotation.get("id"), annotation.get("image_id")
    category_id, bbox = annotation.get("category_id"), annotation.get("bbox")
    image = images_by_id.get(image_id) if type(image_id) is int else None
    where = {"annotation_id": annotation_id, "image_id": image_id, "index": index}
    if image is not None:
        where["file_name"] = _file_name(images[image[0]])
    if type(annotation_id) is not int:
        report.add("malformed_annotation", "id", annotation_id, **where, detail="not an int")
    elif annotation_id in seen_ids:
        report.add("malformed_annotation", "id", annotation_id, **where, detail="repeated")
    else:
        seen_ids.add(annotation_id)
    if type(image_id) is not int:
        report.add("malformed_annotation", "image_id", image_id, **where, detail="not an int")
    elif image is None:
        report.add("unknown_image_id", "image_id", image_id, **where)
    if type(category_id) is not int:
        report.add("malformed_annotation", "category_id", category_id, **where, detail="not an int")
    elif category_id not in category_ids:
        report.add("unknown_category", "category_id", category_id, **where)
    size = None if image is None else image[1]
    kind = _bbox_kind(bbox, size)
    if kind == "malformed_annotation":
        report.add(kind, "bbox", bbox, **where, detail="not a list of 4 finite numbers")
    elif kind == "box_outside_image":
        report.add(kind, "bbox", bbox, **where, detail=f"image {size[0]}x{size[1]}")
    elif kind is not None:
        report.add(kind, "bbox", bbox, **where)
    if annotation.get("ignore", 0) != 0:
        report.add(
            "malformed_annotation",
            "ignore",
            annotation["ignore"],
            **where,
            detail="Detectron2 does not support ignore",
        )


def _bbox_kind(bbox: Any, size: tuple | None) -> str | None:
    """The kind of problem of an XYWH box in an image of ``size``, or None when valid."""
    if type(bbox) is not list or len(bbox) != 4:
        return "malformed_annotation"
    x, y, w, h = bbox
    if not (
        type(x) in _NUMBER_TYPES
        and type(y) in _NUMBER_TYPES
        and type(w) in _NUMBER_TYPES
        and type(h) in _NUMBER_TYPES
        # One call for four: a sum of numbers is finite when none is inf or nan.
        and math.isfinite(x + y + w + h)
    ):
        return "malformed_annotation"
    if not (w > 0 and h > 0):
        return "empty_box"
    # Partly outside is valid: Detectron2 clips boxes to the image.
    if size is not None and not (x < size[0] and y < size[1] and x + w > 0 and y + h > 0):
        return "box_outside_image"
    return None


def _image_id(image: Any) -> Any:
    return image.get("id") if type(image) is dict else None


def _file_name(image: Any) -> Any:
    return image.get("file_name") if type(image) is dict else None


def _short_repr(value: Any, limit: int = 80) -> str:
    """repr, cut to ``limit`` characters: a malformed value can be a whole list of records."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
