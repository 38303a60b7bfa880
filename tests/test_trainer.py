# The shared training loop on a toy regression MLP: it learns, accumulation and DDP equal one big batch,
# checkpoints hold only trainable weights and are atomic, and SIGKILL / Ctrl-C + resume is bitwise exact.
import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import configurator
import trainer
from configurator import ConfigError, configure
from trainer import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    # A toy this small runs 5-8x faster on one thread than on two when the CPU is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Shared by the in-process tests and the scripts run as subprocesses (written to tmp_path).
TOY = """
import torch
from torch import nn
import torch.nn.functional as F

class Toy(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.frozen = nn.Linear(8, 32).requires_grad_(False)  # stands in for the frozen encoder/LLM
        self.head = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1))
    def forward(self, x):
        return self.head(self.frozen(x)).squeeze(-1)

def toy_items(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    y = torch.tanh(x @ w / 3).sum(-1)  # a smooth target the MLP can fit
    return [(x[i], y[i]) for i in range(n)]

def toy_loss(model, batch):
    x = torch.stack([b[0] for b in batch]); y = torch.stack([b[1] for b in batch])
    return F.mse_loss(model(x).float(), y)
"""
toy = {}
exec(TOY, toy)

SCRIPT = TOY + """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from trainer import TrainConfig, init_distributed, rank0_first, train

def main(args):
    rank, world, device = init_distributed("cpu")

    def fill_or_read_cache():  # like the LLM-target cache: rank 0 writes it, the others only read it
        f = Path(args["cfg"]["run_dir"] + ".cache.json")
        if not f.exists():
            assert rank == 0, "another rank got here before rank 0 filled the cache"
            f.write_text(json.dumps(args["n_items"]))
        return json.loads(f.read_text())

    n_items = rank0_first(fill_or_read_cache)
    torch.manual_seed(0)
    model = Toy(args["dropout"])
    items, held_out = toy_items(n_items), toy_items(16, seed=2)
    calls = 0
    def loss_fn(batch):
        nonlocal calls
        calls += 1
        if calls == args.get("kill_at_call"):
            os.kill(os.getpid(), signal.SIGKILL)
        if calls == args.get("interrupt_at_call"):
            os.kill(os.getpid(), signal.SIGINT)
        return toy_loss(model, batch)
    def eval_fn():  # draws from the RNG, so resume must restore it after evaluation too
        return {{"loss": toy_loss(model, held_out) + 0 * torch.rand(1).item()}}
    train(model, loss_fn, items, TrainConfig(**args["cfg"]), eval_fn=eval_fn, run_config={{"stage": "toy"}})
    if rank == 0:  # like train_x.py, rank 0 writes more after train(); the process group ends at exit
        (Path(args["cfg"]["run_dir"]) / "after.txt").write_text(str(calls))

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(json.loads(sys.argv[1]))
"""


def run_script(tmp_path, args, nproc=1):
    script = tmp_path / "toy_train.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    cmd = [sys.executable, str(script), json.dumps(args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def run_in_process(args):
    """The same script's main(), here (on one thread like the subprocesses): the uninterrupted reference."""
    ns = {"__name__": "toy_script"}
    exec(SCRIPT.format(repo=str(REPO)), ns)
    ns["main"](args)


def fit(tmp_path, name, n_items=64, dropout=0.0, **cfg):
    torch.manual_seed(0)
    model = toy["Toy"](dropout)
    items = toy["toy_items"](n_items)
    cfg = TrainConfig(**{"run_dir": str(tmp_path / name), "progress": False, "log_interval": 1, **cfg})
    out = train(model, lambda batch: toy["toy_loss"](model, batch), items, cfg)
    return model, out


def log_rows(run_dir, split="train"):
    return [r for r in map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines()) if r["split"] == split]


