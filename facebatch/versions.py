"""Versions of the code that computes results; part of the pipeline version (config.pipeline_version).

BUMP THE CONSTANT of a module with any change to it that changes results (boxes, landmarks,
scores, chips, vectors, decoded pixels, statuses): rows computed before and after the change then
carry different pipeline versions, and incremental runs reprocess the photos instead of mixing
the two. Refactors that keep every output bit-identical need no bump, and neither do changes
that move outputs only by float rounding (another summation order or kernel choice for the same
arithmetic): the same code already differs by that much between CPU instruction sets (oneDNN
picks its kernels per ISA), oneDNN releases, and CPU and GPU, which share a pipeline version.
The tests bound those differences (tests/test_detector.py compares the fused nets with the plain
ones; tests/test_detector_parity.py the results with facenet-pytorch's).

They live here, not in the modules themselves, so that computing the pipeline version (the CLI,
the driver) does not import torch or OpenCV; each module imports its constant, so it is in sight.
"""

DETECTOR_CODE_VERSION = 1  # facebatch/detector.py (MTCNN in torch: pyramid, NMS, box regression)
ALIGNMENT_CODE_VERSION = 1  # facebatch/alignment.py (5-point similarity transform, chip crop)
DECODER_CODE_VERSION = 1  # facebatch/decode.py (format sniffing, EXIF orientation, colour, resize)
EMBEDDER_CODE_VERSION = 1  # facebatch/embedder.py + dlib_model.py (ResNet in torch, flip averaging)
