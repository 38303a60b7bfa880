"""
The training loop both stages share: batches, AdamW with warmup + decay, grad accumulation and
clipping, bf16 autocast, DDP, JSON-lines log, held-out evaluation, checkpoints and exact resume.

    rank, world, device = init_distributed(device)      # first: under torchrun, picks cuda:LOCAL_RANK
    ...build the model on device, freeze what stays frozen...
    train(model, loss_fn, items, TrainConfig.from_dict(config), eval_fn=evaluate, run_config=config)

loss_fn(batch: list of items) -> loss or (loss, {name: value}) is the caller's: it collates, runs the
model and returns the mean loss over its batch. The trainer knows nothing about speech: it sees a
list of items, a scalar, and the named trainable parameters.

Everything random about training is a function of (seed, step) or saved with the checkpoint: the
batch order is a fixed permutation per epoch, and each checkpoint holds the trainable weights, the
optimizer moments and every rank's python/numpy/torch RNG state. So a run killed at any moment and
resumed from its newest checkpoint ends bitwise equal to one that never stopped.
"""
import atexit
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    batch_size: int = 8          # items per optimizer step, over all ranks and micro-steps
    grad_accum: int = 1          # micro-steps per optimizer step; micro-batch = batch_size // (grad_accum * world)
    max_steps: int = 0           # 0 -> epochs * (len(items) // batch_size)
    epochs: float = 1.0
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "cosine"        # cosine | linear | constant, from lr at the end of warmup to min_lr at max_steps
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0       # 0 -> off
    autocast: bool = True        # bf16 autocast where the device has it (cuda with bf16, cpu)
    seed: int = 0
    shuffle: bool = True
    log_interval: int = 10
    eval_interval: int = 0       # 0 -> evaluate only at the end
    ckpt_interval: int = 500     # 0 -> only at the end
    keep_last: int = 3           # checkpoints kept; 0 -> all
    resume: bool = False         # continue from the newest complete checkpoint in run_dir/checkpoints
    progress: bool = True        # tqdm bar

    @classmethod
    def from_dict(cls, d):
        """Picks this class's fields out of a script's config dict (other keys are the script's own)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# ----------------------------------------------------------------------------------------------
# device, precision, distribution

def autocast(device, enabled=True):
    """bf16 autocast context for device, or a no-op where it does not apply (mps, old GPUs, disabled)."""
    device = torch.device(device)
    if enabled and (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def init_distributed(device=None):
    """-> (rank, world_size, device). device None: cuda, then mps, then cpu. Under torchrun (WORLD_SIZE > 1)
    joins the process group (nccl on cuda, gloo otherwise) and gives each rank its own GPU; a plain run
    is rank 0 of 1. Idempotent."""
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
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # if train() did not
    return dist.get_rank(), dist.get_world_size(), device


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks: rank 0 fills a cache (features, LLM targets) that the
    others then only read. Plain fn() outside torchrun."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
    else:
        dist.barrier()
        out = fn()
    return out


def all_reduce_grads(params, world):
    """Averages the trainable grads over ranks, in one flat buffer. Used instead of wrapping the model
    in DDP: the frozen encoder/LLM are held by every rank and loss_fn calls arbitrary model methods,
    so only these grads need reducing, once per optimizer step (after all micro-steps). A param no rank
    used keeps grad None, as in a single process (AdamW then skips it rather than decaying it)."""
    used = [float(p.grad is not None) for p in params]
    grads = [p.grad.reshape(-1).float() if p.grad is not None else p.new_zeros(p.numel()).float() for p in params]
    flat = torch.cat(grads + [torch.tensor(used, device=params[0].device)])
    dist.all_reduce(flat)
    flat /= world
    used, offset = flat[-len(params):].tolist(), 0
    for p, u in zip(params, used):
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype) if u > 0 else None
        offset += p.numel()


# ----------------------------------------------------------------------------------------------
# schedule and data order: pure functions of the step, so resuming needs only the step

def get_lr(step, cfg, max_steps):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    # the step in decay: 0 at the end of warmup, 1 at max_steps
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    coeff = {"cosine": 0.5 * (1.0 + math.cos(math.pi * ratio)), "linear": 1.0 - ratio, "constant": 1.0}[cfg.decay]
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def batch_indices(step, n_items, cfg):
    """Item indices of optimizer step `step` (all ranks): epoch e is one permutation seeded by (seed, e),
    cut into len // batch_size full batches (the remainder is dropped, so every step has the same size)."""
    per_epoch = n_items // cfg.batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=g) if cfg.shuffle else torch.arange(n_items)
    return order[k * cfg.batch_size:(k + 1) * cfg.batch_size].tolist()


def make_optimizer(params, cfg):
    # Weight decay on matrices only, not on biases and norm gains (nanoGPT, and HF Trainer as the release used).
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# ----------------------------------------------------------------------------------------------
# files: atomic writes, checkpoints

