"""The model grid: the fixed voxel grid in MNI152NLin2009cAsym that a model is trained on.

A model trained on one grid must be run on that grid, so :class:`ModelGrid` is stored in every
model file's JSON metadata (``to_dict`` / ``from_dict``) and preprocessing resamples onto it.

The flow squeezes 2 x 2 x 2 before each of its ``levels`` levels, so every side of the grid
must be divisible by ``2 ** levels``; the constructor refuses a grid that is not.

The brain of MNI152NLin2009cAsym spans x -72..72, y -108..73, z -72..82 mm; the presets
are centred on (0, -18, 5) mm and cover 160 x 192 x 160 mm, which holds it with a margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SPACE = "MNI152NLin2009cAsym"
BRAIN_CENTRE_MM = (0.0, -18.0, 5.0)
#: The presets' box (mm); ``resolve_grid(grid_mm=...)`` keeps it.
GRID_EXTENT_MM = (160.0, 192.0, 160.0)


@dataclass(frozen=True)
class ModelGrid:
    """An isotropic RAS voxel grid in MNI152NLin2009cAsym.

    voxel_size: edge of a voxel in mm. shape: voxels along x, y, z. origin: world position
    (mm, RAS) of the centre of voxel (0, 0, 0). levels: the flow's number of squeeze levels;
    each side of ``shape`` must be divisible by ``2 ** levels``.

    Example::

        >>> grid = ModelGrid.centred(4.0, (40, 48, 40), levels=3)
        >>> ModelGrid.from_dict(grid.to_dict()) == grid
        True
        >>> grid.affine[0, 0]
        4.0
    """

    voxel_size: float
    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    levels: int = 3
    space: str = SPACE

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        if len(self.shape) != 3 or len(self.origin) != 3:
            raise ValueError(f"a model grid is 3D; got shape {self.shape}, origin {self.origin}")
        if not 0.25 <= self.voxel_size <= 16:
            raise ValueError(f"voxel_size {self.voxel_size} mm is outside 0.25..16 mm")
        step = 2**self.levels
        if any(n % step for n in self.shape):
            raise ValueError(
                f"grid shape {self.shape} is not divisible by 2**levels = {step}; the flow "
                f"squeezes 2x2x2 {self.levels} times: pick sides that are multiples of {step}"
            )
        if self.space != SPACE:
            raise ValueError(f"only {SPACE} grids are supported, got {self.space}")

    @classmethod
    def centred(
        cls,
        voxel_size: float,
        shape: tuple[int, int, int],
        levels: int = 3,
        centre: tuple[float, float, float] = BRAIN_CENTRE_MM,
    ) -> ModelGrid:
        """A grid of ``shape`` voxels whose middle is at ``centre`` (mm)."""
        origin = tuple(c - (n - 1) / 2 * voxel_size for c, n in zip(centre, shape, strict=True))
        return cls(voxel_size=float(voxel_size), shape=shape, origin=origin, levels=levels)  # type: ignore[arg-type]

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> world (RAS mm) 4 x 4 matrix, NIfTI convention."""
        affine = np.diag([self.voxel_size] * 3 + [1.0])
        affine[:3, 3] = self.origin
        return affine

    @property
    def bounding_box(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """World coordinates (mm) of the outer faces of the first and last voxels."""
        half = self.voxel_size / 2
        low = tuple(o - half for o in self.origin)
        high = tuple(o + (n - 1) * self.voxel_size + half for o, n in zip(self.origin, self.shape, strict=True))
        return low, high  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (stored in model files)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["origin"] = list(self.origin)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelGrid:
        """Inverse of :meth:`to_dict`; unknown keys are refused so typos do not pass silently."""
        known = {"voxel_size", "shape", "origin", "levels", "space"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown model grid keys {sorted(extra)}; expected {sorted(known)}")
        return cls(
            voxel_size=float(data["voxel_size"]),
            shape=tuple(data["shape"]),
            origin=tuple(data["origin"]),
            levels=int(data.get("levels", 3)),
            space=str(data.get("space", SPACE)),
        )


PRESETS: dict[str, ModelGrid] = {
    # 8 mm: unit tests and smoke runs only.
    "tiny8mm": ModelGrid.centred(8.0, (20, 24, 20), levels=2),
    # 4 mm: trains on a 2-core CPU in minutes (76,800 voxels).
    "cpu4mm": ModelGrid.centred(4.0, (40, 48, 40), levels=3),
    # 2 mm: the paper-like resolution (614,400 voxels), for GPUs.
    "paper2mm": ModelGrid.centred(2.0, (80, 96, 80), levels=4),
}


def preset(name: str) -> ModelGrid:
    """A named grid from :data:`PRESETS`.

    Example::

        >>> preset("cpu4mm").shape
        (40, 48, 40)
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model grid {name!r}; choose one of {sorted(PRESETS)}") from None


def resolve_grid(name: str = "cpu4mm", grid_mm: float | None = None, levels: int | None = None) -> ModelGrid:
    """The model grid: preset ``name``, or ``grid_mm`` voxels over the presets' 160 x 192 x 160
    mm box (sides rounded up to multiples of ``2 ** levels``); ``levels`` defaults to the
    preset's (3 with ``grid_mm``).

    Example::

        >>> resolve_grid(grid_mm=5.0).shape
        (32, 40, 32)
        >>> resolve_grid("cpu4mm", levels=2).levels
        2
    """
    if grid_mm is None:
        grid = preset(name)
        if levels is None or levels == grid.levels:
            return grid
        return ModelGrid(grid.voxel_size, grid.shape, grid.origin, levels=levels)
    levels = levels or 3
    step = 2**levels
    shape = tuple(int(math.ceil(extent / grid_mm / step) * step) for extent in GRID_EXTENT_MM)
    return ModelGrid.centred(grid_mm, shape, levels=levels)  # type: ignore[arg-type]
