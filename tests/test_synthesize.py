"""Participant level, end to end on a small cohort with a small trained model.

Preprocessing (~30-60 s per T1w on 2 cores) runs once per session: the cohort, the work dir
(whose cache every run shares) and the models are session-scoped, and ``main_run`` is the one
full CLI run whose outputs several tests inspect.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from participant_data import SESSION_AGES, build_cohort, make_model, participant_ages
from pinned import check_pinned, mean_tissue_maps

from dualglow_app.bids import (
    Scan,
    sidecar_path,
    validate_dataset,
    validator_executable,
    write_bidsignore,
)
from dualglow_app.cli import main
from dualglow_app.derivatives import age_label, planned_outputs
from dualglow_app.grid import preset
from dualglow_app.options import ParticipantOptions, ParticipantUsageError
from dualglow_app.synthesize import run_participant
from dualglow_app.weights import WeightsNotFoundError, resolve_weights

MNI = "MNI152NLin2009cAsym"
GRID = preset("tiny8mm")
needs_validator = pytest.mark.skipif(validator_executable() is None, reason="bids-validator-deno not installed")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def session_env(tmp_path_factory: pytest.TempPathFactory, template_cache: Path) -> Iterator[None]:
    """The offline template settings of conftest's (function-scoped) autouse fixture, for the
    session-scoped fixtures that preprocess."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DUALGLOW_TEMPLATEFLOW_OFFLINE", "1")
        patch.setenv("DUALGLOW_TEMPLATE_CACHE", str(template_cache))
        patch.setenv("TEMPLATEFLOW_HOME", str(tmp_path_factory.getbasetemp() / "empty-tf-home"))
        patch.setenv("DUALGLOW_NO_PROGRESS", "1")
        yield


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cohort(tmp_path_factory.mktemp("participant") / "bids")


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("participant-work")