def atomic_write(path, write):
    """write(tmp_path) then rename over path: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_weights(named, path):
    atomic_write(path, lambda p: save_file({n: t.detach().contiguous().cpu() for n, t in named}, str(p)))


def save_json(obj, path):
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def list_checkpoints(ckpt_dir):
    """Complete checkpoints, oldest first. A checkpoint is written as step_N.tmp/ and renamed to step_N/
    when all its files are there, so a crash mid-write leaves only a .tmp folder, which is ignored."""
    ckpts = [d for d in Path(ckpt_dir).glob("step_*") if re.fullmatch(r"step_\d+", d.name)
             and all((d / f).is_file() for f in ("model.safetensors", "config.json", "state.pt"))]
    return sorted(ckpts, key=lambda d: int(d.name[5:]))


def rng_state(device):
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}  # plain types: weights_only load
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(ckpt_dir, step, named, opt, extra, config, keep_last, device, rank, world):
    """Collective (every rank calls it, to hand over its RNG state); rank 0 writes."""
    rng = rng_state(device)
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    if rank != 0:
        return
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step_{step:07d}", ckpt_dir / f"step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(named, tmp / "model.safetensors")
    save_json(config, tmp / "config.json")
    state = {"step": step, "optimizer": opt.state_dict(), "rng": rngs, **extra}
    atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)


def load_checkpoint(path, named, opt, device, rank):
    weights = load_file(str(path / "model.safetensors"))
    names = {n for n, _ in named}
    if set(weights) != names:
        raise ValueError(f"{path / 'model.safetensors'}: missing {sorted(names - set(weights))}, "
                         f"unexpected {sorted(set(weights) - names)}")
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    if rank < len(state["rng"]):
        set_rng_state(state["rng"][rank], device)
    else:  # resumed on more ranks than saved: this rank's random stream starts afresh (not bitwise)
        print(f"rank {rank}: no saved RNG state in {path}, reseeding")
    return state


# ----------------------------------------------------------------------------------------------
# logging

def start_log(path, resume_step):
    """The JSON-lines log, minus rows past resume_step: the killed run wrote those, the resumed one
    writes them again. A fresh run (resume_step 0) starts an empty log."""
    path = Path(path)
    rows = path.read_text().splitlines() if path.exists() else []
    keep = [r for r in rows if r.strip() and json.loads(r)["step"] <= resume_step] if resume_step else []
    atomic_write(path, lambda p: Path(p).write_text("".join(r + "\n" for r in keep)))


def log_row(path, **row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_log(log_path, png_path):
    """Loss curves from the JSON-lines log: one panel per metric, train as a line, eval as dots.
    matplotlib is optional: without it, say so once and return False."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(plot_log, "said", False):
            print("matplotlib is not installed: skipping the loss plot")
            plot_log.said = True
        return False
    rows = [json.loads(r) for r in Path(log_path).read_text().splitlines() if r.strip()]
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))} - {"step", "lr", "elapsed"})
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.5 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=3)
        ax.set_ylabel(key)
        ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    atomic_write(png_path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return True


class _StopOnSignal:
    """First Ctrl-C (or SIGTERM): finish the step, save a checkpoint, stop. Stopping between steps, not
    inside one, means the saved state is never half an optimizer update. A second signal stops at once."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit without saving)")


def _mean_over_ranks(window, n, world):
    keys = sorted(window)
    values = torch.stack([window[k] / n for k in keys])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist()))


def train(model, loss_fn, items, cfg, *, trainable=None, eval_fn=None, run_config=None):
    """Trains the parameters in `trainable` ((name, param) pairs; default: those of model with
    requires_grad) on `items` and writes run_dir/{model.safetensors, config.json, log.jsonl, loss.png,
    checkpoints/}. eval_fn() -> {name: number} runs under no_grad every cfg.eval_interval steps and at
    the end, on every rank. config.json is run_config (e.g. configure()'s dict) over cfg's fields.
    Under torchrun, train() ends the process group (one run per process). Returns {"step",
    "train": last logged train metrics, "eval": last eval metrics}."""
    named = list(trainable) if trainable is not None else [(n, p) for n, p in model.named_parameters()
                                                            if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: no parameter requires grad")
    params = [p for _, p in named]
    device = params[0].device
    rank, world, _ = init_distributed(device)
    master = rank == 0
    if cfg.decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay {cfg.decay!r}: expected cosine, linear or constant")
    if cfg.batch_size % (cfg.grad_accum * world) or len(items) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of grad_accum {cfg.grad_accum} x "
                         f"{world} ranks and at most the {len(items)} items")
    micro = cfg.batch_size // (cfg.grad_accum * world)
    per_epoch = len(items) // cfg.batch_size
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    config = {**asdict(cfg), **(run_config or {})}

    opt = make_optimizer(params, cfg)
    ckpts = list_checkpoints(ckpt_dir)
    step, elapsed = 0, 0.0
    if cfg.resume and ckpts:
        state = load_checkpoint(ckpts[-1], named, opt, device, rank)
        if (state["n_items"], state["batch_size"]) != (len(items), cfg.batch_size):
            raise ValueError(f"{ckpts[-1]} was trained on {state['n_items']} items in batches of "
                             f"{state['batch_size']}, not {len(items)} / {cfg.batch_size}: its data position "
                             "means nothing here")
        step, elapsed = state["step"], state["elapsed"]
        if master:
            print(f"resuming from {ckpts[-1]} (step {step}/{max_steps})")
    else:
        if ckpts:
            raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run: pass resume=True, "
                                  "or choose another run_dir")
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)  # per rank, so dropout masks differ between ranks
        if world > 1:
            for p in params:
                dist.broadcast(p.data, 0)
    log = run_dir / "log.jsonl"
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("step_*.tmp"):  # a checkpoint a crash left half-written
            shutil.rmtree(stale)
        print(f"training {sum(p.numel() for p in params):,} parameters in {len(named)} tensors; "
              f"{max_steps} steps of {cfg.batch_size} items ({max_steps / per_epoch:.2f} epochs), "
              f"micro-batch {micro} x {cfg.grad_accum} accum x {world} ranks")
        start_log(log, step)
    start = time.time() - elapsed  # elapsed counts across resumes

    def evaluate():
        model.eval()
        with torch.no_grad(), autocast(device, cfg.autocast):
            metrics = {k: float(v) for k, v in eval_fn().items()}
        model.train()
        if master:
            log_row(log, step=step, split="eval", **metrics, elapsed=round(time.time() - start, 3))
            tqdm.write(f"step {step} eval: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def due(every):  # every N steps and at the end; N = 0: only at the end
        return step == max_steps or (every > 0 and step % every == 0)

    pbar = tqdm(total=max_steps, initial=step, disable=not (master and cfg.progress), dynamic_ncols=True)
    last_train, last_eval, window, n_window = {}, {}, {}, 0
    model.train()
    with _StopOnSignal() as stop:
        try:
            while step < max_steps:
                lr = get_lr(step, cfg, max_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = batch_indices(step, len(items), cfg)
                for m in range(cfg.grad_accum):
                    lo = (m * world + rank) * micro  # this rank's slice of this micro-step
                    with autocast(device, cfg.autocast):
                        out = loss_fn([items[i] for i in idx[lo:lo + micro]])
                    loss, metrics = out if isinstance(out, tuple) else (out, {})
                    (loss / cfg.grad_accum).backward()
                    for k, v in {"loss": loss, **metrics}.items():
                        v = torch.as_tensor(v, dtype=torch.float32, device=device).detach()
                        window[k] = window.get(k, 0.0) + v / cfg.grad_accum
                if world > 1:
                    all_reduce_grads(params, world)
                if cfg.grad_clip > 0:
                    window["grad_norm"] = window.get("grad_norm", 0.0) + torch.nn.utils.clip_grad_norm_(
                        params, cfg.grad_clip).float()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step, n_window = step + 1, n_window + 1
                pbar.update()
                if due(cfg.log_interval):
                    last_train = _mean_over_ranks(window, n_window, world)
                    window, n_window = {}, 0
                    if master:
                        log_row(log, step=step, split="train", lr=lr, **last_train,
                                elapsed=round(time.time() - start, 3))
                        pbar.set_postfix(loss=f"{last_train['loss']:.4f}", lr=f"{lr:.2e}")
                if eval_fn is not None and due(cfg.eval_interval):
                    last_eval = evaluate()
                stopping = stop.requested
                if world > 1:  # every rank must agree to stop at the same step
                    flag = torch.tensor([float(stopping)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stopping = flag.item() > 0
                if due(cfg.ckpt_interval) or stopping:
                    extra = {"n_items": len(items), "batch_size": cfg.batch_size, "epoch": step // per_epoch,
                             "batch_in_epoch": step % per_epoch, "elapsed": time.time() - start}
                    save_checkpoint(ckpt_dir, step, named, opt, extra, config, cfg.keep_last, device, rank, world)
                if stopping:
                    if master:
                        tqdm.write(f"stopped at step {step}; checkpoint saved in {ckpt_dir}: rerun with resume=True")
                    raise KeyboardInterrupt
        finally:
            pbar.close()

    if master:
        save_weights(named, run_dir / "model.safetensors")
        save_json(config, run_dir / "config.json")
        plot_log(run_dir / "log.jsonl", run_dir / "loss.png")
    if world > 1:
        # No rank returns before the run folder is complete, and the process group ends here, while
        # every rank is idle: a gloo rank that exits with it still open can abort at interpreter exit.
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "train": last_train, "eval": last_eval}
