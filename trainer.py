"""What both training scripts need but is not the lesson: torchrun, the batch order, the learning rate, the log and
checkpoints with exact resume: the batch order is a function of (seed, step) and a checkpoint holds every rank's RNG
state, so a run killed at any moment and resumed ends bitwise equal to one that never stopped."""
import atexit
import json
import math
import os
import resource
import shutil
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file


def init_distributed(device):
    """-> (rank, world_size, device); under torchrun each rank on its own GPU (nccl), or gloo on CPUs."""
    cuda = device.type == "cuda"
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():   # device_id binds the NCCL communicator to this rank's GPU up front
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # a run that failed
    return dist.get_rank(), dist.get_world_size(), device


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def end_distributed():
    """No rank returns before rank 0 has written the run folder; the group ends while every rank is idle."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank0_first(fn):
    """fn() on rank 0, then on the others: rank 0 fills a cache (features, LLM targets) the others only read."""
    rank, world = _rank_world()
    if rank > 0:
        dist.barrier()   # rank 0 is done
    out = fn()
    if rank == 0 and world > 1:
        dist.barrier()
    return out


def all_reduce_grads(params):
    """The grads averaged over ranks in one buffer (not DDP: the frozen networks need none); unused stay None."""
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
    keys, world = sorted(sums), _rank_world()[1]
    values = torch.tensor([sums[k] / n for k in keys], dtype=torch.float64)
    if world > 1:   # nccl reduces cuda tensors, gloo cpu ones
        values = values.to(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist()))


def any_rank(flag):
    """True on every rank when it is True on any one: all ranks stop at the same step."""
    return mean_over_ranks({"flag": float(flag)}, 1)["flag"] > 0


def bf16_autocast(device, enabled=True):
    device = torch.device(device)
    native = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and native)


def plan(n_items, batch_size, grad_accum, max_steps, epochs):
    """-> the number of optimizer steps: max_steps, or if 0, `epochs` passes over the items."""
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
    """This rank's item indices for each micro-step of `step`: epoch e is a permutation seeded by (seed, e)."""
    rank, world = _rank_world()
    micro = batch_size // (grad_accum * world)
    epoch, k = divmod(step, n_items // batch_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batch = torch.randperm(n_items, generator=g)[k * batch_size:(k + 1) * batch_size].tolist()
    return [batch[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(grad_accum)]


@torch.no_grad()
def evaluate(model, losses, held_out, batch_size, ctx):
    """The mean of each of losses(model, batch)'s stats over the held-out items, in eval mode."""
    model.eval()
    with ctx:
        stats = [losses(model, held_out[i:i + batch_size])[1] for i in range(0, len(held_out), batch_size)]
    model.train()
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}


def lr_at(step, lr, min_lr, warmup_steps, max_steps, schedule="cosine"):
    """"cosine": linear warmup to lr, cosine decay to min_lr (nanoGPT's). "warmup_decay": the release's DeepSpeed
    WarmupDecayLR, log(step + 1) / log(warmup_steps) up to lr, then linear to 0 at max_steps (min_lr unused)."""
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


def adamw(params, lr, weight_decay):   # decay on matrices only, as nanoGPT and the release's HF Trainer
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def atomic_write(path, write):
    """A killed run leaves the old file or the new one, never a part."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"   # per process: concurrent writers never share a tmp
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):   # write failed or was interrupted
            os.remove(tmp)


def save_run(model, run_dir, config=None):
    """The run folder SpeechLM.from_run loads: config.json (whisper / llm relative to run_dir) + model.safetensors
    (the trainable weights: adapter, emotion head, LoRA), each written atomically."""
    os.makedirs(run_dir, exist_ok=True)
    config = dict(model.config if config is None else config)
    lora = {n.rsplit(".", 1)[-1]: m for n, m in model.decoder.named_modules() if hasattr(m, "lora_A")}
    m = next(iter(lora.values()), None)
    config.update({k: os.path.relpath(config[k], run_dir) for k in ("whisper", "llm") if config.get(k)},
                  adapter=model.adapter.settings, tone_layer=model.tone_layer,
                  lora=dict(r=m.r, alpha=m.alpha, dropout=m.lora_dropout.p, targets=sorted(lora)) if m else None,
                  num_emotions=model.emotion_head.out_features if model.emotion_head is not None else 0)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.trainable_parameters().items()}
    atomic_write(os.path.join(run_dir, "model.safetensors"), lambda p: save_file(weights, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(run_dir, "config.json"), lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def list_checkpoints(run_dir):
    """Complete checkpoints, oldest first: one is written as step_N.tmp/ and renamed when all its files are there."""
    ckpts = [d for d in Path(run_dir, "checkpoints").glob("step_*") if d.name[5:].isdigit()
             and all((d / f).is_file() for f in ("model.safetensors", "config.json", "state.pt"))]
    return sorted(ckpts, key=lambda d: int(d.name[5:]))


def last_checkpoint(run_dir, resume):
    """A fresh run refuses a folder with an earlier run's checkpoints."""
    ckpts = list_checkpoints(run_dir)
    if ckpts and not resume:
        raise FileExistsError(f"{Path(run_dir, 'checkpoints')} holds checkpoints of an earlier run: pass --resume, "
                              "or choose another out_dir")
    return ckpts[-1] if ckpts else None


def start_or_resume(run_dir, ckpt, model, opt, seed, **data):
    """-> (step, elapsed seconds): fresh, or the checkpoint's state if it was trained on the same `data` (n_items,
    batch_size). Rank 0 clears what a killed run wrote past the step."""
    rank, world = _rank_world()
    trainable = model.trainable_parameters()
    step, elapsed = 0, 0.0
    if ckpt is None:
        torch.manual_seed(seed + rank)   # dropout masks differ between ranks; the batch order is (seed, step)
        for p in trainable.values() if world > 1 else []:
            dist.broadcast(p.data, 0)
    else:
        model.load_trainable(ckpt / "model.safetensors")
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        if {k: state.get(k) for k in data} != data:
            raise ValueError(f"{ckpt} was trained with {({k: state.get(k) for k in data})}, not {data}: "
                             "its place in the data means nothing here")
        opt.load_state_dict(state["optimizer"])
        if rank < len(state["rng"]):
            torch.set_rng_state(state["rng"][rank]["cpu"])
            if (device := model.adapter.fc1.weight.device).type == "cuda":
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


def save_checkpoint(run_dir, step, model, opt, config, keep_last, **extra):
    """checkpoints/step_N: a run folder (save_run: chat.py and evaluate.py load it) + state.pt, the optimizer
    and every rank's RNG state for an exact resume; the newest keep_last kept (0: all). Rank 0 writes."""
    rank, world = _rank_world()
    device = model.adapter.fc1.weight.device
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rngs = [rng] * world   # all_gather_object overwrites each rank's entry
    if world > 1:
        dist.all_gather_object(rngs, rng)
    if rank != 0:
        return
    final = Path(run_dir, "checkpoints", f"step_{step:07d}")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_run(model, tmp, config)
    state = {"step": step, "optimizer": opt.state_dict(), "rng": rngs, **extra}
    atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)


def stop_signal():
    """Set by the first Ctrl-C (or SIGTERM): the loop saves after its step, never half an update. A second quits."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit without saving)")
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return stop


def log_row(path, **row):   # rank 0 writes the log
    if _rank_world()[0] > 0:
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"step {row['step']} {row['split']}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                            if k not in ("step", "split")))


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kB on Linux
