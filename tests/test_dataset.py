"""The paired data layer (dualglow_app.dataset): finding, stacking, caching, splitting, batching."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_pairs import fake_preprocessing, paired_volumes

from dualglow_app.data import IntensityScaling
from dualglow_app.dataset import (
    DatasetError,
    DatasetSpec,
    mean_images,
    model_batch,
    model_batches,
    prepare_dataset,
    split_subjects,
)
from dualglow_app.grid import preset


def test_prepare_dataset_skips_a_failing_subject_and_caches(
    tiny_bids: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bids = tiny_bids(subjects=["01", "02", "03", "04"], with_pet=["01", "02", "03"])
    calls = fake_preprocessing(monkeypatch, fail={"02"})
    spec = DatasetSpec(bids, tmp_path / "work", grid=preset("tiny8mm"))
    data = prepare_dataset(spec)
    assert data.labels == ["sub-01", "sub-03"] and list(data.skipped) == ["sub-02"]
    assert data.mri.shape == (2, 20, 24, 20) and isinstance(data.mri, np.memmap)
    assert data.age.tolist() == [60.0, 70.0]
    again = prepare_dataset(spec)
    assert calls["t1w"] == 3 and again.labels == data.labels
    assert np.array_equal(again.pet, data.pet)


def test_fewer_than_two_pairs_is_an_error_naming_them(
    tiny_bids: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bids = tiny_bids(subjects=["01", "02", "03"], with_pet=["01"])
    spec = DatasetSpec(bids, tmp_path / "work", grid=preset("tiny8mm"))
    with pytest.raises(DatasetError, match=r"1 usable .*\(sub-01\); training needs at least 2"):
        prepare_dataset(spec)
    bids2 = tiny_bids(subjects=["01", "02"], with_pet=["01", "02"])
    fake_preprocessing(monkeypatch, fail={"02"})
    with pytest.raises(DatasetError, match=r"\(sub-01\).*Skipped: sub-02: .*all zeros"):
        prepare_dataset(DatasetSpec(bids2, tmp_path / "w2", grid=preset("tiny8mm")))


def test_spec_takes_any_column_but_refuses_names_that_are_no_covariate(tmp_path: Path) -> None:
    assert DatasetSpec(tmp_path, tmp_path / "work", side_info=("sex", "mmse")).side_info == ("sex", "mmse")
    with pytest.raises(ValueError, match="participant_id identifies rows"):
        DatasetSpec(tmp_path, tmp_path / "work", side_info=("participant_id",))
    with pytest.raises(ValueError, match="not a column name"):
        DatasetSpec(tmp_path, tmp_path / "work", side_info=("two words",))


def test_batches_are_on_the_model_scale_with_ages() -> None:
    data = paired_volumes(5)
    batch = model_batch(data, np.array([3, 1]), IntensityScaling(), torch.device("cpu"), side_info=("age",))
    assert batch.mri.shape == (2, 1, 16, 16, 16) and batch.mri.max() <= 1.0
    assert torch.allclose(batch.pet[0, 0], torch.from_numpy(data.pet[1] / 3.0))  # rows are read in order
    assert batch.side is not None and batch.side["age"].tolist() == [float(data.age[1]), float(data.age[3])]
    ablated = model_batch(data, np.array([0]), IntensityScaling(), torch.device("cpu"), mri_input=False)
    assert ablated.side is None and float(ablated.mri.abs().sum()) == 0.0
    sizes = [len(b.mri) for b in model_batches(data, np.arange(5), IntensityScaling(), torch.device("cpu"), 2)]
    assert sizes == [2, 2, 1]


def test_mean_images_are_the_voxelwise_means() -> None:
    data = paired_volumes(4)
    mri, pet = mean_images(data, np.array([0, 2]), IntensityScaling())
    assert np.allclose(pet[0].numpy(), (data.pet[0] + data.pet[2]) / 2 / 3.0, atol=1e-6)
    assert np.allclose(mri[0].numpy(), (data.mri[0] + data.mri[2]) / 2, atol=1e-6)


def test_subset_keeps_rows_and_covariates() -> None:
    data = paired_volumes(4)
    part = data.subset([2, 0])
    assert part.labels == ["sub-02", "sub-00"] and part.age.tolist() == [data.age[2], data.age[0]]
    assert np.array_equal(part.mri[1], data.mri[0]) and part.diagnosis == [None, None]


def test_split_keeps_a_subjects_sessions_together() -> None:
    subjects = ["01", "01", "02", "03", "03", "04", "05"]
    train_rows, val_rows = split_subjects(subjects, 0.4, seed=3)
    assert sorted([*train_rows, *val_rows]) == list(range(len(subjects)))
    train_subjects = {subjects[i] for i in train_rows}
    val_subjects = {subjects[i] for i in val_rows}
    assert not train_subjects & val_subjects and len(val_subjects) == 2
    assert split_subjects(["a", "b"], 0.2, 0)[1].size == 1  # 2 subjects: 1 + 1
    assert split_subjects(["a", "b"], 0.0, 0)[1].size == 0


def test_native_tissue_maps_are_stacked_beside_an_existing_stack(
    tiny_bids: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DatasetSpec(tissue_maps="native") adds each stacked T1w's native tissue maps to the stack it
    finds (the pairs are not preprocessed again); they ride along in subsets and batches; another
    native reading is stacked beside them, in a file of its own."""
    from synthetic_pairs import tissue_maps_of

    bids = tiny_bids(subjects=["01", "02", "03"], with_pet=["01", "02", "03"])
    calls = fake_preprocessing(monkeypatch)
    spec = DatasetSpec(bids, tmp_path / "work", grid=preset("tiny8mm"))
    plain = prepare_dataset(spec)
    assert plain.tissue_maps is None and plain.row_tissue_maps(0) is None and calls["tissue_maps"] == 0
    with_maps = prepare_dataset(DatasetSpec(bids, tmp_path / "work", grid=preset("tiny8mm"), tissue_maps="native"))
    assert calls["tissue_maps"] == 3
    assert with_maps.tissue_maps is not None and with_maps.tissue_maps.shape == (3, 2, 20, 24, 20)
    assert np.array_equal(with_maps.mri, plain.mri)  # the same stack, not preprocessed again
    maps = with_maps.row_tissue_maps(2)
    assert maps is not None and maps.any()
    # The fake preprocessing draws a new T1w at every call: each row's maps are their own.
    assert not np.array_equal(maps, tissue_maps_of(np.asarray(with_maps.mri[2]), np.asarray(with_maps.mask[2])))
    again = prepare_dataset(DatasetSpec(bids, tmp_path / "work", grid=preset("tiny8mm"), tissue_maps="native"))
    assert calls["tissue_maps"] == 3 and again.tissue_maps is not None
    assert np.array_equal(again.tissue_maps, with_maps.tissue_maps)
    subset = with_maps.subset([2, 0])
    assert subset.tissue_maps is not None and np.array_equal(subset.tissue_maps[0], with_maps.tissue_maps[2])
    batch = model_batch(with_maps, np.array([1, 0]), IntensityScaling(), torch.device("cpu"))
    assert batch.tissue_maps is not None and batch.tissue_maps.shape == (2, 2, 20, 24, 20)
    fractions = prepare_dataset(DatasetSpec(bids, tmp_path / "work", grid=preset("tiny8mm"), tissue_maps="native-fractions"))
    assert calls["tissue_maps native-fractions"] == 3 and calls["tissue_maps native"] == 3
    assert fractions.tissue_maps is not None and not np.array_equal(fractions.tissue_maps, with_maps.tissue_maps)
    stacks = {p.parent for p in (tmp_path / "work" / "train-data").glob("*/index.json")}
    assert len(stacks) == 1 and {p.name for p in stacks.pop().glob("tissue_maps*.npy")} == {
        "tissue_maps.npy", "tissue_maps_native-fractions.npy"}
    with pytest.raises(ValueError, match="a native reading"):
        DatasetSpec(bids, tmp_path / "work", tissue_maps="posterior")
    assert torch.equal(batch.tissue_maps[1], torch.from_numpy(np.array(with_maps.tissue_maps[1])))
    assert model_batch(plain, np.array([0]), IntensityScaling(), torch.device("cpu")).tissue_maps is None
