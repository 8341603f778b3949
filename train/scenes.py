"""Scenes of a real-pair folder: what the split by scene is made of (torch-free, so evaluation scripts share it).

A pair's **scene** is its file name without the extension and the trailing ``_N``
(``Canon5D2_5_160_6400_desk_10.JPG`` -> ``Canon5D2_5_160_6400_desk``); its **subject** is the scene's last ``_``
field (``waterhouse``), shared by shots of one object from other cameras or exposures.
"""

from __future__ import annotations

import re
from pathlib import Path


def scene_of(name: str | Path) -> str:
    """A pair's scene: its file name without the extension and the trailing ``_N``."""
    return re.sub(r"_\d+$", "", Path(name).stem)


def subject_of(scene: str) -> str:
    """What a scene shows: its last ``_`` field (``Sony_4-5_125_6400_waterhouse`` -> ``waterhouse``)."""
    return scene.rstrip("_").rsplit("_", 1)[-1]