def test_loss_falls(tmp_path):
    _, out = fit(tmp_path, "run", n_items=256, batch_size=16, max_steps=200, lr=3e-2, warmup_steps=20)
    rows = log_rows(tmp_path / "run")
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-20:]) / 20
    assert len(rows) == 200 and out["step"] == 200
    assert last < first / 20, (first, last)  # bf16 autocast on (the default) and it still fits
    assert rows[0]["lr"] < rows[20]["lr"] and rows[-1]["lr"] < 1e-4  # warmup, then cosine to ~0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_grad_accum_equals_big_batch(tmp_path):
    common = dict(batch_size=8, max_steps=20, lr=3e-3, autocast=False, grad_clip=0.5)
    big, _ = fit(tmp_path, "big", grad_accum=1, **common)
    acc, _ = fit(tmp_path, "acc", grad_accum=2, **common)
    for (n, a), b in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_checkpoints_hold_only_trainable_weights(tmp_path):
    model, _ = fit(tmp_path, "run", batch_size=8, max_steps=10, ckpt_interval=3, keep_last=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.2.weight", "head.2.bias", "head.4.weight", "head.4.bias"}
    ckpts = trainer.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000009", "step_0000010"]  # keep_last=2 pruned 3 and 6
    for f in [tmp_path / "run" / "model.safetensors"] + [c / "model.safetensors" for c in ckpts]:
        assert set(load_file(str(f))) == trainable
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    for n in trainable:
        assert torch.equal(final[n], model.get_parameter(n).detach())
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["max_steps"] == 10 and cfg["weight_decay"] == 0.05
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints", "config.json", "log.jsonl", "loss.png",
                                                     "model.safetensors"]  # no temp files left


def test_fresh_run_refuses_old_checkpoints(tmp_path):
    fit(tmp_path, "run", batch_size=8, max_steps=2, ckpt_interval=1)
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(tmp_path, "run", batch_size=8, max_steps=4)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old complete file")

    def crash_midway(tmp):
        Path(tmp).write_bytes(b"half of the new")
        raise RuntimeError("disk died")

    with pytest.raises(RuntimeError):
        trainer.atomic_write(path, crash_midway)
    assert path.read_bytes() == b"old complete file" and os.listdir(tmp_path) == ["weights.bin"]
    trainer.atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["weights.bin"]


# Grad accumulation 2, dropout, bf16 autocast, an RNG-drawing eval every 4 steps, and an epoch boundary
# (40 items / batch 8 = 5 steps per epoch): everything that has to be restored exactly.
RESUME_ARGS = {"n_items": 40, "dropout": 0.1, "cfg": {
    "batch_size": 8, "grad_accum": 2, "max_steps": 10, "lr": 3e-3, "warmup_steps": 2, "ckpt_interval": 3,
    "keep_last": 2, "eval_interval": 4, "log_interval": 1, "progress": False}}


def test_resume_after_ctrl_c_and_sigkill_is_bitwise_exact(tmp_path):
    run_in_process({**RESUME_ARGS, "cfg": {**RESUME_ARGS["cfg"], "run_dir": str(tmp_path / "ref")}})
    run = {**RESUME_ARGS, "cfg": {**RESUME_ARGS["cfg"], "run_dir": str(tmp_path / "run")}}
    ckpt_dir = tmp_path / "run" / "checkpoints"
    # Ctrl-C during step 5 (micro-step call 9): finishes the step, saves it, exits
    stopped = run_script(tmp_path, {**run, "interrupt_at_call": 9})
    assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr, stopped.stderr[-3000:]
    assert [c.name for c in trainer.list_checkpoints(ckpt_dir)] == ["step_0000003", "step_0000005"]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # resumed, then SIGKILLed in step 8 (steps 6, 7 are calls 1-4 of this process): newest checkpoint is 6
    run["cfg"]["resume"] = True
    killed = run_script(tmp_path, {**run, "kill_at_call": 5})
    assert killed.returncode == -signal.SIGKILL and "step 5/10" in killed.stdout
    assert [c.name for c in trainer.list_checkpoints(ckpt_dir)] == ["step_0000005", "step_0000006"]
    # what a crash in the middle of writing checkpoint 9 leaves: must be ignored, then cleaned up
    (ckpt_dir / "step_0000009.tmp").mkdir()
    (ckpt_dir / "step_0000009.tmp" / "model.safetensors").write_bytes(b"\x00" * 10)
    resumed = run_script(tmp_path, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 6/10" in resumed.stdout
    assert sorted(os.listdir(ckpt_dir)) == ["step_0000009", "step_0000010"]
    ref, out = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ref", "run"))
    assert ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)  # bitwise
    for split in ("train", "eval"):  # one row per step, in order, with the reference's losses
        assert [(r["step"], r["loss"]) for r in log_rows(tmp_path / "run", split)] == \
               [(r["step"], r["loss"]) for r in log_rows(tmp_path / "ref", split)]
    assert [r["step"] for r in log_rows(tmp_path / "run")] == list(range(1, 11))


