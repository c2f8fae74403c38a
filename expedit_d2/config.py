"""Config keys of expedit-d2, added to a Detectron2 CfgNode by :func:`add_expedit_config`.

``MODEL.TOKEN_REDUCTION.METHOD`` selects the method that ``MODEL.BACKBONE.NAME:
"TokenReductionBackbone"`` (alias ``"ExpeditBackbone"``) puts on ``MODEL.TOKEN_REDUCTION.BASE``
(alias ``MODEL.EXPEDIT.BASE``);
``MODEL.EXPEDIT`` holds expedit's settings, ``MODEL.TOKEN_REDUCTION.{TOME,EVIT,POOL}`` the
others' (see :mod:`expedit_d2.reduction.config`); ``MODEL.SWIN`` carries the official Mask2Former Swin keys plus the
official Expedit keys (``CLUSTERING_LOCATION``, ``TOKEN_CLUSTERING_BLOCK``,
``TOKEN_RECONSTRUCTION_BLOCK``) read by the ``D2HourglassSwinTransformer`` alias, so
configs written for the official code run unchanged.
"""
from detectron2.config import CfgNode as CN

from . import expedit_backbone, methods  # noqa: F401  (register the backbones and the methods)
from .ops import DEFAULT_ITERS, DEFAULT_RECON_K, DEFAULT_RECON_TEMPERATURE, DEFAULT_TEMPERATURE, DEFAULT_WINDOW
from .reduction.config import add_token_reduction_config
from .solver import add_solver_config

__all__ = ["add_expedit_config"]


