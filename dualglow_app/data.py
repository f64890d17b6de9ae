"""The bridge between preprocessed images and the model: the intensity scale.

Preprocessing gives a brain-masked T1w already on [0, 1] (robust percentiles) and a PET in
SUVR units. The flow models intensities on [0, 1] in ``n_bins`` bins, so PET SUVR is divided
by ``pet_suvr_max``. The scaling travels with the weights (``ModelMetadata.intensity`` in
:mod:`dualglow_app.weights`, which owns the rest of a model file's metadata), so synthesis
maps samples back to SUVR exactly as training mapped them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IntensityScaling:
    """Map preprocessed T1w / PET-SUVR arrays to the model's [0, 1] scale and back.

    ``pet_suvr_max`` (default 3.0) sits well above cortical FDG SUVR (about 1.2-2.2 against
    the cerebellum), so clipping only touches outliers; one of 256 bins is about 0.012 SUVR.

    >>> scaling = IntensityScaling()
    >>> float(scaling.pet_from_model(scaling.pet_to_model(np.float32(1.5))))
    1.5
    """

    pet_suvr_max: float = 3.0
    mri_max: float = 1.0

    def __post_init__(self) -> None:
        if self.pet_suvr_max <= 0 or self.mri_max <= 0:
            raise ValueError(f"IntensityScaling needs positive maxima, got {self}")

    def mri_to_model(self, t1w: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(t1w, dtype=np.float32) / self.mri_max, 0.0, 1.0)

    def pet_to_model(self, suvr: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(suvr, dtype=np.float32) / self.pet_suvr_max, 0.0, 1.0)

    def synthetic_pet(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-scale samples -> (SUVR clipped to 0..``pet_suvr_max``, where they were
        outside that range or not finite). A flow's inverse is unbounded; the training data
        were not.

        >>> suvr, outside = IntensityScaling().synthetic_pet(np.array([0.5, 1.5, np.nan], np.float32))
        >>> suvr.tolist(), outside.tolist()
        ([1.5, 3.0, 0.0], [False, True, True])
        """
        values = np.asarray(values, dtype=np.float32)
        outside = ~np.isfinite(values) | (values < 0.0) | (values > 1.0)
        return self.pet_from_model(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)), outside

    def pet_from_model(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float32) * np.float32(self.pet_suvr_max)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IntensityScaling:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"IntensityScaling.from_dict: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in data.items()})
