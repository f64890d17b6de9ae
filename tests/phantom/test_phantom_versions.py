"""Phantom versions: version 1 unchanged, version 2's anatomy visible in the MRI and followed by
the PET, the explainable-PET truth, the MNI fast path and the CLI flags.

Version 1's expectation (tests/data/phantom_v1_subject.json) was computed by the code before
phantom versions existed (commit ad6de92, ``make_subject(out, 0, seed=7, voxel_mm=2.0)``) with
:func:`summarize`: every file's NIfTI shape, affine, data type and per-axis profiles of its data
(9 significant digits), JSON sidecars and TSV text. Regenerate only on purpose::

    PYTHONPATH=<checkout of the old code> python tests/phantom/test_phantom_versions.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pinned import assert_close
from scipy.stats import spearmanr

from dualglow_app.imaging import load_nifti

EXPECTED_V1 = Path(__file__).resolve().parents[1] / "data" / "phantom_v1_subject.json"
SPACE = "MNI152NLin2009cAsym"
SEED = 7


def summarize(root: Path) -> dict[str, object]:
    """Compact, CPU-robust description of every file under ``root`` (see the module docstring)."""
    out: dict[str, object] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name.endswith(".nii.gz"):
            image = load_nifti(path)
            data = np.asarray(image.dataobj, dtype=np.float64)
            out[name] = {
                "shape": list(data.shape), "affine": np.round(image.affine, 6).tolist(),
                "dtype": str(image.get_data_dtype()),
                "profiles": [[float(f"{v:.9g}") for v in data.sum(axis=tuple(a for a in range(data.ndim) if a != k))]
                             for k in range(3)],
            }
        elif name.endswith(".json"):
            out[name] = json.loads(path.read_text())
        else:
            out[name] = path.read_text()
    return out


def test_version_1_subject_is_unchanged(tmp_path: Path) -> None:
    """Version 1 writes what the code wrote before versions existed: the same files, sidecars
    and tables, images equal to 1e-6 (relative) along every axis profile."""
    from dualglow_app.phantom import make_subject

    make_subject(tmp_path, 0, seed=SEED, voxel_mm=2.0, version=1)
    assert_close(summarize(tmp_path), json.loads(EXPECTED_V1.read_text()), "v1", tol=1e-5)  # float32 sums differ ~1e-6 between CPUs (AMD EPYC, 2026-12-01)


def _data(path: Path) -> np.ndarray:
    return np.asarray(load_nifti(path).dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def v2_subject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dualglow_app.phantom import make_subject

    out = tmp_path_factory.mktemp("v2")
    make_subject(out, 0, seed=SEED, voxel_mm=2.0, version=2)
    return out / "derivatives" / "phantom" / "sub-001"


def _factors(gt: Path) -> dict[str, dict[str, str]]:
    lines = (gt / "sub-001_desc-regions_factors.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return {row.split("\t")[0]: dict(zip(header, row.split("\t"), strict=True)) for row in lines[1:]}


def test_version_2_gm_factors_are_visible_in_the_mri(v2_subject: Path) -> None:
    """Each cortical region's GM volume (tissue map) and its mean T1w (the MRI: more GM, less
    CSF, brighter) follow the subject's GM factor; the table records both."""
    from dualglow_app.phantom import pet as pt
    from dualglow_app.phantom.template import load_template

    tpl = load_template(2.0)
    maps = pt.region_maps(2.0)
    factors = _factors(v2_subject)
    gm = _data(v2_subject / "anat" / f"sub-001_space-{SPACE}_label-GM_probseg.nii.gz")
    t1 = _data(v2_subject / "anat" / f"sub-001_space-{SPACE}_T1w.nii.gz")
    index = maps.index[tpl.crop]
    cortical = [r for r, name in enumerate(maps.names) if pt.cortical_regions()[r]]
    factor = np.array([float(factors[maps.names[r]]["gm_factor"]) for r in cortical])
    assert factor.std() > 0.05 and all(float(factors[n]["gm_factor"]) == 1.0 for n in ("putamen", "cerebellar_cortex"))
    volume = np.array([gm[index == r].sum() for r in cortical])
    reference = np.array([tpl.gm[tpl.crop][index == r].sum() for r in cortical])
    brightness = np.array([t1[index == r].mean() for r in cortical])
    template_t1 = np.array([(0.72 * tpl.gm + tpl.wm + 0.3 * tpl.csf)[tpl.crop][index == r].mean() for r in cortical])
    assert spearmanr(volume / reference, factor).statistic > 0.8
    assert spearmanr(brightness / template_t1, factor).statistic > 0.6
    recorded = np.array([float(factors[maps.names[r]]["gm_volume_ml"]) for r in cortical])
    assert spearmanr(recorded, volume).statistic > 0.95


