"""``tmd study``: a declared table of training runs, each trained once, scored alike, and reported with intervals.

A study file (``src/tmd/configs/study_*.yaml``) declares named runs: a method (any registered one, or
``teacher``), config overrides on the study's ``base`` run config, the training seeds, the (M, N) samplers
to score and, for a stage-2 run, the ``parent`` whose exported weights become its ``method.init_from``.
Each (run, training seed) is keyed by a hash of everything that decides its record: the resolved config
(paths and display settings left out), its parent's key, the evaluation spec, the world assets' bytes and
the study's ``version``. Equal keys are one run, so stage-2 runs whose stage-1 configs are identical share it.

A run is finished when ``<records>/<key>.json`` exists (committed: config, scores per evaluation noise
seed, the training curve, wall time, machine, git commit); weights stay in ``<work>/<key>/``. So a stopped
study resumes, a finished run is never retrained, and a study that still has to train a stage-2 run on a
machine without its stage-1 weights retrains that stage 1 for its weights (keeping its record). A run in
flight checkpoints every ``checkpoint_every`` iterations into ``<work>/<key>/checkpoints`` and continues
from its last checkpoint the next time the study starts, to the same weights and record as an
uninterrupted run (the trainer resumes bit-exactly): a killed study loses at most ``checkpoint_every``
iterations of each run in flight. Checkpoints live in the work folder, never in the records: on another
machine an unfinished run starts again from scratch. ``--jobs J`` trains J runs at a
time, each in its own process with ``--threads`` torch threads; ``--jobs 1`` trains in this process.
"""
