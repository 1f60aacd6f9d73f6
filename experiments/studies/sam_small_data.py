"""SAM on small data (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently
Improving Generalization", ICLR 2021).

Claim: minimizing the worst loss in a ρ-ball finds flatter minima (smaller top Hessian
eigenvalue) that test better than those of the same optimizer without the ascent step;
the gain is largest where data are scarce.

The config (`configs/sam_small_data.toml`) sweeps SAM's radius ρ with ρ = 0 included:
SAM's ascent step is then zero and its update is exactly heavy-ball SGD's, so the
baseline runs in the same vmapped group, with the same data order and initialization.
"""

from __future__ import annotations

from pathlib import Path

from experiments.report import Figure

from experiments.studies import _summary as S

NAME = "sam_small_data"
SWEEP = True

RHO = "optimizer.rho"
PANELS = (("lambda_max", "λ_max of the Hessian"), ("test_accuracy", "test accuracy"))


def compare(records: list[dict]) -> dict:
    """Per radius ρ, mean and spread over seeds (diverged members left out)."""
    out = {}
    for rho, members in S.by(S.finished(records), RHO).items():
        out[rho] = {"members": len(members)} | {
            key: S.mean_std(r[key] for r in members)
            for key in ("train_loss", "train_accuracy", "test_accuracy", "lambda_max",
                        "worst_case") if key in members[0]}
    return out


def _label(rho: float) -> str:
    return "SGD+m\n(ρ = 0)" if rho == 0 else f"SAM\nρ = {rho:g}"


def _figure(records: list[dict], path: Path) -> None:
    groups = S.by(S.finished(records), RHO)
    fig = Figure(figsize=(8.5, 3.4))
    axs = fig.subplots(1, len(PANELS), gridspec_kw={"wspace": 0.3})
    for ax, (key, label) in zip(axs, PANELS):
        S.seed_dots(ax, groups.values(), key)
        ax.set_xticks(range(len(groups)), [_label(r) for r in groups], fontsize=8)
        ax.set_title(label, fontsize=10)
        if key == "lambda_max":
            ax.set_yscale("log")
    fig.suptitle("SAM on 500 MNIST-1D examples: each dot a seed, bars the means",
                 fontsize=10, y=1.02)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def report(run_dir) -> list[str]:
    path = Path(run_dir)
    cfg, records = S.load(path)
    stats = compare(records)
    if not stats:
        return ["## SAM on small data", "", "Every member diverged: nothing to compare."]
    _figure(records, path / "sam_small_data.png")
    cols = [k for k in ("train_loss", "train_accuracy", "test_accuracy", "lambda_max",
                        "worst_case") if k in next(iter(stats.values()))]
    names = {"train_loss": "train loss", "train_accuracy": "train accuracy", "test_accuracy": "test accuracy",
             "lambda_max": "λ_max",
             "worst_case": f"worst-case sharpness (ρ = {cfg['measure']['rho']:g})"}
    rows = [[_label(rho).replace("\n", " "), str(row["members"])] +
            [S.fmt(*row[k]) for k in cols] for rho, row in stats.items()]
    lines = ["## SAM on small data (Foret et al. 2021)", "",
             f"{cfg['data']['num_train']} training examples, "
             f"{cfg['train']['steps']} steps of batch {cfg['train']['batch_size']}; "
             "mean ± std over seeds.", ""]
    lines += S.table(["optimizer", "seeds"] + [names[k] for k in cols], rows)
    if 0.0 in stats and len(stats) > 1:
        base = stats[0.0]
        best = max((r for r in stats if r != 0.0), key=lambda r: stats[r]["test_accuracy"][0])
        lines += ["", f"Best radius ρ = {best:g}: test accuracy "
                  f"{100 * (stats[best]['test_accuracy'][0] - base['test_accuracy'][0]):+.1f}"
                  f" points and λ_max × {stats[best]['lambda_max'][0] / base['lambda_max'][0]:.2f}"
                  " against SGD with momentum."]
    lines += ["", "![SAM on small data](sam_small_data.png)", ""]
    return lines
