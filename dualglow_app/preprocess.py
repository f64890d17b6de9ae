"""Raw T1w and FDG-PET onto the model grid in MNI152NLin2009cAsym, and back.

T1w path (:func:`preprocess_t1w`): load and check -> reorient to RAS -> skull strip (deepbet)
-> N4 bias correction inside the brain mask -> ANTs affine + SyN to the template brain ->
anti-alias and resample onto the :class:`~dualglow_app.grid.ModelGrid` -> robust intensity
normalisation to [0, 1] inside the template brain mask, 0 outside it (one support for every
scan: :func:`~dualglow_app.templates.brain_mask_on_grid`).

Skull stripping uses deepbet (Fisch et al. 2024, "deepbet: Fast brain extraction of T1-weighted
MRI using Convolutional Neural Networks"): its two TorchScript networks (~17 MB) ship inside
the PyPI wheel, so it works offline with the torch we already need; it runs in ~5 s on 2 CPU
cores on a 1 mm head and was trained on >7000 T1w images from many scanners. The antspyx
alternatives either need a network download (``antspynet``) or a template with skull that is
not shipped offline for MNI152NLin2009cAsym. Skull stripping comes before N4 because deepbet
is trained on uncorrected images and N4 restricted to the brain is ~5x faster.

FDG-PET path (:func:`preprocess_pet`): load and check -> mean of frames -> rigid PET -> T1w
(Mattes mutual information) -> composed with the T1w -> MNI transforms in one resampling ->
template brain mask -> SUVR: divide by the mean uptake in a reference region
(:data:`~dualglow_app.templates.REFERENCE_REGIONS`, default cerebellar hemispheres).

Native tissue maps (:func:`tissue_maps_on_grid`, for a model with a native ``--anatomy-reading``):
an intensity mixture of the subject's own N4-corrected native brain, its grey-matter and CSF
posteriors, partial-volume fractions or a partial-volume mixture's expected fractions warped
onto the grid with the T1w's transforms, cached beside them.

Inverse (:func:`grid_to_mni`, :func:`grid_to_native`): a model-grid image onto the template
grid at any resolution, or through the inverse ANTs transforms onto the subject's original T1w
voxel grid.

Transforms are cached in ``work_dir/cache/`` under a key made of the input's sha256 and the
settings, so a second run of a subject registers nothing. Cache entries are built in a
temporary folder and renamed into place, under a per-entry lock (two runs sharing a work dir
never register the same image twice); bad input is refused before anything is written.

Example::

    >>> from dualglow_app.grid import preset
    >>> t1 = preprocess_t1w("sub-01_T1w.nii.gz", preset("cpu4mm"), "work")  # doctest: +SKIP
    >>> pet = preprocess_pet("sub-01_trc-FDG_pet.nii.gz", t1, "work")  # doctest: +SKIP
    >>> native = grid_to_native(pet.image, t1)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from dualglow_app.grid import ModelGrid
from dualglow_app.imaging import load_nifti, resample_to
from dualglow_app.io import atomic_dir, entry_lock, file_sha256
from dualglow_app.log import get_logger
from dualglow_app.templates import (
    REFERENCE_REGIONS,
    brain_mask_on_grid,
    get_template,
    reference_region,
)

if TYPE_CHECKING:
    import ants

_LOG = get_logger(__name__)
# 2: SyN on a 2 mm copy of the brain, N4 on its bounding box, the PET rigid against a 4 mm T1w.
# 3: the affine stage stops at 4 mm, N4 fits at shrink 6 (issue 19; accuracy unchanged).
CACHE_VERSION = 3
# What preprocess_t1w / preprocess_pet put on the model grid (the transforms' cache does not
# depend on it): 2 = every scan on the template brain mask (templates.brain_mask_on_grid).
GRID_VERSION = 2
# What tissue_maps_on_grid computes (its cache key): 1 = a mixture of the native brain, warped.
TISSUE_MAPS_VERSION = 1
VOXEL_SIZE_RANGE_MM = (0.2, 12.0)
MIN_SIDE_VOXELS = 8
# Below this share of the template brain covered by the registered brain, a T1w is flagged.
MIN_TEMPLATE_COVERAGE = 0.97


def preprocessing_versions() -> dict[str, int]:
    """What a model file records of the preprocessing its training scans went through."""
    return {"cache_version": CACHE_VERSION, "grid_version": GRID_VERSION}


def preprocessing_mismatch(recorded: Mapping[str, Any] | None) -> str | None:
    """Why scans preprocessed now may differ from a model's training scans (``recorded``:
    its :func:`preprocessing_versions`), or None when they match or the model did not record them."""
    if not recorded:
        return None
    now = preprocessing_versions()
    changed = [f"{name.replace('_', ' ')} {recorded.get(name)} -> {value}" for name, value in now.items()
               if recorded.get(name) != value]  # fmt: skip
    return ", ".join(changed) or None


class PreprocessError(RuntimeError):
    """Preprocessing of one subject failed; the message is one line naming the file."""


class InputImageError(PreprocessError, ValueError):
    """An input image is unusable (missing, truncated, NaN, empty, wrong dimensionality...)."""


# --------------------------------------------------------------------------- options, results


@dataclass(frozen=True)
class T1wOptions:
    """Settings of the T1w path; all of them enter the cache key.

    template_resolution: mm of the template the registration runs against (2 keeps the
    T1w path under 60 s on 2 cores; the warp is smooth, so 1 mm gains little).
    syn_iterations: SyN iterations per level (coarse to fine; 0 skips a level).
    affine_iterations, affine_shrink_factors, affine_smoothing_sigmas: the affine stage before
    SyN, per level (ANTsPy's built-in SyN affine stage goes on to a second 4 mm level and a
    2 mm one; these stop at 4 mm, the finest grid the model runs on is 2 mm and the SyN stage
    refines after it: the same accuracy on phantoms, docs/PERFORMANCE.md section 6).
    n4_iterations: N4 iterations per fitting level; n4_shrink: N4 fits on an image shrunk by
    this factor (6: the field is smooth over centimetres). percentiles: the brain intensities mapped
    to 0 and 1 by the normalisation (robust to outliers, unlike min/max).

    Example::

        >>> T1wOptions(template_resolution=1).template_resolution
        1
    """

    template_resolution: int = 2
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    affine_iterations: tuple[int, ...] = (2100, 1200)
    affine_shrink_factors: tuple[int, ...] = (4, 2)
    affine_smoothing_sigmas: tuple[float, ...] = (2, 1)
    n4_iterations: tuple[int, ...] = (30, 20, 10)
    n4_shrink: int = 6
    percentiles: tuple[float, float] = (0.5, 99.5)
    deepbet_threshold: float = 0.5


@dataclass(frozen=True)
class PETOptions:
    """Settings of the PET path.

    reference_region: ``cerebellum`` (default), ``pons`` or ``wholebrain``; see
    :func:`dualglow_app.templates.reference_region` for their definitions.

    Example::

        >>> PETOptions(reference_region="pons").reference_region
        'pons'
    """

    reference_region: str = "cerebellum"
    rigid_iterations: tuple[int, ...] = (200, 100, 50)
    mask_brain: bool = True

    def __post_init__(self) -> None:
        if self.reference_region not in REFERENCE_REGIONS:
            raise ValueError(
                f"unknown reference region {self.reference_region!r}; choose one of {REFERENCE_REGIONS}"
            )


@dataclass
class T1wResult:
    """A T1w on the model grid, and what is needed to go back to the subject.

    Transforms follow ANTs' ``apply_transforms`` conventions: ``forward_transforms`` map the
    native T1w onto MNI, ``inverse_transforms`` with ``inverse_invert`` map MNI onto native.
    """

    source: Path
    sha256: str
    grid: ModelGrid
    image: nib.Nifti1Image
    brain_mask: nib.Nifti1Image
    forward_transforms: list[Path]
    inverse_transforms: list[Path]
    inverse_invert: list[bool]
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_brain: Path
    native_mask: Path
    intensity_range: tuple[float, float]
    # Share of the template brain mask (the grid's support) that the subject's registered
    # brain covers: ~1 when skull strip and registration worked.
    template_coverage: float
    cache_dir: Path
    from_cache: bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PETResult:
    """An FDG-PET on the model grid as SUVR, with its PET -> T1w rigid transform."""

    source: Path
    sha256: str
    grid: ModelGrid
    image: nib.Nifti1Image
    rigid_transform: Path
    reference_region: str
    reference_value: float
    n_frames: int
    cache_dir: Path
    from_cache: bool
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- input checks


def _fail(path: Path, problem: str) -> InputImageError:
    return InputImageError(f"{path}: {problem}")


def load_image(path: str | os.PathLike[str], kind: str = "T1w") -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load and check an input NIfTI; return the image and its float32 data.

    A T1w must be 3D, or 4D with exactly one volume; a PET may have any number of frames.
    Raises :class:`InputImageError` (one line: the file and what is wrong).

    Example::

        >>> img, data = load_image("sub-01_T1w.nii.gz", "T1w")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, f"{kind} file not found")
    try:
        img = load_nifti(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated gzip -> EOFError/zlib.error, garbage -> ImageFileError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, f"cannot read {kind} image (truncated or not NIfTI?): {reason}") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        img = nib.Nifti1Image(data, img.affine)
    shape = data.shape
    if data.ndim < 3 or min(shape[:3]) < MIN_SIDE_VOXELS:
        raise _fail(path, f"{kind} image is 2D or a thin slab (shape {shape}); a 3D volume is required")
    if data.ndim > 4:
        raise _fail(path, f"{kind} image has {data.ndim} dimensions (shape {shape}); expected 3D or 4D")
    if data.ndim == 4:
        if kind == "T1w" and shape[3] != 1:
            raise _fail(path, f"T1w image is 4D with {shape[3]} volumes; give a single 3D volume")
        if shape[3] < 1:
            raise _fail(path, f"{kind} image has no volumes (shape {shape})")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    low, high = VOXEL_SIZE_RANGE_MM
    if not np.all(np.isfinite(zooms)) or np.any(zooms < low) or np.any(zooms > high):
        raise _fail(path, f"absurd voxel size {tuple(float(z) for z in np.round(zooms, 4))} mm; expected {low}..{high} mm")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise _fail(path, "voxel-to-world affine is singular or not finite; fix the header")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise _fail(path, f"{kind} image has {bad} NaN/Inf voxels")
    if not np.any(data):
        raise _fail(path, f"{kind} image is all zero")
    if float(data.max()) == float(data.min()):
        raise _fail(path, f"{kind} image is constant ({float(data.max())})")
    return img, data


# --------------------------------------------------------------------------- ANTs plumbing

_LPS = np.diag([-1.0, -1.0, 1.0])


@contextmanager
def _itk_threads(nprocs: int) -> Iterator[None]:
    """Limit ITK (ANTs) and torch threads to ``nprocs`` for the duration of a call."""
    import torch

    old_env = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    old_torch = torch.get_num_threads()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(nprocs))
    torch.set_num_threads(int(nprocs))
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        if old_env is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = old_env


def to_ants(data: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """A numpy volume with a NIfTI (RAS) affine as an ANTs image (LPS physical space)."""
    import ants

    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    # The polar factor is the nearest rotation: ITK needs orthonormal directions, and
    # scanner affines carry float noise (or a little shear) that would make it refuse.
    u, _, vt = np.linalg.svd(linear / spacing)
    direction = _LPS @ (u @ vt)
    origin = _LPS @ affine[:3, 3]
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(o) for o in origin),
        spacing=tuple(float(s) for s in spacing),
        direction=direction,
    )


def from_ants(image: ants.ANTsImage) -> nib.Nifti1Image:
    """An ANTs image as a float32 NIfTI with a RAS affine (inverse of :func:`to_ants`)."""
    direction = _LPS @ np.asarray(image.direction)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.spacing)[None, :]
    affine[:3, 3] = _LPS @ np.asarray(image.origin)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return nib.Nifti1Image(image.numpy().astype(np.float32), affine, header)


def grid_reference(affine: np.ndarray, shape: tuple[int, ...]) -> ants.ANTsImage:
    """An empty ANTs image with the given geometry (the target of a resampling)."""
    return to_ants(np.zeros(shape, dtype=np.float32), affine)


def _anti_alias(image: ants.ANTsImage, target_voxel_mm: float) -> ants.ANTsImage:
    """Gaussian pre-filter before downsampling: FWHM = sqrt(target^2 - source^2) mm."""
    import ants

    source = float(np.mean(image.spacing))
    fwhm = float(np.sqrt(max(target_voxel_mm**2 - source**2, 0.0)))
    if fwhm < 0.5 * source:
        return image
    return ants.smooth_image(image, fwhm / 2.3548, sigma_in_physical_coordinates=True)


_DEEPBET: Any = None


def skull_strip(img: nib.Nifti1Image, threshold: float = 0.5) -> np.ndarray:
    """deepbet brain mask (bool, same voxel grid as ``img``); see the module docstring."""
    global _DEEPBET
    if _DEEPBET is None:
        from deepbet import BrainExtraction

        _DEEPBET = BrainExtraction()
    _, mask, _ = _DEEPBET.run(img, threshold=threshold)
    return np.asarray(mask.dataobj) > 0


# --------------------------------------------------------------------------- cache


def _settings_key(*parts: Any) -> str:
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _cached_entry(folder: Path, build: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The meta of the cache entry ``folder`` and whether it was cached; when missing,
    ``build(tmp)`` fills a temporary folder and returns the meta, and the folder is renamed
    into place. Built under the entry's lock (:func:`dualglow_app.io.entry_lock`): a concurrent
    run that wants the same entry waits and reuses it, and a killed run's leftovers are removed."""
    meta = _read_meta(folder)
    if meta is not None:
        return meta, True
    with entry_lock(folder):
        meta = _read_meta(folder)
        if meta is not None:
            return meta, True
        with atomic_dir(folder) as tmp:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta, False


