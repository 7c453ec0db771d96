"""`python -m train.sweep ... --executor ray`: every run is one Ray Tune trial, on whichever node Ray places it.

A trial reserves {"cpu": C, "gpu": G} and runs the same `python -m train` subprocess as the local executor
(train/launch.py: fresh or resumed, output into the run's training_log.txt, C torch threads, the trial's GPUs as
CUDA_VISIBLE_DEVICES), and feeds `tune.report` with each val record of the run's metrics.jsonl as it appears.
So a run's folder holds the same files, and its metrics.jsonl the same records, whichever executor ran it. The
driver reports each trial's start and end to the sweep (a Tune callback); Tune's own bookkeeping goes to
save_root/exp_name/.ray_tune, out of the run folders. Ray is imported only here, and only when this executor runs.

On a cluster of several machines the run folders (save_root) must be on storage every node shares, and every
node needs this project at the same path with its environment (each trial imports `train` from there and starts
`python -m train` in the directory the sweep was started from).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from train.launch import ROOT, Child, Events, RunSpec, last_line, latest, stop, stop_on_signals
from train.report import records_of

TUNE_DIR = ".ray_tune"
REPORT_S = 0.5  # how often a trial looks for new val records (and for its end)


def trial(config: dict[str, Any], specs: list[RunSpec], threads: int, storage_options: list[Any]) -> None:
    """Tune's function trainable: one run, start to end. Raises the run's error line when it fails, so Tune marks
    the trial errored."""
    import ray
    from ray import tune

    spec = specs[config["run"]]
    node = ray.get_runtime_context().get_node_id()
    child = Child(spec, threads, ",".join(str(i) for i in ray.get_gpu_ids()), ray.get(storage_options[0]))
    reported, rc = 0, None
    try:
        while rc is None:
            rc = child.poll()
            val = [r for r in records_of(spec.folder) if r["split"] == "val"]
            for record in val[reported:]:
                tune.report({**record, "node": node})
            reported = len(val)
            if rc is None:
                time.sleep(REPORT_S)
    finally:
        if rc is None:  # Tune stops the trial: stop the run with it
            stop([child])
    if rc:
        raise RuntimeError(last_line(spec.folder) or f"python -m train exited with status {rc}")


def trial_error(trial: Any) -> str:
    """The last line of what the trial raised: the run's error line (see `trial`), or Ray's own error. Read from
    the trial's local copy: the one in storage_path is synced later."""
    from ray import cloudpickle

    error = None
    if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
        with open(trial.pickled_error_file, "rb") as f:
            error = cloudpickle.load(f)
    cause = getattr(error, "cause", error)  # a RayTaskError wraps the exception the trial raised
    lines = str(cause).strip().splitlines() if cause is not None else []
    return lines[-1] if lines else f"the Ray trial failed (see {trial.path})"


def run_ray(specs: list[RunSpec], events: Events, exp: str, storage_options: dict | None, address: str | None,
            gpus_per_run: int | None, cpus_per_run: int) -> None:
    """One Tune trial per spec, on the cluster at `address`; when None, on a new local Ray instance (never on a
    cluster that `ray start` left running here: that takes --address)."""
    import ray
    from ray import tune

    class Bookkeeping(tune.Callback):
        """In the driver: each trial's start, node and end go to the sweep, like the local executor's runs."""

        def __init__(self):
            self.started: dict[int, float] = {}  # spec index -> when its trial started

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            i = trial.config["run"]
            self.started[i] = time.time()
            events.started(i, latest(specs[i].folder))

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            events.placed(trial.config["run"], result["node"])

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            i = trial.config["run"]
            events.finished(i, True, time.time() - self.started.pop(i))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            i = trial.config["run"]
            events.finished(i, False, time.time() - self.started.pop(i), trial_error(trial))

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C stops the sweep at once, as with the local executor
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter, which verbose=0 silences: we print our own lines
    ray.init(address=address or "local", runtime_env={"env_vars": {"PYTHONPATH": ROOT}}, log_to_driver=False,
             include_dashboard=False, logging_level="ERROR")
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a failed trial is our FAILED line, not a traceback
    stop_on_signals()  # again: ray.init installed its own SIGTERM handler, which aborts the driver
    callback = Bookkeeping()
    try:
        gpus = gpus_per_run if gpus_per_run is not None else int(ray.cluster_resources().get("GPU", 0) > 0)
        # storage_options (credentials) by a reference in a list, which with_parameters leaves unresolved: Tune
        # pickles the trainable's parameters into its tuner.pkl
        trainable = tune.with_parameters(trial, specs=specs, threads=cpus_per_run,
                                         storage_options=[ray.put(storage_options)])
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_run, "gpu": gpus}),
            param_space={"run": tune.grid_search(list(range(len(specs))))},
            tune_config=tune.TuneConfig(
                trial_dirname_creator=lambda t: os.path.basename(specs[t.config["run"]].folder),
                reuse_actors=True),  # a new trial runs in the last one's worker: no worker start
            run_config=tune.RunConfig(name="sweep", storage_path=os.path.abspath(os.path.join(exp, TUNE_DIR)),
                                      verbose=0, callbacks=[callback], failure_config=tune.FailureConfig(0)),
        )
        tuner.fit()
    finally:
        for i, started in callback.started.items():  # interrupted: their workers go with the driver
            events.stopped(i, time.time() - started)
        ray.shutdown()
