"""Paths and command-line option lists of the projects' tiny models, shared by the tests."""
from pathlib import Path

#: the repository root
ROOT = Path(__file__).resolve().parents[1]

#: the tiny DPT-Hybrid (6 blocks of width 32) as ``train_net.py`` options, on the CPU
DPT_TINY_OPTS = ["MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "6", "MODEL.VIT.NUM_HEADS", "2",
            "MODEL.VIT.IMG_SIZE", "96", "MODEL.VIT.NUM_CLASSES", "10", "MODEL.VIT.HYBRID_LAYERS", "[1, 1, 1]",
            "MODEL.VIT.TAPS", "[0, 1, 3, 5]", "MODEL.DPT.REASSEMBLE_FEATURES", "[16, 24, 32, 32]",
            "MODEL.DPT.FUSION_FEATURES", "16", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"]
#: the depth metrics a DPT evaluation reports
DEPTH_METRICS = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3"}

#: the demo Mask2Former config and the options that shrink it further (64 x 96 inputs)
M2F_TINY_CONFIG = str(ROOT / "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml")
M2F_SMALL = ["MODEL.DEVICE", "cpu", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.SWIN.EMBED_DIM", "16",
             "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
             "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
             "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0", "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0",
             "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.EXPEDIT.WINDOW", "3",
             "MODEL.EXPEDIT.RECON_K", "4"]

#: a tiny Swin (10 blocks of width 16, expedit after block 6) for the benchmark tools' Swin-L configs
TINY_SWIN = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2, 4, 2]",
             "MODEL.SWIN.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.SWIN.PRETRAIN_IMG_SIZE", "224",
             "MODEL.EXPEDIT.CLUSTERING_LOCATION", "6"]

#: the DPT project's defaults, which every DPT config has as its base
DPT_BASE_YAML = ROOT / "projects/DPT/configs/Base-DPT-NYUv2.yaml"
