"""Config keys of focal_det2. Detectron2's ``MODEL.RETINANET.*`` keys keep their meaning."""

from detectron2.config import CfgNode as CN


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
    # Keep the 4-d parameters (all convs, backbone included) in channels-last memory format, so
    # that every feature map is NHWC: faster convolutions (oneDNN on CPU, cuDNN tensor cores) and
    # free reshapes of the head's outputs to (N, Hi*Wi*A, K). Same values either way.
    _C.MODEL.FOCAL_RETINANET.CHANNELS_LAST = True

    # What to do with invalid records of the COCO-format datasets in use: "error" stops before
    # training with one report of all problems, "skip" drops them and trains on the rest.
    _C.DATASETS.INVALID_POLICY = "error"

    # COCOeval implementation of the COCO evaluation: "faster_coco_eval" (compiled, needs no
    # Detectron2 _C) or "pycocotools" (the official Python code); both give the same numbers.
    _C.TEST.COCO_EVAL_BACKEND = "faster_coco_eval"
