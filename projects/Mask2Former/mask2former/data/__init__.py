from .datasets import register_all, register_coco_panoptic_with_sem_seg

__all__ = ["register_all", "register_coco_panoptic_with_sem_seg"]