def add_expedit_config(cfg) -> None:
    """Add expedit-d2's keys with their defaults (idempotent: existing values are kept)."""
    _add_defaults(cfg.MODEL, "EXPEDIT", {
        # build the backbone registered under BASE and patch it with MODEL.TOKEN_REDUCTION.METHOD
        # (expedit: only while ENABLED and CLUSTERING_LOCATION != -1)
        "ENABLED": True,
        # alias of MODEL.TOKEN_REDUCTION.BASE (which wins where set): any BACKBONE_REGISTRY
        # name, ours or the user's own (e.g. their D2SwinTransformer)
        "BASE": "ExpeditD2SwinTransformer",
        # alpha: Swin -- clustering right before global block alpha (blocks counted over
        # all stages); ViT -- clustering right after block alpha (0-based). -1: not
        # expedited (the plain base backbone), as in the official code.
        "CLUSTERING_LOCATION": -1,
        # (h, w) cluster grid: per attention window for Swin, global for ViT
        "NUM_CLUSTERS": [8, 8],
        # the operators' defaults (expedit_d2.ops), the official ones
        "ITERS": DEFAULT_ITERS,
        "TEMPERATURE": DEFAULT_TEMPERATURE,
        # lambda, odd: neighbourhood of cluster cells a token may join
        "WINDOW": DEFAULT_WINDOW,
        "RECON_K": DEFAULT_RECON_K,
        "RECON_TEMPERATURE": DEFAULT_RECON_TEMPERATURE,
        # "topk": the paper's reconstruction layer (official Swin/Mask2Former release);
        # "nearest": copy the nearest final centre's cluster (official DPT release)
        "RECONSTRUCTION": "topk",
        # topk only. False = the official weights exp(-tau_r * D), which underflow for
        # tokens far from every centre (the token then shrinks towards 0); True subtracts
        # each token's smallest distance first (identical wherever nothing underflows)
        "RECON_SUBTRACT_MIN_DISTANCE": False,
        # Swin blocks after clustering: the shifted-window mask of the official release
        # ("official": regions cut at the stage's ORIGINAL shift, window // 2, while the
        # blocks roll by s // 2) or the self-consistent one ("consistent": s // 2 for both)
        "SWIN_SHIFT_MASK": "official",
        # ViT: an input with fewer tokens than NUM_CLUSTERS makes clusters runs unexpedited
        # ("skip": logged once, counted in the evaluation results) or fails ("error"); one
        # axis of the cluster grid longer than the token grid's is clustered, as officially
        "SMALL_INPUT": "skip",
        # cap on the operators' temporaries per chunk, in MB
        "MEMORY_LIMIT_MB": 256,
    })
    # how the projects' models compute nn.Linear on a CPU in float32 inference: "blas"
    # (F.linear, PyTorch's default) or "onednn" (a 1x1 convolution: about twice as fast where
    # MKL keeps to AVX2, as on AMD CPUs with AVX-512; float rounding apart the same numbers;
    # see expedit_d2/cpu_linear.py)
    if "CPU_LINEAR" not in cfg.MODEL:
        cfg.MODEL.CPU_LINEAR = "blas"
    # images per evaluation batch (expedit_d2.batching.build_batched_test_loader; Detectron2
    # 0.6's test loader always takes 1). Images of different padded sizes in one batch run as
    # separate batches, so each image's output does not depend on its batch mates
    if "IMS_PER_BATCH" not in cfg.TEST:
        cfg.TEST.IMS_PER_BATCH = 1
    add_token_reduction_config(cfg)
    add_solver_config(cfg)
    # bottom-up backbone of build_bottom_up_fpn_backbone (any BACKBONE_REGISTRY name)
    if "BOTTOM_UP" not in cfg.MODEL.FPN:
        cfg.MODEL.FPN.BOTTOM_UP = "TokenReductionBackbone"
    # Official Mask2Former Swin keys (defaults: Swin-T) ...
    _add_defaults(cfg.MODEL, "SWIN", {
        "PRETRAIN_IMG_SIZE": 224,
        "PATCH_SIZE": 4,
        "EMBED_DIM": 96,
        "DEPTHS": [2, 2, 6, 2],
        "NUM_HEADS": [3, 6, 12, 24],
        "WINDOW_SIZE": 7,
        "MLP_RATIO": 4.0,
        "QKV_BIAS": True,
        "QK_SCALE": None,
        "DROP_RATE": 0.0,
        "ATTN_DROP_RATE": 0.0,
        "DROP_PATH_RATE": 0.3,
        "APE": False,
        "PATCH_NORM": True,
        "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        "USE_CHECKPOINT": False,
        # ... and the official Expedit ones (D2HourglassSwinTransformer); -1 (the official
        # default): not expedited
        "CLUSTERING_LOCATION": -1,
    })
    # ViT / ViT-Hybrid (D2ViT, D2ViTHybrid); defaults: ViT-B/16 at 384 with DPT taps
    _add_defaults(cfg.MODEL, "VIT", {
        "IMG_SIZE": 384,  # pretraining size: the position embedding has (384/16)^2 + 1 rows
        "PATCH_SIZE": 16,
        "EMBED_DIM": 768,
        "DEPTH": 12,
        "NUM_HEADS": 12,
        "MLP_RATIO": 4.0,
        "QKV_BIAS": True,
        "DROP_RATE": 0.0,
        "ATTN_DROP_RATE": 0.0,
        "DROP_PATH_RATE": 0.0,
        "NUM_CLASSES": 1000,  # the pretrained classifier head, unused, kept for loading
        # DPT taps: ViT-B/16 [2, 5, 8, 11], ViT-L/16 [5, 11, 17, 23], Hybrid [0, 1, 8, 11]
        "TAPS": [2, 5, 8, 11],
        "HYBRID_LAYERS": [3, 4, 9],  # ResNet-50 stages of D2ViTHybrid
        "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    })
    # any timm VisionTransformer (D2TimmViT, expedit_d2/backbones/timm_vit.py)
    _add_defaults(cfg.MODEL, "TIMM_VIT", {
        "NAME": "vit_base_patch16_384",
        "TAPS": [2, 5, 8, 11],
        "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    })
    if "KWARGS" not in cfg.MODEL.TIMM_VIT:  # extra timm.create_model arguments, any keys
        cfg.MODEL.TIMM_VIT.KWARGS = CN(new_allowed=True)
    # ViTDet's ViT and simple feature pyramid (ExpeditD2ViTDet, expedit_d2/backbones/vitdet.py);
    # defaults: ViT-B of the model zoo's mask_rcnn_vitdet_b_100ep
    _add_defaults(cfg.MODEL, "VITDET", {
        "IMG_SIZE": 1024,  # sizes the global blocks' relative positions ((1024/16)*2 - 1 rows)
        "PATCH_SIZE": 16,
        "EMBED_DIM": 768,
        "DEPTH": 12,
        "NUM_HEADS": 12,
        "MLP_RATIO": 4.0,
        "QKV_BIAS": True,
        "DROP_PATH_RATE": 0.1,
        "NORM_EPS": 1e-6,  # the blocks' LayerNorm
        "USE_ABS_POS": True,
        "USE_REL_POS": True,
        "WINDOW_SIZE": 14,
        # blocks attending in windows; the others (2, 5, 8, 11) attend globally
        "WINDOW_BLOCK_INDEXES": [0, 1, 3, 4, 6, 7, 9, 10],
        "RESIDUAL_BLOCK_INDEXES": [],  # blocks followed by a convolutional residual block
        "PRETRAIN_IMG_SIZE": 224,  # the position embedding's grid: (224/16)^2 (+ 1 cls row)
        "PRETRAIN_USE_CLS_TOKEN": True,
        # the pyramid: p2..p5 from these scales of the stride-16 map, p6 by max-pooling p5
        "SCALE_FACTORS": [4.0, 2.0, 1.0, 0.5],
        "OUT_CHANNELS": 256,
        "NORM": "LN",  # of the pyramid's convs: "LN" (channel LayerNorm) or a Detectron2 norm ("" none)
        # images padded to this square (0: to multiples of 32); see backbones/vitdet.py
        "SQUARE_PAD": 1024,
    })
    _add_defaults(cfg.MODEL.SWIN, "TOKEN_CLUSTERING_BLOCK", {
        "NUM_SPIXELS": 64,  # clusters per attention window (a square: 64 -> 8x8)
        "N_ITERS": DEFAULT_ITERS,
        "TEMPERATURE": DEFAULT_TEMPERATURE,
        "WINDOW_SIZE": DEFAULT_WINDOW,  # lambda
    })
    _add_defaults(cfg.MODEL.SWIN, "TOKEN_RECONSTRUCTION_BLOCK", {
        "TEMPERATURE": DEFAULT_RECON_TEMPERATURE,
        "K": DEFAULT_RECON_K,
    })


def _add_defaults(parent, name: str, values: dict) -> None:
    if name not in parent:
        parent[name] = CN()
    node = parent[name]
    for key, value in values.items():
        if key not in node:
            node[key] = value
