"""The training mapper: Detectron2's ``DatasetMapper``, without failing on images that cannot be
decoded.

The dataset validation decodes each image's header before training (its pixels too with
``DATASETS.VALIDATE_FULL_DECODE``); a file whose body is damaged, or that changes on disk while
training runs, still fails when its pixels are decoded, in a data-loader worker. There an
exception would end the worker with a traceback, so :class:`FocalDatasetMapper` returns None
instead (Detectron2's ``MapDataset`` then maps a random other sample) and reports the failure
with the next sample it returns: the trainer, in the main process, applies
``DATASETS.INVALID_POLICY`` and counts the failures of every worker.
"""

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog

__all__ = ["DECODE_FAILURES_KEY", "DecodeFailure", "FocalDatasetMapper"]

# Key of a mapped sample holding the DecodeFailure list of the samples replaced before it.
DECODE_FAILURES_KEY = "decode_failures"


@dataclass(frozen=True)
class DecodeFailure:
    """An image that could not be decoded while training.

    Attributes:
        file_name: the image file.
        dataset: the name(s) of the training dataset(s) it belongs to.
        error: the decoder's error, "Type: message".
    """

    file_name: str
    dataset: str
    error: str

    def __str__(self) -> str:
        return f"image {self.file_name} of dataset {self.dataset} cannot be decoded ({self.error})"


class FocalDatasetMapper(DatasetMapper):
    """
    ``DatasetMapper`` that returns None for an image it cannot read or decode, and attaches the
    :class:`DecodeFailure` of such images to the next sample it maps, under
    ``DECODE_FAILURES_KEY``.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, image_roots: Dict[str, str], **kwargs: Any):
        """
        Args:
            is_train, kwargs: those of Detectron2's ``DatasetMapper``.
            image_roots: dataset name -> its image folder, to name the dataset of a bad file.
        """
        super().__init__(is_train, **kwargs)
        self.image_roots = image_roots
        self._pending: List[DecodeFailure] = []

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        ret["image_roots"] = {
            name: str(MetadataCatalog.get(name).get("image_root", "")) for name in names
        }
        return ret

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        try:
            mapped = super().__call__(dataset_dict)
        # PIL reports damaged image data as OSError ("image file is truncated", "broken data
        # stream") or, from some parsers, SyntaxError; a vanished file is an OSError too.
        except (OSError, SyntaxError) as e:
            file_name = dataset_dict["file_name"]
            self._pending.append(
                DecodeFailure(file_name, self._dataset_of(file_name), f"{type(e).__name__}: {e}")
            )
            return None
        if self._pending:
            mapped[DECODE_FAILURES_KEY], self._pending = self._pending, []
        return mapped

    def _dataset_of(self, file_name: str) -> str:
        """The dataset(s) whose image folder holds ``file_name``, else all of them."""
        names = [
            name
            for name, root in self.image_roots.items()
            if root
            and os.path.commonpath([os.path.abspath(root), os.path.abspath(file_name)])
            == os.path.abspath(root)
        ]
        return " or ".join(map(repr, names or list(self.image_roots)))
