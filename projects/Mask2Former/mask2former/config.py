"""Config keys of the Mask2Former project, named as in the official code so its configs
run unchanged. :func:`add_maskformer2_config` also adds expedit-d2's keys.

The official configs' ``_BASE_`` chains also set DeepLab keys (``MODEL.RESNETS.STEM_TYPE``,
``RES5_MULTI_GRID``, ``SOLVER.POLY_LR_*``): call Detectron2's
``detectron2.projects.deeplab.add_deeplab_config`` first, as ``train_net.build_config`` does.

Keys of the official code and what they do here:

* ``TEST.DETECTIONS_PER_IMAGE`` (Detectron2's key): instance top-k per image.
* ``MODEL.MASK_FORMER.TEST.RESIZE_RATIO`` (Expedit fork): when > 0, the padded batch is
  resized by this ratio (to multiples of 32) before the backbone at test time.
* ``MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS`` (Expedit fork): how many pixel-decoder maps
  the transformer decoder attends to (3 in every published model).
* ``MODEL.MASK_FORMER.TEST.RESIZE_SHORT_EDGE_LENGTH`` and ``LOG_TEMP_OUTPUT`` (Expedit
  fork): accepted and unused, as in the official forward.
"""
from detectron2.config import CfgNode as CN

from expedit_d2 import add_expedit_config


def add_maskformer2_config(cfg) -> None:
    add_expedit_config(cfg)
    # data
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    cfg.INPUT.IMAGE_SIZE = 1024  # large-scale jitter (COCO)
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # solver
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # model
    m = cfg.MODEL.MASK_FORMER = CN()
    m.DEEP_SUPERVISION = True
    m.NO_OBJECT_WEIGHT = 0.1
    m.CLASS_WEIGHT = 1.0
    m.DICE_WEIGHT = 1.0
    m.MASK_WEIGHT = 20.0
    m.NHEADS = 8
    m.DROPOUT = 0.1
    m.DIM_FEEDFORWARD = 2048
    m.ENC_LAYERS = 0
    m.DEC_LAYERS = 6
    m.PRE_NORM = False
    m.HIDDEN_DIM = 256
    m.NUM_OBJECT_QUERIES = 100
    m.TRANSFORMER_IN_FEATURE = "res5"
    m.ENFORCE_INPUT_PROJ = False
    m.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    m.SIZE_DIVISIBILITY = 32
    m.TRAIN_NUM_POINTS = 112 * 112
    m.OVERSAMPLE_RATIO = 3.0
    m.IMPORTANCE_SAMPLE_RATIO = 0.75
    m.TEST = CN()
    m.TEST.SEMANTIC_ON = True
    m.TEST.INSTANCE_ON = False
    m.TEST.PANOPTIC_ON = False
    m.TEST.OBJECT_MASK_THRESHOLD = 0.0
    m.TEST.OVERLAP_THRESHOLD = 0.0
    m.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # (the instance top-k per image is Detectron2's TEST.DETECTIONS_PER_IMAGE, as officially)
    m.TEST.RESIZE_RATIO = -1.0  # > 0: resize the padded batch before the backbone (test time)
    m.TEST.RESIZE_SHORT_EDGE_LENGTH = -1  # read but unused by the official code: a no-op
    h = cfg.MODEL.SEM_SEG_HEAD
    h.MASK_DIM = 256
    h.TRANSFORMER_ENC_LAYERS = 0
    h.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    h.NUM_FEATURE_LEVELS = 3  # pixel-decoder maps the transformer decoder attends to
    h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    h.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    h.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    cfg.LOG_TEMP_OUTPUT = "output"  # Expedit fork's key; unused
