"""Imported first by the scripts that run in the LeRobot side environment (never by hindsight).

PyPI's torchvision wheels are CUDA builds: with the project's CPU torch their compiled `_C`
does not load, and torchvision 0.28 then fails at import while registering fake kernels for
`torchvision::nms`/`qnms`, operators that only `_C` defines. LeRobot uses torchvision's Python
transforms, not those operators, so defining the two schemas (no kernels) is enough to import
it. Nothing is done when `_C` loads (a torchvision built for this torch).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

_torchvision_ops = None


def prepare() -> None:
    global _torchvision_ops
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name) != "1":
            raise SystemExit(f"{name}=1 must be set: nothing may reach the hub")
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _torchvision_ops is not None:
        return
    try:
        torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))
    except OSError:
        _torchvision_ops = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _torchvision_ops.define(
                f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            )