def _read_meta(folder: Path) -> dict[str, Any] | None:
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        _LOG.warning("ignoring unreadable cache entry %s", folder)
        return None


# --------------------------------------------------------------------------- T1w path


def _register_t1w(
    img: nib.Nifti1Image, folder: Path, options: T1wOptions, timings: dict[str, float]
) -> dict[str, Any]:
    """Skull strip, N4 and register one RAS T1w; write the results into ``folder``."""
    import ants

    data = np.asarray(img.dataobj, dtype=np.float32)
    start = time.perf_counter()
    mask = skull_strip(img, options.deepbet_threshold)
    if mask.sum() < 1000:
        raise PreprocessError("deepbet found no brain (fewer than 1000 voxels)")
    timings["skull_strip"] = time.perf_counter() - start

    start = time.perf_counter()
    # N4 runs on the brain's bounding box: the field is fitted inside the mask only, and the
    # rest of the head image cost time (a 256 x 256 x 192 T1w is 2-3x the box). The 12-voxel
    # margin exceeds the mask's 2-voxel dilation and keeps the shrink-4 B-spline fit's border
    # away from the brain.
    box = tuple(slice(max(int(i.min()) - 12, 0), min(int(i.max()) + 13, n))
                for i, n in zip(np.nonzero(mask), mask.shape, strict=True))
    crop_affine = img.affine.copy()
    crop_affine[:3, 3] = img.affine[:3, :3] @ np.array([b.start for b in box]) + img.affine[:3, 3]
    head = to_ants(data[box], crop_affine)
    crop_mask = to_ants(mask[box].astype(np.float32), crop_affine)
    # A slightly dilated mask lets N4 see the brain's edge without the (skull-free) background.
    n4_mask = ants.iMath(crop_mask, "MD", 2)
    corrected = ants.n4_bias_field_correction(
        head,
        mask=n4_mask,
        shrink_factor=options.n4_shrink,
        convergence={"iters": list(options.n4_iterations), "tol": 1e-7},
    )
    brain_data = np.zeros(data.shape, np.float32)
    brain_data[box] = corrected.numpy() * mask[box]
    brain = to_ants(brain_data, img.affine)
    brain_mask = to_ants(mask.astype(np.float32), img.affine)
    timings["n4"] = time.perf_counter() - start

    start = time.perf_counter()
    template = ants.image_read(str(get_template(options.template_resolution).t1w))
    # The metric is sampled on the template's grid, so a moving image finer than it adds cost
    # (its pyramid, its gradient images), not accuracy: register an anti-aliased copy at the
    # template's voxel size (measured on a 1 mm phantom: 15.9 -> 8.6 s). Transforms live in
    # physical space, so they apply to the native image unchanged.
    voxel = float(options.template_resolution)
    moving = brain
    if min(brain.spacing) < voxel:
        moving = ants.resample_image(_anti_alias(brain, voxel), (voxel,) * 3, False, 0)
    affine = ants.registration(
        fixed=template,
        moving=moving,
        type_of_transform="Affine",
        aff_iterations=tuple(options.affine_iterations),
        aff_shrink_factors=tuple(options.affine_shrink_factors),
        aff_smoothing_sigmas=tuple(options.affine_smoothing_sigmas),
        # Not under the SyN stage's prefix: ANTsPy lists a stage's transforms by globbing it.
        outprefix=str(folder / "affine_"),
    )
    timings["affine"] = time.perf_counter() - start
    reg = ants.registration(
        fixed=template,
        moving=moving,
        type_of_transform="SyNOnly",
        initial_transform=affine["fwdtransforms"][0],
        reg_iterations=tuple(options.syn_iterations),
        outprefix=str(folder / "t1w2mni_"),
    )
    timings["registration"] = time.perf_counter() - start
    Path(affine["fwdtransforms"][0]).unlink()  # the SyN stage wrote it again as its 0GenericAffine

    ants.image_write(brain, str(folder / "brain.nii.gz"))
    ants.image_write(brain_mask, str(folder / "brain_mask.nii.gz"))
    return {
        "forward": [Path(p).name for p in reg["fwdtransforms"]],
        "inverse": [Path(p).name for p in reg["invtransforms"]],
        "inverse_invert": ["GenericAffine" in p for p in reg["invtransforms"]],
    }


