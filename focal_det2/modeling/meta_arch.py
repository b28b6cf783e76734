"""The FocalRetinaNet meta-architecture."""

import logging
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from .acceleration import (
    CHANNELS_LAST_SETTINGS,
    WINOGRAD_SETTINGS,
    choose_channels_last,
    choose_winograd,
    compile_with_fallback,
    cpu_bfloat16_support,
)
from .folding import inference_copy, state_signature
from .heads import FOCAL_HEAD_REGISTRY, build_focal_head
from .losses import FOCAL_CLS_LOSS_REGISTRY, ClassificationLoss, build_cls_loss
from .postprocess import GridAnchors, dense_detections
from .winograd import use_winograd

__all__ = ["FocalRetinaNet", "check_focal_config"]

logger = logging.getLogger(__name__)


def _fail(key: str, value, allowed: str) -> None:
    raise ValueError(f"Invalid config: {key} = {value!r}; allowed: {allowed}.")


def check_focal_config(cfg: CN) -> None:
    """
    Raise ValueError naming the key and its allowed values for a config value the detector
    cannot train with.
    """
    retinanet, focal = cfg.MODEL.RETINANET, cfg.MODEL.FOCAL_RETINANET
    if not retinanet.FOCAL_LOSS_GAMMA >= 0:
        _fail("MODEL.RETINANET.FOCAL_LOSS_GAMMA", retinanet.FOCAL_LOSS_GAMMA, ">= 0")
    alpha = retinanet.FOCAL_LOSS_ALPHA
    if not (0 <= alpha <= 1 or alpha == -1):
        _fail("MODEL.RETINANET.FOCAL_LOSS_ALPHA", alpha, "[0, 1], or -1 for no weighting")
    if not 0 < retinanet.PRIOR_PROB < 1:
        _fail("MODEL.RETINANET.PRIOR_PROB", retinanet.PRIOR_PROB, "(0, 1)")
    if focal.HEAD_NAME == "FocalRetinaNetGNHead":
        _fail(
            "MODEL.FOCAL_RETINANET.HEAD_NAME",
            focal.HEAD_NAME,
            'FocalRetinaNetHead; its GroupNorm variant is MODEL.RETINANET.NORM "GN"',
        )
    for key, registry, name in (
        ("HEAD_NAME", FOCAL_HEAD_REGISTRY, focal.HEAD_NAME),
        ("CLS_LOSS_NAME", FOCAL_CLS_LOSS_REGISTRY, focal.CLS_LOSS_NAME),
    ):
        if name not in registry:
            _fail(f"MODEL.FOCAL_RETINANET.{key}", name, ", ".join(sorted(n for n, _ in registry)))
    if focal.CLS_LOSS_NAME == "FocalStarLoss" and not retinanet.FOCAL_LOSS_GAMMA > 0:
        _fail("MODEL.RETINANET.FOCAL_LOSS_GAMMA", retinanet.FOCAL_LOSS_GAMMA, "> 0 for FL*")
    ohem = focal.OHEM
    if not (isinstance(ohem.BATCH_SIZE_PER_IMAGE, int) and ohem.BATCH_SIZE_PER_IMAGE > 0):
        _fail("MODEL.FOCAL_RETINANET.OHEM.BATCH_SIZE_PER_IMAGE", ohem.BATCH_SIZE_PER_IMAGE, "> 0")
    if not 0 < ohem.NMS_THRESH <= 1:
        _fail("MODEL.FOCAL_RETINANET.OHEM.NMS_THRESH", ohem.NMS_THRESH, "(0, 1]")
    if not (0 < ohem.FG_FRACTION <= 1 or ohem.FG_FRACTION == -1):
        _fail("MODEL.FOCAL_RETINANET.OHEM.FG_FRACTION", ohem.FG_FRACTION, "(0, 1], or -1")
    for key, settings in (
        ("CHANNELS_LAST", CHANNELS_LAST_SETTINGS),
        ("WINOGRAD", WINOGRAD_SETTINGS),
    ):
        if focal.get(key) not in settings:
            _fail(
                f"MODEL.FOCAL_RETINANET.{key}",
                focal.get(key),
                ", ".join(f'"{x}"' for x in settings),
            )
    if focal.DIAGNOSTICS_PERIOD < 0:
        _fail("MODEL.FOCAL_RETINANET.DIAGNOSTICS_PERIOD", focal.DIAGNOSTICS_PERIOD, ">= 0")


