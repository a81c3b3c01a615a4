"""The names of what a sweep directory holds, shared by the trials that write it and the commands that read it."""

TUNE_DIR = "tune"  # Ray Tune's experiment state, under the sweep dir
JOB_FILE = "job.yaml"  # the resolved spec, under the sweep dir
CHECKPOINT_KEY = "checkpoint_path"  # added to each report by Ray Train's TuneReportCallback
# In each report: how many the trial has made, its earlier runs included (Tune's training_iteration starts again
# when a resumed sweep restarts a trial), so ASHA's rungs count a restarted trial's reports where they left off.
REPORTS_KEY = "reports"
ADAPTER_DIR = "adapter"  # in a trial's checkpoint: the adapter with its selection (sdt.save)
TRAINER_STATE = "trainer_state.json"  # in a trial's checkpoint: its data position and the report made with it
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names a trial's checkpoints checkpoint_<time> in its directory
TRIAL_PREFIX = "trial-"  # <sweep dir>/trial-<trial id>: Ray Train's storage of one trial
COST_FILE = "cost.json"  # in a trial's directory: where its wall time went (written by the sweep driver)
DRIVER_RUNS_FILE = "driver-runs.json"  # under the sweep dir: each run of the sweep driver, its start, end, capacity
DIVERGED_FILE = "diverged.json"  # in a trial's directory: why its training loss stopped being finite
EXPORT_DIR = "export"  # under the sweep dir, unless export.dir says elsewhere
MERGED_DIR = "merged"  # in an export: the adapter merged into its base, a plain transformers model
TRIAL_FILE = "trial.json"  # in an export: the trial it came from; written last, so an export without it is unwritten
CARD_FILE = "README.md"  # in an export: the model card