def image_on_grid(data: np.ndarray, grid: ModelGrid) -> nib.Nifti1Image:
    """``data`` as a NIfTI image on ``grid`` (units mm)."""
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return nib.Nifti1Image(data, grid.affine, header)


def _t1w_transforms(
    ras: nib.Nifti1Image, folder: Path, source: Path, facts: dict[str, Any], options: T1wOptions,
    timings: dict[str, float],
) -> tuple[dict[str, Any], bool]:
    """The cached skull strip + registration of a T1w (computed into ``folder`` when missing,
    its meta.json recording ``facts`` about the input): the meta and whether it was cached."""
    def build(tmp: Path) -> dict[str, Any]:
        _LOG.info("%s: skull strip, N4, registration to MNI152NLin2009cAsym", source.name)
        return {**_register_t1w(ras, tmp, options, timings), "source": str(source), **facts, "options": asdict(options)}

    meta, cached = _cached_entry(folder, build)
    if cached:
        _LOG.info("%s: reusing transforms from %s", source.name, folder)
    return meta, cached


def preprocess_t1w(
    t1w: str | os.PathLike[str],
    grid: ModelGrid,
    work_dir: str | os.PathLike[str],
    nprocs: int = 2,
    options: T1wOptions | None = None,
) -> T1wResult:
    """Bring a raw T1w (any orientation, with skull) onto ``grid``; see the module docstring.

    Returns the normalised grid image (0 outside the template brain mask, intensities inside it
    scaled so the ``options.percentiles`` map to 0 and 1, clipped), that mask, the share of it
    the subject's registered brain covers, and the
    transforms and native geometry that :func:`grid_to_native` needs.

    Example::

        >>> from dualglow_app.grid import preset
        >>> res = preprocess_t1w("sub-01_T1w.nii.gz", preset("cpu4mm"), "work")  # doctest: +SKIP
        >>> res.image.shape
        (40, 48, 40)
    """
    options = options or T1wOptions()
    source = Path(t1w)
    raw, _ = load_image(source, "T1w")
    if raw.ndim == 4:
        raw = raw.slicer[..., 0]
    native_affine = raw.affine.copy()
    native_shape = tuple(int(n) for n in raw.shape[:3])
    ras = nib.as_closest_canonical(raw)
    ras = nib.Nifti1Image(np.asarray(ras.dataobj, dtype=np.float32), ras.affine)
    digest = file_sha256(source)
    folder = Path(work_dir) / "cache" / f"t1w-{digest[:16]}-{_settings_key(asdict(options))}"
    timings: dict[str, float] = {}
    start = time.perf_counter()

    with _itk_threads(nprocs):
        import ants

        facts = {"sha256": digest, "native_affine": native_affine.tolist(), "native_shape": list(native_shape)}
        meta, from_cache = _t1w_transforms(ras, folder, source, facts, options, timings)
        forward = [str(folder / name) for name in meta["forward"]]
        brain = ants.image_read(str(folder / "brain.nii.gz"))
        brain_mask = ants.image_read(str(folder / "brain_mask.nii.gz"))
        target = grid_reference(grid.affine, grid.shape)
        t0 = time.perf_counter()
        warped = ants.apply_transforms(
            target, _anti_alias(brain, grid.voxel_size), forward, interpolator="linear"
        )
        warped_mask = ants.apply_transforms(target, brain_mask, forward, interpolator="linear")
        timings["resample"] = time.perf_counter() - t0

    subject_brain = warped_mask.numpy() > 0.5
    values = warped.numpy()
    if subject_brain.sum() < 10:
        raise PreprocessError(f"{source}: the brain falls outside the model grid after registration")
    # Every scan shares the template's brain support (templates.brain_mask_on_grid says why);
    # the subject's own mask only measures how much of it the registered brain covers.
    mask = brain_mask_on_grid(grid)
    coverage = float((subject_brain & mask).sum() / max(mask.sum(), 1))
    if coverage < MIN_TEMPLATE_COVERAGE:
        _LOG.warning("%s: the registered brain covers only %.0f %% of the template brain; check the skull "
                     "strip and the registration (the report's registration check)", source.name, 100 * coverage)
    low, high = (float(v) for v in np.percentile(values[mask], options.percentiles))
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0) * mask
    timings["total"] = time.perf_counter() - start
    return T1wResult(
        source=source,
        sha256=digest,
        grid=grid,
        image=image_on_grid(scaled.astype(np.float32), grid),
        brain_mask=image_on_grid(mask.astype(np.uint8), grid),
        forward_transforms=[Path(p) for p in forward],
        inverse_transforms=[folder / name for name in meta["inverse"]],
        inverse_invert=list(meta["inverse_invert"]),
        native_affine=np.asarray(meta["native_affine"]),
        native_shape=tuple(meta["native_shape"]),
        native_brain=folder / "brain.nii.gz",
        native_mask=folder / "brain_mask.nii.gz",
        intensity_range=(low, high),
        template_coverage=coverage,
        cache_dir=folder,
        from_cache=from_cache,
        timings=timings,
    )


