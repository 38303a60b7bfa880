"""
What both training scripts need but is not the lesson: torchrun set-up, the batch order, the learning
rate schedule, checkpoints with exact resume, atomic writes, the log and its plot. Plain functions;
the training loop itself is written out in train_semantic.py and train_emotion.py.

Exact resume: everything random about training is a function of (seed, step) or saved in the
checkpoint. The batch order is a fixed permutation per epoch, and a checkpoint holds the trainable
weights, the optimizer moments and every rank's torch RNG state. So a run killed at any
moment and resumed from its newest checkpoint ends bitwise equal to one that never stopped.

A run folder: log.jsonl, loss.png, checkpoints/step_NNNNNNN/{model.safetensors, config.json, state.pt}.
"""
import atexit
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data import atomic_write

# ----------------------------------------------------------------------------------------------
# device and torchrun: outside torchrun every helper here acts as one process would


def init_distributed(device=None):
    """-> (rank, world_size, device). device None: cuda, then mps, then cpu. Under torchrun (WORLD_SIZE > 1)
    joins the process group (nccl on cuda, gloo otherwise) and gives each rank its own GPU; a plain run
    is rank 0 of 1."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":  # device_id binds the NCCL communicator to this rank's GPU up front
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # a run that failed
    return dist.get_rank(), dist.get_world_size(), device


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _comm_device():  # nccl reduces cuda tensors, gloo cpu ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def end_distributed():
    """Called after rank 0 has written the run folder: no rank returns before it is complete, and the
    group ends while every rank is idle (a gloo rank that exits with it still open can abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks: rank 0 fills a cache (features, LLM targets) that the
    others then only read."""
    rank, world = _rank_world()
    if rank > 0:
        dist.barrier()   # rank 0 is done
    out = fn()
    if rank == 0 and world > 1:
        dist.barrier()
    return out


def all_reduce_grads(params):
    """Averages the trainable grads over ranks, in one flat buffer. Used instead of wrapping the model
    in DDP: the frozen encoder/LLM are held by every rank and the losses call several model methods, so
    only these grads need reducing, once per optimizer step (after all micro-steps). A param no rank
    used keeps grad None, as in a single process (AdamW then skips it rather than decaying it)."""
    world = _rank_world()[1]
    if world == 1:
        return
    used = [float(p.grad is not None) for p in params]
    grads = [p.grad.reshape(-1).float() if p.grad is not None else p.new_zeros(p.numel()).float() for p in params]
    flat = torch.cat(grads + [torch.tensor(used, device=params[0].device)])
    dist.all_reduce(flat)
    flat /= world
    used, offset = flat[-len(params):].tolist(), 0
    for p, u in zip(params, used):
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype) if u > 0 else None
        offset += p.numel()


def mean_over_ranks(sums, n):
    """{name: sum over n steps} -> {name: mean over the steps and the ranks}."""
    keys, world = sorted(sums), _rank_world()[1]
    values = torch.tensor([sums[k] / n for k in keys], dtype=torch.float64)
    if world > 1:
        values = values.to(_comm_device())
        dist.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist()))


def any_rank(flag):
    """True on every rank when it is True on any one: all ranks stop at the same step."""
    return mean_over_ranks({"flag": float(flag)}, 1)["flag"] > 0


def bf16_autocast(device, enabled=True):
    """bf16 autocast context for device, or a no-op where it does not apply (mps, old GPUs, disabled)."""
    device = torch.device(device)
    if enabled and (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# the plan, the batch order and the schedule: functions of the step, so resuming needs only the step


def plan(n_items, batch_size, grad_accum, max_steps, epochs):
    """-> the number of optimizer steps: max_steps, or if that is 0, `epochs` passes over the items.
    Checks first that a batch splits evenly into grad_accum micro-batches on every rank."""
    rank, world = _rank_world()
    if batch_size % (grad_accum * world) or n_items < batch_size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of grad_accum {grad_accum} x "
                         f"{world} ranks and at most the {n_items} items")
    per_epoch = n_items // batch_size
    steps = max_steps or math.ceil(epochs * per_epoch)
    if rank == 0:
        print(f"{steps} steps of {batch_size} items ({steps / per_epoch:.2f} epochs), "
              f"micro-batch {batch_size // (grad_accum * world)} x {grad_accum} accum x {world} ranks")
    return steps


def micro_batches(step, n_items, batch_size, grad_accum, seed):
    """This rank's item indices for each micro-step of optimizer step `step`. Epoch e is one permutation
    seeded by (seed, e), cut into n_items // batch_size full batches (the remainder is dropped, so every
    step has the same size); a batch is cut into grad_accum x world micro-batches of equal size."""
    rank, world = _rank_world()
    micro = batch_size // (grad_accum * world)
    epoch, k = divmod(step, n_items // batch_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batch = torch.randperm(n_items, generator=g)[k * batch_size:(k + 1) * batch_size].tolist()
    return [batch[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(grad_accum)]


def lr_at(step, lr, min_lr, warmup_steps, max_steps, schedule="cosine"):
    """The learning rate of optimizer step `step`. "cosine": linear warmup to lr, then cosine decay to min_lr at
    max_steps (nanoGPT's schedule). "warmup_decay": the release's, DeepSpeed's WarmupDecayLR as its trainer fills
    it in: from 0 along log(step + 1) / log(warmup_steps) (DeepSpeed's default warmup type, which the release
    keeps), then linear to 0 at max_steps; min_lr is not used. (DeepSpeed applies the value of step k to the
    update after it, and runs the first update at lr itself: a one-step shift that is not copied.)"""
    if schedule == "warmup_decay":
        warmup = max(2, warmup_steps)   # as DeepSpeed: log(1) would divide by zero
        if step < warmup:
            return lr * math.log(step + 1) / math.log(warmup)
        return lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup))
    if schedule != "cosine":
        raise ValueError(f"schedule {schedule!r}: use 'cosine' or 'warmup_decay'")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    ratio = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def due(step, every, last):
    """Every `every` steps and at the last one; every = 0: only at the last."""
    return step == last or (every > 0 and step % every == 0)


def adamw(params, lr, weight_decay):
    # Weight decay on matrices only, not on biases and norm gains (nanoGPT, and HF Trainer as the release used).
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


# ----------------------------------------------------------------------------------------------
# files: atomic writes, checkpoints, exact resume


def list_checkpoints(run_dir):
    """Complete checkpoints, oldest first. A checkpoint is written as step_N.tmp/ and renamed to step_N/
    when all its files are there, so a crash mid-write leaves only a .tmp folder, which is ignored."""
    ckpts = [d for d in Path(run_dir, "checkpoints").glob("step_*") if re.fullmatch(r"step_\d+", d.name)
             and all((d / f).is_file() for f in ("model.safetensors", "config.json", "state.pt"))]
    return sorted(ckpts, key=lambda d: int(d.name[5:]))


def last_checkpoint(run_dir, resume):
    """The newest complete checkpoint to resume from, or None: a fresh run. A fresh run refuses a folder
    that holds an earlier run's checkpoints, which a later --resume would otherwise mix with its own."""
    ckpts = list_checkpoints(run_dir)
    if ckpts and not resume:
        raise FileExistsError(f"{Path(run_dir, 'checkpoints')} holds checkpoints of an earlier run: pass --resume, "
                              "or choose another out_dir")
    return ckpts[-1] if ckpts else None


def start_or_resume(run_dir, ckpt, trainable, opt, seed, **data):
    """-> (step, elapsed seconds) the loop starts from. ckpt None: step 0; every RNG is seeded (per rank,
    so dropout masks differ between ranks) and every rank takes rank 0's weights. Else the checkpoint's
    weights, optimizer moments and this rank's RNG state; `data` (e.g. n_items, batch_size) must be what
    it was trained on, or its place in the batch order means nothing. Rank 0 also clears a half-written
    checkpoint and the log rows past the step: the killed run wrote them, this one writes them again."""
    rank, world = _rank_world()
    device = next(iter(trainable.values())).device
    step, elapsed = 0, 0.0
    if ckpt is None:
        torch.manual_seed(seed + rank)   # torch draws all training's randomness (dropout); the batch order is (seed, step)
        for p in trainable.values() if world > 1 else []:
            dist.broadcast(p.data, 0)
    else:
        weights = load_file(str(ckpt / "model.safetensors"))
        if set(weights) != set(trainable):
            raise ValueError(f"{ckpt / 'model.safetensors'}: missing {sorted(set(trainable) - set(weights))}, "
                             f"unexpected {sorted(set(weights) - set(trainable))}")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(weights[n])
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        if {k: state.get(k) for k in data} != data:
            raise ValueError(f"{ckpt} was trained with {({k: state.get(k) for k in data})}, not {data}: "
                             "its place in the data means nothing here")
        opt.load_state_dict(state["optimizer"])
        if rank < len(state["rng"]):
            torch.set_rng_state(state["rng"][rank]["cpu"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
        else:  # resumed on more ranks than saved: this rank's random stream starts afresh (not bitwise)
            print(f"rank {rank}: no saved RNG state in {ckpt}, reseeding")
        step, elapsed = state["step"], state["elapsed"]
    if rank == 0:
        for stale in Path(run_dir, "checkpoints").glob("step_*.tmp"):
            shutil.rmtree(stale)
        log = Path(run_dir, "log.jsonl")
        log.parent.mkdir(parents=True, exist_ok=True)
        rows = log.read_text().splitlines() if log.exists() and step else []
        keep = "".join(r + "\n" for r in rows if r.strip() and json.loads(r)["step"] <= step)
        atomic_write(log, lambda p: Path(p).write_text(keep))
        print(f"training {sum(p.numel() for p in trainable.values()):,} parameters in {len(trainable)} tensors"
              + (f", resuming from {ckpt} (step {step})" if ckpt else ""))
    return step, elapsed


def save_checkpoint(run_dir, step, trainable, opt, config, keep_last, **extra):
    """run_dir/checkpoints/step_N with the trainable weights, the run's config and state.pt (step,
    optimizer, every rank's RNG state, extra), keeping the newest keep_last (0: all). Every rank calls
    it, to hand over its RNG state; rank 0 writes."""
    rank, world = _rank_world()
    device = next(iter(trainable.values())).device
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    if rank != 0:
        return
    final = Path(run_dir, "checkpoints", f"step_{step:07d}")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write(tmp / "model.safetensors", lambda p: save_file(
        {n: t.detach().contiguous().cpu() for n, t in trainable.items()}, str(p)))
    atomic_write(tmp / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2, default=str)))
    state = {"step": step, "optimizer": opt.state_dict(), "rng": rngs, **extra}
    atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)


def stop_signal():
    """An event the first Ctrl-C (or SIGTERM) sets: the loop finishes its step, saves a checkpoint and
    stops, so a checkpoint is never half an optimizer update. A second signal stops at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit without saving)")
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return stop


# ----------------------------------------------------------------------------------------------
# the log


def log_row(path, **row):
    """One JSON line in the log (row has a step and a split), and the same on stdout."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"step {row['step']} {row['split']}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                            if k not in ("step", "split")))


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kB on Linux
