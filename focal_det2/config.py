"""Config keys of focal_det2. Detectron2's ``MODEL.RETINANET.*`` keys keep their meaning."""

import os
from typing import Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_focal_config", "load_config"]


def add_focal_config(cfg: CN) -> None:
    """
    Add the plugin's keys to a Detectron2 config, in place. With the defaults, a
    ``FocalRetinaNet`` is the RetinaNet of the paper and of Detectron2: the focal loss with
    ``MODEL.RETINANET.FOCAL_LOSS_ALPHA`` 0.25, ``FOCAL_LOSS_GAMMA`` 2.0, and the classifier prior
    ``MODEL.RETINANET.PRIOR_PROB`` 0.01.
    """
    _C = cfg
    _C.MODEL.FOCAL_RETINANET = CN()
    # Name in FOCAL_HEAD_REGISTRY of the classification/box-regression head.
    _C.MODEL.FOCAL_RETINANET.HEAD_NAME = "FocalRetinaNetHead"
    # Name in FOCAL_CLS_LOSS_REGISTRY of the classification loss: SigmoidFocalLoss (the paper's),
    # BalancedCrossEntropyLoss (Table 1a), FocalStarLoss (Appendix A), SoftmaxFocalLoss,
    # OhemCrossEntropyLoss (Table 1d).
    _C.MODEL.FOCAL_RETINANET.CLS_LOSS_NAME = "SigmoidFocalLoss"
    # beta of FL* (Appendix A); its gamma is MODEL.RETINANET.FOCAL_LOSS_GAMMA.
    _C.MODEL.FOCAL_RETINANET.FOCAL_STAR_BETA = 1.0
    # OHEM baseline (Table 1d): per image, NMS over anchors scored by their loss at NMS_THRESH,
    # then the BATCH_SIZE_PER_IMAGE hardest; FG_FRACTION > 0 caps the foreground share (0.25 is
    # the paper's 1:3 ratio), -1 takes the hardest regardless of their label.
    _C.MODEL.FOCAL_RETINANET.OHEM = CN()
    _C.MODEL.FOCAL_RETINANET.OHEM.BATCH_SIZE_PER_IMAGE = 128
    _C.MODEL.FOCAL_RETINANET.OHEM.NMS_THRESH = 0.7
    _C.MODEL.FOCAL_RETINANET.OHEM.FG_FRACTION = -1.0
    # Detectron2 also marks as foreground the best anchor of each ground-truth box below the IoU
    # threshold; the paper has no such rule. True keeps Detectron2's behaviour.
    _C.MODEL.FOCAL_RETINANET.ALLOW_LOW_QUALITY_MATCHES = True
    # Normalise the losses by the number of positive anchors summed over all processes, as the
    # paper's 8-GPU batch implies (Detectron2 uses each process's own count).
    _C.MODEL.FOCAL_RETINANET.NUM_POS_ACROSS_WORKERS = True
    # Write class-imbalance diagnostics to the EventStorage every this many iterations; 0 = off.
    _C.MODEL.FOCAL_RETINANET.DIAGNOSTICS_PERIOD = 20
    # Memory format of the convolutions, "auto", "on" or "off". "on" keeps the 4-d parameters
    # (backbone included) in channels-last format, so that every feature map is NHWC; same values
    # either way. NHWC is faster with cuDNN on tensor-core GPUs, and with oneDNN for inference on
    # every CPU and for training on AVX-512 CPUs, slower for training on AVX2-only CPUs: "auto"
    # picks per mode (train() / eval() convert the parameters in place) by the device (and
    # ONEDNN_MAX_CPU_ISA), and logs why.
    _C.MODEL.FOCAL_RETINANET.CHANNELS_LAST = "auto"
    # Run the backbone (with the FPN) and the head under torch.compile, with dynamic shapes (one
    # graph for every image size); anchor matching and losses stay eager. Compiling takes a
    # while on the first iteration (logged) and falls back to eager, with a warning, where it
    # fails. State-dict keys and checkpoints are unchanged.
    _C.MODEL.FOCAL_RETINANET.COMPILE = False
    # Inference (eval mode, no gradients, eager) runs copies of the backbone and head with each
    # batch norm folded into the convolution before it: one pass over each feature map less,
    # the same detections up to float rounding (README: Deploy). The copies share the other
    # weights and are rebuilt after train()/eval() and when a weight changes; with forward hooks
    # on those modules inference runs them. False: Detectron2's computation, bit for bit.
    _C.MODEL.FOCAL_RETINANET.FOLD_BATCH_NORMS = True
    # In those copies, on a CPU, channels-last convolutions take their weights packed once into
    # oneDNN's layout, where eager PyTorch packs them at every call, and run the ReLU (and a
    # ResNet block's residual addition) after them as oneDNN post-ops: the same kernel and the
    # same results, faster (README: Deploy).
    _C.MODEL.FOCAL_RETINANET.PACK_CONV_WEIGHTS = True
    # The 3x3 convolutions of the head and the FPN's output with >= 256 input and output
    # channels run Winograd's algorithms on large CPU maps, "auto", "on" or "off": forward and
    # the input's gradient by NNPACK from 40 x 40 (P3, and P4 from 640 px), the weight's gradient
    # from 32 x 32; 4-5x fewer multiplications, the same results up to float rounding (relative
    # 2e-5 per convolution). "auto": where oneDNN runs without AVX-512 (AVX2 CPUs, or
    # ONEDNN_MAX_CPU_ISA=AVX2), where it is faster; logged at build. In `python -m
    # focal_det2.export`, the graph's 3x3 convolutions of >= 128 channels by F(4x4, 3x3) in
    # standard operators: "auto" for ONNX (faster in onnxruntime), not for an ExportedProgram.
    _C.MODEL.FOCAL_RETINANET.WINOGRAD = "auto"
    # Per-class alpha of the classification loss (every loss with an alpha): one float in
    # [0, 1] per class (MODEL.RETINANET.NUM_CLASSES values), weighting the positives of class k
    # by alpha_k and its negatives by 1 - alpha_k. [] = MODEL.RETINANET.FOCAL_LOSS_ALPHA for
    # every class (the paper).
    _C.MODEL.FOCAL_RETINANET.CLASS_ALPHA = []
    # Derive the per-class alpha from the instance counts n_k of DATASETS.TRAIN with this power
    # p >= 0 (0 = off; exclusive with CLASS_ALPHA): on the odds scale, alpha_k / (1 - alpha_k) =
    # a / (1 - a) * (median_j n_j / n_k)^p with a = MODEL.RETINANET.FOCAL_LOSS_ALPHA, clipped to
    # [0.01, 0.99]. A class of median frequency keeps a; rarer classes weigh their positives more.
    # Computed when the model is built; without the training sets registered (inference) the
    # loss keeps a, which inference does not use.
    _C.MODEL.FOCAL_RETINANET.CLASS_ALPHA_FROM_FREQUENCY = 0.0
    # Fine-tuning from weights of another number of classes (e.g. COCO's 80): drop the
    # classifier's weights from MODEL.WEIGHTS (head.cls_score) and start it from the prior
    # (MODEL.RETINANET.PRIOR_PROB). False: a classifier of another shape stops training with an
    # error, as any other weight whose shape does not fit the model.
    _C.MODEL.FOCAL_RETINANET.WEIGHTS_DROP_CLASSIFIER = False

    # What to do with invalid records of the COCO-format datasets in use: "error" stops before
    # training with one report of all problems, "skip" drops them and trains on the rest.
    # It applies as well to an image that fails to decode while training: "error" stops the run
    # naming the file, "skip" replaces the sample and counts it (data/skipped_samples).
    _C.DATASETS.INVALID_POLICY = "error"
    # Decode every image's pixels in the dataset validation, not only its header: finds damaged
    # files before training, at the cost of reading every image once more.
    _C.DATASETS.VALIDATE_FULL_DECODE = False

    # Group the training batches by orientation and by the resized short side (in 32 px steps)
    # instead of by orientation alone (DATALOADER.ASPECT_RATIO_GROUPING): with several
    # INPUT.MIN_SIZE_TRAIN a batch is then padded to its own size, not to the largest.
    _C.DATALOADER.SIZE_GROUPING = False

    # COCOeval implementation of the COCO evaluation: "faster_coco_eval" (compiled, needs no
    # Detectron2 _C) or "pycocotools" (the official Python code); both give the same numbers.
    _C.TEST.COCO_EVAL_BACKEND = "faster_coco_eval"


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """
    The frozen config of ``config_file`` with the plugin's keys and the ``KEY VALUE`` overrides
    ``opts``, as every command of the project builds it (CPU when CUDA is not available).

    Raises:
        ValueError: naming the file, or the file and the key, when either is invalid.
    """
    if not config_file or not os.path.isfile(config_file):
        raise ValueError(f"config file not found: {config_file!r}")
    cfg = get_cfg()
    add_focal_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise ValueError(f"invalid config ({config_file}, command line): {e}") from e
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg
