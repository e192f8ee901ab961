"""The training loop of both stages (paper §4.2; hyperparameters §5).

    from vistune.train.config import load_config
    from vistune.train.loop import train
    result = train(load_config("configs/scenes/pretrain.yaml", {}))

Each optimizer step takes one global batch (length-grouped, see vistune.data.dataset),
runs this process's micro-batches under bf16 autocast (fp32 master weights) with gradient
accumulation, and applies AdamW at the warmup + cosine learning rate. On the CPU, a
Llama-family LLM runs through vistune.train.llama_cpu (see vistune.train.step). The vision tower is
not in the loop: image features come from the frozen feature store. The loss is the token
cross entropy of the supervised answer tokens (eq. 3), normalised by the count of
supervised tokens in the global batch, so any split over processes and micro-batches gives
the same update. Outputs in `out`: model/ (what `vistune chat` loads), log.jsonl,
loss.png, train_config.json, summary.json and checkpoints/ (resumable, see checkpoint.py).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vistune.data.dataset import Sample, global_batches, micro_batches
from vistune.data.formats import RESPONSE_TYPES, response_type
from vistune.errors import DataError, VistuneError
from vistune.train import checkpoint as ckpt
from vistune.train.config import TrainConfig
from vistune.train.distributed import (
    DistInfo,
    all_sum,
    barrier,
    gather_objects,
    grad_sync,
    init_distributed,
    materialize,
    meta_ranks,
    shutdown,
    wrap,
)
from vistune.train.gain import held_out_gain, hold_out
from vistune.train.optim import (
    NonFiniteGradientError,
    build_optimizer,
    clip_and_step,
    load_optimizer,
    lr_at,
    optimizer_state,
)
from vistune.train.setup import (
    apply_stage,
    build_model,
    check_inputs,
    data_fingerprint,
    prepare_samples,
    resolve_device,
    run_notes,
)
from vistune.train.step import TrainStep

Say = Callable[[str], None]


@dataclass
class TrainResult:
    out: Path
    model_dir: Path
    steps: int
    loss: float
    skipped: Counter = field(default_factory=Counter)
    samples: int = 0
    padding_share: float = 0.0


@dataclass
class _Run:
    """What the step loop needs, gathered by `_setup`."""

    cfg: TrainConfig
    info: DistInfo
    model: Any
    step_module: TrainStep
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    samples: list[Sample]
    skipped: Counter
    store: Any
    accum: int
    steps_per_epoch: int
    total: int
    start: int
    trainable: list[str]
    fingerprint: str
    attention: str
    held: list[Sample] = field(default_factory=list)
    """Held out of training to measure the image gain (cfg.gain_samples)."""
    types: tuple[str, ...] = ()
    """The response types the data mixes (vistune.data.formats.response_type), when two
    or more: each step logs its loss per type."""


def keep_large_buffers() -> None:
    """Let glibc reuse big freed buffers instead of returning them to the OS.

    glibc serves allocations above its mmap threshold (at most 32 MB) with fresh pages, so
    every step page-faults and zero-fills its large tensors again (logits, the embedding
    gradient, weight casts): about 14% of a stage-2 step on the CPU here. Raising the
    threshold and the trim limit keeps them in the heap. No effect off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: 1 GiB
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim
    except (OSError, AttributeError):
        return


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    cfg: TrainConfig,
    say: Say = lambda _m: None,
    on_step: Callable[[dict[str, Any], int], None] | None = None,
    on_features: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Run one stage as `cfg` says; returns where the model went and the final loss."""
    if not cfg.out:
        raise VistuneError("no output directory: set `out` or --out")
    try:  # before the model loads and the features fill, not after
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VistuneError(f"{cfg.out}: cannot use the out folder ({err.strerror})") from err
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0"))))
    if info.device.type == "cpu":
        keep_large_buffers()
    lock = None
    try:
        lock = _lock_out(Path(cfg.out), info)
        run = _setup(cfg, info, say, on_features)
        result = _loop(run, say, on_step)
        # A rank aborted after its last step, twice ("terminate called without an active
        # exception": CI with FSDP + LoRA, a local suite run with DDP or FSDP). The known
        # cause: DDP/FSDP objects, freed late (reference cycles) at interpreter shutdown,
        # still hold gloo work whose teardown then aborts. So the wrapped model and its
        # optimizer go now, while the group is alive, and every rank leaves its last
        # collective before any tears the group down.
        del run
        gc.collect()
        barrier(info)
        return result
    finally:
        if lock is not None:
            os.close(lock)
        shutdown()


def _lock_out(out: Path, info: DistInfo) -> int | None:
    """Hold `out/.lock` for the run (rank 0; every rank learns the outcome), so a second
    run into the same folder is refused: two runs wrote one log, one set of checkpoints and
    one model, and each reported the other's loss. The lock dies with its process (flock),
    so a killed run leaves nothing to clean up before `--resume`."""
    handle, holder = None, None
    if info.is_main:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unguarded
            fcntl = None
        if fcntl is not None:
            try:
                handle = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise VistuneError(
                    f"{out}: cannot write in the out folder ({err.strerror})"
                ) from err
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by another process
                holder = os.read(handle, 64).decode(errors="replace").strip() or "?"
                os.close(handle)
                handle = None
            except OSError:  # a file system without locks: unguarded
                os.close(handle)
                handle = None
            else:
                os.ftruncate(handle, 0)
                os.pwrite(handle, str(os.getpid()).encode(), 0)
    holder = gather_objects(holder, info)[0]
    if holder is not None:
        raise VistuneError(
            f"{out}: another vistune train (pid {holder}) is writing there; wait for it, or "
            "pick another --out"
        )
    return handle


def _setup(cfg: TrainConfig, info: DistInfo, say: Say, on_features) -> _Run:
    out = Path(cfg.out)
    latest = ckpt.latest_checkpoint(out)
    if latest is not None and not cfg.resume:
        raise VistuneError(f"{out} already has checkpoints; add --resume or pick another --out")
    per_step = cfg.per_device_batch * info.world
    if cfg.batch_size % per_step:  # before the model loads and the features fill
        raise VistuneError(
            f"batch_size {cfg.batch_size} is not a multiple of per_device_batch x processes "
            f"({cfg.per_device_batch} x {info.world})"
        )
    check_inputs(cfg)
    seed_everything(cfg.seed)
    sharded = cfg.fsdp and info.world > 1
    # only rank 0 reads the LLM's weights; under FSDP the others get them as they shard,
    # under DDP when it wraps the model (its start-up broadcast from rank 0)
    model = build_model(cfg, say, meta_llm=info.world > 1 and not info.is_main)
    attention = model.llm.config._attn_implementation
    apply_stage(model, cfg, info.device)
    if cfg.precision == "bf16" and cfg.plan["llm"] == "frozen" and not cfg.fsdp:
        # Frozen weights need no fp32 master copy: bf16 saves the per-step casts. The
        # export keeps the source LLM's own files (export.py), so the cast never reaches them.
        model.llm.to(torch.bfloat16)
    for note in run_notes(model, cfg, info.world):  # before an hour of feature filling
        say(note)
    model.vision.to(info.device)  # the feature fill runs the tower where training runs
    samples, skipped, store = prepare_samples(
        cfg, model, info.rank, info.world, lambda: barrier(info), on_features, say
    )
    samples, held = hold_out(samples, cfg.gain_samples, cfg.seed)
    steps_per_epoch = len(samples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"{cfg.data}: {len(samples)} samples, fewer than one batch ({cfg.batch_size})"
        )
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    if sharded:  # fully_shard moves each decoder layer to the device as it shards it, so
        # the whole LLM never sits on one GPU (52 GB for 13B in fp32)
        for child in model.children():
            if child is not model.llm:
                child.to(info.device)
    else:
        if any(p.is_meta for p in model.llm.parameters()):
            materialize(model.llm, info.device)
        model.to(info.device)
    # A resumed run's checkpoint holds the grounded projector. Rank 0 alone grounds: the
    # others may hold an LLM on the meta device (no embeddings to aim at), and DDP's
    # start-up broadcast or FSDP's rank-0 load (wrap, below) gives them rank 0's projector.
    if cfg.ground and latest is None and info.is_main:
        _ground(cfg, model, samples, store, say)
    # FSDP's DTensor weights run through transformers' forward, not vistune's CPU kernels
    step_module = TrainStep(model, fast=None if cfg.cpu_kernels and not sharded else False)
    trainable = [n for n, p in step_module.named_parameters() if p.requires_grad]
    fingerprint = data_fingerprint(samples)
    state = _load_resume(cfg, latest, step_module, trainable, fingerprint, say)
    start = int(state.get("step", 0))
    if start > total:
        raise VistuneError(
            f"{latest} is at step {start}, past this run's {total} steps: resume with at least "
            f"--max-steps {start}, or the epochs it was written with"
        )
    if sharded:
        ranks = meta_ranks(model.llm, info)
        say(f"FSDP: ranks {ranks} built the LLM on the meta device; rank 0 sends its weights")
    elif info.world > 1:
        say("DDP: only rank 0 read the LLM's weights; DDP broadcasts them to the others")
    wrapped = wrap(step_module, model.llm, info, sharded)
    named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    ratio = (cfg.projector_lr or cfg.lr) / cfg.lr
    scales = [ratio if ".projector." in f".{n}" else 1.0 for n, _ in named]
    params = [p for _, p in named]
    optimizer = build_optimizer(params, cfg.lr, cfg.weight_decay, not cfg.fsdp, scales)
    if start:
        load_optimizer(wrapped, optimizer, latest, from_rank0=sharded)
        ckpt.restore_rng(latest, state, info.rank)
    return _Run(
        cfg,
        info,
        model,
        step_module,
        wrapped,
        optimizer,
        samples,
        skipped,
        store,
        cfg.batch_size // per_step,
        steps_per_epoch,
        total,
        start,
        trainable,
        fingerprint,
        attention,
        held,
        _types(samples),
    )


def _types(samples: list[Sample]) -> tuple[str, ...]:
    """The response types among `samples`, in RESPONSE_TYPES order, if two or more."""
    found = {response_type(s.id) for s in samples}
    types = tuple(t for t in RESPONSE_TYPES if t in found)
    return types if len(types) > 1 else ()


def _ground(cfg: TrainConfig, model: Any, samples: list[Sample], store: Any, say: Say) -> None:
    """Grounded projector alignment (vistune.train.ground)."""
    from vistune.train.ground import ground_projector

    images = [s.image for s in samples if s.image is not None]
    result = ground_projector(
        model, Path(cfg.ground), cfg.ground_split, images, store.get, cfg.ground_steps,
        cfg.ground_lr, seed=cfg.seed, where=cfg.ground_where, say=say,
        cells_of=cfg.ground_cells,
    )  # fmt: skip
    say(
        f"grounded the projector on {result['images']} images: alignment loss "
        f"{result['first_loss']:.3f} -> {result['last_loss']:.3f}"
    )


def _load_resume(
    cfg: TrainConfig,
    latest: Path | None,
    step_module: TrainStep,
    trainable: list[str],
    fingerprint: str,
    say: Say,
) -> dict[str, Any]:
    """Trainable weights from the newest checkpoint (when resuming); its state dict."""
    if not cfg.resume:
        return {}
    if latest is None:
        say(f"no checkpoint in {cfg.out}: starting at step 0")
        return {}
    # A rank holding the LLM on the meta device reads only the names: it takes rank 0's
    # weights (the checkpoint's, loaded here before `wrap`) as it shards.
    meta = any(p.is_meta for p in step_module.parameters())
    tensors, state = ckpt.load_checkpoint(latest, names_only=meta)
    # settings first: a changed template or length limit also changes the fingerprint
    ckpt.check_resumed_config(cfg.to_dict(), state.get("config", {}), latest, say)
    if state.get("fingerprint") != fingerprint:
        raise VistuneError(f"{latest}: written for different data; cannot resume on {cfg.data}")
    missing = sorted(set(trainable) - set(tensors))
    if missing:
        raise VistuneError(f"{latest}: missing trainable tensors {missing[:3]}")
    if not meta:
        step_module.load_state_dict(tensors, strict=False)
    say(f"resuming from {latest} (step {state['step']})")
    return state


def _micro_step(run: _Run, items: list[Sample], scale: float, sync: bool) -> torch.Tensor:
    """Forward + backward of one micro-batch; returns each sample's summed token CE (B,)."""
    device = run.info.device
    feats = run.store.get([s.image for s in items if s.image is not None]).to(device)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=run.cfg.precision == "bf16"
    )
    with grad_sync(run.wrapped, sync):
        with autocast:
            turns = [s.turns for s in items] if any(s.turns for s in items) else None
            ce = run.wrapped([s.input_ids for s in items], [s.labels for s in items], feats, turns)
        (ce * scale).backward()
    return run.step_module.sample_ce.cpu()


