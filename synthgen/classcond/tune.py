"""Stages 2 and 4: tune generation for CAS with Optuna (TPE sampler, Hyperband pruner).

Stage 2 (``stage="encoder"``) searches inference steps, guidance and the stage-1 encoder epoch;
stage 4 (``stage="unet"``) searches steps up to stage 2's best, guidance up to twice its best, and
the stage-3 UNet epoch (with stage 2's encoder epoch). Each trial generates ``tuning.images``
label-balanced images with the same seeds, trains the CAS classifier of ``tuning.protocol`` on them
and reports its validation accuracy to the trial after every epoch, so Hyperband prunes; the
objective is the best validation accuracy on the protocol's real held-out TRAINING images (the
classifier never fits on them). The real test split is never loaded here.

Lomurno et al.'s published tuning (``hyp_opt.py``) scored each trial on the test split and reported
no intermediate value, so its Hyperband pruner could prune nothing; both are fixed here. The study
lives in ``run_dir/tune-encoder/`` (``tune-unet/``), see :mod:`synthgen.classcond.study` for its
storage and crash recovery. The first trial runs the paper's defaults (see ``TuningConfig.defaults``).
When the study has its trials, ``best.json`` holds the tuned settings and the report (optimisation
history and parameter importances, PNG and JSON) is written beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from synthgen.classcond.checkpoints import epoch_dir, list_epochs, read_state
from synthgen.classcond.runfolder import RunFolder
from synthgen.classcond.study import INTERRUPTED_ATTR, WORKER_ATTR, StudyFolder, Worker, finished_trials, worker_alive
from synthgen.errors import SynthgenError

__all__ = ["STAGES", "SearchSpace", "TuneResult", "tune_stage", "read_best", "study_dir", "BEST_FILE"]

STAGES = ("encoder", "unet")
BEST_FILE = "best.json"
_STUDY_DIR = {"encoder": "tune-encoder", "unet": "tune-unet"}


def study_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / _STUDY_DIR[stage]


def read_best(run_dir: str | os.PathLike, stage: str) -> dict:
    """The tuned settings of a finished study (``best.json``); SynthgenError when it has not finished."""
    path = study_dir(run_dir, stage) / BEST_FILE
    if not path.is_file():
        number = 2 if stage == "encoder" else 4
        raise SynthgenError(f"stage {number} (tune {stage}) has no result in {run_dir}: no {path.name} (the study has not "
                            "finished its trials, or every trial was pruned); tune it (more trials) first")
    return json.loads(path.read_text())


@dataclass
class SearchSpace:
    """What a stage tunes: steps, guidance and a checkpoint epoch, each a closed range."""

    epoch_param: str  # "encoder_epoch" or "unet_epoch"
    steps: tuple[int, int]
    guidance: tuple[float, float]
    epochs: tuple[int, int]
    defaults: dict[str, Any]

    def suggest(self, trial) -> dict[str, Any]:
        return {
            "steps": trial.suggest_int("steps", *self.steps),
            "guidance": trial.suggest_float("guidance", *self.guidance),
            self.epoch_param: trial.suggest_int(self.epoch_param, *self.epochs),
        }

    def describe(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "guidance": list(self.guidance), self.epoch_param: list(self.epochs),
                "defaults": self.defaults}


@dataclass
class TuneResult:
    stage: str
    folder: Path
    best: dict
    finished: int
    pruned: int
    failed: int
    retried: list[int] = field(default_factory=list)  # trials of dead processes re-enqueued by this call
    ran: int = 0  # trials this call ran
    target: int = 0  # finished trials the study is run to

    @property
    def no_best_reason(self) -> str:
        """Why ``best`` is empty (a study with trials still running elsewhere, or pruned throughout)."""
        return ("every finished trial was pruned; run more (--trials)" if self.finished >= self.target
                else "other processes are running the rest")


def _complete_stage_epochs(stage_dir: Path, wanted: int, what: str, command: str) -> int:
    have = list_epochs(stage_dir)
    if not have:
        raise SynthgenError(f"no {what} checkpoints in {stage_dir}; run `synthgen classcond {command}` first")
    if have[-1] < wanted:
        raise SynthgenError(f"{what} training finished {have[-1]} of {wanted} epochs in {stage_dir}; "
                            f"run `synthgen classcond {command}` to finish it first")
    return have[-1]


def search_space(run_dir: Path, recipe, stage: str) -> tuple[SearchSpace, Optional[int]]:
    """(the stage's search space, the fixed encoder epoch of stage 4)."""
    from synthgen.classcond.finetune import UNET_STAGE
    from synthgen.classcond.train_encoder import ENCODER_STAGE

    t = recipe.tuning
    if stage == "encoder":
        last = _complete_stage_epochs(run_dir / ENCODER_STAGE, recipe.encoder.epochs, "encoder", "train")
        steps, guidance = t.defaults
        return SearchSpace("encoder_epoch", tuple(t.steps), tuple(t.guidance), (1, last),
                           {"steps": int(steps), "guidance": float(guidance), "encoder_epoch": last}), None
    best = read_best(run_dir, "encoder")["params"]
    last = _complete_stage_epochs(run_dir / UNET_STAGE, recipe.unet.epochs, "UNet", "finetune")
    trained_with = int(read_state(epoch_dir(run_dir / UNET_STAGE, last))["settings"]["encoder_epoch"])
    if trained_with != best["encoder_epoch"]:
        raise SynthgenError(f"the UNet in {run_dir / UNET_STAGE} was fine-tuned with encoder epoch {trained_with}, "
                            f"but stage 2's best is encoder epoch {best['encoder_epoch']}; fine-tune again in a new run folder")
    steps = (min(t.steps[0], best["steps"]), int(best["steps"]))
    guidance = (min(t.guidance[0], best["guidance"]), 2.0 * float(best["guidance"]))
    return SearchSpace("unet_epoch", steps, guidance, (1, last),
                       {"steps": int(best["steps"]), "guidance": float(best["guidance"]), "unet_epoch": last}), trained_with


def _real_description(real) -> dict:
    keys = ("id", "revision", "sha", "split", "fingerprint", "subset")
    return {
        "fit": {k: real.fit.source.get(k) for k in keys} | {"rows": len(real.fit)},
        "val": {k: real.val.source.get(k) for k in keys} | {"rows": len(real.val)},
    }


def tune_stage(
    run_dir: str | os.PathLike,
    recipe,
    stage: str,
    *,
    real=None,
    trials: Optional[int] = None,
    device: Optional[str] = None,
    on_trial: Optional[Callable[[dict], None]] = None,
    trial_callbacks: Optional[Callable[[Any], Sequence]] = None,
) -> TuneResult:
    """Run (or resume) the stage-2 (``encoder``) or stage-4 (``unet``) study of ``run_dir`` until it
    has ``trials`` finished trials (default: the recipe's ``encoder_trials`` / ``unet_trials``).

    ``real``: the real dataset (default: the recipe's ``dataset``), a source or a ``(train, test)``
    pair of ImageTensorDatasets; only its training split is read. ``on_trial(summary)`` is called
    after each trial; ``trial_callbacks(trial)`` gives extra epoch callbacks for a trial's classifier.
    Returns the best settings (also written to ``best.json``) and the trial counts.
    """
    import optuna

    from synthgen.classcond.generation import trial_generation
    from synthgen.train.cas import load_cas_protocol, load_real_splits
    from synthgen.train.runtime import Runtime

    if stage not in STAGES:
        raise SynthgenError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    t = recipe.tuning
    target = int(trials if trials is not None else (t.encoder_trials if stage == "encoder" else t.unet_trials))
    if target < 1:
        raise SynthgenError(f"trials must be at least 1, got {target}")
    run_dir = Path(run_dir)
    info = RunFolder(run_dir).read_info()
    space, fixed_encoder = search_space(run_dir, recipe, stage)

    protocol, protocol_info = load_cas_protocol(t.protocol, t.protocol_overrides)
    if protocol.validation != "real":
        raise SynthgenError(f"tuning validates on real held-out training images: protocol {protocol.name} has "
                            f"validation: {protocol.validation}; use a protocol with validation: real")
    d = recipe.dataset
    real_splits = load_real_splits(real if real is not None else d.source, protocol, revision=d.revision,
                                   train_split=d.split, with_test=False, seed=t.seed)
    if list(real_splits.class_names) != list(info["class_names"]):
        from synthgen.train.cas import match_labels

        match_labels(info["class_names"], real_splits.class_names)  # names must match (loosely)
    stored_size = real_splits.val.image_size[0]
    generator_cfg, output = trial_generation(recipe, info["resolution"], stored_size, device)
    pruner_spec = t.pruner
    max_resource = pruner_spec.max_resource or protocol.epochs
    identity = {
        "stage": stage,
        "run": {k: info.get(k) for k in ("base_model", "base_revision", "dataset", "class_names", "resolution")},
        "search": space.describe(),
        "encoder_epoch": fixed_encoder,
        "images": t.images,
        "seed": t.seed,
        "protocol": protocol.model_dump(mode="json"),
        "real": _real_description(real_splits),
        "generation": {"generator": {k: v for k, v in generator_cfg.pixel_settings().items()
                                     if k not in ("model", "steps", "guidance_scale")},
                       "output": output.pixel_settings()},
        "pruner": {**pruner_spec.model_dump(), "max_resource": max_resource},
        "storage": t.storage,
    }
    folder = StudyFolder(study_dir(run_dir, stage), t.storage)
    folder.check(identity)  # another recipe's study: refused before anything is touched
    from synthgen.classcond.report import check_importance_evaluator

    check_importance_evaluator(t.importance)

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are ours to report, as one line
    name = f"classcond-{stage}"
    sampler = optuna.samplers.TPESampler(seed=t.seed)
    pruner = optuna.pruners.HyperbandPruner(min_resource=pruner_spec.min_resource, max_resource=max_resource,
                                            reduction_factor=pruner_spec.reduction_factor,
                                            bootstrap_count=pruner_spec.bootstrap_count)
    result = TuneResult(stage, folder.root, {}, 0, 0, 0, target=target)
    single = t.storage == "sqlite"
    # SQLite: this process alone for the whole study; journal: alone only while creating it
    with folder.exclusive() if single else contextlib.nullcontext():
        with contextlib.nullcontext() if single else folder.exclusive():
            folder.claim(identity)
            storage = folder.storage()
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                        direction="maximize", load_if_exists=True)
            if not study.get_trials(deepcopy=False):
                study.enqueue_trial(space.defaults)  # the paper's defaults first
        worker = Worker(folder.root)
        try:
            pipeline = None
            runtime = None
            while True:
                result.retried += folder.recover(study, storage, worker, t.max_retries)
                done = len(finished_trials(study))
                if done >= target or (not single and done + _others_running(study, folder, worker) >= target):
                    break
                if pipeline is None:  # loaded only when a trial has to run
                    from synthgen.classcond.trials import TrialPipeline

                    pipeline = TrialPipeline(run_dir, generator_cfg, encoder_epoch=fixed_encoder,
                                             tune_unet=stage == "unet", revision=info["base_revision"])
                    runtime = Runtime.create(device, amp=protocol.amp, compile=protocol.compile)
                summary = _run_trial(study, worker, space, pipeline, generator_cfg, output, info["class_names"],
                                     real_splits.val, protocol, runtime, t, trial_callbacks)
                result.ran += 1
                if on_trial is not None:
                    on_trial({**summary, "finished": len(finished_trials(study)), "target": target})
        finally:
            worker.close()
    from optuna.trial import TrialState

    states = [tr.state for tr in study.get_trials(deepcopy=False)]
    result.finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    result.pruned = sum(s == TrialState.PRUNED for s in states)
    result.failed = sum(s == TrialState.FAIL for s in states)
    if result.finished >= target:
        result.best = _write_best(study, folder.root, stage, space, fixed_encoder, identity, protocol_info, target)
        from synthgen.classcond.report import write_study_report

        write_study_report(study, folder.root, t.importance)
    return result


