"""Covariates (dualglow_app.covariates): typing from participants.json, learning, the model
file round trip, the group level's errors and the data layer's encoding, sweeps and labels."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from synthetic_pairs import fake_preprocessing, paired_volumes

from dualglow_app.bids import BIDSInputError, CovariateError, find_scans
from dualglow_app.covariates import (
    AGE_SPEC,
    CovariateSpec,
    Sweep,
    dataset_mismatch,
    declare_covariates,
    desc_label,
    learn_covariates,
    side_config,
)
from dualglow_app.dataset import DatasetError, DatasetSpec, prepare_dataset, side_information
from dualglow_app.grid import preset

DIAGNOSIS = CovariateSpec("diagnosis", "categorical", levels=("CN", "MCI", "AD"))


def _with_columns(root: Path, rows: dict[str, dict[str, str]], described: dict[str, dict] | None = None) -> Path:
    """Rewrite participants.tsv with extra columns (by subject label), and participants.json."""
    lines = (root / "participants.tsv").read_text().splitlines()
    extra = sorted({c for row in rows.values() for c in row})
    out = ["\t".join([lines[0], *extra])]
    for line in lines[1:]:
        label = line.split("\t")[0].removeprefix("sub-")
        out.append("\t".join([line, *[rows.get(label, {}).get(c, "n/a") for c in extra]]))
    (root / "participants.tsv").write_text("\n".join(out) + "\n")
    if described is not None:
        (root / "participants.json").write_text(json.dumps(described))
    return root


# --------------------------------------------------------------------------- typing


def test_kinds_come_from_participants_json_then_from_the_values(tiny_bids: Callable[..., Path]) -> None:
    bids = _with_columns(tiny_bids(subjects=["01", "02", "03"]),
                         {"01": {"mmse": "29", "apoe4": "0", "site": "B"}, "02": {"mmse": "24", "apoe4": "1", "site": "A"}},
                         {"diagnosis": {"Levels": {"CN": "normal", "MCI": "mci", "AD": "ad"}},
                          "apoe4": {"Levels": {"0": "none", "1": "one", "2": "two"}}})  # fmt: skip
    specs = declare_covariates(bids, ["age", "sex", "diagnosis", "mmse", "apoe4", "site"])
    kinds = {name: (spec.kind, spec.levels) for name, spec in specs.items()}
    assert kinds["diagnosis"] == ("categorical", ("CN", "MCI", "AD"))  # declared order kept
    assert kinds["apoe4"] == ("categorical", ("0", "1", "2"))  # Levels win over numeric values
    assert kinds["mmse"] == ("continuous", ())  # numbers, no declaration
    assert kinds["site"] == ("categorical", ("A", "B"))  # inferred, sorted
    assert kinds["sex"] == ("categorical", ("F",)) and specs["age"].units == "year"


def test_a_missing_column_is_one_line_naming_the_file_and_the_columns(tiny_bids: Callable[..., Path]) -> None:
    bids = tiny_bids()
    with pytest.raises(BIDSInputError, match=r"participants.tsv: no column 'apoe4' .* the columns are age, sex, "
                                             r"diagnosis: add apoe4 there, or drop it from --side-info") as err:
        declare_covariates(bids, ["apoe4"])
    assert "\n" not in str(err.value)


def test_cells_are_checked_against_the_declared_levels_and_sessions_win(tiny_bids: Callable[..., Path]) -> None:
    bids = tiny_bids(subjects=["01", "02"], sessions=["a", "b"])
    _with_columns(bids, {"01": {"mmse": "28"}, "02": {"mmse": "27"}})
    (bids / "participants.json").write_text(json.dumps({"diagnosis": {"Levels": {"CN": "", "AD": ""}}}))
    (bids / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tmmse\tdiagnosis\nses-a\t26\tn/a\nses-b\tn/a\tXX\n")
    specs = declare_covariates(bids, ["mmse", "diagnosis"])
    scans = {s.prefix: s for s in find_scans(bids, covariates=list(specs.values()))}
    assert scans["sub-01_ses-a"].covariates == {"mmse": 26.0, "diagnosis": "CN"}  # the session's own value wins
    assert scans["sub-01_ses-a"].covariate_sources["mmse"].endswith("sub-01_sessions.tsv")
    assert scans["sub-01_ses-b"].covariates == {"mmse": 28.0}  # n/a there: participants.tsv
    problem = scans["sub-01_ses-b"].covariate_problems["diagnosis"]
    assert "sub-01_sessions.tsv, row ses-b, column diagnosis: 'XX' is not one of its declared levels (CN, AD)" in problem


def test_a_parse_error_names_file_row_column_and_fix() -> None:
    mmse = CovariateSpec("mmse", "continuous", units="score")
    with pytest.raises(CovariateError, match=r"^p.tsv, row sub-01, column mmse: 'high' is not a number of score; "
                                             r"correct it, or write n/a if it is unknown.$"):
        mmse.parse("high", "p.tsv", "sub-01")
    assert mmse.parse("n/a", "p.tsv", "sub-01") is None
    with pytest.raises(CovariateError, match="is outside 18-110 years"):
        AGE_SPEC.parse("300", "p.tsv", "sub-01")


# --------------------------------------------------------------------------- learning


def test_learning_centres_continuous_and_keeps_the_classes_seen_in_declared_order() -> None:
    learnt = learn_covariates({"age": [60.0, 70.0, 80.0, None], "diagnosis": ["AD", "CN", "AD", None]},
                              {"age": AGE_SPEC, "diagnosis": DIAGNOSIS})  # fmt: skip
    age, diagnosis = learnt["age"], learnt["diagnosis"]
    assert (age.centre, age.scale, age.low, age.high, age.n) == (70.0, 8.165, 60.0, 80.0, 3)
    assert diagnosis.levels == ("CN", "AD") and diagnosis.counts == {"CN": 1, "AD": 2}  # MCI never seen: not a class
    assert diagnosis.typical == "AD" and age.typical == 70.0
    assert side_config(["age", "diagnosis"], learnt) == {"continuous": {"age": (70.0, 8.165)}, "categorical": {"diagnosis": 2}}
    assert side_config(["age"], None) == {"continuous": {"age": (70.0, 10.0)}, "categorical": {}}  # dualglow 0.1's
    with pytest.raises(ValueError, match="every training scan has diagnosis = CN; a covariate must vary"):
        learn_covariates({"diagnosis": ["CN", "CN"]}, {"diagnosis": DIAGNOSIS})
    with pytest.raises(ValueError, match="every training scan has age = 70"):
        learn_covariates({"age": [70.0, 70.0]}, {"age": AGE_SPEC})


def test_a_learnt_spec_round_trips_and_refuses_classes_it_never_saw() -> None:
    learnt = learn_covariates({"diagnosis": ["CN", "AD", "AD"]}, {"diagnosis": DIAGNOSIS})["diagnosis"]
    again = CovariateSpec.from_dict(json.loads(json.dumps(learnt.to_dict())))
    assert again == learnt and again.counts == learnt.counts
    assert again.encode("AD") == 1.0
    with pytest.raises(CovariateError, match="'MCI' is not one of the categories the model was trained with"):
        again.parse("MCI", "participants.tsv", "sub-09")


def test_data_layer_encodes_categories_as_learnt_class_indices() -> None:
    data = paired_volumes(4)
    data.covariates = {"diagnosis": ["AD", "CN", None, "CN"]}
    data.covariate_declarations = {"diagnosis": DIAGNOSIS}
    side = side_information(data, np.array([0, 1, 3]), ("age", "diagnosis"))
    assert side is not None and side["diagnosis"].tolist() == [1.0, 0.0, 0.0]  # CN = 0, AD = 1 (no MCI)
    assert side["age"].tolist() == pytest.approx(data.age[[0, 1, 3]].tolist())
    with pytest.raises(DatasetError, match="sub-02: no diagnosis"):
        side_information(data, np.array([2]), ("diagnosis",))
    fold = data.subset([0, 1])
    assert fold.covariates == {"diagnosis": ["AD", "CN"]} and fold.covariate_specs(("diagnosis",))["diagnosis"].n == 2


def test_group_level_leaves_out_a_scan_without_a_value_and_stacks_the_rest(
    tiny_bids: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bids = _with_columns(tiny_bids(subjects=["01", "02", "03"], with_pet=["01", "02", "03"]),
                         {"01": {"group": "AD"}, "02": {"group": "CN"}, "03": {"group": "n/a"}},
                         {"group": {"Levels": {"CN": "", "AD": ""}}})  # fmt: skip
    fake_preprocessing(monkeypatch)
    data = prepare_dataset(DatasetSpec(bids, tmp_path / "work", grid=preset("tiny8mm"), side_info=("age", "group")))
    assert data.labels == ["sub-01", "sub-02"] and data.covariates["group"] == ["AD", "CN"]
    assert "sub-03: no group in participants.tsv or sessions.tsv; not used (--side-info group needs one)" in caplog.text
    assert data.covariate_specs(("age", "group"))["group"].levels == ("CN", "AD")


def test_mni_stack_declares_its_columns(tmp_path: Path) -> None:
    from dualglow_app.dataset import load_mni_stack
    from dualglow_app.phantom import make_mni_stack

    make_mni_stack(tmp_path / "stack", 3, seed=0, grid=preset("tiny8mm"), jobs=1)
    index = json.loads((tmp_path / "stack" / "index.json").read_text())
    assert "mmse" in index and index["columns"]["diagnosis"]["Levels"]
    data = load_mni_stack(tmp_path / "stack")
    assert data.covariate_declarations["mmse"].kind == "continuous"
    assert data.covariate_declarations["diagnosis"].levels == ("CN", "MCI", "AD")
    assert all(0 <= m <= 30 for m in data.covariates["mmse"])


# --------------------------------------------------------------------------- the participant level's checks


def test_dataset_mismatch_names_a_missing_column_and_a_kind_declared_otherwise(tiny_bids: Callable[..., Path]) -> None:
    bids = tiny_bids()
    (bids / "participants.json").write_text(json.dumps({"sex": {"Units": "kg"}}))
    problems = dataset_mismatch(bids, {"apoe4": DIAGNOSIS, "sex": CovariateSpec("sex", "categorical", levels=("F", "M")),
                                       "diagnosis": DIAGNOSIS})  # fmt: skip
    assert problems["apoe4"].startswith("no column 'apoe4'")
    assert "declares sex continuous" in problems["sex"] and "diagnosis" not in problems


def test_sweeps_parse_ranges_lists_and_all() -> None:
    assert Sweep.parse("age=50:100:10").resolve(AGE_SPEC) == [50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
    assert Sweep.parse("age=72.5,60").resolve(AGE_SPEC) == [60.0, 72.5]
    assert Sweep.parse("diagnosis=AD,CN").resolve(DIAGNOSIS) == ["AD", "CN"]
    assert Sweep.parse("diagnosis=all").resolve(DIAGNOSIS) == ["CN", "MCI", "AD"]
    for bad, message in (("age", "write NAME=VALUES"), ("age=90:50:10", "START <= STOP"), ("age=a:b:c", "must be numbers"),
                         ("participant_id=1", "identifies rows")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Sweep.parse(bad)
    with pytest.raises(ValueError, match="'XX' is not one of its declared levels"):
        Sweep.parse("diagnosis=CN,XX").resolve(DIAGNOSIS)
    with pytest.raises(ValueError, match="300 is outside 18-110 years"):
        Sweep.parse("age=60,300").resolve(AGE_SPEC)


def test_desc_labels_are_bids_safe() -> None:
    assert desc_label("age", 60.0) == "age60" and desc_label("age", 72.5) == "age72p5"
    assert desc_label("diagnosis", "AD", DIAGNOSIS) == "diagnosisAD"
    assert desc_label("apoe_e4", "e4/e4", CovariateSpec("apoe_e4", "categorical", levels=("e4/e4",))) == "apoee4e4e4"
    assert desc_label("mmse", -1.5) == "mmsem1p5"


# --------------------------------------------------------------------------- the model file


def test_group_level_stores_the_learnt_covariates_and_the_participant_level_reads_them(tmp_path: Path) -> None:
    from synthetic_pairs import tiny_options

    from dualglow_app import train as train_module
    from dualglow_app.weights import open_model, read_model_info

    data = paired_volumes(6)
    data.covariates = {"diagnosis": ["CN", "AD", "CN", "AD", "MCI", "CN"]}
    data.covariate_declarations = {"diagnosis": DIAGNOSIS}
    options = tiny_options(tmp_path / "out", tmp_path / "work", side_info=["age", "diagnosis"], epochs=1, report=True)
    result = train_module.train(options, data=data)
    info = read_model_info(result.model_path)
    stored = info["metadata"]["covariates"]
    assert stored["diagnosis"]["levels"] == ["CN", "MCI", "AD"] and stored["diagnosis"]["counts"]["CN"] == 3
    assert info["config"]["categorical"] == {"diagnosis": 3}
    assert [stored["age"]["centre"], stored["age"]["scale"]] == info["config"]["continuous"]["age"]
    loaded = open_model(result.model_path)
    assert loaded.covariates["diagnosis"].encode("AD") == 2.0 and loaded.covariates["diagnosis"].learnt
    assert "Covariates (side information" in (tmp_path / "out" / "group.html").read_text()


def test_a_model_file_whose_covariates_disagree_with_its_network_is_refused(tmp_path: Path) -> None:
    import torch

    from dualglow_app.model import DualGlow, DualGlowConfig
    from dualglow_app.weights import ModelFileError, ModelMetadata, check_covariates, save_model

    config = DualGlowConfig(ndim=3, levels=1, depth=1, hidden=4, relation_hidden=4, categorical={"diagnosis": 3})
    meta = ModelMetadata(grid=None, side_info=["diagnosis"],
                         covariates={"diagnosis": replace_levels(("CN", "AD")).to_dict()})  # fmt: skip
    with pytest.raises(ModelFileError, match="diagnosis: 2 levels stored, the network has 3 classes"):
        check_covariates(meta, config, "m.json")
    torch.manual_seed(0)
    path = save_model(DualGlow(config), tmp_path / "m", meta)
    assert path.is_file()


def replace_levels(levels: tuple[str, ...]) -> CovariateSpec:
    from dataclasses import replace

    return replace(DIAGNOSIS, levels=levels, learnt=True)


def test_an_old_model_file_reads_as_age_with_its_own_scaling(tmp_path: Path) -> None:
    import shutil

    from dualglow_app.weights import open_model, resolve_weights

    # The shipped model's files as dualglow <= 0.1 wrote them: no covariates in the metadata,
    # age scaled by the fixed (70, 10) of its config.
    shipped = resolve_weights("dualglow-phantom-demo")
    shutil.copyfile(shipped, tmp_path / shipped.name)
    info = json.loads(shipped.with_suffix(".json").read_text())
    info["metadata"].pop("covariates", None)
    info["config"]["continuous"] = {"age": [70.0, 10.0]}
    (tmp_path / shipped.with_suffix(".json").name).write_text(json.dumps(info))
    shipped = open_model(tmp_path / shipped.name)
    assert not shipped.metadata.covariates
    age = shipped.covariates["age"]
    assert (age.kind, age.centre, age.scale, age.units) == ("continuous", 70.0, 10.0, "year")
    assert age.encode(72.0) == 72.0 and age.low is None  # no training range: no extrapolation warnings
