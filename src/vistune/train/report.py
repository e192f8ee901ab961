"""What a training run leaves beside its model: JSONL log, loss curve, config, summary.

`log.jsonl` has one record per optimizer step (step, epoch, loss, lr, grad_norm,
tokens/s, samples/s, padding share, the loss of each response type in the batch when the
data mixes them, ...); after a resume the records past the checkpoint
are dropped so the log reads as one run. `train_config.json` is the resolved TrainConfig
(loadable again with --config), `summary.json` the totals (skips by reason, padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from vistune.data.records import read_journal
from vistune.files import replacing, write_json, write_jsonl
from vistune.train.config import TrainConfig


def open_log(path: Path, start: int) -> IO[str]:
    """The log opened for appending, keeping only records up to step `start` (a torn last
    line from a killed run is dropped)."""
    kept = [r for r in read_journal(path) if r.get("step", 0) <= start] if start else []
    write_jsonl(path, kept)
    return open(path, "a", encoding="utf-8")


def save_run_files(out: Path, cfg: TrainConfig, run: Any, say: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_config.json", cfg.to_dict(), indent=1)
    from vistune.train.setup import sample_limit

    cut = sum(s.truncated for s in run.samples)
    say(
        f"{len(run.samples)} samples (skipped {sum(run.skipped.values())}: {dict(run.skipped)}; "
        f"{cut} cut to {sample_limit(cfg, run.model)} tokens); "
        f"{run.total} steps of {cfg.batch_size} = {cfg.per_device_batch} x {run.accum} accum "
        f"x {run.info.world} processes; plan {cfg.plan}"
    )


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average, as TensorBoard smooths."""
    out, value = [], values[0] if values else 0.0
    for v in values:
        value = weight * value + (1 - weight) * v
        out.append(value)
    return out


def plot_loss(records: list[dict[str, Any]], path: Path) -> list[str]:
    """Loss per step as a PNG (matplotlib, Agg backend): raw and smoothed, the smoothed
    loss of each response type where the data mixes them, and the held-out losses with own
    and swapped images. Returns the curves' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    marker = "o" if len(records) < 2 else None  # a line of one point draws nothing
    smooth = len(records) >= 8
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8,
            alpha=0.35 if smooth else 1.0, marker=marker, label="training loss")  # fmt: skip
    if smooth:
        ax.plot([r["step"] for r in records], smoothed([r["loss"] for r in records]), lw=1.4,
                label="smoothed")  # fmt: skip
    types = sorted({t for r in records for t in r.get("loss_by_type", {})})
    for kind in types:  # each type's loss on the steps whose batch held it
        steps = [r for r in records if kind in r.get("loss_by_type", {})]
        values = [r["loss_by_type"][kind] for r in steps]
        ax.plot([r["step"] for r in steps], smoothed(values) if smooth else values, lw=1.0,
                ls=":", label=f"{kind} (smoothed)" if smooth else kind)  # fmt: skip
    gains = [r for r in records if "image_gain" in r]
    if gains:
        ax.plot([r["step"] for r in gains], [r["held_loss"] for r in gains], "o-", ms=3,
                label="held out, own images")  # fmt: skip
        ax.plot([r["step"] for r in gains], [r["held_loss_swapped"] for r in gains], "s--",
                ms=3, label="held out, swapped images")  # fmt: skip
    labels = [line.get_label() for line in ax.get_lines()]
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token CE)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return labels


def finish(run: Any, model_dir: Path, last: dict[str, Any]) -> Any:
    """Summary + loss curve (rank 0); the TrainResult of the run."""
    from vistune.train.loop import TrainResult

    out = Path(run.cfg.out)
    result = TrainResult(
        out,
        model_dir,
        run.total,
        float(last.get("loss", float("nan"))),
        run.skipped,
        len(run.samples),
    )
    if not run.info.is_main:
        return result
    records = read_journal(out / "log.jsonl")
    tokens = sum(r.get("tokens", 0) for r in records)
    padded = sum(r.get("padded_tokens", 0) for r in records)
    result.padding_share = (padded - tokens) / padded if padded else 0.0
    if records:
        result.loss = float(records[-1]["loss"])
    if run.cfg.plot and records:
        plot_loss(records, out / "loss.png")
    seconds = sum(r.get("seconds", 0.0) for r in records)
    write_json(
        out / "summary.json",
        {
            "steps": run.total,
            "final_loss": result.loss,
            "samples": len(run.samples),
            "skipped": dict(run.skipped),
            "truncated": sum(s.truncated for s in run.samples),
            "padding_share": result.padding_share,
            "train_seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "model": str(model_dir),
            "processes": run.info.world,
            "accumulation": run.accum,
            "held_out": len(getattr(run, "held", [])),
            "image_gain": [
                {k: r[k] for k in ("step", "image_gain", "held_loss", "held_loss_swapped")}
                for r in records
                if "image_gain" in r
            ],
        },
    )
    return result