def _others_running(study, folder: StudyFolder, me: Worker) -> int:
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return sum(1 for tr in running if tr.user_attrs.get(WORKER_ATTR) not in (None, me.id)
               and worker_alive(folder.root, tr.user_attrs[WORKER_ATTR]))


def _run_trial(study, worker: Worker, space: SearchSpace, pipeline, generator_cfg, output, class_names, real_val,
               protocol, runtime, t, trial_callbacks) -> dict:
    """Ask for a trial, generate its images, train and score the classifier, tell the result."""
    from optuna.trial import TrialState

    from synthgen.classcond.trials import generate_class_images, score_images

    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, worker.id)
    trial.set_user_attr(INTERRUPTED_ATTR, False)
    started = time.perf_counter()
    try:
        params = space.suggest(trial)
        pipeline.use(params[space.epoch_param])
        cfg = generator_cfg.model_copy(update={"steps": params["steps"], "guidance_scale": params["guidance"]})
        syn = generate_class_images(pipeline.loaded, cfg, output, class_names, t.images, t.seed)
        generation_s = time.perf_counter() - started
        extra = list(trial_callbacks(trial)) if trial_callbacks is not None else []
        score = score_images(syn, real_val, protocol, seed=t.seed, runtime=runtime, trial=trial, callbacks=extra)
        trial.set_user_attr("generation_s", round(generation_s, 3))
        trial.set_user_attr("train_s", round(score.train_s, 3))
        trial.set_user_attr("epochs_run", score.metrics.get("epochs_run"))
        trial.set_user_attr("best_epoch", score.metrics.get("best_epoch"))
        trial.set_user_attr("retried_images", syn.source.get("retries", 0))
        trial.set_user_attr("val_acc", [row.get("val_acc") for row in score.history])
    except KeyboardInterrupt:
        trial.set_user_attr(INTERRUPTED_ATTR, True)  # retried on the next start
        study.tell(trial, state=TrialState.FAIL)
        raise
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    if score.pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        state = "pruned"
    else:
        study.tell(trial, score.value)
        state = "complete"
    return {"number": trial.number, "params": params, "state": state, "value": score.value,
            "pruned_at": score.pruned_at, "epochs_run": score.metrics.get("epochs_run"),
            "generation_s": round(generation_s, 3), "train_s": round(score.train_s, 3),
            "seconds": round(time.perf_counter() - started, 3)}


def _write_best(study, root: Path, stage: str, space: SearchSpace, fixed_encoder, identity, protocol_info, target) -> dict:
    from optuna.trial import TrialState

    from synthgen.train.checkpoint import atomic_write_text

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:  # only with a bootstrap_count: Hyperband otherwise completes each bracket's first trial
        (root / BEST_FILE).unlink(missing_ok=True)
        return {}
    best = max(complete, key=lambda tr: (tr.value, -tr.number))
    params = dict(best.params)
    if fixed_encoder is not None:
        params["encoder_epoch"] = fixed_encoder
    out = {
        "stage": stage,
        "params": params,
        "value": best.value,
        "objective": "best validation accuracy on real held-out training images",
        "trial": best.number,
        "target_trials": target,
        "finished": len(finished_trials(study)),
        "search": space.describe(),
        "protocol": protocol_info,
    }
    atomic_write_text(root / BEST_FILE, json.dumps(out, indent=2, default=str) + "\n")
    return out
