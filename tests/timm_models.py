"""The timm models the tests build (D2TimmViT, ``pretrained=False``, shrunk by MODEL.TIMM_VIT.KWARGS)."""

#: DINOv2 with a class token and 4 registers: D2TimmViT's model in the tiny_reduction_cfg fixture
DINOV2_REG4 = "vit_small_patch14_reg4_dinov2"
#: pseudo-bases of tiny_reduction_cfg: D2TimmViT over timm's Eva (rotary embeddings), one table
#: (EVA-02) or one per block ("mixed")
TIMM_EVA = {"EVA": "eva02_tiny_patch14_224", "EVA-mixed": "vit_small_patch16_rope_mixed_224"}
#: a rotary ViT with one register and no class token
ROPE_REG1_NO_CLS = "vit_medium_patch16_rope_reg1_gap_256"
#: EVA-02 base, the model of configs/examples/faster_rcnn_eva02_fpn_tome.yaml
EVA02_BASE = "eva02_base_patch14_224"
#: every one of them
TIMM_MODELS = [DINOV2_REG4, *TIMM_EVA.values(), ROPE_REG1_NO_CLS, EVA02_BASE]
