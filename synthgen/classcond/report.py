"""Plots and their data, PNG beside JSON: a study's optimisation history and parameter importances,
and the final CAS-vs-scale curve.

* ``history.json`` / ``history.png`` -- every trial (number, state, parameters, objective, the
  validation accuracy it reported at each epoch, where it was pruned) and the best value so far;
* ``importances.json`` / ``importances.png`` -- :func:`optuna.importance.get_param_importances` over
  the finished trials (PED-ANOVA, Optuna's default; ``fanova`` -- the paper's functional ANOVA --
  needs scikit-learn, the ``fanova`` extra). With too few trials Optuna can only return equal
  importances, and without scikit-learn fanova none: the JSON then holds ``importances: null`` and
  the reason, and the PNG says so instead of showing bars;
* ``cas-vs-scale.json`` / ``cas-vs-scale.png`` -- CAS top-1 at each scale, with the real baseline
  (the JSON also lists the largest scale's classes furthest below the baseline, ``class_gaps``).

Figures are drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

__all__ = ["study_history", "param_importances", "write_study_report", "write_scale_report", "check_importance_evaluator"]

MIN_TRIALS_FOR_IMPORTANCE = 4  # PED-ANOVA needs some spread between its "top" and "all" trials


def _write_json(path: Path, data: Any) -> None:
    from synthgen.train.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def study_history(study) -> dict:
    """Every trial in order and the running best (maximised objective)."""
    rows, best, best_so_far = [], None, []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.values else None
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params),
            "value": value,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "pruned_at": t.last_step if t.state.name == "PRUNED" else None,
            "retry_of": t.system_attrs.get("failed_trial"),
            "generation_s": t.user_attrs.get("generation_s"),
            "train_s": t.user_attrs.get("train_s"),
        })
        if t.state.name == "COMPLETE" and value is not None and (best is None or value > best):
            best = value
        best_so_far.append(best)
    return {"direction": "maximize", "objective": "best validation accuracy (fraction) on real held-out training images",
            "trials": rows, "best_so_far": best_so_far}


def _evaluator_missing(name: str) -> str | None:
    """Why evaluator ``name`` cannot run here (a package it needs), or None."""
    if name == "fanova":
        try:
            import sklearn  # noqa: F401 - Optuna's fANOVA fits scikit-learn random forests
        except ImportError:
            return "fanova needs scikit-learn (pip install scikit-learn, or pip install 'synthgen[fanova]'); or use ped-anova"
    return None


def check_importance_evaluator(name: str) -> None:
    """Refuse, in one line, an evaluator that cannot run here: before a study's trials, not after."""
    missing = _evaluator_missing(name)
    if missing is not None:
        from synthgen.errors import SynthgenError

        raise SynthgenError(f"tuning.importance: {missing}")


def param_importances(study, evaluator: str = "ped-anova") -> dict:
    """``{"importances": {param: share} | None, "reason": ..., "evaluator": ..., "trials": n}``."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict[str, Any] = {"evaluator": evaluator, "trials": len(complete), "importances": None, "reason": None}
    varied = {k for t in complete for k in t.params if len({tt.params.get(k) for tt in complete}) > 1}
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varied:
        out["reason"] = (f"too few finished trials ({len(complete)}; importances need at least "
                         f"{MIN_TRIALS_FOR_IMPORTANCE} with varied parameters)")
        return out
    missing = _evaluator_missing(evaluator)
    if missing is not None:  # the report is still written, saying why it has no importances
        out["reason"] = missing
        return out
    chosen = (optuna.importance.FanovaImportanceEvaluator(seed=0) if evaluator == "fanova"
              else optuna.importance.PedAnovaImportanceEvaluator())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study, evaluator=chosen)
        except (ValueError, RuntimeError) as exc:
            out["reason"] = f"{type(exc).__name__}: {exc}"
            return out
    degenerate = [str(w.message) for w in caught if "importances will be equal" in str(w.message).lower()]
    if degenerate:
        out["reason"] = degenerate[0]
        return out
    out["importances"] = {k: float(v) for k, v in values.items()}
    return out


def write_study_report(study, folder: Path, evaluator: str = "ped-anova") -> dict:
    from matplotlib.figure import Figure

    folder = Path(folder)
    history = study_history(study)
    _write_json(folder / "history.json", history)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
        pts = [(r["number"], r["value"]) for r in history["trials"] if r["state"] == state and r["value"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state.lower() + (" (last report)" if state == "PRUNED" else ""))
    best = [(i, b) for i, b in enumerate(history["best_so_far"]) if b is not None]
    if best:
        ax.step(*zip(*best), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (real held-out)")
    ax.set_title(f"Optimisation history: {study.study_name}")
    ax.legend(loc="lower right")
    _save(fig, folder / "history.png")

    importances = param_importances(study, evaluator)
    _write_json(folder / "importances.json", importances)
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    if importances["importances"]:
        names = list(importances["importances"])[::-1]
        ax.barh(names, [importances["importances"][n] for n in names], color="tab:blue")
        ax.set_xlabel(f"importance ({importances['evaluator']}, {importances['trials']} trials)")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, f"no importances:\n{importances['reason']}", ha="center", va="center", wrap=True)
    ax.set_title(f"Parameter importances: {study.study_name}")
    _save(fig, folder / "importances.png")
    return {"history": history, "importances": importances}


def write_scale_report(cas: dict, folder: Path) -> dict:
    """``cas-vs-scale.{json,png}`` from a :func:`synthgen.train.cas.cas_score` result."""
    from matplotlib.figure import Figure

    from synthgen.train.cas import class_gaps

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    curve = {
        "scale_unit": cas["scale_unit"],
        "real_top1": cas["real_baseline"]["top1"],
        "scales": [r["scale"] for r in cas["runs"]],
        "top1": [r["top1"] for r in cas["runs"]],
        "images": [r["n_images"] for r in cas["runs"]],
        "protocol": cas["protocol"].get("values", {}).get("name"),
        "class_gaps": class_gaps(cas, top=10),  # the largest scale's classes furthest below the real baseline
    }
    _write_json(folder / "cas-vs-scale.json", curve)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(curve["scales"], curve["top1"], marker="o", label="synthetic (CAS)")
    ax.axhline(curve["real_top1"], color="tab:red", linestyle="--", label="real baseline")
    ax.set_xlabel(f"scale (x {curve['scale_unit']} images)")
    ax.set_ylabel("top-1 accuracy on the real test split (%)")
    ax.set_xticks(curve["scales"])
    ax.set_title("CAS vs synthetic dataset size")
    ax.legend()
    _save(fig, folder / "cas-vs-scale.png")
    return curve
