"""A tuning study on disk: its identity, its Optuna storage, and crash recovery.

::

    study.json        what the study tunes (stage, run, search space, images, protocol, generation ...)
    study.db          Optuna's RDB storage on SQLite (storage: sqlite -- one process at a time)
    study.journal     Optuna's JournalStorage on a JournalFileBackend (storage: journal -- several processes)
    .workers/ID.lock  one per live tuning process, locked (flock) for its lifetime
    .lock             held by the one process of a SQLite study (and while a journal study is created)

``study.json`` is written when the study is created and compared on every later call: a folder made
for another recipe (another search space, image count, protocol, run ...) is refused with one line
naming the first difference, before the storage is opened.

Crashes. Each trial records the worker that runs it. A process killed mid-trial (``kill -9``, a
lost node) leaves its trial RUNNING; the OS drops its worker lock at once. Every tuning process,
on start and before each trial, fails the RUNNING trials whose worker lock is free and re-enqueues
their parameters with Optuna's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` (the
retry is a WAITING trial with the same parameters, ``system_attrs["failed_trial"]`` naming the
original), up to ``max_retries`` times per trial. A trial stopped by Ctrl-C is FAIL with
``user_attrs["interrupted"]`` and is retried the same way. Finished trials (COMPLETE, PRUNED) are
kept. Optuna's own heartbeat does the same for RDB storages only and only after a grace period; the
lock tells at once, for both storages.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from synthgen.errors import SynthgenError

__all__ = ["StudyFolder", "Worker", "worker_alive", "WORKER_ATTR", "INTERRUPTED_ATTR", "finished_trials"]

STUDY_INFO = "study.json"
WORKER_ATTR = "worker"
INTERRUPTED_ATTR = "interrupted"
# A RUNNING trial without a worker (its process died between creating it and recording itself, a
# few milliseconds) is taken for dead after this long.
UNCLAIMED_GRACE_S = 600


def finished_trials(study) -> list:
    """The trials that count toward a study's target: COMPLETE and PRUNED."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _first_difference(have: Any, want: Any, prefix: str = "") -> Optional[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want)):
            found = _first_difference(have.get(key), want.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    if have != want:
        show = lambda v: (json.dumps(v) if not isinstance(v, str) else v)[:80]  # noqa: E731
        return f"{prefix.rstrip('.')}: {show(have)}, not {show(want)}"
    return None


class Worker:
    """This process, as the study sees it: an id and a lock file held until :meth:`close`."""

    def __init__(self, root: Path) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder = root / ".workers"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{self.id}.lock"
        self._handle = open(self.path, "a+")
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def close(self) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def worker_alive(root: Path, worker_id: str) -> bool:
    """Whether the process ``worker_id`` still holds its lock (a dead one's lock is freed by the OS)."""
    path = root / ".workers" / f"{worker_id}.lock"
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@dataclass
class StudyFolder:
    root: Path
    storage_kind: str = "sqlite"  # "sqlite" or "journal"

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def info_path(self) -> Path:
        return self.root / STUDY_INFO

    @property
    def storage_path(self) -> Path:
        return self.root / ("study.db" if self.storage_kind == "sqlite" else "study.journal")

    def read_identity(self) -> Optional[dict]:
        if not self.info_path.is_file():
            return None
        try:
            return json.loads(self.info_path.read_text())
        except ValueError:
            raise SynthgenError(f"{self.info_path} is not valid JSON; the study folder is damaged") from None

    def check(self, identity: dict) -> bool:
        """True when the folder holds this study; False when it holds none (and is empty);
        SynthgenError when it holds another one, or something else."""
        identity = json.loads(json.dumps(identity, default=str))
        have = self.read_identity()
        if have is None:
            if self.root.exists() and any(not p.name.startswith(".") for p in self.root.iterdir()):
                raise SynthgenError(f"{self.root} is not empty and holds no tuning study; use another folder")
            return False
        diff = _first_difference(have, identity)
        if diff:
            raise SynthgenError(f"{self.root} holds a study for another recipe ({diff}); use another folder")
        return True

    def claim(self, identity: dict) -> None:
        """Write the study's identity (atomically) unless the folder already holds it."""
        if self.check(identity):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.info_path.with_name(f".{STUDY_INFO}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(identity, indent=2, default=str) + "\n")
        os.replace(tmp, self.info_path)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held by a SQLite study's one process (a second one is refused), and around a journal
        study's creation (so that the paper's defaults are enqueued once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if self.storage_kind == "sqlite" else 0))
            except BlockingIOError:
                raise SynthgenError(
                    f"the study in {self.root} is being tuned by another process; a SQLite study takes one "
                    "process at a time (set tuning.storage: journal to tune with several)"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def storage(self):
        import optuna

        if self.storage_kind == "sqlite":
            return optuna.storages.RDBStorage(
                f"sqlite:///{self.storage_path.resolve()}", engine_kwargs={"connect_args": {"timeout": 60}}
            )
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(self.storage_path)))

    # ---------------------------------------------------------------------------------- recovery
    def recover(self, study, storage, me: Worker, max_retries: int) -> list[int]:
        """Fail the trials of dead workers (and Ctrl-C'd ones) and re-enqueue their parameters;
        returns the numbers of the trials retried."""
        from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        retried_already = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        now = datetime.datetime.now()
        orphans = []
        for t in trials:
            if t.state == TrialState.RUNNING:
                owner = t.user_attrs.get(WORKER_ATTR)
                if owner == me.id:
                    continue
                if owner is None:
                    young = t.datetime_start is not None and (now - t.datetime_start).total_seconds() < UNCLAIMED_GRACE_S
                    if self.storage_kind != "sqlite" and young:
                        continue  # another process may be recording itself on it right now
                elif worker_alive(self.root, owner):
                    continue
                try:
                    if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                        continue
                except UpdateFinishedTrialError:  # another process got there first
                    continue
                orphans.append(t._trial_id)
            elif t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR) and t.number not in retried_already:
                orphans.append(t._trial_id)
        done = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
            for trial_id in orphans:
                frozen = storage.get_trial(trial_id)
                before = len(study.get_trials(deepcopy=False))
                retry(study, frozen)
                if len(study.get_trials(deepcopy=False)) > before:
                    done.append(frozen.number)
        return done
