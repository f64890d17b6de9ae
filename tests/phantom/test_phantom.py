"""The phantom cohort: BIDS validity, determinism, ground truth, and physiology going the right way.

Most tests use coarse 2 mm phantoms (``voxel_mm=2``); one builds the real 1 mm default.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import spearmanr

from dualglow_app.cli.phantom import main
from dualglow_app.phantom import load_truth, make_cohort, make_subject
from dualglow_app.phantom import pet as pt
from dualglow_app.phantom.template import HIPPOCAMPUS, LATERAL_VENTRICLES, load_template

SPACE = "MNI152NLin2009cAsym"
SEED = 7


def _validator() -> str | None:
    local = Path(sys.executable).with_name("bids-validator-deno")
    return str(local) if local.exists() else shutil.which("bids-validator-deno")


def validate(dataset: Path) -> None:
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    proc = subprocess.run([exe, str(dataset), "--format", "json"], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, json.dumps(errors[:5], indent=1)


def data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def gt_dir(root: Path, label: str) -> Path:
    return root / "derivatives" / "phantom" / f"sub-{label}"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "bids"
    make_cohort(out, 3, seed=SEED, voxel_mm=2.0, jobs=2)
    return out


@pytest.fixture(scope="module")
def by_age_and_diagnosis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One subject (same traits) made young CN, old CN, old AD and CN at the table's age (that
    one in phantom version 1 too)."""
    out = tmp_path_factory.mktemp("contrast")
    cases = {"cn60": (60.0, "CN", 2), "cn88": (88.0, "CN", 2), "ad88": (88.0, "AD", 2), "cn73": (73.0, "CN", 2),
             "cn73v1": (73.0, "CN", 1)}
    for name, (age, dx, version) in cases.items():
        make_subject(out / name, 0, seed=SEED, voxel_mm=2.0, age=age, diagnosis=dx, version=version)
    return {name: gt_dir(out / name, "001") for name in cases}


def regional_suvr(gt: Path, voxel_mm: float) -> dict[str, float]:
    """Mean noise-free MNI PET per docs/DESIGN.md region, normalised by the pons (table's reference)."""
    tpl = load_template(voxel_mm)
    maps = pt.region_maps(voxel_mm)
    pet = np.zeros(tpl.shape, dtype=np.float32)
    pet[tpl.crop] = data(next((gt / "pet").glob("*desc-noisefree_pet.nii.gz")))
    values = dict(zip(maps.names, pt.measure_regions(pet, maps), strict=True))
    return {k: v / values["pons"] * pt.REGION_TARGETS["pons"][0] for k, v in values.items()}


def test_raw_dataset_passes_the_bids_validator(cohort: Path) -> None:
    validate(cohort)


def test_longitudinal_sessions_are_valid_and_a_year_apart(tmp_path: Path) -> None:
    out = tmp_path / "long"
    info = make_cohort(out, 2, seed=SEED, sessions=3, voxel_mm=2.0, jobs=2)
    validate(out)
    for subject in info.subjects:
        rows = (out / subject.participant_id / f"{subject.participant_id}_sessions.tsv").read_text().split("\n")[1:4]
        ages = [float(r.split("\t")[1]) for r in rows]
        assert np.all(np.diff(ages) >= 1.0) and 55 <= ages[0] and ages[-1] <= 90
        assert (out / subject.participant_id / "ses-03" / "pet" / f"{subject.participant_id}_ses-03_trc-FDG_pet.nii.gz").exists()
        assert (gt_dir(out, subject.participant_id[4:]) / "ses-02" / "xfm").is_dir()


def test_subject_is_deterministic_and_independent_of_cohort_size(cohort: Path, tmp_path: Path) -> None:
    make_subject(tmp_path / "alone", 1, seed=SEED, voxel_mm=2.0)
    for rel in ("sub-002/anat/sub-002_T1w.nii.gz", "sub-002/pet/sub-002_trc-FDG_pet.nii.gz",
                f"derivatives/phantom/sub-002/pet/sub-002_trc-FDG_space-{SPACE}_desc-noisefree_pet.nii.gz"):
        a, b = nib.load(cohort / rel), nib.load(tmp_path / "alone" / rel)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
    make_subject(tmp_path / "other", 1, seed=SEED + 1, voxel_mm=2.0)
    other = data(tmp_path / "other/sub-002/anat/sub-002_T1w.nii.gz")
    assert other.shape != data(cohort / "sub-002/anat/sub-002_T1w.nii.gz").shape or not np.array_equal(
        other, data(cohort / "sub-002/anat/sub-002_T1w.nii.gz"))


