"""The DUAL-GLOW model: Glow flow layers (``flows``) and the conditional MRI -> PET model
(``dualglow``). Model files are read and written by :mod:`dualglow_app.weights` only."""

from dualglow_app.model.dualglow import AGE_SCALING, DualGlow, DualGlowConfig, grad_reverse
from dualglow_app.model.flows import Glow

__all__ = ["AGE_SCALING", "DualGlow", "DualGlowConfig", "Glow", "grad_reverse"]