def _one_step(run: _Run, step: int, batch: list[int]) -> dict[str, Any]:
    """One optimizer step on a global batch; returns the log record."""
    cfg, info = run.cfg, run.info
    began = time.perf_counter()
    lr = lr_at(step, run.total, cfg.lr, cfg.warmup_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    targets = sum(run.samples[i].targets for i in batch)
    micros = micro_batches(batch, cfg.per_device_batch, info.world, info.rank)
    ce = real = padded = 0.0
    types = run.types
    by_type = [0.0] * (2 * len(types))  # (CE, targets) per response type
    for a, micro in enumerate(micros):
        items = [run.samples[i] for i in micro]
        per_sample = _micro_step(run, items, info.world / targets, a == len(micros) - 1)
        ce += float(per_sample.sum())
        for item, sample_ce in zip(items, per_sample.tolist(), strict=True):
            if (kind := response_type(item.id)) in types:
                by_type[2 * types.index(kind)] += sample_ce
                by_type[2 * types.index(kind) + 1] += item.targets
        lengths = [s.length for s in items]
        real += sum(lengths)
        multiple = run.step_module.length_multiple  # the length the micro-batch runs at
        padded += -(-max(lengths) // multiple) * multiple * len(lengths)
    ce, real, padded, *by_type = all_sum([ce, real, padded, *by_type], info)
    loss = ce / targets
    if not math.isfinite(loss):
        raise _stopped(f"loss is {loss}", step, cfg)
    params = [p for p in run.wrapped.parameters() if p.requires_grad]
    try:
        norm = clip_and_step(run.optimizer, params, cfg.max_grad_norm)
    except NonFiniteGradientError as err:
        raise _stopped(f"{err} (loss {loss:.4f})", step, cfg) from None
    run.step_module.weights_changed()
    run.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began
    epochs = (step + 1) / run.steps_per_epoch
    return {
        "step": step + 1,
        "epoch": round(epochs, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
        "tokens_per_s": real / seconds,
        "samples_per_s": len(batch) / seconds,
        "padding_share": (padded - real) / padded,
        "tokens": int(real),
        "padded_tokens": int(padded),
        "seconds": seconds,
    } | _type_losses(types, by_type)


def _type_losses(types: tuple[str, ...], by_type: list[float]) -> dict[str, Any]:
    """{"loss_by_type": {type: mean token CE}} for the response types in this step's batch
    (none when the data has fewer than two types)."""
    losses = {t: by_type[2 * i] / by_type[2 * i + 1]
              for i, t in enumerate(types) if by_type[2 * i + 1]}  # fmt: skip
    return {"loss_by_type": losses} if losses else {}


def _stopped(what: str, step: int, cfg: TrainConfig) -> VistuneError:
    last = ckpt.latest_checkpoint(Path(cfg.out))
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return VistuneError(
        f"{what} at step {step + 1}; stopped before updating the weights ({keep}; "
        "try a lower lr and --resume)"
    )


def _loop(run: _Run, say: Say, on_step) -> TrainResult:
    cfg, info = run.cfg, run.info
    out = Path(cfg.out)
    from vistune.train.report import open_log, save_run_files

    lengths = [s.length for s in run.samples]
    log = open_log(out / "log.jsonl", run.start) if info.is_main else None
    if info.is_main:
        save_run_files(out, cfg, run, say)
    batches, epoch_of = [], -1
    record: dict[str, Any] = {"loss": float("nan")}
    try:
        for step in range(run.start, run.total):
            epoch, position = divmod(step, run.steps_per_epoch)
            if epoch != epoch_of:
                batches = global_batches(
                    lengths,
                    cfg.batch_size,
                    epoch,
                    cfg.seed,
                    cfg.group_by_length,
                    cfg.length_group,
                )
                epoch_of = epoch
            record = _one_step(run, step, batches[position])
            if run.held and ((step + 1) % cfg.gain_every == 0 or step + 1 == run.total):
                record.update(held_out_gain(run.step_module, run.store, run.held, cfg.precision))
                if info.is_main:
                    say(f"step {step + 1}: image gain {record['image_gain']:.3f} nats/token "
                        f"(held-out loss {record['held_loss']:.3f} with own images, "
                        f"{record['held_loss_swapped']:.3f} swapped)")  # fmt: skip
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if on_step is not None and info.is_main:
                on_step(record, run.total)
            if (step + 1) % cfg.save_every == 0 or step + 1 == run.total:
                _save_checkpoint(run, step + 1)
    finally:
        if log is not None:
            log.close()
    from vistune.train.export import export_model

    model_dir = export_model(run, say)
    from vistune.train.report import finish

    return finish(run, model_dir, record)


def _save_checkpoint(run: _Run, step: int) -> None:
    """Every rank takes part (FSDP gathers); rank 0 writes."""
    trainable = _trainable_state(run)
    optim = optimizer_state(run.wrapped, run.optimizer)
    rng = gather_objects(ckpt.rng_state(), run.info)
    if run.info.is_main:
        state = {
            "fingerprint": run.fingerprint,
            "skipped": dict(run.skipped),
            "total": run.total,
            "config": run.cfg.to_dict(),
        }
        ckpt.save_checkpoint(
            Path(run.cfg.out), step, trainable, optim, state, run.cfg.keep_last, rng
        )
    barrier(run.info)


def _trainable_state(run: _Run) -> dict[str, torch.Tensor]:
    names = set(run.trainable)
    if run.cfg.fsdp and run.info.world > 1:
        full = get_model_state_dict(
            run.wrapped,  # the frozen LLM or LoRA base is not gathered (52 GB for 13B)
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
            ),
        )
        return {k: v for k, v in full.items() if k in names}
    return {n: p.detach() for n, p in run.step_module.named_parameters() if n in names}
