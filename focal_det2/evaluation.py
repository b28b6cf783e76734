"""COCO box AP through Detectron2's ``COCOEvaluator`` with a selectable COCOeval implementation,
and the evaluation's precision array kept on disk for the training report."""

import os
from typing import Dict, Optional

import numpy as np
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco_evaluation
from faster_coco_eval import COCOeval_faster
from pycocotools.cocoeval import COCOeval

from .file_io import atomic_write

__all__ = [
    "COCO_EVAL_BACKENDS",
    "FocalCOCOEvaluator",
    "check_coco_eval_backend",
    "coco_eval_file",
    "load_coco_eval",
]

# TEST.COCO_EVAL_BACKEND -> (COCOeval class, COCOeval class for a non-default maxDets).
# pycocotools' COCOeval reports AP at maxDets 100 only, hence Detectron2's COCOevalMaxDets;
# faster-coco-eval's summary already uses the last maxDets, so one class serves both.
COCO_EVAL_BACKENDS = {
    "faster_coco_eval": (COCOeval_faster, COCOeval_faster),
    "pycocotools": (COCOeval, d2_coco_evaluation.COCOevalMaxDets),
}


def check_coco_eval_backend(backend: str) -> None:
    """Raise ValueError naming ``TEST.COCO_EVAL_BACKEND`` unless ``backend`` is one we have."""
    if backend not in COCO_EVAL_BACKENDS:
        raise ValueError(
            f"TEST.COCO_EVAL_BACKEND: unknown COCO evaluation backend {backend!r}, "
            f"choose one of {sorted(COCO_EVAL_BACKENDS)}"
        )


def coco_eval_file(output_dir: str, dataset_name: str) -> str:
    """Where :class:`FocalCOCOEvaluator` saves the box evaluation's arrays of ``dataset_name``."""
    return os.path.join(output_dir, f"coco_eval_bbox_{dataset_name}.npz")


def load_coco_eval(path: str) -> Dict[str, np.ndarray]:
    """
    Read a file written by :class:`FocalCOCOEvaluator`.

    Returns:
        ``precision`` (T, R, K, A, M): COCOeval's ``eval["precision"]`` (IoU thresholds, recall
        thresholds, classes, area ranges, max detections; -1 where undefined), ``iou_thrs``
        (T,), ``rec_thrs`` (R,), ``stats`` (12,): the 12 COCO numbers in [0, 1], and
        ``class_names`` (K,).
    """
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


class FocalCOCOEvaluator(COCOEvaluator):
    """
    Detectron2's ``COCOEvaluator`` (bbox) whose COCOeval is chosen by ``backend``:
    ``"faster_coco_eval"`` (compiled, no Detectron2 ``_C`` needed) or ``"pycocotools"`` (the
    official Python implementation). Both give the same numbers.

    With ``output_dir``, it also saves the COCOeval arrays (see :func:`load_coco_eval`) to
    :func:`coco_eval_file`, from which the training report draws its precision-recall curves.
    """

    def __init__(
        self,
        dataset_name: str,
        *,
        backend: str = "faster_coco_eval",
        output_dir: Optional[str] = None,
        max_dets_per_image: Optional[int] = None,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a dataset registered in Detectron2's catalogs, in COCO format.
            backend: a key of :data:`COCO_EVAL_BACKENDS`.
            output_dir: folder for Detectron2's prediction dumps and the COCOeval arrays.
            max_dets_per_image: detections per image that count (COCO: 100).
            distributed: gather the predictions of all processes and evaluate in the main one.
        """
        check_coco_eval_backend(backend)
        # use_fast_impl selects Detectron2's COCOeval_opt, which needs its compiled _C.
        super().__init__(
            dataset_name,
            tasks=("bbox",),
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=max_dets_per_image,
            use_fast_impl=False,
        )
        self._dataset_name = dataset_name
        self._backend = backend

    def _eval_predictions(self, predictions, img_ids=None):
        # Detectron2 looks these names up in its module when it builds the COCOeval, and offers
        # no argument for them; rebinding them for this call leaves every other caller alone.
        cocoeval, cocoeval_max_dets = COCO_EVAL_BACKENDS[self._backend]
        module = d2_coco_evaluation
        saved = module.COCOeval, module.COCOevalMaxDets
        module.COCOeval, module.COCOevalMaxDets = cocoeval, cocoeval_max_dets
        try:
            super()._eval_predictions(predictions, img_ids=img_ids)
        finally:
            module.COCOeval, module.COCOevalMaxDets = saved

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is not None and self._output_dir:
            self._save_arrays(coco_eval, class_names)
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)

    def _save_arrays(self, coco_eval, class_names) -> None:
        num_classes = coco_eval.eval["precision"].shape[2]
        arrays = {
            "precision": np.asarray(coco_eval.eval["precision"], dtype=np.float64),
            "iou_thrs": np.asarray(coco_eval.params.iouThrs, dtype=np.float64),
            "rec_thrs": np.asarray(coco_eval.params.recThrs, dtype=np.float64),
            "stats": np.asarray(coco_eval.stats[:12], dtype=np.float64),
            "class_names": np.asarray(
                list(class_names) if class_names else [str(i) for i in range(num_classes)]
            ),
        }
        os.makedirs(self._output_dir, exist_ok=True)
        atomic_write(
            coco_eval_file(self._output_dir, self._dataset_name),
            lambda f: np.savez(f, **arrays),
            "wb",
        )