def tissue_maps_on_grid(t1w: T1wResult, nprocs: int = 2, reading: str = "native") -> np.ndarray:
    """(2, *grid.shape) float32: each grid voxel's grey-matter and CSF map
    (:data:`~dualglow_app.tissue.NATIVE_TISSUE_CHANNELS`) read at the T1w's native resolution,
    0 outside the template brain mask: the anatomy template's input with a native
    ``--anatomy-reading`` (``reading``, one of :data:`~dualglow_app.tissue.NATIVE_READINGS`).

    A three-class mixture (:class:`~dualglow_app.tissue.GreyMatterModel`) is fitted to this
    subject's own N4-corrected native brain; its posteriors ("native"), each voxel's
    partial-volume fractions of the two classes its intensity lies between ("native-fractions"),
    or each voxel's expected fractions under a mixture with pure and boundary classes started
    from it (:class:`~dualglow_app.tissue.PartialVolumeMixture`, "native-pve") are warped to
    the grid the way the T1w is (anti-aliased, the same transforms). On the grid a 4 mm voxel mixes its tissues, and one T1w intensity can be several mixes: through the
    preprocessing of 8 phantoms, each subject's departure from the mean grey matter was read
    with r 0.55 from the grid T1w and 0.80 this way (docs/MODEL_EXPERIMENTS.md, finding 25).
    Cached beside the T1w's transforms (its own entry per grid and reading), so a second call
    reads one file.
    """
    from dualglow_app.tissue import (
        NATIVE_MIXTURE_STRIDE,
        NATIVE_READINGS,
        NATIVE_TISSUE_CHANNELS,
        own_tissue_maps,
        reading_key,
    )

    if reading not in NATIVE_READINGS:
        raise ValueError(f"reading={reading!r} (choose from {list(NATIVE_READINGS)})")
    grid = t1w.grid
    key = _settings_key(grid.to_dict(), TISSUE_MAPS_VERSION, NATIVE_MIXTURE_STRIDE, *reading_key(reading))
    folder = t1w.cache_dir.parent / f"{t1w.cache_dir.name}-tissues-{key}"

    def build(tmp: Path) -> dict[str, Any]:
        import ants

        _LOG.info("%s: tissue mixture of the native brain (%s reading) onto the grid", t1w.source.name, reading)
        with _itk_threads(nprocs):
            brain = ants.image_read(str(t1w.native_brain))
            inside = ants.image_read(str(t1w.native_mask)).numpy() > 0.5
            native, mixture = own_tissue_maps(brain.numpy(), inside, reading)
            maps = native_maps_on_grid(t1w, brain, native)
        np.save(tmp / "tissue_maps.npy", maps)
        weights, means, variances = mixture.mixture_parameters()
        return {"source": str(t1w.source), "sha256": t1w.sha256, "channels": list(NATIVE_TISSUE_CHANNELS), "reading": reading,
                "grid": grid.to_dict(), "mixture": {"weights": weights, "means": means, "variances": variances}}  # fmt: skip

    _cached_entry(folder, build)
    return np.load(folder / "tissue_maps.npy")


