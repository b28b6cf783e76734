"""The dataset policy of training: which datasets a config uses are validated, and what a
problem stops.

Detectron2 reads a dataset's json when training starts and its images one by one while
training, so a bad record otherwise surfaces as a crash mid-run (a missing file, a
``KeyError`` for an unknown category) or silently (annotations of unknown images are
dropped). :func:`validate_datasets` checks every COCO dataset of ``DATASETS.TRAIN`` and
``DATASETS.TEST`` up front with :mod:`focal_det2.data.coco_checks` and applies
``DATASETS.INVALID_POLICY``: "error" stops with one report of all problems, "skip" trains on a
cleaned copy of the json.
"""

import functools
import json
import logging
import os

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..file_io import atomic_write
from .coco_checks import DatasetReport, cleaned_coco_dict, read_and_check_coco_dataset

__all__ = ["DatasetValidationError", "PREPARE_FILES_KEY", "validate_datasets"]

logger = logging.getLogger(__name__)

# Values of DATASETS.INVALID_POLICY.
POLICIES = ("error", "skip")
# Folder under OUTPUT_DIR of the cleaned json files of the "skip" policy.
CLEANED_DIR = "validated_datasets"
# Metadata key of a dataset whose files are made on first use (by its DatasetCatalog loader):
# a callable of no arguments that makes them if need be, points the metadata's json_file and
# image_root at them and returns (json_file, image_root), so that the files validated are
# those the loader will read.
PREPARE_FILES_KEY = "prepare_files"


class DatasetValidationError(ValueError):
    """The datasets in use are invalid under ``DATASETS.INVALID_POLICY``, or it is unknown.

    The message is the complete report, meant to be printed as is.
    """


def validate_datasets(cfg: CfgNode, *, num_threads: int | None = None) -> list[DatasetReport]:
    """
    Validate the COCO-format datasets of ``DATASETS.TRAIN`` and ``DATASETS.TEST`` (those whose
    metadata has a ``json_file``, as ``register_coco_instances`` sets; those whose files are
    made on first use are made first, see ``PREPARE_FILES_KEY``), decoding every image's pixels
    with ``DATASETS.VALIDATE_FULL_DECODE``, and apply ``DATASETS.INVALID_POLICY``.

    "error": raise if any dataset has a problem; nothing is written. "skip": write each
    invalid dataset's json without its bad records (bad images with their annotations) to
    ``<OUTPUT_DIR>/validated_datasets/<name>.json``, atomically so that concurrent processes
    writing the same file are safe, re-register the name with it (so ``COCOEvaluator`` uses it
    too) and log one line per kind of problem; raise only for problems that dropping records
    cannot repair (malformed json, no image left).

    Args:
        cfg: the config.
        num_threads: see :func:`~focal_det2.data.coco_checks.validate_coco_dataset`.

    Returns:
        The reports of the datasets validated.

    Raises:
        DatasetValidationError: with the report of every invalid dataset, or naming
            ``DATASETS.INVALID_POLICY`` when its value is unknown.
    """
    policy = cfg.DATASETS.INVALID_POLICY
    if policy not in POLICIES:
        raise DatasetValidationError(
            f"DATASETS.INVALID_POLICY must be one of {', '.join(map(repr, POLICIES))}, "
            f"got {policy!r}"
        )
    reports, failures, cleaned = [], [], []
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        files = _coco_files(name)
        if files is None:
            continue
        dataset, report = read_and_check_coco_dataset(
            *files,
            name,
            num_threads=num_threads,
            full_decode=cfg.DATASETS.VALIDATE_FULL_DECODE,
        )
        reports.append(report)
        if report.ok:
            continue
        if policy == "error" or report.fatal:
            failures.append(report.format())
        elif len(report.drop_image_indices) == report.num_images:
            failures.append(f"{report.format()}\n  no valid image is left")
        else:
            cleaned.append((name, cleaned_coco_dict(dataset, report), report))
    if failures:
        action = (
            'fix them, or set DATASETS.INVALID_POLICY "skip" to train on the valid records'
            if policy == "error"
            else "dropping the bad records cannot repair these"
        )
        raise DatasetValidationError(
            f"invalid datasets (DATASETS.INVALID_POLICY {policy!r}); {action}:\n"
            + "\n".join(failures)
        )
    for name, dataset, report in cleaned:
        json_file = os.path.join(cfg.OUTPUT_DIR, CLEANED_DIR, f"{name.replace(os.sep, '_')}.json")
        os.makedirs(os.path.dirname(json_file), exist_ok=True)
        atomic_write(json_file, functools.partial(json.dump, dataset), "w")
        _register_again(name, json_file, report.image_root)
        for line in report.summary():
            logger.warning(line)
    return reports


def _coco_files(name: str) -> tuple[str, str] | None:
    """(json_file, image_root) of a registered COCO-format dataset, else None."""
    if name not in DatasetCatalog.list():
        return None  # Detectron2 reports unknown names when it loads them
    metadata = MetadataCatalog.get(name)
    if metadata.get("json_file") is None:
        return None
    prepare_files = metadata.get(PREPARE_FILES_KEY)
    if prepare_files is not None:
        return prepare_files()
    return str(metadata.json_file), str(metadata.get("image_root", ""))


def _register_again(name: str, json_file: str, image_root: str) -> None:
    """Point a registered COCO dataset at another json, keeping its other metadata (not how
    its former files were made: the new ones exist)."""
    kept = {
        key: value
        for key, value in MetadataCatalog.get(name).as_dict().items()
        if key not in ("name", "json_file", "image_root", "evaluator_type", PREPARE_FILES_KEY)
    }
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    register_coco_instances(name, kept, json_file, image_root)