def test_ddp_two_ranks_equal_single_process(tmp_path):
    # torchrun, 2 gloo ranks x micro-batch 2 x accum 2 against one process with the same global batch 8
    args = {"n_items": 48, "dropout": 0.0, "cfg": {
        "batch_size": 8, "grad_accum": 2, "max_steps": 12, "lr": 3e-3, "autocast": False, "ckpt_interval": 5,
        "log_interval": 1, "progress": False}}
    out = run_script(tmp_path, {**args, "cfg": {**args["cfg"], "run_dir": str(tmp_path / "ddp")}}, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "micro-batch 2 x 2 accum x 2 ranks" in out.stdout
    run_in_process({**args, "cfg": {**args["cfg"], "run_dir": str(tmp_path / "single")}})
    ddp, single = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ddp", "single"))
    for n in single:
        torch.testing.assert_close(ddp[n], single[n], atol=1e-5, rtol=1e-4, msg=n)
    # only rank 0 writes: one log row per step, not two
    assert [r["step"] for r in log_rows(tmp_path / "ddp")] == list(range(1, 13))
    assert [r["loss"] for r in log_rows(tmp_path / "ddp")] == pytest.approx(
        [r["loss"] for r in log_rows(tmp_path / "single")], rel=1e-4)


def test_schedule_and_batches():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, batch_size=4, decay="cosine")
    lrs = [trainer.get_lr(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.55) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    cfg.decay = "linear"
    assert trainer.get_lr(12, cfg, 20) == pytest.approx(0.55) and trainer.get_lr(20, cfg, 20) == pytest.approx(0.1)
    # an epoch of 10 items in batches of 4: 2 batches, each item at most once, remainder dropped
    epoch0 = trainer.batch_indices(0, 10, cfg) + trainer.batch_indices(1, 10, cfg)
    assert len(set(epoch0)) == 8 and trainer.batch_indices(2, 10, cfg) != trainer.batch_indices(0, 10, cfg)
    assert trainer.batch_indices(1, 10, cfg) == trainer.batch_indices(1, 10, cfg)


def test_trainer_does_not_import_the_model():
    tree = ast.parse((REPO / "trainer.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"model", "adapter", "data"}


def test_configurator(tmp_path):
    def defaults():
        return {"lr": 1e-4, "batch_size": 8, "name": "run", "resume": False, "betas": (0.9, 0.95),
                "init_from": None, "EMOTIONS": ["neutral"], "_private": 1, "os": os}

    g = defaults()
    cfg_file = tmp_path / "tiny.py"
    cfg_file.write_text("import math\nbatch_size = 2\nname = 'tiny'\nlr = 0.5 * math.pi\n")
    config = configure(g, [str(cfg_file), "--lr=3", "--name=my_run", "--resume", "--betas=[0.8, 0.9]",
                           "--init_from=runs/a"])
    assert config == {"lr": 3.0, "batch_size": 2, "name": "my_run", "resume": True, "betas": (0.8, 0.9),
                      "init_from": "runs/a"}
    assert g["lr"] == 3.0 and isinstance(g["lr"], float) and g["EMOTIONS"] == ["neutral"]
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr'.*did you mean: lr"):
        configure(defaults(), ["--lrr=1e-3"])
    with pytest.raises(ConfigError, match="unknown config key 'EMOTIONS'"):
        configure(defaults(), ["--EMOTIONS=[]"])  # constants are not settings
    with pytest.raises(ConfigError, match="batch_size expects int"):
        configure(defaults(), ["--batch_size=abc"])
    with pytest.raises(ConfigError, match="batch_size expects int"):
        configure(defaults(), ["--batch_size=8.5"])
    with pytest.raises(ConfigError, match="resume expects bool"):
        configure(defaults(), ["--resume=1"])
    with pytest.raises(ConfigError, match="needs a value"):
        configure(defaults(), ["--lr"])
    assert configurator.config_keys(defaults()) == ["lr", "batch_size", "name", "resume", "betas", "init_from"]
    # a trainer config picks its fields out of a script's config dict
    assert TrainConfig.from_dict({"lr": 0.3, "stage": "x"}).lr == 0.3


def test_all_reduce_grads_keeps_unused_params_gradless(tmp_path):
    # a one-rank gloo group in this process: averaging is the identity, and a param without a grad
    # must stay without one (AdamW skips it, as in a single-process run)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
        (used * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        trainer.all_reduce_grads([used, unused], 1)
        assert used.grad.tolist() == [1.0, 2.0, 3.0] and unused.grad is None
    finally:
        dist.destroy_process_group()


def test_plot_without_matplotlib_says_so_once(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log.jsonl"
    trainer.log_row(log, step=1, split="train", loss=1.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(trainer.plot_log, "said", False, raising=False)
    assert not trainer.plot_log(log, tmp_path / "loss.png") and not trainer.plot_log(log, tmp_path / "loss.png")
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1
    assert not (tmp_path / "loss.png").exists()