def test_ground_truth_files_and_sidecars(cohort: Path) -> None:
    for label in ("001", "002", "003"):
        gt = gt_dir(cohort, label)
        s = f"sub-{label}"
        expected = [
            f"anat/{s}_space-{SPACE}_T1w.nii.gz",
            *(f"anat/{s}_space-{SPACE}_label-{t}_probseg.nii.gz" for t in ("GM", "WM", "CSF")),
            f"anat/{s}_space-{SPACE}_desc-brain_mask.nii.gz",
            f"pet/{s}_trc-FDG_space-{SPACE}_desc-noisefree_pet.nii.gz",
            f"pet/{s}_trc-FDG_space-{SPACE}_desc-explainable_pet.nii.gz",  # phantom version 2 (the default)
            f"xfm/{s}_from-T1w_to-{SPACE}_mode-image_xfm.json",
            f"xfm/{s}_from-T1w_to-{SPACE}_mode-image_xfm.nii.gz",
            f"xfm/{s}_from-{SPACE}_to-T1w_mode-image_xfm.nii.gz",
            f"xfm/{s}_from-PET_to-T1w_mode-image_xfm.json",
            f"{s}_desc-regions_factors.tsv",
        ]
        for rel in expected:
            assert (gt / rel).is_file(), rel
        sidecar = json.loads((gt / f"pet/{s}_trc-FDG_space-{SPACE}_desc-noisefree_pet.json").read_text())
        assert "2009c" in sidecar["SpatialReference"]
        pet = json.loads((cohort / s / "pet" / f"{s}_trc-FDG_pet.json").read_text())
        assert pet["TracerName"] == "FDG" and pet["TracerRadionuclide"] == "F18" and pet["Units"] == "Bq/mL"
    description = json.loads((cohort / "derivatives/phantom/dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert "SYNTHETIC" in (cohort / "README").read_text()
    header = (cohort / "participants.tsv").read_text().splitlines()[0].split("\t")
    assert header[:4] == ["participant_id", "age", "sex", "diagnosis"] and header[-1] == "mmse"
    columns = json.loads((cohort / "participants.json").read_text())
    assert columns["mmse"]["Units"] == "score" and columns["sex"]["Levels"] and columns["diagnosis"]["Levels"]


def test_mmse_follows_diagnosis_and_age_as_adni_reports() -> None:
    """The MMSE-like score: ADNI-1 baseline means by group (CN 29.1, MCI 27.0, AD 23.3; Petersen
    2010), lower with age, 0-30 integers, declining between an AD subject's sessions."""
    from dualglow_app.phantom.cohort import mmse_scores
    from dualglow_app.phantom.subjects import Demographics

    def scores(diagnosis: str, age: float) -> np.ndarray:
        demo = Demographics(age, "F", diagnosis, diagnosis, 0.0, 0.0, 1.0)
        return np.array([mmse_scores(SEED, i, demo, [age])[0] for i in range(400)])

    means = {d: scores(d, 74.0).mean() for d in ("CN", "MCI", "AD")}
    assert means["CN"] == pytest.approx(29.0, abs=0.4) and means["AD"] == pytest.approx(23.3, abs=0.4)
    assert means["CN"] > means["MCI"] > means["AD"] and scores("CN", 90.0).mean() < means["CN"]
    assert all(0 <= s <= 30 and float(s).is_integer() for s in scores("AD", 90.0))
    ad = Demographics(75.0, "M", "AD", "AD", 3.0, 1.0, 1.0)
    course = mmse_scores(SEED, 0, ad, [75.0, 76.5, 78.0])
    assert course[0] > course[-1] and course == mmse_scores(SEED, 0, ad, [75.0, 76.5, 78.0])


def test_version_1_participants_have_no_mmse(tmp_path: Path) -> None:
    from dualglow_app.phantom.cohort import _write_dataset_files
    from dualglow_app.phantom.subjects import Demographics, SubjectInfo

    subjects = [SubjectInfo("sub-001", Demographics(70.0, "F", "CN", "CN", 0.0, 0.0, 1.0), [70.0, 71.5])]
    _write_dataset_files(tmp_path / "v1", subjects, SEED, 2, 2.0, 1)
    _write_dataset_files(tmp_path / "v2", subjects, SEED, 2, 2.0, 2)
    assert (tmp_path / "v1" / "participants.tsv").read_text() == (
        "participant_id\tage\tsex\tdiagnosis\tdiagnosis_detail\nsub-001\t70\tF\tCN\tCN\n")
    assert "mmse" not in (tmp_path / "v1" / "participants.json").read_text()
    assert "MMSE" not in (tmp_path / "v1" / "README").read_text()
    sessions = (tmp_path / "v2" / "sub-001" / "sub-001_sessions.tsv").read_text().splitlines()
    assert sessions[0] == "session_id\tage\tmmse" and len(sessions) == 3


def test_true_transform_maps_native_t1w_onto_the_mni_ground_truth(cohort: Path) -> None:
    tt = load_truth(cohort, "sub-001")
    gt_img = nib.load(gt_dir(cohort, "001") / "anat" / f"sub-001_space-{SPACE}_T1w.nii.gz")
    gt = np.asarray(gt_img.dataobj, dtype=np.float32)
    ijk = np.argwhere(gt > 0)[::7].T
    mni = gt_img.affine[:3, :3] @ ijk + gt_img.affine[:3, 3:4]
    native = tt.mni_to_t1w(mni)
    assert np.abs(tt.t1w_to_mni(native) - mni).max() < 0.05
    t1 = nib.load(cohort / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    from scipy import ndimage as ndi

    inv = np.linalg.inv(t1.affine)
    vox = inv[:3, :3] @ native + inv[:3, 3:4]
    sampled = ndi.map_coordinates(np.asarray(t1.dataobj, dtype=np.float32), vox, order=1)
    assert np.corrcoef(sampled, gt[tuple(ijk)])[0, 1] > 0.85


def test_native_geometry_varies_like_scanners(tmp_path: Path) -> None:
    codes, voxels = set(), set()
    for i in range(6):
        make_subject(tmp_path, i, seed=SEED, voxel_mm=2.0)
        t1 = nib.load(tmp_path / f"sub-{i + 1:03d}" / "anat" / f"sub-{i + 1:03d}_T1w.nii.gz")
        codes.add(nib.aff2axcodes(t1.affine))
        pet = nib.load(tmp_path / f"sub-{i + 1:03d}" / "pet" / f"sub-{i + 1:03d}_trc-FDG_pet.nii.gz")
        voxels.add(tuple(np.round(pet.header.get_zooms(), 3)))
        assert not np.allclose(t1.affine, pet.affine)
    assert len(codes) >= 3
    assert voxels == {(4.0, 4.0, 4.0)}  # 2 x the T1w voxel (2 mm PET at the real 1 mm)


def _volume_ml(gt: Path, tissue: str, labels: tuple[int, ...] | None, voxel_mm: float) -> float:
    tpl = load_template(voxel_mm)
    prob = data(gt / "anat" / f"sub-001_space-{SPACE}_label-{tissue}_probseg.nii.gz")
    if labels is not None:
        prob = prob * np.isin(tpl.labels[tpl.crop], labels)
    return float(prob.sum() * voxel_mm**3 / 1000.0)


def test_atrophy_grows_with_age_and_faster_in_ad(by_age_and_diagnosis: dict[str, Path]) -> None:
    gt = by_age_and_diagnosis
    hippo = {k: _volume_ml(p, "GM", HIPPOCAMPUS, 2.0) for k, p in gt.items()}
    vent = {k: _volume_ml(p, "CSF", LATERAL_VENTRICLES, 2.0) for k, p in gt.items()}
    gm = {k: _volume_ml(p, "GM", None, 2.0) for k, p in gt.items()}
    assert hippo["cn88"] < 0.9 * hippo["cn60"]
    assert hippo["ad88"] < 0.9 * hippo["cn88"]
    assert vent["cn60"] < vent["cn88"] < vent["ad88"]
    assert gm["cn60"] > gm["cn88"] > gm["ad88"]


def test_hypometabolism_with_age_and_ad(by_age_and_diagnosis: dict[str, Path]) -> None:
    suvr = {k: regional_suvr(p, 2.0) for k, p in by_age_and_diagnosis.items()}
    for region in ("precuneus", "posterior_cingulate"):
        assert suvr["ad88"][region] < 0.88 * suvr["cn88"][region], region
    for region in ("lateral_parietal", "lateral_temporal", "hippocampus"):
        assert suvr["ad88"][region] < suvr["cn88"][region], region
    for region in ("superior_frontal", "anterior_cingulate", "insula"):
        assert suvr["cn88"][region] < suvr["cn60"][region], region
    assert suvr["ad88"]["cerebellar_cortex"] == pytest.approx(suvr["cn88"]["cerebellar_cortex"], rel=0.03)
    # Absolute uptake falls with age too (same subject, same global scale).
    whole = {k: data(next((p / "pet").glob("*.nii.gz"))).mean() for k, p in by_age_and_diagnosis.items()}
    assert whole["cn88"] < 0.9 * whole["cn60"]


def test_ground_truth_pet_reproduces_the_design_table_ranking(by_age_and_diagnosis: dict[str, Path]) -> None:
    """Phantom version 1: every subject is the calibrated template, so one CN subject at 73
    ranks the regions like the table. (Version 2 subjects differ by their own GM: their
    population mean does, next test.)"""
    suvr = regional_suvr(by_age_and_diagnosis["cn73v1"], 2.0)
    names = list(pt.REGION_TARGETS)
    rho = spearmanr([suvr[n] for n in names], [pt.REGION_TARGETS[n][0] for n in names]).statistic
    assert rho >= 0.9


def test_version_2_population_means_reproduce_the_design_table_ranking() -> None:
    """The regional SUVR of the version 2 population (CN at the table's age 73, 10 subjects,
    noise-free, pons-normalised as the table) ranks the regions like docs/DESIGN.md."""
    from dualglow_app.phantom import anatomy as an
    from dualglow_app.phantom import cohort
    from dualglow_app.phantom import pet as pt
    from dualglow_app.phantom.template import load_template

    tpl = load_template(2.0)
    cal = pt.calibrate(2.0)
    maps = pt.region_maps(2.0)
    rows = []
    for i in range(10):
        traits = cohort.subject_traits(SEED, i, 1, tpl, age=73.0, diagnosis="CN", version=2, native=False)
        _, head_pet = an.head_images(tpl, traits.head, cohort._head_shell(2.0), pt.HEAD_ACTIVITY)
        truth = cohort.session_truth(tpl, cal, traits, 0, head_pet, cohort.subject_maps(tpl, traits), False)
        regions = pt.measure_regions(truth.pet, maps)
        rows.append(regions / regions[maps.names.index("pons")] * pt.REGION_TARGETS["pons"][0])
    mean = dict(zip(maps.names, np.mean(rows, axis=0), strict=True))
    names = list(pt.REGION_TARGETS)
    assert spearmanr([mean[n] for n in names], [pt.REGION_TARGETS[n][0] for n in names]).statistic >= 0.9


def test_real_default_path_one_subject(tmp_path: Path) -> None:
    """The 1 mm phantom exactly as the CLI makes it: valid, calibrated, 1 mm T1w and 2 mm PET."""
    out = tmp_path / "real"
    result = CliRunner().invoke(main, [str(out), "--subjects", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    validate(out)
    t1 = nib.load(out / "sub-001/anat/sub-001_T1w.nii.gz")
    pet = nib.load(out / "sub-001/pet/sub-001_trc-FDG_pet.nii.gz")
    assert np.allclose(t1.header.get_zooms(), 1.0) and np.allclose(pet.header.get_zooms(), 2.0)
    assert max(t1.shape) >= 256
    assert nib.load(gt_dir(out, "001") / "anat" / f"sub-001_space-{SPACE}_T1w.nii.gz").shape == (193, 229, 193)
    assert (gt_dir(out, "001") / "pet" / f"sub-001_trc-FDG_space-{SPACE}_desc-explainable_pet.nii.gz").is_file()
    # Phantom version 2 (the default): the regions measure like the table times the subject's own
    # recorded factors (GM uptake included; the partial-volume effect of its GM is not, hence 0.85).
    suvr = regional_suvr(gt_dir(out, "001"), 1.0)
    lines = (gt_dir(out, "001") / "sub-001_desc-regions_factors.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    total = {r.split("\t")[0]: float(r.split("\t")[header.index("total_factor")]) for r in lines[1:]}
    names = list(pt.REGION_TARGETS)
    expected = [pt.REGION_TARGETS[n][0] * total[n] for n in names]
    assert spearmanr([suvr[n] for n in names], expected).statistic >= 0.85
    cal = pt.calibrate(1.0)
    assert cal.spearman >= 0.95
    cortical = cal.gm_activity[[i for i, n in enumerate(cal.names) if n not in pt.DEEP_REGIONS]]
    assert cortical.mean() / cal.wm_activity == pytest.approx(4.0, rel=0.01)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subjects", "0"], "at least 1"),
        (["--subjects", "2", "--sessions", "0"], "--sessions"),
        (["--subjects", "2", "--seed", "-1"], "--seed"),
        (["--subjects", "2", "--jobs", "0"], "--jobs"),
        (["--subjects", "x"], "not a valid integer"),
        ([], "--subjects"),
    ],
)
def test_cli_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, [str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_out_dir_and_overwrites_only_a_phantom(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(main, [str(foreign), "--subjects", "1", "--voxel-mm", "2", *extra])
        assert result.exit_code == 2
        assert "not empty" in result.output and len(result.output.strip().splitlines()[-1]) > 0
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "phantom"
    assert CliRunner().invoke(main, [str(out), "--subjects", "1", "--voxel-mm", "2"]).exit_code == 0
    again = CliRunner().invoke(main, [str(out), "--subjects", "1", "--voxel-mm", "2"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    result = CliRunner().invoke(main, [str(out), "--subjects", "1", "--voxel-mm", "2", "--overwrite", "--preview"])
    assert result.exit_code == 0, result.output
    assert (out / "derivatives/phantom/preview.png").stat().st_size > 10_000