def test_version_2_pet_follows_the_gm_factor_and_explainable_pet_is_written(v2_subject: Path) -> None:
    from dualglow_app.phantom import pet as pt

    factors = _factors(v2_subject)
    for name, row in factors.items():
        expected = float(row["gm_factor"]) ** pt.GM_UPTAKE_EXPONENT
        assert float(row["gm_uptake_factor"]) == pytest.approx(expected, rel=1e-5), name
    pet_dir = v2_subject / "pet"
    explainable = pet_dir / f"sub-001_trc-FDG_space-{SPACE}_desc-explainable_pet.nii.gz"
    assert explainable.is_file()
    sidecar = json.loads(explainable.with_name(explainable.name.replace(".nii.gz", ".json")).read_text())
    assert "MRI" in sidecar["Description"] and sidecar["Units"] == "Bq/mL"
    doc = json.loads((v2_subject / "sub-001_desc-regions_factors.json").read_text())
    assert doc["PhantomVersion"] == 2 and 5.0 < doc["VentricleVolumeML"] < 150.0


def test_version_3_changes_only_the_grey_matter_s_t1w(v2_subject: Path, tmp_path: Path) -> None:
    """Version 3 has version 2's tissues and PET exactly; its T1w's pure grey matter spreads
    over a wider range (its own field and texture), brighter in the deep nuclei than in the
    association cortex, where version 2's is one level."""
    from dualglow_app.phantom import make_subject
    from dualglow_app.phantom import pet as pt
    from dualglow_app.phantom.template import load_template

    make_subject(tmp_path, 0, seed=SEED, voxel_mm=2.0, version=3)
    v3 = tmp_path / "derivatives" / "phantom" / "sub-001"
    for name in (f"anat/sub-001_space-{SPACE}_label-GM_probseg.nii.gz", f"anat/sub-001_space-{SPACE}_label-CSF_probseg.nii.gz",
                 f"pet/sub-001_trc-FDG_space-{SPACE}_desc-noisefree_pet.nii.gz"):
        np.testing.assert_array_equal(_data(v3 / name), _data(v2_subject / name), err_msg=name)
    gm = _data(v2_subject / "anat" / f"sub-001_space-{SPACE}_label-GM_probseg.nii.gz")
    index = pt.region_maps(2.0).index[load_template(2.0).crop]
    names = list(pt.all_regions())
    pure = gm > 0.9
    deep = pure & np.isin(index, [names.index(n) for n in ("thalamus", "putamen")])
    association = pure & np.isin(index, [names.index(n) for n in ("dorsolateral_frontal", "lateral_temporal")])
    assert deep.sum() > 20 and association.sum() > 100
    spread, lift = {}, {}
    for version, folder in ((2, v2_subject), (3, v3)):
        t1 = _data(folder / "anat" / f"sub-001_space-{SPACE}_T1w.nii.gz")
        spread[version] = float(t1[association].std())
        lift[version] = float(t1[deep].mean() - t1[association].mean())
    assert spread[3] > 8 * spread[2], spread
    assert abs(lift[2]) < 10 and lift[3] > 60, lift  # WM = 1000: a fifth of the GM-to-WM gap and more


def test_explainable_pet_is_closer_to_the_pet_than_the_mean_pet(tmp_path: Path) -> None:
    """Over a small cohort (SUVR: each PET over its whole-brain mean), every subject's
    explainable PET is nearer its noise-free PET than the cohort's mean PET is."""
    from dualglow_app.phantom import make_cohort

    make_cohort(tmp_path, 4, seed=SEED, voxel_mm=2.0, jobs=2)
    pets: list[np.ndarray] = []
    explained: list[np.ndarray] = []
    for i in range(1, 5):
        pet_dir = tmp_path / "derivatives" / "phantom" / f"sub-{i:03d}" / "pet"
        mask = _data(pet_dir.parent / "anat" / f"sub-{i:03d}_space-{SPACE}_desc-brain_mask.nii.gz") > 0
        for out, desc in ((pets, "noisefree"), (explained, "explainable")):
            image = _data(pet_dir / f"sub-{i:03d}_trc-FDG_space-{SPACE}_desc-{desc}_pet.nii.gz")
            out.append(np.where(mask, image / image[mask].mean(), 0.0))
    mean = np.mean(pets, axis=0)
    for pet, expl in zip(pets, explained, strict=True):
        assert np.linalg.norm(pet - expl) < 0.8 * np.linalg.norm(pet - mean)