def native_maps_on_grid(t1w: T1wResult, brain: Any, maps: np.ndarray) -> np.ndarray:
    """(len(maps), *grid.shape) float32: maps on the T1w's native brain (``brain``, its ANTs
    image) warped onto its grid the way the T1w is (anti-aliased, its forward transforms,
    linear), 0 outside the template brain mask."""
    import ants

    grid = t1w.grid
    target = grid_reference(grid.affine, grid.shape)
    forward = [str(p) for p in t1w.forward_transforms]
    warped = np.stack([ants.apply_transforms(target, _anti_alias(brain.new_image_like(np.asarray(m, np.float32)),
                                                                 grid.voxel_size), forward, interpolator="linear").numpy()
                       for m in maps])  # fmt: skip
    return (warped * brain_mask_on_grid(grid)).astype(np.float32)


# --------------------------------------------------------------------------- PET path


def _pet_to_t1w(
    moving: Any, t1w: T1wResult, folder: Path, source: Path, digest: str, options: PETOptions,
    timings: dict[str, float],
) -> tuple[dict[str, Any], bool]:
    """The cached rigid PET -> T1w transform (Mattes MI against the skull-stripped,
    bias-corrected T1w; computed into ``folder`` when missing): its meta and whether cached."""
    import ants

    def build(tmp: Path) -> dict[str, Any]:
        _LOG.info("%s: rigid coregistration to the T1w (mutual information)", source.name)
        start = time.perf_counter()
        brain = ants.image_read(str(t1w.native_brain))
        # Six parameters of a whole-head rigid alignment need no fine detail, and FDG-PET has
        # none (FWHM 6-8 mm): against an anti-aliased 4 mm T1w (pyramid 16/8/4 mm) Mattes MI
        # takes 1.6-2.5 s instead of 15-19 s at 2 mm, and moves the brain 0.2 mm on average
        # (0.5 mm at most) from the 2 mm result on three 1 mm phantoms (docs/PERFORMANCE.md).
        fixed = ants.resample_image(_anti_alias(brain, 4.0), (4.0, 4.0, 4.0), False, 0)
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="Rigid",
            aff_metric="mattes",
            aff_iterations=tuple(options.rigid_iterations),
            aff_shrink_factors=(4, 2, 1)[-len(options.rigid_iterations) :],
            aff_smoothing_sigmas=(2, 1, 0)[-len(options.rigid_iterations) :],
            outprefix=str(tmp / "pet2t1w_"),
        )
        timings["coregistration"] = time.perf_counter() - start
        return {"rigid": Path(reg["fwdtransforms"][0]).name, "source": str(source), "sha256": digest,
                "t1w_sha256": t1w.sha256}  # fmt: skip

    meta, cached = _cached_entry(folder, build)
    if cached:
        _LOG.info("%s: reusing PET -> T1w transform from %s", source.name, folder)
    return meta, cached


