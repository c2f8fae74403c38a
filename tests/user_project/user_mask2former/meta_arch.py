"""A Mask2Former-style meta-architecture: backbone -> pixel decoder (FPN-like, mask features
at stride 4) -> queries attending to the coarsest map -> per-query class logits and masks ->
semantic inference (softmax classes x sigmoid masks), in Detectron2's input/output format."""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        self.in_features = sorted(shapes, key=lambda k: shapes[k].stride)
        D, Q = cfg.MODEL.MASK_FORMER.HIDDEN_DIM, cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
        K = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.lateral = nn.ModuleList([nn.Conv2d(shapes[f].channels, D, 1) for f in self.in_features])
        self.mask_features = nn.Conv2d(D, D, 3, padding=1)
        self.query_feat = nn.Embedding(Q, D)
        self.cross_attn = nn.MultiheadAttention(D, 4, batch_first=True)
        self.class_embed = nn.Linear(D, K + 1)
        self.mask_embed = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        features = self.backbone(images.tensor)
        maps = [conv(features[f]) for conv, f in zip(self.lateral, self.in_features)]
        y = maps[-1]
        for m in reversed(maps[:-1]):  # top-down
            y = m + F.interpolate(y, size=m.shape[-2:], mode="nearest")
        mask_features = self.mask_features(y)
        memory = maps[-1].flatten(2).transpose(1, 2)
        queries = self.query_feat.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        queries = queries + self.cross_attn(queries, memory, memory)[0]
        mask_cls = self.class_embed(queries)
        mask_pred = torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), mask_features)
        mask_pred = F.interpolate(mask_pred, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        results = []
        for cls, masks, x, size in zip(mask_cls, mask_pred, batched_inputs, images.image_sizes):
            semseg = torch.einsum("qc,qhw->chw", cls.softmax(-1)[..., :-1], masks.sigmoid())
            height, width = x.get("height", size[0]), x.get("width", size[1])
            results.append({"sem_seg": sem_seg_postprocess(semseg, size, height, width)})
        return results