def test_versions_share_demographics_and_version_2_ventricles_spread() -> None:
    """Subject i is the same person in both versions (demographics, ages); version 2's
    ventricles span roughly 10-80 ml over a cohort, its brain size about 4 %."""
    from dualglow_app.phantom import anatomy as an
    from dualglow_app.phantom import cohort
    from dualglow_app.phantom.template import load_template

    tpl = load_template(2.0)
    volumes, scales = [], []
    for i in range(40):
        v1 = cohort.subject_traits(SEED, i, 1, tpl, version=1, native=False)
        v2 = cohort.subject_traits(SEED, i, 1, tpl, version=2, native=False)
        assert v1.demographics == v2.demographics and v1.ages == v2.ages and v1.anatomy is None
        assert v2.anatomy is not None
        d = v2.demographics
        atrophy = an.AtrophyParams.expected(d.age, d.diagnosis, d.disease_years, d.atrophy_rate)
        volumes.append(an.ventricle_target_ml(tpl, an.with_ventricle_factor(atrophy, tpl, v2.anatomy.ventricle_factor)))
        scales.append(v2.anatomy.brain_scale)
    assert 5.0 < min(volumes) < 25.0 and 50.0 < max(volumes) < 150.0
    assert 0.025 < np.std(np.log(scales)) < 0.06


def test_ventricles_smaller_than_the_template_are_filled_with_wm() -> None:
    from dualglow_app.phantom import anatomy as an
    from dualglow_app.phantom.template import load_template

    tpl = load_template(2.0)
    template_ml = an.ventricle_volume_ml(tpl.csf, tpl)
    for growth in (-0.5 * template_ml, 20.0):
        _, wm, csf = an.atrophied_tissues(tpl, an.AtrophyParams(0.0, 0.0, growth))
        measured = an.ventricle_volume_ml(csf, tpl)
        if growth < 0:
            assert measured == pytest.approx(template_ml + growth, rel=0.25)
            assert wm.sum() > tpl.wm.sum()
        else:
            assert measured >= template_ml - 0.5


# --------------------------------------------------------------------------- the MNI fast path


def test_mni_stack_loads_with_shapes_labels_and_suvr(tmp_path: Path) -> None:
    from dualglow_app.dataset import PairedVolumes, load_mni_stack
    from dualglow_app.grid import preset
    from dualglow_app.phantom import cohort
    from dualglow_app.phantom.mni import _grid_refs, _to_grid, make_mni_stack, work_truth
    from dualglow_app.phantom.template import load_template

    grid = preset("tiny8mm")
    folder = make_mni_stack(tmp_path / "stack", 3, seed=SEED, grid=grid, jobs=1)
    data = load_mni_stack(folder)
    assert isinstance(data, PairedVolumes) and len(data) == 3
    assert data.labels == ["sub-001", "sub-002", "sub-003"] and data.subjects == ["001", "002", "003"]
    for array in (data.mri, data.pet, data.mask):
        assert array.shape == (3, *grid.shape) and isinstance(array, np.memmap)
    index = json.loads((folder / "index.json").read_text())
    assert index["version"] == cohort.DEFAULT_VERSION == 3 and "SKIPS" in index["Note"] and index["grid"] == grid.to_dict()
    tpl = load_template(2.0)
    for i in range(3):
        traits = cohort.subject_traits(SEED, i, 1, tpl, native=False)
        assert data.age[i] == pytest.approx(traits.demographics.age)
        assert data.diagnosis[i] == traits.demographics.diagnosis
    reference = _grid_refs(grid).reference
    explainable = getattr(data, "explainable")  # noqa: B009 - an extra attribute, not a field
    assert explainable.shape == (3, *grid.shape) and isinstance(explainable, np.memmap)
    for i in range(3):
        brain = data.mask[i] > 0
        assert data.mri[i][brain].min() >= 0.0 and data.mri[i][brain].max() == pytest.approx(1.0)
        assert np.all(data.mri[i][~brain] == 0) and np.all(data.pet[i][~brain] == 0)
        assert data.pet[i][reference].mean() == pytest.approx(1.0, abs=1e-4)
        assert explainable[i][reference].mean() == pytest.approx(1.0, abs=1e-4)
        assert 0.8 < np.corrcoef(data.pet[i][brain], explainable[i][brain])[0, 1] <= 1.0
    # The stack's counterpart of the native tissue maps: probabilities, 0 outside the brain, the
    # grey matter where the subject's own grey matter is.
    maps = data.tissue_maps
    assert maps is not None and maps.shape == (3, 2, *grid.shape) and isinstance(maps, np.memmap)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-5 and not (maps * (data.mask[:, None] == 0)).any()
    tpl, _, subject = work_truth(SEED, 0)
    truth = _to_grid(subject.tissues[0], tpl.affine, grid)
    brain = data.mask[0] > 0
    assert np.corrcoef(maps[0, 0][brain], truth[brain])[0, 1] > 0.8


