from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dualglow_app.bids import (
    AGE,
    BIDSInputError,
    CovariateError,
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


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ("seventy", "'seventy' is not a number of years"),
        ("abc", "'abc' is not a number of years"),
        ("nan", "nan is not a number of years"),
        ("inf", "inf is not a number of years"),
        ("-5", "-5 is outside 18-110 years"),
        ("0", "0 is outside 18-110 years"),
        ("300", "300 is outside 18-110 years"),
    ],
)
def test_an_unusable_age_is_that_scans_problem_naming_file_and_row(
    tiny_bids: Callable[..., Path], cell: str, problem: str
) -> None:
    """Every unusable age is handled alike: no value, the reason on the scan (file, row,
    column, fix), and the other subjects untouched. NaN never becomes an age."""
    root = tiny_bids(subjects=("01", "02"))
    (root / "participants.tsv").write_text(f"participant_id\tage\nsub-01\t{cell}\nsub-02\t64\n")
    bad, good = find_scans(root)
    assert bad.age is None and bad.age_source is None
    assert bad.covariate_problems["age"] == (
        f"{root}/participants.tsv, row sub-01, column age: {problem}; correct it, or write n/a if it is unknown."
    )
    assert (good.age, good.covariate_problems) == (64.0, {})


def test_n_a_and_empty_ages_are_unknown_not_problems(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01", "02"))
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\tn/a\nsub-02\t\n")
    assert [(s.age, s.covariate_problems) for s in find_scans(root)] == [(None, {}), (None, {})]


def test_a_bad_session_age_is_not_papered_over_by_participants_tsv(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01",), sessions=("1", "2"), ages={"01": 70.0})
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t7O\nses-2\t71\n")
    first, second = find_scans(root)
    assert first.age is None and "sub-01_sessions.tsv, row ses-1, column age: '7O'" in first.covariate_problems["age"]
    assert (second.age, second.covariate_problems) == (71.0, {})


def test_a_broken_sessions_tsv_is_that_subjects_problem(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01", "02"), sessions=("1",))
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session\tage\nses-1\t70\n")
    first, second = find_scans(root)
    assert first.age is None and "sub-01_sessions.tsv: no session_id column" in first.covariate_problems["age"]
    assert (second.age, second.covariate_problems) == (65.0, {})
    assert len({first, second}) == 2, "scans stay hashable"


def test_covariate_parse_and_range() -> None:
    assert AGE.parse(" 71.5 ", Path("p.tsv"), "sub-01") == 71.5 and AGE.parse("n/a", Path("p.tsv"), "sub-01") is None
    with pytest.raises(CovariateError, match=r"^p.tsv, row sub-01, column age: 111 is outside 18-110 years"):
        AGE.parse("111", Path("p.tsv"), "sub-01")
    assert AGE.range_problem(18.0) is None and AGE.range_problem(float("nan")) == "nan is not a number of years"


def test_unknown_label_lists_the_subjects_the_dataset_has(tiny_bids: Callable[..., Path], tmp_path: Path) -> None:
    """Only the subjects asked for are indexed; the error still lists the dataset's subjects."""
    root = tiny_bids(subjects=("01", "02"))
    with pytest.raises(BIDSInputError, match=r"no participant\(s\) sub-99; the dataset has: sub-01, sub-02\.$"):
        find_scans(root, participant_labels=["01", "99"], work_dir=tmp_path / "work")


def test_participants_tsv_without_an_id_column_is_one_line(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01",))
    (root / "participants.tsv").write_text("subject\tage\nsub-01\t70\n")
    with pytest.raises(BIDSInputError, match=r"participants.tsv: no participant_id column"):
        find_scans(root)


def test_a_killed_indexing_leaves_no_index_that_is_reused(tiny_bids: Callable[..., Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The pybids index is written whole: interrupted while saving, nothing is left in place
    and the next run indexes again (a partial index would silently miss subjects)."""
    from bids import BIDSLayout

    root = tiny_bids(subjects=("01", "02"))
    work = tmp_path / "work"

    def interrupted_save(self: object, path: object, replace_connection: bool = True) -> None:
        Path(str(path), "layout_index.sqlite").write_bytes(b"half an index")
        raise KeyboardInterrupt

    real_save = BIDSLayout.save
    monkeypatch.setattr(BIDSLayout, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        find_scans(root, work_dir=work)
    assert not list((work / "pybids").glob("*/layout_index.sqlite"))
    assert [p.name for p in (work / "pybids").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(BIDSLayout, "save", real_save)
    assert [s.subject for s in find_scans(root, work_dir=work)] == ["01", "02"]
    assert [s.subject for s in find_scans(root, work_dir=work)] == ["01", "02"]  # from the stored index
    assert len(list((work / "pybids").glob("*/layout_index.sqlite"))) == 1


def test_derivative_names_follow_the_spec(tmp_path: Path) -> None:
    scan = Scan(subject="01", session="2", t1w=tmp_path / "t1.nii.gz")
    path = derivative_path(tmp_path, scan, desc="synthetic", res="2")
    assert path == tmp_path / "sub-01/ses-2/pet/sub-01_ses-2_trc-FDG_space-MNI152NLin2009cAsym_res-2_desc-synthetic_pet.nii.gz"
    assert strip_prefix("sub-01", "sub") == "01" and strip_prefix("01", "sub") == "01"


def test_bids_uri(tiny_bids: Callable[..., Path]) -> None:
    root = tiny_bids(subjects=("01",))
    uri = bids_uri(root, root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert uri == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
