from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dualglow_app.bids import (
    BIDSInputError,
    Scan,
    bids_uri,
    derivative_path,
    find_scans,
    load_layout,
    strip_prefix,
)


def test_find_scans_pairs_t1w_pet_and_age(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01", "02"), with_pet=("01",), ages={"01": 71.5, "02": 64.0})
    scans = find_scans(root)
    assert [s.subject for s in scans] == ["01", "02"]
    assert scans[0].pet is not None and scans[0].pet.name == "sub-01_trc-FDG_pet.nii.gz"
    assert scans[1].pet is None
    assert scans[0].age == 71.5 and scans[0].age_source.endswith("participants.tsv")
    assert [s.subject for s in find_scans(root, require_pet=True)] == ["01"]


def test_session_age_wins_over_participants(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01",), sessions=("1", "2"), ages={"01": 70.0})
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t70.0\nses-2\tn/a\n")
    scans = find_scans(root)
    assert [(s.session, s.age) for s in scans] == [("1", 70.0), ("2", 70.0)]
    assert scans[0].age_source.endswith("sub-01_sessions.tsv")
    assert scans[1].age_source.endswith("participants.tsv")
    assert [s.session for s in find_scans(root, session_labels=["ses-2"])] == ["2"]


def test_participant_labels_filter_and_unknown_label(tiny_bids: Callable[..., Path], tmp_path: Path) -> None:
    root = tiny_bids(subjects=("01", "02", "03"))
    scans = find_scans(root, participant_labels=["sub-02"], work_dir=tmp_path / "work")
    assert [s.subject for s in scans] == ["02"]
    assert load_layout(root, ["02"]).get_subjects() == ["02"], "other subjects are not indexed"
    assert any((tmp_path / "work" / "pybids").iterdir()), "the index is cached in the work dir"
    with pytest.raises(BIDSInputError, match="sub-99"):
        find_scans(root, participant_labels=["99"])


def test_not_a_bids_dataset(tmp_path: Path) -> None:
    with pytest.raises(BIDSInputError, match="dataset_description.json"):
        find_scans(tmp_path)


def test_bad_age_names_the_file(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01",))
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\tseventy\n")
    with pytest.raises(BIDSInputError, match="participants.tsv"):
        find_scans(root)


def test_derivative_names_follow_the_spec(tmp_path: Path) -> None:
    scan = Scan(subject="01", session="2", t1w=tmp_path / "t1.nii.gz")
    path = derivative_path(tmp_path, scan, desc="synthetic", res="2")
    assert path == tmp_path / "sub-01/ses-2/pet/sub-01_ses-2_trc-FDG_space-MNI152NLin2009cAsym_res-2_desc-synthetic_pet.nii.gz"
    assert strip_prefix("sub-01", "sub") == "01" and strip_prefix("01", "sub") == "01"


def test_bids_uri(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01",))
    uri = bids_uri(root, root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert uri == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