def _channels_last(cfg: CN) -> Dict[str, bool]:
    choice = {}
    for mode in ("training", "inference"):
        use, reason = choose_channels_last(
            cfg.MODEL.FOCAL_RETINANET.CHANNELS_LAST, cfg.MODEL.DEVICE, training=mode == "training"
        )
        logger.info("Convolutions in %s memory format for %s (%s).", _FORMAT[use], mode, reason)
        choice[f"channels_last_{mode}"] = use
    return choice


_FORMAT = {True: "NHWC", False: "NCHW"}


def _winograd(cfg: CN) -> bool:
    focal = cfg.MODEL.FOCAL_RETINANET
    if focal.COMPILE:
        return False  # inductor generates its own convolutions
    use, reason = choose_winograd(focal.WINOGRAD, cfg.MODEL.DEVICE)
    logger.info(
        "Large 3x3 convolutions of the FPN and the head by %s (%s).",
        "Winograd" if use else "direct convolution",
        reason,
    )
    return use


def _bfloat16_training(cfg: CN) -> bool:
    # Detectron2's AMPTrainer autocasts to float16 on CUDA; on a CPU the model autocasts its
    # own training forward to bfloat16 (PyTorch's CPU autocast type).
    if not (cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"):
        return False
    native, reason = cpu_bfloat16_support()
    if native:
        logger.info("SOLVER.AMP.ENABLED: training forward in bfloat16 autocast (%s).", reason)
    else:
        logger.warning(
            "SOLVER.AMP.ENABLED: training forward in bfloat16 autocast, slower than float32 "
            "here: %s.",
            reason,
        )
    return True


@META_ARCH_REGISTRY.register()
class FocalRetinaNet(RetinaNet):
    """
    RetinaNet of :paper:`RetinaNet` with its classification loss and head as parts.

    At default config it is Detectron2's ``RetinaNet``: the same state-dict keys, losses,
    gradients and detections. The classification loss (``cls_loss``, a
    :class:`ClassificationLoss`) decides how many logits each anchor has and how they become
    scores; the losses are normalised by the EMA of the number of foreground anchors, summed over
    all processes when ``num_pos_across_workers``.
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss: ClassificationLoss,
        num_pos_across_workers: bool = True,
        diagnostics_period: int = 20,
        channels_last_training: bool = False,
        channels_last_inference: bool = False,
        compile: bool = False,
        fold_batch_norms: bool = True,
        pack_conv_weights: bool = True,
        winograd: bool = False,
        bfloat16_training: bool = False,
        **kwargs,
    ):
        """
        Args:
            cls_loss: the classification loss; it also turns logits into scores at inference.
            num_pos_across_workers: normalise by the number of positive anchors of all processes.
            diagnostics_period: write imbalance diagnostics every this many iterations; 0 = off.
            channels_last_training: keep the 4-d parameters in channels-last memory format
                in training mode (``train()``), so that every feature map is NHWC.
            channels_last_inference: the same in inference mode (``eval()``); the parameters
                change format when the mode changes (the same values, objects and keys).
            compile: run the backbone (with the FPN) and the head under ``torch.compile``.
            fold_batch_norms: in inference without gradients, run copies of the backbone and
                the head with their batch norms folded into the convolutions (not with
                ``compile``, which folds them itself).
            pack_conv_weights: in those copies, on a CPU, give channels-last convolutions their
                weights packed once for oneDNN (eager PyTorch packs them at every call).
            winograd: run the 3x3 convolutions of the head and the FPN's output ones (>= 256
                channels, no norm) by Winograd's algorithms on large CPU maps
                (:mod:`.winograd`; fewer multiplications, the same values up to float
                rounding); the FPN's stay direct in the folded inference copy where their
                weights are packed for oneDNN.
            bfloat16_training: in training, run the forward on a CPU under autocast to bfloat16
                (the convolutions; the parameters, their gradients and the losses stay float32).
            kwargs: the arguments of Detectron2's :class:`RetinaNet`, except the focal-loss ones.
        """
        super().__init__(**kwargs)
        self.cls_loss = cls_loss
        self.num_pos_across_workers = num_pos_across_workers
        self.diagnostics_period = diagnostics_period
        # Memory format by mode: self.channels_last[self.training].
        self.channels_last = {True: channels_last_training, False: channels_last_inference}
        self._apply_memory_format()
        if compile:
            compile_with_fallback(self.backbone, "backbone")
            compile_with_fallback(self.head, "head")
        self.fold_batch_norms = fold_batch_norms and not compile
        self.pack_conv_weights = pack_conv_weights
        self.winograd = winograd
        if winograd:
            logger.info(
                "Winograd for %d of the FPN's and %d of the head's convolutions.",
                len(use_winograd(self.backbone)),
                len(use_winograd(self.head)),
            )
        self.bfloat16_training = bfloat16_training
        # (state signature, backbone, head) of the last folding; not submodules: no state-dict
        # keys, and DDP and optimizers do not see them.
        self._folded: Optional[tuple] = None
        self._last_anchors: Optional[tuple] = None  # (feature sizes, anchors)

    @classmethod
    def from_config(cls, cfg):
        check_focal_config(cfg)
        ret = super().from_config(cfg)
        # The classification loss replaces Detectron2's focal-loss arguments.
        del ret["focal_loss_alpha"], ret["focal_loss_gamma"]
        feature_shapes = [ret["backbone"].output_shape()[f] for f in ret["head_in_features"]]
        ret.update(
            head=build_focal_head(cfg, feature_shapes),
            anchor_matcher=Matcher(
                cfg.MODEL.RETINANET.IOU_THRESHOLDS,
                cfg.MODEL.RETINANET.IOU_LABELS,
                allow_low_quality_matches=cfg.MODEL.FOCAL_RETINANET.ALLOW_LOW_QUALITY_MATCHES,
            ),
            cls_loss=build_cls_loss(cfg),
            num_pos_across_workers=cfg.MODEL.FOCAL_RETINANET.NUM_POS_ACROSS_WORKERS,
            diagnostics_period=cfg.MODEL.FOCAL_RETINANET.DIAGNOSTICS_PERIOD,
            **_channels_last(cfg),
            compile=cfg.MODEL.FOCAL_RETINANET.COMPILE,
            fold_batch_norms=cfg.MODEL.FOCAL_RETINANET.FOLD_BATCH_NORMS,
            pack_conv_weights=cfg.MODEL.FOCAL_RETINANET.PACK_CONV_WEIGHTS,
            winograd=_winograd(cfg),
            bfloat16_training=_bfloat16_training(cfg),
        )
        return ret

    def train(self, mode: bool = True):
        super().train(mode)
        self._apply_memory_format()
        # Every mode change (Detectron2's evaluation calls eval() each time) folds anew: the
        # state signature misses changes that autograd does not count (``.data`` edits,
        # collectives such as DDP's buffer broadcast).
        self._folded = None
        return self

    def _apply(self, fn, *args, **kwargs):
        # Device and dtype conversions: the folded copies would keep the old tensors alive.
        self._folded = self._last_anchors = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # Pickles and deep copies leave the caches out: they are rebuilt when needed.
        return {**super().__getstate__(), "_folded": None, "_last_anchors": None}

    def inference_modules(self) -> Tuple[nn.Module, nn.Module]:
        """
        The backbone and the head that inference runs now: copies with the batch norms folded
        into the convolutions (and, with ``pack_conv_weights``, the convolutions' weights packed
        for oneDNN) when ``fold_batch_norms`` applies, i.e. in eval mode, without
        gradients, in eager mode, without forward hooks on their modules; else
        ``self.backbone`` and ``self.head``. The copies are built at the first call after
        ``train()``/``eval()`` or a device or dtype change, and again whenever a parameter or
        buffer changed (:func:`~focal_det2.modeling.folding.state_signature`).
        """
        if (
            self.training
            or not self.fold_batch_norms
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
        ):
            return self.backbone, self.head
        signature = state_signature([self.backbone, self.head])
        if signature is None:
            return self.backbone, self.head
        if self._folded is None or self._folded[0] != signature:
            backbone = inference_copy(self.backbone, self.pack_conv_weights)
            head = inference_copy(self.head, self.pack_conv_weights, self.winograd)
            self._folded = (signature, backbone or self.backbone, head or self.head)
        return self._folded[1:]

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """
        Detectron2's: losses in training, per image ``{"instances": Instances}`` in inference,
        computed by :meth:`inference_modules`.
        """
        if self.training and self.bfloat16_training:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().forward(batched_inputs)
        backbone, head = self.inference_modules()
        if backbone is self.backbone and head is self.head:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        results = self.forward_inference(images, features, head(features))
        return [
            {
                "instances": detector_postprocess(
                    r, x.get("height", size[0]), x.get("width", size[1])
                )
            }
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]

    def _apply_memory_format(self) -> None:
        fmt = torch.channels_last if self.channels_last[self.training] else torch.contiguous_format
        if any(not p.is_contiguous(memory_format=fmt) for p in self.parameters() if p.dim() == 4):
            # In place (Module.to sets .data): optimizers and DDP keep the same parameters.
            # Device moves and load_state_dict keep the format of existing tensors.
            self.to(memory_format=fmt)

    @property
    def num_logits(self) -> int:
        """Classification logits per anchor."""
        return self.cls_loss.num_logits(self.num_classes)

    def _transpose_dense_predictions(
        self, predictions: List[List[Tensor]], dims_per_anchor: List[int]
    ) -> List[List[Tensor]]:
        """
        Detectron2's, for the head's outputs: its callers ask for ``num_classes`` values per
        anchor, the head predicts ``num_logits`` (K + 1 for a loss with a background logit).
        Each (N, A*D, H, W) map becomes (N, H*W*A, D), the same order as Detectron2's
        ``permute_to_N_HWA_K``, in 2 operations instead of 3 (a view of a channels-last map).
        """
        dims = [self.num_logits, *dims_per_anchor[1:]]
        return [
            [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, dim) for x in level_predictions]
            for level_predictions, dim in zip(predictions, dims)
        ]

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """
        Detectron2's, after checking that every ground-truth class id is one of the model's
        classes: an id past ``MODEL.RETINANET.NUM_CLASSES`` would otherwise train as a
        background anchor of the classification loss but a foreground one of the box loss.
        """
        gt_classes = cat([x.gt_classes for x in gt_instances])
        if gt_classes.numel():
            low, high = int(gt_classes.min()), int(gt_classes.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"ground-truth class id {high if high >= self.num_classes else low} is out "
                    f"of range for MODEL.RETINANET.NUM_CLASSES = {self.num_classes} (ids "
                    f"0..{self.num_classes - 1}): set MODEL.RETINANET.NUM_CLASSES to the "
                    "number of classes of the training data."
                )
        return super().label_anchors(anchors, gt_instances)

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Args:
            anchors (list[Boxes]): #lvl anchors, each (Hi*Wi*A, 4).
            pred_logits (list[Tensor]): #lvl tensors of shape (N, Hi*Wi*A, L).
            gt_labels (list[Tensor]): N tensors of shape (R,), R = sum(Hi*Wi*A), values in
                {-1: ignore, 0..K-1: class, K: background}.
            pred_anchor_deltas (list[Tensor]): #lvl tensors of shape (N, Hi*Wi*A, 4).
            gt_boxes (list[Tensor]): N tensors of shape (R, 4).

        Returns:
            dict[str, Tensor]: "loss_cls" and "loss_box_reg", scalars.
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage = get_event_storage()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = self._loss_normalizer(num_pos_anchors)

        # Under mixed precision (autocast) the head's outputs are float16/bfloat16: the losses,
        # sums over ~1e5-1e6 terms, and the scores of the diagnostics are computed in float32.
        # A no-op for float32 outputs.
        logits = cat(pred_logits, dim=1).float()
        deltas = cat(pred_anchor_deltas, dim=1).float()
        anchor_boxes = Boxes.cat(anchors).tensor
        loss_cls = self.cls_loss(logits, gt_labels, anchor_boxes)
        if self.cls_loss.normalize_by_num_foreground:
            loss_cls = loss_cls / normalizer
        # Detectron2's regression loss, given the foreground anchors only: it would otherwise
        # compute targets (and for the IoU losses, decoded boxes) for all N x R anchors.
        _, fg_anchor_index = pos_mask.nonzero(as_tuple=True)
        loss_box_reg = _dense_box_regression_loss(
            [anchor_boxes[fg_anchor_index]],
            self.box2box_transform,
            [deltas[pos_mask][None]],
            [torch.stack(gt_boxes)[pos_mask]],
            torch.ones_like(fg_anchor_index, dtype=torch.bool)[None],
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        if self.diagnostics_period > 0 and storage.iter % self.diagnostics_period == 0:
            storage.put_scalars(**self.imbalance_diagnostics(logits.detach(), gt_labels))
        losses = {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg / normalizer}
        # For the post-mortem of a non-finite loss (FocalTrainer): detached tensors and two
        # reductions, so recording them every step costs no device synchronisation.
        self.last_loss_stats = {
            "losses": {name: loss.detach() for name, loss in losses.items()},
            "num_pos_anchors": num_pos_anchors,
            "loss_normalizer": normalizer,
            "max_abs_logit": torch.stack(torch.aminmax(logits.detach())).abs().max(),
            "max_abs_box_delta": torch.stack(torch.aminmax(deltas.detach())).abs().max(),
        }
        return losses

    def _loss_normalizer(self, num_pos_anchors: int) -> float:
        """
        The divisor of this process's summed losses: Detectron2's EMA of the number of positive
        anchors. Across workers, the EMA runs on the positives of the whole batch and is
        divided by the number of processes, so that DDP's gradient average equals the gradient
        of the whole batch's summed loss divided by its positives, as in one process (the
        paper's synchronous 8-GPU SGD).
        """
        world_size = comm.get_world_size()
        if not self.num_pos_across_workers or world_size == 1:
            return self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)
        total = torch.tensor([num_pos_anchors], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return self._ema_update("loss_normalizer", max(total.item(), 1), 100) / world_size

    @torch.no_grad()
    def imbalance_diagnostics(self, logits: Tensor, gt_labels: Tensor) -> Dict[str, float]:
        """
        The class-imbalance figures the paper discusses, for one batch.

        Args:
            logits: (N, R, L) classification logits; gt_labels: (N, R) anchor labels.

        Returns:
            dict with "focal/neg_loss_share" (share of the classification loss from background
            anchors), "focal/easy_neg_loss_share" (from background anchors with p_t > 0.9,
            i.e. every class probability below 0.1) and "focal/pos_fg_prob" (mean probability
            of the true class on foreground anchors; nan without foreground).
        """
        valid = gt_labels >= 0
        logits, labels = logits[valid], gt_labels[valid]
        loss = self.cls_loss.per_anchor_loss(logits, labels).float()
        scores = self.cls_loss.predict_scores(logits).float()
        negative = labels == self.num_classes
        easy_negative = negative & (scores.max(dim=1).values < 0.1)
        total = loss.sum().clamp(min=torch.finfo(loss.dtype).tiny)
        positive = ~negative
        pos_prob = scores[positive, labels[positive]].mean()
        return {
            "focal/neg_loss_share": (loss[negative].sum() / total).item(),
            "focal/easy_neg_loss_share": (loss[easy_negative].sum() / total).item(),
            "focal/pos_fg_prob": pos_prob.item(),
        }

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        """
        Detectron2's RetinaNet detections, through :func:`dense_detections` (all images at once,
        thresholding in logit space, decoding only the kept candidates).

        Returns:
            list[Instances]: per image, "pred_boxes", "scores" and "pred_classes" in the
            coordinates of the (resized, unpadded) input image, by descending score.
        """
        boxes, scores, classes, image_index = self.detect(features, predictions)
        counts = torch.bincount(image_index, minlength=len(images)).tolist()
        results, start = [], 0
        for size, count in zip(images.image_sizes, counts):
            # Slices, not split(): detector_postprocess scales the boxes in place, which
            # autograd refuses on the views of a multi-output function (inference with grad).
            per_image = slice(start, start + count)
            results.append(
                Instances(
                    size,
                    pred_boxes=Boxes(boxes[per_image]),
                    scores=scores[per_image],
                    pred_classes=classes[per_image],
                )
            )
            start += count
        return results

    def detect(
        self, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        The detections of a batch from the head's outputs; traceable by ``torch.export``.

        Args:
            features: #lvl feature maps (N, C, Hi, Wi) the head ran on (for the anchors).
            predictions: the head's outputs: logits (N, A*L, Hi, Wi) and deltas (N, A*4, Hi, Wi)
                per level.

        Returns:
            (boxes, scores, classes, image_index), (D, 4), (D,), (D,), (D,), ordered by image
            and then by descending score: see :func:`dense_detections`.
        """
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        return dense_detections(
            pred_logits,
            pred_anchor_deltas,
            self._inference_anchors(features),
            cls_loss=self.cls_loss,
            box2box_transform=self.box2box_transform,
            score_thresh=self.test_score_thresh,
            topk_candidates=self.test_topk_candidates,
            nms_thresh=self.test_nms_thresh,
            max_detections_per_image=self.max_detections_per_image,
        )

    def _inference_anchors(self, features: List[Tensor]) -> Union[List[Tensor], GridAnchors]:
        """
        The anchors of each level, XYXY: when exporting with Detectron2's default generator,
        computed only for the candidates (:class:`GridAnchors`); when exporting with another
        generator or compiling, all of them; in eager mode, those of the last call when the
        feature maps have the same sizes (a fixed input size: no anchor generation per image).
        """
        if torch.compiler.is_exporting() and type(self.anchor_generator) is DefaultAnchorGenerator:
            return GridAnchors(self.anchor_generator, [tuple(x.shape[-2:]) for x in features])
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return [x.tensor for x in self.anchor_generator(features)]
        key = (features[0].device, *(tuple(x.shape[-2:]) for x in features))
        last = self._last_anchors  # one read: threads may share the model
        if last is None or last[0] != key:
            last = (key, [x.tensor for x in self.anchor_generator(features)])
            self._last_anchors = last
        return last[1]
