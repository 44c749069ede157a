"""The privacy report: what a run (or any mechanism's history) spent, what that means for an
attacker, and whether every safety check held, as ``privacy_report.json``, a figure
(``privacy_report.png``) and a table.

It renders a plain :class:`PrivacyRecord` and knows nothing of Lightning:
:class:`~lightning_dp.PrivacyBudget` hands it one at the end of ``fit`` (and on demand,
``budget.report(trainer)``), ``python -m lightning_dp report CHECKPOINT`` one read from a
checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from lightning_dp.core.accounting import compute_epsilon
from lightning_dp.core.events import event_from_dict, event_to_dict
from lightning_dp.core.history import PrivacyHistory

__all__ = ["REPORT_JSON", "REPORT_PNG", "PrivacyRecord", "build_report", "print_report", "write_report"]

REPORT_JSON = "privacy_report.json"
REPORT_PNG = "privacy_report.png"

#: Steps where the report's epsilon curve is the accountant's own figure (one query each, PRV:
#: ~0.1-0.8 s); between them the figure plotted is an upper bound (spend_table.step_curve).
_CURVE_POINTS = 8
_FPRS = (0.001, 0.01)

_ACCOUNTANT_ERROR = {
    "prv": {"kind": "upper bound", "tolerance": 0.01,
            "note": "numerical PRV accountant (Opacus): an upper bound on epsilon, within 0.01 of the exact value"},
    "rdp": {"kind": "upper bound", "tolerance": None,
            "note": "Renyi DP converted to (epsilon, delta): a valid but loose upper bound"},
    "gdp": {"kind": "estimate", "tolerance": None,
            "note": "Gaussian DP central-limit approximation: an estimate, not a bound"},
}


@dataclass(frozen=True)
class PrivacyRecord:
    """Everything the report shows, as plain data.

    Attributes:
        history: the mechanisms that ran.
        delta, accountant: how epsilon is reported.
        epsilon_budget, max_advantage, max_tpr_at_fpr, kappa: the budget's targets.
        noise_multiplier: the noise in force (shown when the history is empty).
        safety_checks: the facts behind the guarantee (a strategy's ``safety_checks()``).
        audit: an audit's result as a dict, or ``None``.
        stopped_reason, run_id, resumed_at, budget_changes, ledger_verified: the run's story.
    """

    history: PrivacyHistory
    delta: float
    accountant: str = "prv"
    epsilon_budget: Optional[float] = None
    max_advantage: Optional[float] = None
    max_tpr_at_fpr: Mapping[float, float] = field(default_factory=dict)
    kappa: Optional[float] = None
    noise_multiplier: Optional[float] = None
    safety_checks: Optional[dict[str, Any]] = None
    audit: Optional[dict[str, Any]] = None
    stopped_reason: Optional[str] = None
    run_id: Optional[str] = None
    resumed_at: Sequence[int] = ()
    budget_changes: Sequence[tuple[int, Optional[float]]] = ()
    ledger_verified: bool = True
    #: The dataset's ledger (:meth:`~lightning_dp.core.ledger.PrivacyLedger.summary`), or ``None``.
    dataset_ledger: Optional[dict[str, Any]] = None
    #: What one unit of privacy is when it is not one training example (a PMixED partition).
    privacy_unit: Optional[str] = None

    @classmethod
    def of_service(cls, service: Any) -> PrivacyRecord:
        """The record of a private service that answers queries within a budget (a
        :class:`~lightning_dp.PMixED`) or of a synthesis job's result (Private Evolution): its
        ``privacy_history`` (or ``history``), ``delta``, ``epsilon``, ``privacy_unit`` and ``accountant``.

        Example:
            >>> import torch
            >>> from lightning_dp import PMixED
            >>> service = PMixED(lambda ids: torch.zeros(4), [lambda ids: torch.ones(4)] * 2, epsilon=8.0,
            ...                  delta=1e-5, query_budget=10, sample_rate=1.0)
            >>> _ = service.next_token_distribution(torch.tensor([0]))
            >>> report = build_report(PrivacyRecord.of_service(service))
            >>> report["steps"], report["privacy_unit"], abs(report["epsilon"] - service.epsilon_spent) < 1e-9
            (1, 'one partition of the private data (every record in it together)', True)
        """
        history = getattr(service, "privacy_history", None) or service.history
        return cls(history, delta=service.delta, accountant=getattr(service, "accountant", "rdp"),
                   epsilon_budget=service.epsilon, privacy_unit=service.privacy_unit)


def build_report(record: PrivacyRecord) -> dict[str, Any]:
    """The privacy report of ``record`` as a JSON-serialisable dict.

    Keys: ``epsilon`` (spent), ``epsilon_budget`` (and the risk targets ``max_advantage``,
    ``max_tpr_at_fpr``; ``None`` when not set), ``delta``, ``accountant``,
    ``accountant_error``, ``noise_multiplier`` and ``sample_rate`` (of the last segment, or
    in force), ``steps``, ``segments``, ``epsilon_curve`` (``[steps, epsilon]`` pairs),
    ``risk`` (``advantage``, ``tpr_at_fpr`` keyed by the FPR as a string, ``reconstruction``,
    ``kappa``), ``audit`` (``None`` when no audit ran), ``safety_checks`` (``None`` when not
    known), ``stopped_reason``, ``ledger_verified``, ``run_id``, ``resumed_at``,
    ``budget_changes`` and ``versions``. A non-finite number is written as the string
    ``"inf"`` / ``"nan"`` so that the file stays strict JSON.

    Example:
        >>> history = PrivacyHistory([(1.0, 0.01, 100)])
        >>> report = build_report(PrivacyRecord(history, delta=1e-5, accountant="rdp", epsilon_budget=3.0))
        >>> report["steps"], report["noise_multiplier"], round(report["epsilon"], 3)
        (100, 1.0, 1.214)
    """
    from lightning_dp.core.risk import privacy_risk

    history = record.history
    last = history.entries[-1].event if history.entries else None
    sigma = getattr(last, "noise_multiplier", None) if last is not None else record.noise_multiplier
    if last is not None and last.kind == "non_private":
        sigma = 0.0
    q = getattr(last, "sample_rate", None)
    targets = dict(record.max_tpr_at_fpr or {})
    try:
        risk: Optional[Any] = privacy_risk(history, fprs=sorted({*_FPRS, *map(float, targets)}), kappa=record.kappa)
    except ValueError:  # a history known only by Renyi-DP curves has no privacy profile
        risk = None
    report = {
        "epsilon": compute_epsilon(history, record.delta, record.accountant),  # type: ignore[arg-type]
        "epsilon_budget": record.epsilon_budget,
        "max_advantage": record.max_advantage,
        "max_tpr_at_fpr": {f"{float(fpr):g}": tpr for fpr, tpr in targets.items()} or None,
        "delta": record.delta,
        "accountant": record.accountant,
        "accountant_error": _ACCOUNTANT_ERROR[record.accountant],
        "noise_multiplier": sigma,
        "sample_rate": q,
        "steps": history.steps,
        "segments": [{"mechanism": e.event.kind, **_fields(e.event), "steps": e.count} for e in history.entries],
        "epsilon_curve": _epsilon_curve(history, record.delta, record.accountant),
        "risk": None if risk is None else {
            "advantage": risk.advantage,
            "tpr_at_fpr": {f"{float(fpr):g}": tpr for fpr, tpr in risk.tpr_at_fpr.items()},
            "reconstruction": risk.reconstruction,
            "kappa": risk.kappa,
        },
        "audit": record.audit,
        "safety_checks": record.safety_checks,
        "stopped_reason": record.stopped_reason,
        "ledger_verified": record.ledger_verified,
        "dataset_ledger": record.dataset_ledger,
        "privacy_unit": record.privacy_unit,
        "run_id": record.run_id,
        "resumed_at": list(record.resumed_at),
        "budget_changes": [list(c) for c in record.budget_changes],
        "versions": _versions(),
    }
    return _finite(report)


def write_report(report: dict[str, Any], directory: Union[str, Path], history: Optional[PrivacyHistory] = None
                 ) -> tuple[Path, Path]:
    """Write ``privacy_report.json`` and ``privacy_report.png`` into ``directory`` (created if
    missing) and return their paths. The figure's ROC bound is drawn from ``history`` (the
    ledger the report was built from; rebuilt from the report's segments when omitted).

    Another run's report is never overwritten: when ``directory`` holds the report of another run
    (another ``run_id``), the files are named ``privacy_report_<run id>.json`` and ``.png``. The
    same run (resumed) updates its own."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / REPORT_JSON, directory / REPORT_PNG
    if json_path.exists() and _run_of(json_path) != report.get("run_id"):
        tag = str(report.get("run_id") or "unknown")[:12]
        json_path = directory / f"{json_path.stem}_{tag}.json"
        png_path = directory / f"{png_path.stem}_{tag}.png"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if history is None:
        history = PrivacyHistory()
        for entry in report["segments"]:
            fields = {k: v for k, v in entry.items() if k not in ("mechanism", "steps")}
            history.append(event_from_dict({"kind": entry.get("mechanism", "sampled_gaussian"), **fields}),
                           int(entry["steps"]))
    _plot(report, history, png_path)
    return json_path, png_path


def print_report(report: dict[str, Any], console: Optional[Any] = None) -> None:
    """Print the report as a short ``rich`` table (to ``console``, default standard output)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Privacy report", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    eps, err = report["epsilon"], report["accountant_error"]
    table.add_row("epsilon spent", f"{_fmt(eps)} of {_fmt(report['epsilon_budget'])} ({err['kind']})")
    if report.get("max_advantage") is not None or report.get("max_tpr_at_fpr"):
        limits = [f"advantage <= {report['max_advantage']:g}"] if report.get("max_advantage") is not None else []
        limits += [f"TPR at FPR {fpr} <= {tpr:g}" for fpr, tpr in (report.get("max_tpr_at_fpr") or {}).items()]
        table.add_row("risk budget", "; ".join(limits))
    table.add_row("delta", f"{report['delta']:g}")
    table.add_row("accountant", f"{report['accountant']}: {err['note']}")
    table.add_row("noise multiplier", _fmt(report["noise_multiplier"]))
    table.add_row("sample rate", _fmt(report["sample_rate"]))
    table.add_row("steps", f"{report['steps']} in {len(report['segments'])} segment(s)")
    risk = report["risk"] or {"advantage": "- (no privacy profile: Renyi-DP charges)", "tpr_at_fpr": {}}
    table.add_row("membership advantage (bound)", _fmt(risk["advantage"]))
    for fpr, tpr in risk["tpr_at_fpr"].items():
        table.add_row(f"TPR at FPR {fpr} (bound)", _fmt(tpr))
    if risk.get("reconstruction") is not None:
        table.add_row(f"reconstruction success (bound, kappa={_fmt(risk['kappa'])})", _fmt(risk["reconstruction"]))
    audit = report["audit"]
    table.add_row(
        "audit epsilon lower bound",
        "no audit" if audit is None else (
            f"{_fmt(audit['epsilon_lower_bound'])} ({audit['correct']}/{audit['guesses']} guesses right, "
            f"{audit['canaries']} canaries, confidence {1 - audit['p']:g})"
        ),
    )
    checks = report["safety_checks"]
    if checks is None:
        status = "not recorded"
    else:
        grad = checks["per_sample_gradient_check"] or {}
        detail = f"engine {grad.get('engine', '?')}"
        if grad.get("worst_relative_error") is not None:
            detail += f", worst relative error {grad['worst_relative_error']:.1e} on {grad['examples']} examples"
        elif not grad.get("verified"):
            detail += ", per-sample gradients NOT verified"
        verdict = "passed" if checks["passed"] else "NOT passed"
        status = f"{verdict} (Poisson sampling: {checks['poisson_sampling']}; {detail})"
    table.add_row("safety checks", status)
    if (checks or {}).get("privacy_unit") == "user":
        table.add_row("privacy unit", f"user (at most {checks['max_examples_per_user']} examples each per batch): "
                                      "every figure above protects a person's examples together")
    if report.get("privacy_unit"):
        table.add_row("privacy unit", f"{report['privacy_unit']}: every figure above protects it as a whole")
    if (checks or {}).get("non_finite_examples_dropped"):
        table.add_row("examples dropped", "some had a non-finite gradient and contributed nothing (see the log)")
    if report.get("ledger_verified") is False:
        table.add_row("ledger", "UNVERIFIED: resumed from a checkpoint whose ledger could not be verified")
    shared = report.get("dataset_ledger")
    if shared:
        table.add_row(
            "dataset ledger",
            f"{shared['dataset']}: epsilon {_fmt(shared['spent'])} of {_fmt(shared['epsilon'])} spent by every run, "
            f"{_fmt(shared['remaining'])} remaining (delta {shared['delta']:g}). The ledger's figure is a Renyi-DP "
            "filter's, valid for runs chosen after seeing earlier ones' results: larger than the sum of the runs' "
            "own epsilons would suggest for one fixed plan, and larger than this run's own (tight) epsilon.",
        )
    (console or Console()).print(table)


# ---------------------------------------------------------------------- helpers
def _epsilon_curve(history: PrivacyHistory, delta: float, accountant: str) -> list[list[float]]:
    total = history.steps
    if total == 0:
        return [[0, 0.0]]
    # Denser early, where epsilon grows fastest; the last step, and where the noise or rate changed.
    marks = {math.ceil(total * (j / _CURVE_POINTS) ** 2) for j in range(_CURVE_POINTS + 1)}
    marks |= {int(n) for n in np.cumsum([e.count for e in history.entries])}
    return [[n, compute_epsilon(history.prefix(n), delta, accountant)] for n in sorted(marks)]  # type: ignore[arg-type]


def _plot(report: dict[str, Any], history: PrivacyHistory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display here; a backend the user already chose is kept
    from matplotlib.figure import Figure

    from lightning_dp.core.risk import tpr_bound
    from lightning_dp.core.spend_table import step_curve

    # A bare Figure (not pyplot) leaves the user's pyplot state and backend untouched.
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_eps, ax_roc = fig.subplots(1, 2)
    exact = [(int(n), float(e)) for n, e in report["epsilon_curve"] if isinstance(e, (int, float))]
    if history.steps:
        steps, lower, upper = step_curve(history, report["delta"], exact)
        ax_eps.fill_between(steps, lower, upper, step="post", color="tab:blue", alpha=0.25, linewidth=0,
                            label="epsilon after each step lies here")
    if exact:
        ax_eps.plot(*zip(*exact), "o-", color="tab:blue", markersize=4, linewidth=1,
                    label=f"the accountant's figure ({report['accountant']})")
    boundaries = np.cumsum([s["steps"] for s in report["segments"]])[:-1]
    for k, step in enumerate(boundaries):
        ax_eps.axvline(step, color="grey", linestyle=":", label="noise or sample rate changed" if k == 0 else None)
    for k, step in enumerate(report.get("resumed_at") or []):
        ax_eps.axvline(step, color="tab:green", linestyle="--", label="resumed" if k == 0 else None)
    changes = report.get("budget_changes") or []
    if changes:
        xs = [c[0] for c in changes] + [max(history.steps, changes[-1][0])]
        ys = [c[1] for c in changes]
        ax_eps.step(xs, ys + ys[-1:], where="post", color="tab:red", linestyle="--", label="budget")
    elif isinstance(report["epsilon_budget"], (int, float)):
        ax_eps.axhline(report["epsilon_budget"], color="tab:red", linestyle="--", label="budget")
    ax_eps.set(xlabel="private steps", ylabel=f"epsilon at delta={report['delta']:g}", title="Privacy spent")
    ax_eps.legend(fontsize="small")
    # Log axes: the low false-positive rates where membership inference matters (0.1%) are visible.
    fpr = np.logspace(-5, 0, 201)
    if report["risk"] is not None:
        ax_roc.plot(fpr, np.asarray(tpr_bound(history, fpr), dtype=float), label="the most any attack can reach")
    ax_roc.plot(fpr, fpr, color="grey", linestyle=":", label="chance")
    ax_roc.axvline(1e-3, color="lightgrey", linewidth=0.8)
    ax_roc.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate",
               xlim=(1e-5, 1), ylim=(1e-5, 1.05), title="Membership inference: ROC bound")
    ax_roc.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=100)


def _fields(event: Any) -> dict[str, Any]:
    return {k: v for k, v in event_to_dict(event).items() if k != "kind"}


def _run_of(path: Path) -> Any:
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _versions() -> dict[str, str]:
    from lightning_dp._version import __version__

    versions = {"lightning_dp": __version__, "python": platform.python_version()}
    for dist in ("torch", "lightning", "opacus", "dp-accounting", "numpy", "scipy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _finite(value: Any) -> Any:
    """Numbers JSON can hold: numpy scalars as Python ones, non-finite floats as strings."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
