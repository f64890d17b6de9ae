"""Grey-matter probability from T1w intensities, for the side template's anatomy adjustment.

A three-class Gaussian mixture (CSF, grey matter, white matter, ordered by their mean
intensity) fitted to the brain voxels of the training MRIs: the intensity model of FSL FAST
and ANTs Atropos, without their spatial (Markov random field) prior. The side template's
least-squares start (:meth:`dualglow_app.model.DualGlow.fit_pet_template`) holds the anatomy
fixed to separate what age does to the PET from what atrophy does; grey matter is what FDG
uptake follows, and a T1w intensity is not linear in it (a voxel darkens whether it loses
grey matter to CSF or gains it from white matter), so a linear adjustment on intensities
leaves part of atrophy's effect to be taken as age. Measured on phantom v2
(docs/MODEL_EXPERIMENTS.md, finding 21): the template's age slopes against the swept truth,
held-out subjects, r 0.81 -> 0.91, median ratio 1.23 -> 1.16. The CSF posterior beside it
("gm+csf") says where lost grey matter went (finding 24).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

#: What the PET template's MRI terms are made of (the side template's start holds them fixed,
#: the anatomy template moves with them; DualGlowConfig.anatomy_tissue): the T1w intensity, its
#: grey-matter probability, or the grey-matter and the CSF probabilities.
SIDE_TEMPLATE_ANATOMY = ("t1w", "gm", "gm+csf")

#: The mixture's three classes in order of their mean T1w intensity.
MIXTURE_CLASSES = ("csf", "gm", "wm")

#: How the tissue maps are read (DualGlowConfig.anatomy_reading): from the grid T1w with the
#: training brains' mixture, each class's posterior, or each voxel's fractions of its two
#: neighbouring classes, linearly between their means; or natively (NATIVE_READINGS): each
#: subject's own mixture fitted to its native-resolution brain, its posteriors ("native"), its
#: partial-volume fractions ("native-fractions") or the expected fractions of a partial-volume
#: mixture ("native-pve") warped to the grid with the T1w
#: (dualglow_app.preprocess.tissue_maps_on_grid), an input beside the MRI.
ANATOMY_READINGS = ("posterior", "fractions", "native", "native-fractions", "native-pve")

#: The group level's and the evaluation's reading: trained on phantom version 3 with the
#: card's recipe, the fractions beat the posteriors on every held-out figure (deviation r
#: 0.874 vs 0.858, age slopes within +-25 % in 27 vs 23 of 30 regions) and keep real brains'
#: SUVR nearer the phantoms' (docs/MODEL_EXPERIMENTS.md, findings 34-35).
DEFAULT_ANATOMY_READING = "native-fractions"

#: The native readings, each with how it reads the subject's own intensities at each native
#: voxel (own_tissue_maps): the three-class mixture's posteriors, the fractions of the two
#: classes the intensity lies between, or each tissue's expected fraction under a mixture with
#: pure and mixed classes (PartialVolumeMixture).
NATIVE_READINGS = {"native": "posterior", "native-fractions": "fractions", "native-pve": "partial-volume"}

#: The channels of the native tissue maps (dualglow_app.preprocess.tissue_maps_on_grid), in
#: MIXTURE_CLASSES names.
NATIVE_TISSUE_CHANNELS = ("gm", "csf")

#: Every how-many-th brain voxel a subject's own mixture is fitted on (a 1 mm brain has ~1.5
#: million; a 3-class mixture of one intensity needs far fewer).
NATIVE_MIXTURE_STRIDE = 5

#: The mixture classes (indices into MIXTURE_CLASSES) each tissue map of SIDE_TEMPLATE_ANATOMY
#: takes its posteriors from; the T1w needs no mixture.
TISSUE_CLASSES = {"t1w": (), "gm": (1,), "gm+csf": (1, 0)}


def reading_key(reading: str) -> list[str]:
    """What a native ``reading`` adds to the names and cache keys of its tissue maps: nothing for
    "native" (its caches and stacks predate the choice and stay valid), else its name.

    >>> reading_key("native"), reading_key("native-fractions")
    ([], ['native-fractions'])
    """
    return [] if reading == "native" else [reading]


def tissue_reading(reading: str, anatomy: str, mri_input: bool = True) -> str:
    """The reading (ANATOMY_READINGS) the MRI terms ``anatomy`` (SIDE_TEMPLATE_ANATOMY) of a model
    get: ``reading`` where they are tissue maps of a real MRI, else "posterior" (the T1w
    intensity, or an ablated MRI, reads no tissue).

    >>> tissue_reading("native", "gm+csf"), tissue_reading("native", "t1w")
    ('native', 'posterior')
    """
    return reading if mri_input and TISSUE_CLASSES[anatomy] else "posterior"


def own_tissue_maps(image: np.ndarray, inside: np.ndarray,
                    reading: str = "native") -> tuple[np.ndarray, GreyMatterModel | PartialVolumeMixture]:  # fmt: skip
    """(len(NATIVE_TISSUE_CHANNELS), *image.shape) float32: this one image's tissue maps under a
    mixture fitted to its brain ``inside`` (every NATIVE_MIXTURE_STRIDE-th voxel), read the way
    the native ``reading`` (NATIVE_READINGS) reads them, 0 outside the brain; and that mixture
    (the partial-volume one for "native-pve", started from the three-class fit): the native
    tissue maps before they are put on a grid."""
    inside = np.asarray(inside, bool)
    mixture = GreyMatterModel.fit([image], [inside], stride=NATIVE_MIXTURE_STRIDE)
    if NATIVE_READINGS[reading] == "partial-volume":
        sample = np.asarray(image, np.float64)[inside][::NATIVE_MIXTURE_STRIDE]
        partial_volume = PartialVolumeMixture.fit(sample, mixture)
        return partial_volume.tissue_maps(image, inside, NATIVE_TISSUE_CHANNELS), partial_volume
    return mixture.tissue_maps(image, inside, NATIVE_TISSUE_CHANNELS, NATIVE_READINGS[reading]), mixture


class GreyMatterModel:
    """A fitted intensity mixture; :meth:`probability` maps MRIs to grey-matter probabilities.

    >>> rng = np.random.default_rng(0)
    >>> brain = np.concatenate([rng.normal(m, 0.03, 500) for m in (0.3, 0.6, 0.9)])
    >>> model = GreyMatterModel.fit([brain], [np.ones_like(brain, bool)])
    >>> [round(float(p), 2) for p in model.probability(np.array([0.3, 0.6, 0.9]))]
    [0.0, 1.0, 0.0]
    """

    def __init__(self, mixture: object) -> None:
        self._mixture = mixture

    @classmethod
    def fit(cls, images: Iterable[np.ndarray], masks: Iterable[np.ndarray], stride: int = 7,
            seed: int = 0) -> GreyMatterModel:  # fmt: skip
        """Fit on every ``stride``-th brain voxel of each image (inside its mask)."""
        from sklearn.mixture import GaussianMixture

        sample = np.concatenate([np.asarray(image, np.float64)[np.asarray(mask) > 0][::stride]
                                 for image, mask in zip(images, masks, strict=True)])  # fmt: skip
        if sample.size < 3:
            raise ValueError("GreyMatterModel.fit: fewer than 3 brain voxels to fit a 3-class mixture on.")
        mixture = GaussianMixture(3, random_state=seed).fit(sample[:, None])
        return cls(mixture)

    def mixture_parameters(self) -> tuple[list[float], list[float], list[float]]:
        """(weights, means, variances) of the three classes, as
        :meth:`dualglow_app.model.DualGlow.set_tissue_mixture` takes them."""
        mixture: Any = self._mixture
        return ([float(v) for v in mixture.weights_], [float(v) for v in mixture.means_[:, 0]],
                [float(v) for v in mixture.covariances_.reshape(-1)])  # fmt: skip

    def ordered_parameters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weights, means, variances) as arrays in the order CSF < GM < WM of their means."""
        weights, means, variances = (np.asarray(v) for v in self.mixture_parameters())
        order = np.argsort(means)
        return weights[order], means[order], variances[order]

    def probability(self, image: np.ndarray, tissue: str = "gm") -> np.ndarray:
        """The posterior of ``tissue`` (one of MIXTURE_CLASSES) at each voxel of ``image`` (any
        shape), float32."""
        return self.probabilities(image, (tissue,))[0]

    def probabilities(self, values: np.ndarray, tissues: Iterable[str]) -> np.ndarray:
        """(len(tissues), *values.shape): the posterior of each of ``tissues`` (MIXTURE_CLASSES
        names) at each value, float32; one pass of the mixture for all of them."""
        mixture: Any = self._mixture
        order = np.argsort(mixture.means_[:, 0])
        values = np.asarray(values, np.float64)
        posterior = mixture.predict_proba(values.reshape(-1, 1))
        columns = [order[MIXTURE_CLASSES.index(tissue)] for tissue in tissues]
        return posterior[:, columns].T.reshape(len(columns), *values.shape).astype(np.float32)

    def tissue_maps(self, image: np.ndarray, inside: np.ndarray, tissues: Iterable[str], reading: str = "posterior") -> np.ndarray:
        """(len(tissues), *image.shape) float32, 0 outside ``inside``: each voxel's posterior of
        each of ``tissues`` (``reading`` "posterior"), or its fraction of it (``reading``
        "fractions": the voxel read as a mix of the two classes its intensity lies between,
        linearly between their means, :func:`dualglow_app.model.dualglow.tissue_fractions`).

        A voxel that mixes two tissues has an intensity between their means; its posterior
        saturates a little way from a class mean where its fraction keeps changing, so a
        subject's small loss of grey matter moves the fractions and hardly the posteriors
        (docs/MODEL_EXPERIMENTS.md, finding 30).
        """
        tissues = list(tissues)
        inside = np.asarray(inside, bool)
        if reading == "posterior":
            maps = np.zeros((len(tissues), *np.shape(image)), np.float32)
            maps[:, inside] = self.probabilities(np.asarray(image)[inside], tissues)
            return maps
        if reading != "fractions":
            raise ValueError(f"reading={reading!r} (choose 'posterior' or 'fractions')")
        import torch

        from dualglow_app.model.dualglow import tissue_fractions

        parameters = torch.as_tensor(np.stack(self.ordered_parameters()))  # CSF < GM < WM, as tissue_fractions takes them
        fractions = tissue_fractions(torch.as_tensor(np.asarray(image), dtype=torch.float64), parameters, torch.as_tensor(inside))
        return fractions[[MIXTURE_CLASSES.index(t) for t in tissues]].numpy().astype(np.float32)