def _suvr(warped: np.ndarray, t1w: T1wResult, options: PETOptions, source: Path) -> tuple[np.ndarray, float]:
    """PET on the grid divided by its mean in the reference region (0 outside the brain when
    ``options.mask_brain``), and that mean."""
    brain = np.asarray(t1w.brain_mask.dataobj) > 0
    region_path = reference_region(options.reference_region, 1 if t1w.grid.voxel_size < 2 else 2)
    region = resample_to(load_nifti(region_path), t1w.grid.affine, t1w.grid.shape, order=1) > 0.5
    region &= brain
    if region.sum() < 3:
        raise PreprocessError(
            f"{source}: reference region {options.reference_region!r} is (almost) outside the "
            "brain on this grid; pick another region or a larger grid"
        )
    reference = float(warped[region].mean())
    if not reference > 0:
        raise PreprocessError(f"{source}: mean uptake in the {options.reference_region} is {reference:.3g}")
    suvr = warped / reference
    return (suvr * brain if options.mask_brain else suvr), reference


def preprocess_pet(
    pet: str | os.PathLike[str],
    t1w: T1wResult,
    work_dir: str | os.PathLike[str],
    nprocs: int = 2,
    options: PETOptions | None = None,
) -> PETResult:
    """Bring a raw FDG-PET (3D or 4D) onto the T1w's model grid as SUVR.

    The rigid PET -> T1w transform (Mattes MI against the skull-stripped, bias-corrected T1w)
    and the T1w -> MNI transforms are applied in a single resampling; the result is divided
    by its mean in ``options.reference_region`` and, by default, set to 0 outside the brain.

    Example::

        >>> pet = preprocess_pet("sub-01_trc-FDG_pet.nii.gz", t1_result, "work")  # doctest: +SKIP
        >>> round(pet.reference_value, 1) > 0
        True
    """
    options = options or PETOptions()
    source = Path(pet)
    raw, data = load_image(source, "PET")
    n_frames = int(data.shape[3]) if data.ndim == 4 else 1
    mean = data.mean(axis=3) if data.ndim == 4 else data
    mean_img = nib.as_closest_canonical(nib.Nifti1Image(mean.astype(np.float32), raw.affine))
    digest = file_sha256(source)
    key = _settings_key(options.rigid_iterations, t1w.sha256, t1w.cache_dir.name)
    folder = Path(work_dir) / "cache" / f"pet-{digest[:16]}-{key}"
    timings: dict[str, float] = {}
    start = time.perf_counter()

    with _itk_threads(nprocs):
        import ants

        moving = to_ants(np.asarray(mean_img.dataobj, dtype=np.float32), mean_img.affine)
        meta, from_cache = _pet_to_t1w(moving, t1w, folder, source, digest, options, timings)
        rigid = folder / meta["rigid"]
        target = grid_reference(t1w.grid.affine, t1w.grid.shape)
        transforms = [str(p) for p in t1w.forward_transforms] + [str(rigid)]
        warped = ants.apply_transforms(
            target, _anti_alias(moving, t1w.grid.voxel_size), transforms, interpolator="linear"
        ).numpy()

    suvr, reference = _suvr(warped, t1w, options, source)
    timings["total"] = time.perf_counter() - start
    return PETResult(
        source=source,
        sha256=digest,
        grid=t1w.grid,
        image=image_on_grid(suvr.astype(np.float32), t1w.grid),
        rigid_transform=rigid,
        reference_region=options.reference_region,
        reference_value=reference,
        n_frames=n_frames,
        cache_dir=folder,
        from_cache=from_cache,
        timings=timings,
    )


