"""The inference actor sizes OpenCV's thread pool like torch's (no Ray: the actor class is plain Python)."""

from __future__ import annotations


def test_actor_sizes_opencv_like_torch():
    import cv2
    import torch

    from facebatch.pipeline import FaceModelActor

    before = (torch.get_num_threads(), cv2.getNumThreads())
    try:
        FaceModelActor(device="cpu", detector_params={"min_face_size": 20, "thresholds": [0.6, 0.7, 0.7],
                                                      "scale_factor": 0.709}, embed=False, torch_threads=1)
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