def test_longitudinal_mni_stack_rows_are_sessions_of_one_brain(tmp_path: Path) -> None:
    """--sessions 2: a row per session, subject-major; each row the BIDS cohort's session (its
    age, its MMSE); the same brain a year or two older, with its own scan noise; the swept truth
    of a follow-up row is that session's brain."""
    from dualglow_app.dataset import load_mni_stack, split_subjects
    from dualglow_app.grid import preset
    from dualglow_app.phantom import cohort
    from dualglow_app.phantom.mni import age_sweep_truth, make_mni_stack, simulate_subject
    from dualglow_app.phantom.template import load_template

    grid = preset("tiny8mm")
    data = load_mni_stack(make_mni_stack(tmp_path / "stack", 2, seed=SEED, grid=grid, jobs=1, sessions=2))
    assert data.labels == ["sub-001_ses-01", "sub-001_ses-02", "sub-002_ses-01", "sub-002_ses-02"]
    assert data.subjects == ["001", "001", "002", "002"]
    index = json.loads((tmp_path / "stack" / "index.json").read_text())
    assert index["sessions"] == 2 and index["session"] == [0, 1, 0, 1]
    traits = cohort.subject_traits(SEED, 1, 2, load_template(2.0), native=False)
    assert list(data.age[2:]) == pytest.approx(traits.ages) and 1.0 <= traits.ages[1] - traits.ages[0] <= 2.0
    assert index["mmse"][2:] == cohort.mmse_scores(SEED, 1, traits.demographics, traits.ages)
    follow_up = simulate_subject(SEED, 1, grid, sessions=2, session=1)
    np.testing.assert_array_equal(follow_up.pet, data.pet[3])
    brain = data.mask[2] > 0
    assert 0.98 < np.corrcoef(data.pet[2][brain], data.pet[3][brain])[0, 1] < 1.0
    assert not np.array_equal(data.mri[2], data.mri[3])
    np.testing.assert_array_equal(age_sweep_truth(SEED, 1, grid, [traits.ages[1]], sessions=2, session=1)[0],
                                  data.pet[3])
    train, val = split_subjects(data.subjects, 0.5, seed=0)
    assert {data.subjects[r] for r in train}.isdisjoint({data.subjects[r] for r in val})
    with pytest.raises(ValueError, match="sessions"):
        simulate_subject(SEED, 1, grid, sessions=2, session=2)


def test_mni_stack_matches_the_bids_cohort_s_truth(tmp_path: Path) -> None:
    """Row i of the stack is the BIDS cohort's subject i: its noise-free MNI PET on the grid."""
    from dualglow_app.grid import preset
    from dualglow_app.phantom import make_subject
    from dualglow_app.phantom.mni import _grid_refs, _to_grid, simulate_subject

    grid = preset("tiny8mm")
    subject = simulate_subject(SEED, 1, grid)
    make_subject(tmp_path, 1, seed=SEED, voxel_mm=2.0)
    image = load_nifti(tmp_path / "derivatives" / "phantom" / "sub-002" / "pet" /
                     f"sub-002_trc-FDG_space-{SPACE}_desc-noisefree_pet.nii.gz")
    on_grid = _to_grid(np.asarray(image.dataobj, dtype=np.float32), image.affine, grid)
    suvr = on_grid / on_grid[_grid_refs(grid).reference].mean()
    brain = subject.mask > 0
    assert np.corrcoef(suvr[brain], subject.pet[brain])[0, 1] > 0.99


