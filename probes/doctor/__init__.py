"""`probes doctor`: the expert's debugging order for a probing pipeline, run as one command.

:func:`run_doctor` reads a store once into a frozen view (:mod:`probes.doctor.view`) and runs
eight steps in a fixed order, one module each; every step gives a verdict (``pass``, ``warn``,
``fail`` or ``skip``) with its evidence (numbers), a message and one line of advice:

1. :mod:`~probes.doctor.data_sanity` - class counts, speakers per class, failed items, clips of 0-2
   frames, duplicated audio;
2. :mod:`~probes.doctor.confounds` - duration alone, loudness alone, the speaker;
3. :mod:`~probes.doctor.fold_sanity` - what the speaker-grouped folds hold, and whether the group
   column is the speaker;
4. :mod:`~probes.doctor.alignment` - NaN/inf or constant features, labels shifted by one row;
5. :mod:`~probes.doctor.shuffle_control` - the label-shuffle control (selection-aware permutation
   test);
6. :mod:`~probes.doctor.padding` - padding stored as frames, a stale cache, and padded vs true-frame
   pooling (measured with ``padded=``, else simulated);
7. :mod:`~probes.doctor.layer_profile` - best layer, flatness, the baseline comparison;
8. :mod:`~probes.doctor.imbalance` - with and without balanced class weights.

The screen probe and the shuffles every step shares are in :mod:`probes.doctor.screen`; the report
files in :mod:`probes.doctor.report` and :mod:`probes.doctor.plot`.
"""
from probes.doctor.report import summary_table, write_report
from probes.doctor.result import FAIL, PASS, SKIP, STATUSES, STEPS, WARN, DoctorError, DoctorReport, Step
from probes.doctor.run import run_doctor
from probes.doctor.screen import lda_cv_predict, screen_features

__all__ = ["run_doctor", "DoctorReport", "Step", "write_report", "summary_table", "DoctorError",
           "PASS", "WARN", "FAIL", "SKIP", "STATUSES", "STEPS", "lda_cv_predict", "screen_features"]
