"""Config keys of the video project (the official ``add_maskformer2_video_config``), added
after the image project's (``mask2former.add_maskformer2_config``)."""


def add_maskformer2_video_config(cfg) -> None:
    cfg.INPUT.SAMPLING_FRAME_NUM = 2  # frames per clip in training (and the decoder's num_frames)
    cfg.INPUT.SAMPLING_FRAME_RANGE = 20
    cfg.INPUT.SAMPLING_FRAME_SHUFFLE = False
    cfg.INPUT.AUGMENTATIONS = []  # "brightness", "contrast", "saturation", "rotation" (training)