def test_age_sweep_truth_ages_the_metabolism_of_the_same_brain() -> None:
    """The truth of a fixed-MRI age sweep: at the subject's own age it is the stack's PET; at
    other ages the anatomy (MRI, mask) stays and the PET falls with age, most in the frontal
    cortex (the calibration's strongest slope) and not at all in the SUVR reference."""
    from dualglow_app.evaluate.atlases import phantom_regions
    from dualglow_app.grid import preset
    from dualglow_app.phantom.mni import age_sweep_truth, simulate_subject
    from dualglow_app.regions import regional_mean_matrix

    grid = preset("tiny8mm")
    subject = simulate_subject(SEED, 0, grid)
    age = subject.demographics.age
    sweep = age_sweep_truth(SEED, 0, grid, [age, age + 20.0])
    np.testing.assert_array_equal(sweep[0], subject.pet)
    older = simulate_subject(SEED, 0, grid, metabolic_age=age + 20.0)
    np.testing.assert_array_equal(older.mri, subject.mri)
    np.testing.assert_array_equal(older.pet, sweep[1])
    labels, names = phantom_regions(grid)
    regional = regional_mean_matrix(sweep, labels, list(range(1, len(names) + 1)), masks=subject.mask)
    change = regional[1] / regional[0] - 1
    frontal, reference = names.index("superior_frontal"), names.index("cerebellar_cortex")
    assert change[frontal] < -0.05 and change[frontal] < np.nanmedian(change)
    assert abs(change[reference]) < 0.02


# --------------------------------------------------------------------------- CLI


def test_cli_phantom_versions(tmp_path: Path) -> None:
    from dualglow_app.cli.phantom import main
    from dualglow_app.phantom.cohort import phantom_seed, phantom_version

    for version in ("1", "2", "3"):
        out = tmp_path / f"v{version}"
        result = CliRunner().invoke(main, [str(out), "--subjects", "1", "--voxel-mm", "2", "--phantom-version", version,
                                           "--seed", "3"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"phantom version {version}" in result.output
        assert phantom_version(out) == int(version) and phantom_seed(out) == 3
        assert f"phantom version {version}" in (out / "README").read_text()
        explainable = list((out / "derivatives" / "phantom").rglob("*desc-explainable_pet.nii.gz"))
        assert len(explainable) == (0 if version == "1" else 1)
    assert phantom_version(tmp_path) is None and phantom_seed(tmp_path) is None
    result = CliRunner().invoke(main, [str(tmp_path / "x"), "--subjects", "1", "--phantom-version", "4"])
    assert result.exit_code == 2


def test_cli_mni_stack(tmp_path: Path) -> None:
    from dualglow_app.cli.phantom import main

    out = tmp_path / "stack"
    result = CliRunner().invoke(main, [str(out), "--mni-stack", "--grid", "tiny8mm", "--subjects", "2",
                                       "--phantom-version", "1", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert "SKIP" in result.output
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 1 and index["grid"]["shape"] == [20, 24, 20] and len(index["labels"]) == 2
    again = CliRunner().invoke(main, [str(out), "--mni-stack", "--grid", "tiny8mm", "--subjects", "1"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    result = CliRunner().invoke(main, [str(out), "--mni-stack", "--grid", "tiny8mm", "--subjects", "1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "index.json").read_text())["labels"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "cpu4mm"], "--grid only applies to --mni-stack"),
        (["--mni-stack", "--sessions", "0"], "--sessions must be between"),
        (["--mni-stack", "--preview"], "--preview"),
        (["--mni-stack", "--voxel-mm", "2"], "--voxel-mm"),
        (["--mni-stack", "--grid", "nope"], "nope"),
    ],
)
def test_cli_refuses_mni_stack_misuse(tmp_path: Path, args: list[str], message: str) -> None:
    from dualglow_app.cli.phantom import main

    result = CliRunner().invoke(main, [str(tmp_path / "out"), "--subjects", "1", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":
    import tempfile

    from dualglow_app.phantom import make_subject as _make

    with tempfile.TemporaryDirectory() as tmp:
        _make(Path(tmp), 0, seed=SEED, voxel_mm=2.0)
        Path(sys.argv[1]).write_text(json.dumps(summarize(Path(tmp)), indent=0) + "\n")