@pytest.fixture(scope="session")
def models(session_env: None, cohort: Path, work: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``age``: conditioned on age; ``plain``: no side information. Trained on the cohort's
    preprocessed T1w, which also fills the shared preprocessing cache."""

    from dualglow_app.preprocess import preprocess_t1w

    torch.set_num_threads(2)
    images = [
        np.asarray(preprocess_t1w(cohort / f"sub-00{i}" / "anat" / f"sub-00{i}_T1w.nii.gz", GRID, work, 2).image.dataobj)
        for i in (1, 2)
    ]
    folder = tmp_path_factory.mktemp("models")
    return {
        "age": make_model(folder / "tiny-age", GRID, images, [65, 75], steps=8),
        "plain": make_model(folder / "tiny-plain", GRID, images, [65, 75], steps=1, with_age=False,
                            conditioning_range=False),  # as written before the range existed
    }


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def main_run(session_env: None, cohort: Path, work: Path, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """The full run: input validation, 4 scans, 3 samples, age sweep, MNI and native outputs."""
    out = tmp_path_factory.mktemp("main-run") / "derivatives"
    result = invoke(
        cohort, out, "participant", "--weights", models["age"], "-w", work, "--nprocs", "2",
        "--samples", "3", "--temperature", "0.7", "--seed", "7", "--age-sweep", "60", "80",
        "--output-spaces", MNI, "T1w",
    )
    return out, result


def data_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


# --------------------------------------------------------------------------- end to end


def test_full_run_writes_valid_indexable_derivatives(main_run: tuple[Path, Result], cohort: Path) -> None:
    out, result = main_run
    assert result.exit_code == 0, result.output
    assert "4 processed, 0 skipped" in result.output
    scans = {
        "sub-001": "sub-001/pet/sub-001",
        "sub-003 ses-b": "sub-003/ses-b/pet/sub-003_ses-b",
    }
    for stem in scans.values():
        for desc in ("synthetic", "sd", "age60", "age80"):
            assert (out / f"{stem}_trc-FDG_space-{MNI}_res-2_desc-{desc}_pet.nii.gz").is_file()
        for desc in ("synthetic", "sd"):
            native = out / f"{stem}_trc-FDG_space-T1w_desc-{desc}_pet.nii.gz"
            assert native.is_file()
    # native outputs are on the subject's own T1w grid
    raw = nib.load(cohort / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    native = nib.load(out / "sub-001" / "pet" / "sub-001_trc-FDG_space-T1w_desc-synthetic_pet.nii.gz")
    assert native.shape == raw.shape and np.allclose(native.affine, raw.affine, atol=1e-4)
    mean_path = out / "sub-001" / "pet" / f"sub-001_trc-FDG_space-{MNI}_res-2_desc-synthetic_pet.nii.gz"
    assert data_of(mean_path).shape == (97, 115, 97)
    assert data_of(mean_path).max() > 0.2  # SUVR, not the model's [0, 1] scale squashed to 0
    assert not tmp_leftovers(out)
    assert sorted(p.name for p in (out / "logs").iterdir())[0].startswith("participant-")


def test_sidecars_say_synthetic_and_record_provenance(main_run: tuple[Path, Result], cohort: Path) -> None:
    out, _ = main_run
    meta = json.loads((out / "sub-003" / "ses-a" / "pet" / f"sub-003_ses-a_trc-FDG_space-{MNI}_res-2_desc-synthetic_pet.json").read_text())
    assert meta["Description"].startswith("SYNTHETIC")
    assert "demonstration model trained on digital phantoms" in meta["Description"].lower()
    assert meta["TracerName"] == "FDG" and meta["SkullStripped"] is True and meta["Units"] == "SUVR"
    assert meta["Sources"] == ["bids:raw:sub-003/ses-a/anat/sub-003_ses-a_T1w.nii.gz"]
    assert meta["Resolution"] == {"2": f"TemplateFlow res-02 grid of {MNI} (2 mm isotropic)"}
    assert meta["ModelName"] == "tiny-age" and len(meta["ModelSHA256"]) == 64
    assert (meta["Age"], meta["AgeSource"]) == (SESSION_AGES["a"], "bids:raw:sub-003/sub-003_sessions.tsv")
    assert (meta["Seed"], meta["Samples"], meta["Temperature"], meta["DemonstrationModel"]) == (7, 3, 0.7, True)
    assert "SoftwareVersion" in meta and 0.0 <= meta["ClippedFraction"] <= 1.0
    assert 0.0 <= meta["LatentsOutsideTrainingRange"] <= 1.0
    sub01 = json.loads((out / "sub-001" / "pet" / f"sub-001_trc-FDG_space-{MNI}_res-2_desc-synthetic_pet.json").read_text())
    assert (sub01["Age"], sub01["AgeSource"]) == (participant_ages(cohort)["001"], "bids:raw:participants.tsv")
    # sub-001 is a training scan of the model: none of its MRI latents is outside the range.
    assert sub01["LatentsOutsideTrainingRange"] == 0.0
    # It has a measured FDG-PET, so the synthetic one is scored against it; sub-003 has none.
    measured = sub01["AgreementWithMeasuredPET"]
    assert measured["Source"] == "bids:raw:sub-001/pet/sub-001_trc-FDG_pet.nii.gz"
    assert measured["mae_suvr"] > 0 and -1.0 <= measured["pearson_r"] <= 1.0 and "ssim" in measured
    assert "AgreementWithMeasuredPET" not in meta
    assert "agreement with the measured FDG-PET" in (out / "sub-001.html").read_text()
    sweep = json.loads((out / "sub-001" / "pet" / f"sub-001_trc-FDG_space-{MNI}_res-2_desc-age80_pet.json").read_text())
    assert (sweep["Age"], sweep["AgeSource"]) == (80.0, "--age-sweep")
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "dualglow"
    assert "raw" in description["DatasetLinks"]


def test_age_sweep_table_and_report(main_run: tuple[Path, Result]) -> None:
    out, _ = main_run
    table = out / "sub-002" / "pet" / f"sub-002_trc-FDG_space-{MNI}_res-2_atlas-AAL2_desc-agesweep_stats.tsv"
    lines = table.read_text().splitlines()
    assert lines[0] == "age\tregion\tmean_suvr"
    rows = [line.split("\t") for line in lines[1:]]
    assert {r[0] for r in rows} == {"60", "80"}
    assert len(rows) == 2 * 121  # whole_brain + 120 AAL2 regions, per age
    assert any(r[1] == "Precuneus_L" for r in rows)
    report = (out / "sub-003.html").read_text()
    assert "SYNTHETIC" in report and "Demonstration model trained on digital phantoms" in report
    # two sessions x (registration check, montage, age-sweep curve, age difference map)
    assert report.count("<img") == 8
    assert "Registration check" in report and "age 80 years minus 60 years" in report
    assert "age sweep difference maps" in report
    assert "Session a" in report and "Session b" in report


@needs_validator
def test_derivatives_pass_the_bids_validator_and_pybids_indexes_them(main_run: tuple[Path, Result], cohort: Path) -> None:
    from bids import BIDSLayout

    out, _ = main_run
    result = validate_dataset(out)
    assert result.errors == []
    layout = BIDSLayout(out, validate=False, is_derivative=True)
    assert layout.get_subjects() == ["001", "002", "003"]
    means = layout.get(desc="synthetic", suffix="pet", space=MNI, extension=".nii.gz")
    assert len(means) == 4
    assert {f.get_metadata()["Age"] for f in means} == {*participant_ages(cohort).values(), *SESSION_AGES.values()}


def test_rerun_skips_and_overwrite_is_bit_identical(main_run: tuple[Path, Result], cohort: Path, work: Path, models: dict[str, Path]) -> None:
    out, _ = main_run
    outputs = sorted(p for p in out.rglob("sub-001/**/*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, data_of(p).tobytes() if p.name.endswith(".nii.gz") else None) for p in outputs}
    common = [cohort, out, "participant", "--weights", models["age"], "-w", work, "--skip-bids-validation",
              "--samples", "3", "--temperature", "0.7", "--seed", "7", "--age-sweep", "60", "80",
              "--output-spaces", MNI, "T1w", "--participant-label", "001"]
    again = invoke(*common)
    assert again.exit_code == 0 and "0 processed, 1 skipped" in again.output
    assert all(p.stat().st_mtime_ns == before[p][0] for p in outputs)
    redo = invoke(*common, "--overwrite")
    assert redo.exit_code == 0 and "1 processed, 0 skipped" in redo.output
    for path, (mtime, data) in before.items():
        assert path.stat().st_mtime_ns != mtime
        if data is not None:
            assert data_of(path).tobytes() == data, f"{path.name} changed on a re-run with the same seed"


def test_changed_settings_are_reported_not_silently_mixed(main_run: tuple[Path, Result], cohort: Path, work: Path, models: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    out, _ = main_run
    options = ParticipantOptions(
        cohort, out, weights=models["age"], work_dir=work, participant_labels=["001"], skip_bids_validation=True,
        samples=3, temperature=0.7, seed=8, age_sweep=[60, 80], output_spaces=[MNI, "T1w"], report=False,
    )
    caplog.set_level("WARNING", logger="dualglow")
    summary = run_participant(options)
    assert [o.status for o in summary.outcomes] == ["skipped"]
    assert "made with other Seed" in caplog.text and "--overwrite" in caplog.text


# --------------------------------------------------------------------------- failure modes


def test_one_failing_participant_does_not_stop_the_others(session_env: None, cohort: Path, work: Path, models: dict[str, Path], tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    shutil.copytree(cohort, bids, ignore=shutil.ignore_patterns("sub-002", "sub-003", "derivatives"))
    broken = bids / "sub-004" / "anat" / "sub-004_T1w.nii.gz"
    broken.parent.mkdir(parents=True)
    raw = (cohort / "sub-002" / "anat" / "sub-002_T1w.nii.gz").read_bytes()
    broken.write_bytes(raw[: len(raw) // 3])  # a truncated download
    with (bids / "participants.tsv").open("a") as handle:
        handle.write("sub-004\t70\tF\tCN\tCN\n")
    out = tmp_path / "out"
    result = invoke(bids, out, "participant", "--weights", models["age"], "-w", work, "--skip-bids-validation")
    assert result.exit_code == 1
    assert "1 processed, 0 skipped (outputs exist), 1 failed" in result.output
    assert "FAILED sub-004" in result.output and "sub-004_T1w.nii.gz" in result.output
    assert (out / "sub-001" / "pet" / f"sub-001_trc-FDG_space-{MNI}_res-2_desc-synthetic_pet.nii.gz").is_file()
    assert not (out / "sub-004").exists()
    assert (out / "sub-001.html").is_file()


def test_missing_age_fails_that_subject_naming_the_file(session_env: None, cohort: Path, work: Path, models: dict[str, Path], tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    shutil.copytree(cohort, bids, ignore=shutil.ignore_patterns("sub-001", "sub-003", "derivatives"))
    (bids / "participants.tsv").write_text("participant_id\tage\tsex\nsub-002\tn/a\tF\n")
    out = tmp_path / "out"
    common = [bids, out, "participant", "--weights", models["age"], "-w", work, "--skip-bids-validation"]
    result = invoke(*common)
    assert result.exit_code == 1
    assert "no age for sub-002" in result.output and f"{bids}/participants.tsv" in result.output
    assert "--age YEARS" in result.output
    fixed = invoke(*common, "--age", "68")
    assert fixed.exit_code == 0, fixed.output
    meta = json.loads(sidecar_path(next((out / "sub-002" / "pet").glob("*desc-synthetic_pet.nii.gz"))).read_text())
    assert (meta["Age"], meta["AgeSource"]) == (68.0, "--age")


def test_a_model_without_age_needs_none(session_env: None, cohort: Path, work: Path, models: dict[str, Path], tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    shutil.copytree(cohort, bids, ignore=shutil.ignore_patterns("sub-001", "sub-003", "derivatives"))
    (bids / "participants.tsv").write_text("participant_id\tsex\nsub-002\tF\n")
    result = invoke(bids, tmp_path / "out", "participant", "--weights", models["plain"], "-w", work,
                    "--skip-bids-validation", "--output-res", "4")
    assert result.exit_code == 0, result.output
    meta = json.loads(next((tmp_path / "out" / "sub-002" / "pet").glob("*desc-synthetic_pet.json")).read_text())
    assert "Age" not in meta and "conditional mode" in meta["Description"]
    assert "LatentsOutsideTrainingRange" not in meta  # a model file from before the range
    sweep = invoke(bids, tmp_path / "out2", "participant", "--weights", models["plain"], "-w", work,
                   "--skip-bids-validation", "--age-sweep", "60", "70")
    assert sweep.exit_code == 2 and "not conditioned on age" in sweep.output


def test_a_t1w_unlike_the_training_data_is_flagged(session_env: None, cohort: Path, work: Path, models: dict[str, Path],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Many MRI latents outside the training range: a warning naming the T1w, the share in
    the sidecar and a flagged row in the report."""
    from dualglow_app import synthesize

    real = synthesize.synthesize
    monkeypatch.setattr(synthesize, "synthesize", lambda *a, **k: real(*a, **k)._replace(latents_outside=0.2))
    caplog.set_level("WARNING", logger="dualglow")
    out = tmp_path / "out"
    options = ParticipantOptions(cohort, out, weights=models["age"], work_dir=work, participant_labels=["002"],
                                 skip_bids_validation=True, output_res=4)  # fmt: skip
    assert run_participant(options).exit_code == 0
    assert "sub-002_T1w.nii.gz: 20.0% of its MRI latents lie outside" in caplog.text
    meta = json.loads(next((out / "sub-002" / "pet").glob("*desc-synthetic_pet.json")).read_text())
    assert meta["LatentsOutsideTrainingRange"] == 0.2
    assert "20.00 % (high: this T1w is unlike the training data)" in (out / "sub-002.html").read_text()


def test_a_model_trained_on_other_preprocessing_is_flagged(session_env: None, cohort: Path, work: Path,
                                                          models: dict[str, Path], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A model file recording another preprocessing version than this dualglow's: a warning
    naming what changed (the model still runs); one that records none (older files) or the
    same version: no warning."""
    from dualglow_app.preprocess import (
        CACHE_VERSION,
        preprocessing_mismatch,
        preprocessing_versions,
    )

    assert preprocessing_mismatch(None) is None and preprocessing_mismatch(preprocessing_versions()) is None
    source = Path(models["age"])
    copy = tmp_path / "older-preprocessing"
    for suffix in (".safetensors", ".json"):
        shutil.copy(source.with_suffix(suffix), copy.with_suffix(suffix))
    meta = json.loads(copy.with_suffix(".json").read_text())
    meta["metadata"]["training"]["preprocessing"] = {**preprocessing_versions(), "cache_version": CACHE_VERSION - 1}
    copy.with_suffix(".json").write_text(json.dumps(meta))
    caplog.set_level("WARNING", logger="dualglow")
    options = ParticipantOptions(cohort, tmp_path / "out", weights=copy.with_suffix(".safetensors"), work_dir=work,
                                 participant_labels=["002"], skip_bids_validation=True, output_res=4)  # fmt: skip
    assert run_participant(options).exit_code == 0
    assert f"(cache version {CACHE_VERSION - 1} -> {CACHE_VERSION})" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--participant-label", "001", "099"], "no participant(s) sub-099"),
        (["--weights", "no-such-model"], "looked for"),
        (["--samples", "3"], "identical samples"),
        (["--session-label", "zz"], "no T1w in session(s) zz"),
    ],
)
def test_usage_errors_exit_2_with_one_line(session_env: None, cohort: Path, work: Path, models: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    weights = [] if "--weights" in args else ["--weights", str(models["age"])]
    result = invoke(cohort, tmp_path / "out", "participant", "-w", work, *weights, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out" / "sub-001").exists()


def test_output_dir_equal_to_bids_dir_exits_2(cohort: Path) -> None:
    result = invoke(cohort, cohort, "participant")
    assert result.exit_code == 2 and "OUTPUT_DIR" in result.output


def test_interrupted_write_leaves_no_partial_file(session_env: None, cohort: Path, work: Path, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    options = ParticipantOptions(cohort, out, weights=models["age"], work_dir=work, participant_labels=["002"],
                                 skip_bids_validation=True, samples=2, temperature=0.5)
    real_save = nib.save
    calls = {"n": 0}

    def save_then_interrupt(image: nib.Nifti1Image, filename: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the synthetic mean: half written, then Ctrl-C
            Path(filename).write_bytes(gzip.compress(b"\0" * 100)[:20])
            raise KeyboardInterrupt
        real_save(image, filename)

    monkeypatch.setattr(nib, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_participant(options)
    scan = Scan("002", None, cohort / "sub-002" / "anat" / "sub-002_T1w.nii.gz")
    planned = planned_outputs(scan, options)
    assert planned["t1w"].is_file() and not planned["mean"].exists()
    assert not tmp_leftovers(out)
    monkeypatch.setattr(nib, "save", real_save)
    summary = run_participant(options)
    assert [o.status for o in summary.outcomes] == ["processed"]
    assert all(p.is_file() for p in planned.values())
    data_of(planned["mean"])  # readable


# --------------------------------------------------------------------------- covariates beyond age


@pytest.fixture(scope="session")
def covariate_model(session_env: None, cohort: Path, work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model conditioned on age, sex and diagnosis (its covariates learnt and stored as the
    group level stores them), on the cohort's preprocessed T1w + PET pairs."""
    from participant_data import make_covariate_model

    from dualglow_app.preprocess import preprocess_pet, preprocess_t1w

    torch.set_num_threads(2)
    t1 = [preprocess_t1w(cohort / f"sub-00{i}" / "anat" / f"sub-00{i}_T1w.nii.gz", GRID, work, 2) for i in (1, 2)]
    pets = [np.asarray(preprocess_pet(cohort / f"sub-00{i}" / "pet" / f"sub-00{i}_trc-FDG_pet.nii.gz", t, work, 2)
                       .image.dataobj, np.float32) for i, t in zip((1, 2), t1, strict=True)]  # fmt: skip
    images = [np.asarray(t.image.dataobj, np.float32) for t in t1]
    values = {"age": [65.0, 75.0, 70.0, 80.0], "sex": ["M", "F", "F", "M"], "diagnosis": ["CN", "AD", "MCI", "CN"]}
    folder = tmp_path_factory.mktemp("covariate-model")
    return make_covariate_model(folder / "tiny-cov", GRID, images * 2, pets * 2, values)


@pytest.fixture(scope="session")
def covariate_run(session_env: None, cohort: Path, work: Path, covariate_model: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:  # fmt: skip
    """sub-001 (diagnosis in participants.tsv, with an FDG-PET) and sub-003 (diagnosis n/a):
    a diagnosis sweep and an age sweep, the measured PET moved along both."""
    out = tmp_path_factory.mktemp("covariate-run") / "derivatives"
    result = invoke(cohort, out, "participant", "--weights", covariate_model, "-w", work, "--nprocs", "2",
                    "--participant-label", "001", "003", "--skip-bids-validation", "--counterfactual-pet",
                    "--sweep", "diagnosis=CN,MCI,AD", "age=60:80:20")  # fmt: skip
    return out, result


def _brain_mean(path: Path) -> float:
    data = data_of(path)
    return float(data[data > 0].mean())


def test_covariate_sweeps_write_counterfactuals_tables_and_report(covariate_run: tuple[Path, Result]) -> None:
    out, result = covariate_run
    assert result.exit_code == 1, result.output  # sub-003 has no diagnosis
    assert "1 processed, 0 skipped (outputs exist), 2 failed" in result.output
    assert ("FAILED sub-003 ses-a: no diagnosis for sub-003_ses-a: the model is conditioned on diagnosis; add a value "
            "(one of CN, MCI, AD) to") in result.output and "--impute-covariates." in result.output  # fmt: skip
    stem = out / "sub-001" / "pet" / f"sub-001_trc-FDG_space-{MNI}_res-2"
    for desc in ("diagnosisCN", "diagnosisMCI", "diagnosisAD", "age60", "age80", "measuredDiagnosisCN",
                 "measuredDiagnosisAD", "measuredAge60", "measuredAge80"):  # fmt: skip
        assert Path(f"{stem}_desc-{desc}_pet.nii.gz").is_file(), desc
    mean = json.loads(Path(f"{stem}_desc-synthetic_pet.json").read_text())
    assert set(mean["Covariates"]) == {"age", "sex", "diagnosis"}
    assert mean["CovariateSources"]["diagnosis"] == "bids:raw:participants.tsv"
    assert "conditioned on the T1w and age" in mean["Description"] and "diagnosis" in mean["Description"]
    swept = json.loads(Path(f"{stem}_desc-diagnosisAD_pet.json").read_text())
    assert swept["Covariates"]["diagnosis"] == "AD" and swept["SweptCovariate"] == "diagnosis"
    moved = json.loads(Path(f"{stem}_desc-measuredAge80_pet.json").read_text())
    assert moved["Counterfactual"] is True and moved["Covariates"]["age"] == 80.0
    assert moved["Sources"][-1] == "bids:raw:sub-001/pet/sub-001_trc-FDG_pet.nii.gz" and "Samples" not in moved
    assert moved["Description"].startswith("COUNTERFACTUAL of the measured FDG-PET")
    # The model learnt AD 25 % lower: the sweep of one MRI, and the measured PET moved, show it.
    assert _brain_mean(Path(f"{stem}_desc-diagnosisAD_pet.nii.gz")) < 0.95 * _brain_mean(Path(f"{stem}_desc-diagnosisCN_pet.nii.gz"))
    assert (_brain_mean(Path(f"{stem}_desc-measuredDiagnosisAD_pet.nii.gz"))
            < 0.95 * _brain_mean(Path(f"{stem}_desc-measuredDiagnosisCN_pet.nii.gz")))  # fmt: skip
    table = (out / "sub-001" / "pet" / f"sub-001_trc-FDG_space-{MNI}_res-2_atlas-AAL2_desc-diagnosissweep_stats.tsv")
    rows = [line.split("\t") for line in table.read_text().splitlines()]
    assert rows[0] == ["diagnosis", "region", "mean_suvr"] and {r[0] for r in rows[1:]} == {"CN", "MCI", "AD"}
    assert json.loads(sidecar_path(table).read_text())["diagnosis"]["Levels"] == {"CN": "CN", "MCI": "MCI", "AD": "AD"}
    assert Path(str(table).replace("desc-diagnosissweep", "desc-measuredDiagnosissweep")).is_file()
    report = (out / "sub-001.html").read_text()
    for text in ("Registration check", "diagnosis sweep: regional mean SUVR", "diagnosis AD minus CN",
                 "measured PET moved: age 80 years minus 60 years", "sex", "(from bids:raw:participants.tsv)"):  # fmt: skip
        assert text in report, text


def test_imputation_only_when_asked_and_recorded(session_env: None, cohort: Path, work: Path, covariate_model: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    from dualglow_app.synthesize import resolve_covariates
    from dualglow_app.weights import open_model

    loaded = open_model(covariate_model)
    scan = next(s for s in _scans(cohort, loaded) if s.subject == "003")
    options = ParticipantOptions(cohort, tmp_path / "o", work_dir=work, covariates=["diagnosis=MCI"])
    values, sources = resolve_covariates(scan, loaded, options)
    assert (values["diagnosis"], sources["diagnosis"]) == ("MCI", "--covariate")
    assert values["age"] == SESSION_AGES[scan.session] and sources["age"].endswith("sub-003_sessions.tsv")
    options = ParticipantOptions(cohort, tmp_path / "o", work_dir=work, impute_covariates=True)
    values, sources = resolve_covariates(scan, loaded, options)
    assert (values["diagnosis"], sources["diagnosis"]) == ("CN", "imputed (most frequent training class)")


def _scans(cohort: Path, loaded: object) -> list[Scan]:
    from dualglow_app.bids import find_scans

    return find_scans(cohort, covariates=[s for n, s in loaded.covariates.items() if n != "age"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("args", "message"), [
    (["--sweep", "mmse=20:30:5"], "--sweep mmse=...: model tiny-cov is not conditioned on mmse (its covariates: age, "
                                  "sex, diagnosis)"),
    (["--sweep", "diagnosis=CN,XX"], "'XX' is not one of the categories the model was trained with (CN, MCI, AD)"),
    (["--covariate", "diagnosis=XX"], "--covariate diagnosis=XX: 'XX' is not one of the categories"),
    (["--covariate", "apoe4=1"], "--covariate apoe4=1: model tiny-cov is not conditioned on apoe4"),
    (["--sweep", "age=90:50:10"], "use START <= STOP"),
    (["--counterfactual-pet"], "--counterfactual-pet moves a measured PET to each sweep value: pass --sweep"),
    (["--sweep", "age=60", "--age-sweep", "70"], "age swept twice"),
])  # fmt: skip
def test_bad_covariate_options_exit_2_with_one_line(session_env: None, cohort: Path, work: Path, covariate_model: Path,
                                                    tmp_path: Path, args: list[str], message: str) -> None:  # fmt: skip
    result = invoke(cohort, tmp_path / "out", "participant", "--weights", covariate_model, "-w", work,
                    "--skip-bids-validation", *args)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output


def _one_subject_dataset(cohort: Path, root: Path, participants: str) -> Path:
    (root / "sub-001" / "anat").mkdir(parents=True)
    shutil.copyfile(cohort / "sub-001" / "anat" / "sub-001_T1w.nii.gz", root / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    shutil.copyfile(cohort / "dataset_description.json", root / "dataset_description.json")
    (root / "participants.tsv").write_text(participants)
    return root


def test_a_dataset_without_the_model_s_covariate_is_refused_before_any_scan(
    session_env: None, cohort: Path, work: Path, covariate_model: Path, tmp_path: Path
) -> None:
    bids = _one_subject_dataset(cohort, tmp_path / "bids", "participant_id\tage\tsex\nsub-001\t70\tM\n")
    result = invoke(bids, tmp_path / "out", "participant", "--weights", covariate_model, "-w", work, "--skip-bids-validation")
    assert result.exit_code == 2, result.output
    assert ("model tiny-cov is conditioned on diagnosis, but " in result.output
            and "no column 'diagnosis' in participants.tsv or any sub-*_sessions.tsv; add the column to participants.tsv "
                "(one of CN, MCI, AD), pass --covariate diagnosis=VALUE, or --impute-covariates." in result.output)  # fmt: skip


def test_a_class_the_model_never_saw_fails_that_scan(session_env: None, cohort: Path, work: Path, covariate_model: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
    bids = _one_subject_dataset(cohort, tmp_path / "bids", "participant_id\tage\tsex\tdiagnosis\nsub-001\t70\tM\tSMC\n")
    result = invoke(bids, tmp_path / "out", "participant", "--weights", covariate_model, "-w", work, "--skip-bids-validation")
    assert result.exit_code == 1, result.output
    assert ("FAILED sub-001: " in result.output and "participants.tsv, row sub-001, column diagnosis: 'SMC' is not one of "
            "the categories the model was trained with (CN, MCI, AD); correct it, or write n/a" in result.output)  # fmt: skip


def test_a_model_that_reads_native_tissue_maps_gets_them_from_the_preprocessing(
        session_env: None, cohort: Path, work: Path, tmp_path: Path) -> None:  # fmt: skip
    """--anatomy-reading native at the participant level: each T1w's native tissue maps are read
    (and cached beside its transforms) and passed to the model, for the image, the sweep and
    the measured PET moved along it: the written PET is the one predict() makes from them."""
    from participant_data import make_covariate_model

    from dualglow_app.inference import predict
    from dualglow_app.preprocess import (
        grid_to_mni,
        image_on_grid,
        preprocess_pet,
        preprocess_t1w,
        tissue_maps_on_grid,
    )
    from dualglow_app.weights import open_model

    torch.set_num_threads(2)
    t1 = [preprocess_t1w(cohort / f"sub-00{i}" / "anat" / f"sub-00{i}_T1w.nii.gz", GRID, work, 2) for i in (1, 2)]
    pets = [np.asarray(preprocess_pet(cohort / f"sub-00{i}" / "pet" / f"sub-00{i}_trc-FDG_pet.nii.gz", t, work, 2)
                       .image.dataobj, np.float32) for i, t in zip((1, 2), t1, strict=True)]  # fmt: skip
    images = [np.asarray(t.image.dataobj, np.float32) for t in t1]
    maps = [tissue_maps_on_grid(t, 2) for t in t1]
    values = {"age": [65.0, 75.0, 70.0, 80.0], "sex": ["M", "F", "F", "M"], "diagnosis": ["CN", "AD", "MCI", "CN"]}
    weights = make_covariate_model(tmp_path / "tiny-native", GRID, images * 2, pets * 2, values, tissue_maps=maps * 2)
    out = tmp_path / "out"
    result = invoke(cohort, out, "participant", "--weights", weights, "-w", work, "--nprocs", "2",
                    "--participant-label", "001", "--skip-bids-validation", "--counterfactual-pet", "--sweep", "age=60:80:20")  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = open_model(weights, "cpu")
    assert loaded.model.reads_tissue_maps
    row = next(r for r in (cohort / "participants.tsv").read_text().splitlines()[1:] if r.startswith("sub-001\t"))
    columns = (cohort / "participants.tsv").read_text().splitlines()[0].split("\t")
    own = dict(zip(columns, row.split("\t"), strict=True))
    side = {name: spec.encode(float(own[name]) if name == "age" else own[name]) for name, spec in loaded.covariates.items()}
    mask = np.asarray(t1[0].brain_mask.dataobj)
    expected = predict(loaded.model, loaded.scaling, images[0], mask, side, tissue_maps=maps[0]).mean
    other = predict(loaded.model, loaded.scaling, images[0], mask, side, tissue_maps=maps[1]).mean
    assert np.abs(expected - other).max() > 0.01  # the maps matter to this model
    written = data_of(next(out.rglob("sub-001_*desc-synthetic_pet.nii.gz")))
    assert np.allclose(written, np.asarray(grid_to_mni(image_on_grid(expected, GRID), GRID, 2).dataobj), atol=1e-4)
    assert len(list(out.rglob("sub-001_*_pet.nii.gz"))) >= 5  # mean, two sweep images, two moved PETs


# --------------------------------------------------------------------------- units


def test_age_labels_are_bids_safe() -> None:
    assert age_label(60) == "age60" and age_label(72.5) == "age72p5"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 4, "temperature": 0.0}, "identical samples"),
        ({"temperature": -1.0}, "--temperature"),
        ({"output_spaces": ["fsaverage"]}, "--output-spaces fsaverage"),
        ({"age_sweep": [60, 500]}, "--age-sweep 500: 500 is outside 18-110 years"),
        ({"age": float("nan")}, "--age nan: nan is not a number of years"),
        ({"device": "tpu"}, "--device tpu"),
    ],
)
def test_options_refuse_impossible_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ParticipantUsageError, match=message):
        ParticipantOptions("bids", "out", **kwargs)  # type: ignore[arg-type]


def test_resolve_weights_looks_in_the_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"looked for .*mine\.safetensors.*DUALGLOW_MODELS_DIR"):
        resolve_weights("mine")
    (tmp_path / "mine.safetensors").write_bytes(b"")
    (tmp_path / "mine.json").write_text("{}")
    monkeypatch.setenv("DUALGLOW_MODELS_DIR", str(tmp_path))
    assert resolve_weights("mine") == tmp_path / "mine.safetensors"
    assert resolve_weights(tmp_path / "mine.json") == tmp_path / "mine.safetensors"


def test_bidsignore_keeps_other_tools_patterns(tmp_path: Path) -> None:
    (tmp_path / ".bidsignore").write_text("extra/\n")
    write_bidsignore(tmp_path, ["*.html", "extra/"])
    write_bidsignore(tmp_path, ["*.html"])
    assert (tmp_path / ".bidsignore").read_text() == "extra/\n*.html\n"


# --------------------------------------------------------------------------- pinned outputs


def test_participant_outputs_are_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The participant level with the shipped model on a fixed preprocessed T1w (its own mean
    training T1w; registration is replaced because ANTs is not run-to-run reproducible): every
    derivative, sidecar and table matches what it wrote when this model was shipped (images by
    their axis profiles; tests/data/participant_outputs_pinned.json; re-pinned with a new
    shipped model: tests/pinned.py)."""
    from types import SimpleNamespace

    from dualglow_app import __version__, preprocess
    from dualglow_app.weights import open_model

    shipped = open_model("dualglow-phantom-demo")
    t1w = shipped.model.mri_template[0, 0].numpy().astype(np.float32)

    def fixed_t1w(path: Path, grid: object, work_dir: object, nprocs: int = 2, options: object = None) -> object:
        affine = grid.affine  # type: ignore[attr-defined]
        mask = (t1w > 0.05).astype(np.uint8)
        return SimpleNamespace(image=nib.Nifti1Image(t1w, affine), brain_mask=nib.Nifti1Image(mask, affine),
                               intensity_range=(100.0, 1000.0), template_coverage=1.0, grid=grid)  # fmt: skip

    monkeypatch.setattr(preprocess, "preprocess_t1w", fixed_t1w)
    # A model that reads native tissue maps gets its own mean training maps (fixed, like the T1w).
    monkeypatch.setattr(preprocess, "tissue_maps_on_grid", lambda t1, nprocs=2, reading="native": mean_tissue_maps(shipped.model))
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "pin", "BIDSVersion": "1.10.0"}))
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t72\n")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    options = ParticipantOptions(bids, tmp_path / "out", work_dir=tmp_path / "work", samples=2, temperature=0.7,
                                 age_sweep=(60, 85), covariates=("diagnosis=CN",), skip_bids_validation=True,
                                 report=False, nprocs=1)  # fmt: skip
    assert run_participant(options).exit_code == 0
    got: dict[str, object] = {}
    for path in sorted((tmp_path / "out").rglob("*")):
        name = path.relative_to(tmp_path / "out").as_posix()
        if not path.is_file() or name.startswith("logs/"):
            continue
        if name.endswith(".nii.gz"):
            image = nib.load(path)
            data = np.asarray(image.dataobj, dtype=np.float64)
            got[name] = {"shape": list(data.shape), "affine": image.affine.tolist(),
                         "profiles": [data.sum(axis=tuple(a for a in range(3) if a != k)).tolist() for k in range(3)]}  # fmt: skip
        elif name.endswith(".json") and name != "dataset_description.json":
            got[name] = json.loads(path.read_text())
        elif name.endswith(".tsv"):
            got[name] = [line.split("\t") for line in path.read_text().splitlines()]
        else:
            got[name] = None
    # Floats to 1e-4 (relative) so another CPU's rounding passes, a changed output not.
    check_pinned(got, Path(__file__).parent / "data" / "participant_outputs_pinned.json", tol=1e-4,
                 numeric_strings=True, version=__version__)  # fmt: skip