# --------------------------------------------------------------------------- inverse


def _check_on_grid(image: nib.Nifti1Image, grid: ModelGrid) -> None:
    if tuple(image.shape[:3]) != grid.shape or not np.allclose(image.affine, grid.affine, atol=1e-3):
        raise PreprocessError(
            f"image of shape {image.shape} is not on the model grid {grid.shape} "
            f"({grid.voxel_size} mm); resample it with the grid it was made on"
        )


def grid_to_mni(image: nib.Nifti1Image, grid: ModelGrid, resolution: int = 2) -> nib.Nifti1Image:
    """A model-grid image on TemplateFlow's MNI152NLin2009cAsym ``res-XX`` grid (linear).

    Example::

        >>> out = grid_to_mni(pet.image, pet.grid, resolution=2)  # doctest: +SKIP
        >>> out.shape
        (97, 115, 97)
    """
    from dualglow_app.templates import tf_grid

    _check_on_grid(image, grid)
    affine, shape = tf_grid(resolution)
    data = resample_to(image, affine, shape, order=1)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return nib.Nifti1Image(data.astype(np.float32), affine, header)


def grid_to_native(
    image: nib.Nifti1Image, t1w: T1wResult, nprocs: int = 2, interpolator: str = "linear"
) -> nib.Nifti1Image:
    """A model-grid image on the subject's original T1w voxel grid (inverse ANTs transforms).

    Example::

        >>> native = grid_to_native(pet.image, t1_result)  # doctest: +SKIP
        >>> native.shape == t1_result.native_shape
        True
    """
    _check_on_grid(image, t1w.grid)
    with _itk_threads(nprocs):
        import ants

        moving = to_ants(np.asarray(image.dataobj, dtype=np.float32), image.affine)
        fixed = grid_reference(t1w.native_affine, t1w.native_shape)
        warped = ants.apply_transforms(
            fixed,
            moving,
            [str(p) for p in t1w.inverse_transforms],
            interpolator=interpolator,
            whichtoinvert=list(t1w.inverse_invert),
        )
    # Back on the original voxel grid (same orientation as the input file), not RAS.
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return nib.Nifti1Image(warped.numpy().astype(np.float32), t1w.native_affine, header)


def native_to_grid(
    image: nib.Nifti1Image, t1w: T1wResult, nprocs: int = 2, interpolator: str = "linear"
) -> nib.Nifti1Image:
    """Any image in the subject's T1w space (e.g. a segmentation) onto the model grid.

    Uses the same anti-aliasing and transforms as the T1w itself; pass
    ``interpolator="nearestNeighbor"`` (and expect aliasing) for label images.

    Example::

        >>> gm_grid = native_to_grid(nib.load("sub-01_label-GM_probseg.nii.gz"), t1)  # doctest: +SKIP
    """
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise PreprocessError(f"expected a 3D image in T1w space, got shape {data.shape}")
    with _itk_threads(nprocs):
        import ants

        moving = to_ants(data, image.affine)
        if interpolator == "linear":
            moving = _anti_alias(moving, t1w.grid.voxel_size)
        warped = ants.apply_transforms(
            grid_reference(t1w.grid.affine, t1w.grid.shape),
            moving,
            [str(p) for p in t1w.forward_transforms],
            interpolator=interpolator,
        )
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return nib.Nifti1Image(warped.numpy().astype(np.float32), t1w.grid.affine, header)