class PartialVolumeMixture:
    """Pure and mixed tissue classes of one intensity: CSF, GM and WM, each a Gaussian, and the
    two boundaries CSF/GM and GM/WM, whose voxels hold a fraction f of grey matter, uniform on
    (0, 1), with mean f mu_GM + (1 - f) mu_other and variance f s_GM^2 + (1 - f) s_other^2: the
    partial-volume model of Santago & Gage (1993) and of BrainSuite's classifier (Shattuck et
    al. 2001), here without a spatial prior.

    Each voxel is read as its expected fraction of each tissue given its intensity: inside a
    class that is wide it reads pure tissue, like the three-class posterior; between the
    classes, where the posterior saturates, it is linear in the intensity, like the fractions.
    Fitted this way, a real brain's pure grey matter is 1.7-4.2 times as wide as a phantom's;
    on the phantoms, whose T1w is linear in its fractions, this reading follows the subject and
    the age less well than the fractions (docs/MODEL_EXPERIMENTS.md, finding 32).

    >>> rng = np.random.default_rng(0)
    >>> f = rng.uniform(0, 1, 3000)
    >>> brain = np.concatenate([rng.normal(m, 0.02, 3000) for m in (0.3, 0.6, 0.9)] + [0.3 + 0.3 * f, 0.9 - 0.3 * f])
    >>> model = PartialVolumeMixture.fit(brain, GreyMatterModel.fit([brain], [np.ones_like(brain, bool)], stride=1))
    >>> [round(float(v), 1) for v in model.expected_fractions(np.array([0.3, 0.45, 0.6, 0.75, 0.9]))[1]]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    #: Points of a mixed voxel's grey-matter fraction the boundary classes are integrated on.
    FRACTION_STEPS = 16
    #: Histogram bins the mixture is fitted on (a subject's ~300 000 sampled brain voxels).
    BINS = 256

    def __init__(self, weights: np.ndarray, means: np.ndarray, sds: np.ndarray) -> None:
        self.weights = np.asarray(weights, np.float64)  # CSF, GM, WM, CSF/GM, GM/WM
        self.means = np.asarray(means, np.float64)  # CSF < GM < WM
        self.sds = np.asarray(sds, np.float64)

    @classmethod
    def fit(cls, values: np.ndarray, start: GreyMatterModel) -> PartialVolumeMixture:
        """Maximum likelihood on a histogram of ``values`` (a brain's intensities), from the
        three-class mixture ``start`` with a tenth of the voxels on each boundary."""
        from scipy.optimize import minimize
        from scipy.special import softmax

        values = np.asarray(values, np.float64).ravel()
        weights, means, variances = start.ordered_parameters()
        sds = np.sqrt(variances)
        # Work in units of the CSF-to-WM distance, so that every parameter is of order one.
        origin, scale = means[0], means[2] - means[0]
        counts, edges = np.histogram((values - origin) / scale, bins=cls.BINS)
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        share = counts / counts.sum()

        def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            mu = np.cumsum([x[0], np.exp(x[1]), np.exp(x[2])])
            logits = np.concatenate([[0.0], x[6:]])
            return softmax(logits), mu, np.exp(x[3:6])

        def loss(x: np.ndarray) -> float:
            density = cls(*unpack(x))._components(centres)[0].sum(0) * width
            return -float(share @ np.log(density + 1e-300))

        mu0 = (means - origin) / scale
        w0 = np.concatenate([0.8 * weights, [0.1, 0.1]])
        x0 = np.concatenate([[mu0[0]], np.log(np.diff(mu0)), np.log(np.maximum(sds / scale, width)),
                             np.log(w0[1:] / w0[0])])  # fmt: skip
        bounds = [(None, None)] * 3 + [(np.log(width), 0.0)] * 3 + [(-12.0, 12.0)] * 4
        x = minimize(loss, x0, method="L-BFGS-B", bounds=bounds).x
        w, mu, sd = unpack(x)
        return cls(w, origin + scale * mu, scale * sd)

    def _components(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weighted density of each component at each value, each component's GM fraction,
        each component's CSF fraction): the three pure classes, then FRACTION_STEPS points of
        each boundary."""
        f = (np.arange(self.FRACTION_STEPS) + 0.5) / self.FRACTION_STEPS
        csf, gm, wm = 0, 1, 2
        means = [self.means[[csf, gm, wm]]]
        variances = [self.sds[[csf, gm, wm]] ** 2]
        weights = [self.weights[:3]]
        for other, weight in ((csf, self.weights[3]), (wm, self.weights[4])):
            means.append(f * self.means[gm] + (1 - f) * self.means[other])
            variances.append(f * self.sds[gm] ** 2 + (1 - f) * self.sds[other] ** 2)
            weights.append(np.full(self.FRACTION_STEPS, weight / self.FRACTION_STEPS))
        mean, variance, weight = (np.concatenate(v)[:, None] for v in (means, variances, weights))
        density = weight * np.exp(-0.5 * (values[None] - mean) ** 2 / variance) / np.sqrt(2 * np.pi * variance)
        gm_fraction = np.concatenate([[0.0, 1.0, 0.0], f, f])
        csf_fraction = np.concatenate([[1.0, 0.0, 0.0], 1 - f, np.zeros_like(f)])
        return density, gm_fraction, csf_fraction

    def expected_fractions(self, values: np.ndarray) -> np.ndarray:
        """(3, *values.shape): each value's expected CSF, GM and WM fraction (MIXTURE_CLASSES
        order) given its intensity; a value darker than the CSF mean or brighter than the WM
        mean reads as that mean does (far out in a class's tail, the widest class would win)."""
        values = np.asarray(values, np.float64)
        density, gm_fraction, csf_fraction = self._components(np.clip(values.ravel(), self.means[0], self.means[2]))
        total = np.maximum(density.sum(0), 1e-300)
        gm, csf = gm_fraction @ density / total, csf_fraction @ density / total
        return np.stack([csf, gm, 1.0 - gm - csf]).reshape(3, *values.shape)

    def tissue_maps(self, image: np.ndarray, inside: np.ndarray, tissues: Iterable[str]) -> np.ndarray:
        """(len(tissues), *image.shape) float32, 0 outside ``inside``: each voxel's expected
        fraction of each of ``tissues`` (MIXTURE_CLASSES names), read through a table of 2048
        intensities between the CSF and the WM means."""
        tissues = list(tissues)
        inside = np.asarray(inside, bool)
        table = np.linspace(self.means[0], self.means[2], 2048)
        expected = self.expected_fractions(table)
        maps = np.zeros((len(tissues), *np.shape(image)), np.float32)
        values = np.asarray(image, np.float64)[inside]
        for row, tissue in enumerate(tissues):
            maps[row, inside] = np.interp(values, table, expected[MIXTURE_CLASSES.index(tissue)])
        return maps

    def mixture_parameters(self) -> tuple[list[float], list[float], list[float]]:
        """(weights of CSF, GM, WM, CSF/GM, GM/WM; means and variances of CSF, GM, WM)."""
        return [float(v) for v in self.weights], [float(v) for v in self.means], [float(v) ** 2 for v in self.sds]


__all__ = ["ANATOMY_READINGS", "MIXTURE_CLASSES", "NATIVE_READINGS", "NATIVE_TISSUE_CHANNELS", "SIDE_TEMPLATE_ANATOMY", "TISSUE_CLASSES",
           "GreyMatterModel", "NATIVE_MIXTURE_STRIDE", "PartialVolumeMixture", "own_tissue_maps", "reading_key", "tissue_reading"]
