# The training loops as the scripts run them, on tiny random models and chirps: stage 1 learns and writes
# its run folder, Ctrl-C and SIGKILL + --resume end bitwise equal to an uninterrupted stage-2 run, and two
# torchrun ranks equal one process. Then trainer.py's pieces one by one, and configurator.py.
import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny
import trainer
from configurator import ConfigError, configure
from data import EMOTIONS

REPO = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat hello world the train runs late today".split()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Tiny Whisper + LLM folders, a stage-1 run, and manifests of chirps with made-up transcripts."""
    root = tmp_path_factory.mktemp("speech")
    models = tiny.make_models(root / "models")
    (root / "clips").mkdir()

    def manifest(name, n, first):
        rows = []
        for k in range(first, first + n):
            t = np.arange(int(16000 * (0.6 + 0.1 * (k % 7)))) / 16000   # two tones per clip: clips sound apart
            tone = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (150 * (1 + k % 9), 1000 + 317 * (k % 11)))
            audio = tiny.write_wav(root / "clips" / f"{k}.wav", tone + tiny.chirp(len(t) / 16000, seed=k, amp=0.05))
            text = " ".join(WORDS[(3 * k + j) % len(WORDS)] for j in range(3 + k % 4))
            rows.append(json.dumps({"audio": audio, "text": text, "emotion": EMOTIONS[k % 5]}) + "\n")
        (root / name).write_text("".join(rows))
        return str(root / name)

    return dict(root=root, whisper=models["whisper"], llm=models["llm"], train=manifest("train.jsonl", 20, 0),
                test=manifest("test.jsonl", 6, 100),
                stage1=tiny.make_run(root / "stage1", models["whisper"], models["llm"], stage="semantic",
                                     num_emotions=0, lora=False))


# Runs a training script as `python script.py args`, in the speech folder (the feature cache lands there).
# at=N: this signal arrives in the middle of the Nth training micro-step (the loss is computed in train
# mode; evaluation runs in eval mode and is not counted).
WRAPPER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
sys.argv = [{script!r}] + {args!r}
import torch
torch.set_num_threads(1)
import {module} as script
losses, calls = script.losses, 0

def counted(model, batch):
    global calls
    calls += model.training
    if model.training and calls == {at}:
        os.kill(os.getpid(), signal.{sig})
    return losses(model, batch)

script.losses = counted
script.main()
"""


def run(speech, script, *args, at=0, sig="SIGKILL", nproc=1):
    module = script.removesuffix(".py")
    wrapper = speech["root"] / f"run_{module}.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO), script=script, args=list(args), module=module, at=at, sig=sig))
    cmd = [sys.executable, str(wrapper)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(wrapper)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, cwd=speech["root"], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


def semantic_args(speech, out_dir, *extra):
    return [f"--whisper={speech['whisper']}", f"--llm={speech['llm']}", f"--train_manifest={speech['train']}",
            f"--eval_manifest={speech['test']}", f"--out_dir={out_dir}", "--max_new_tokens=8", "--dtype=fp32",
            "--ctc_steps=0", "--asr_weight=0", *extra]   # the CTC warm-up and the transcription loss have their own tests


def log_rows(run_dir, split="train"):
    rows = map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split]


def test_a_missing_manifest_is_named_before_any_model_loads(speech):
    for script, args in (("train_semantic.py", semantic_args(speech, speech["root"] / "none", "--ctc_manifest=nowhere.jsonl",
                                                            "--ctc_steps=5", "--dtype=auto")),
                         ("train_emotion.py", emotion_args(speech, speech["root"] / "none", "--eval_manifest=nowhere.jsonl",
                                                           "--dtype=auto"))):
        p = run(speech, script, *args)
        # pick_dtype says "dtype: ..." when a model loads: the error comes first
        assert p.returncode != 0 and "nowhere.jsonl: no such manifest" in p.stderr and "dtype:" not in p.stderr, p.stderr


def test_ctc_warmup_learns_to_spell_before_the_kl(speech):
    out = speech["root"] / "ctc"
    args = semantic_args(speech, out, "--max_train=8", "--max_eval=4", "--batch_size=4", "--max_steps=1",
                         "--ctc_manifest=", "--ctc_steps=40", "--ctc_batch_size=8", "--ctc_lr=1e-2")
    p = run(speech, "train_semantic.py", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ctc_end"] < summary["ctc_start"] / 2, summary   # the adapter's frames spell the transcripts
    p = run(speech, "train_semantic.py", *args, "--resume")
    assert p.returncode == 0 and "CTC warm-up" not in p.stderr   # a resumed run keeps its adapter: no second warm-up


def test_transcription_loss_falls_beside_the_kl(speech):
    # no recombined set given: the training clips' own transcripts are the transcription task
    out = speech["root"] / "asr"
    p = run(speech, "train_semantic.py", *semantic_args(
        speech, out, "--max_train=8", "--max_eval=4", "--batch_size=4", "--max_steps=80", "--lr=1e-2",
        "--min_lr=1e-3", "--warmup_steps=5", "--weight_decay=0.0", "--log_interval=10", "--ctc_manifest=", "--asr_weight=1", "--asr_batch_size=4"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = log_rows(out)
    # a random tiny LLM reads little through the adapter alone: the loss falls steadily, not fast
    asr = [r["asr"] for r in rows]
    assert asr[-1] < 0.95 * asr[0] and asr == sorted(asr, reverse=True), asr
    assert all(r["loss"] == pytest.approx(r["kl"] + r["asr"], rel=1e-4) for r in rows)   # weight 1: their sum
    p = run(speech, "train_semantic.py", *semantic_args(speech, speech["root"] / "asr3", "--asr_batch_size=3",
                                                         "--asr_weight=1", "--grad_accum=2", "--batch_size=4"))
    assert p.returncode != 0 and "asr_batch_size 3 must be a multiple of grad_accum 2" in p.stderr


def test_stage1_learns_and_writes_its_run_folder(speech):
    # held out = the 8 training clips: the summary's KL then says whether the adapter can fit them
    out = speech["root"] / "fit"
    p = run(speech, "train_semantic.py", *semantic_args(
        speech, out, f"--eval_manifest={speech['train']}", "--max_train=8", "--max_eval=8", "--batch_size=4",
        "--max_steps=80", "--lr=1e-2", "--min_lr=1e-3", "--warmup_steps=5", "--weight_decay=0.0", "--log_interval=1",
        "--eval_interval=40", "--ckpt_interval=25", "--keep_last=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 80 and 0 < summary["peak_rss_gb"] < 8
    assert summary["kl_end"] < summary["kl_start"] / 2, summary
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 81))
    assert rows[0]["lr"] < rows[4]["lr"] < rows[5]["lr"] == pytest.approx(1e-2) and rows[-1]["lr"] == pytest.approx(1e-3, rel=0.01)
    assert [r["step"] for r in log_rows(out, "eval")] == [0, 40, 80]
    assert log_rows(out, "eval")[0]["kl"] == summary["kl_start"] and log_rows(out, "eval")[-1]["kl"] == summary["kl_end"]
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "log.jsonl", "model.safetensors",
                                       "summary.json", "targets.jsonl"]   # no temp files left
    # checkpoints: keep_last=2 of steps 25, 50, 75, 80, each with only the trainable weights (the adapter)
    ckpts = trainer.list_checkpoints(out)
    assert [c.name for c in ckpts] == ["step_0000075", "step_0000080"]
    final = load_file(str(out / "model.safetensors"))
    assert final and all(n.startswith("adapter.") for n in final)
    last = load_file(str(ckpts[-1] / "model.safetensors"))
    assert last.keys() == final.keys() and all(torch.equal(last[n], final[n]) for n in final)
    assert json.loads((ckpts[-1] / "config.json").read_text())["max_steps"] == 80
    # a fresh run refuses the folder (before computing anything); --resume at the end has nothing to do
    with pytest.raises(FileExistsError, match="--resume"):
        trainer.last_checkpoint(out, resume=False)
    again = run(speech, "train_semantic.py", *semantic_args(speech, out))
    assert again.returncode != 0 and "FileExistsError" in again.stderr and "items" not in again.stdout


# Stage 2 with grad accumulation 2 (micro-batch 2), LoRA dropout, bf16 autocast, the head warm-up, an eval
# every 4 steps and an epoch boundary (20 items / batch 4 = 5 steps per epoch): all of it must be restored.
def emotion_args(speech, out_dir, *extra):
    return [f"--init_from={speech['stage1']}", f"--train_manifest={speech['train']}", f"--eval_manifest={speech['test']}",
            f"--out_dir={out_dir}", "--max_new_tokens=8", "--dtype=bf16", "--lora_r=4",
            "--lora_dropout=0.2", "--head_warmup_steps=3", "--batch_size=4", "--grad_accum=2", "--max_steps=10",
            "--lr=3e-3", "--warmup_steps=2", "--log_interval=1", "--eval_interval=4", "--ckpt_interval=3",
            "--keep_last=2", *extra]


def test_resume_after_ctrl_c_and_sigkill_is_bitwise_exact(speech):
    ref, out = speech["root"] / "ref", speech["root"] / "resumed"
    p = run(speech, "train_emotion.py", *emotion_args(speech, ref))
    assert p.returncode == 0, p.stderr[-3000:]
    # Ctrl-C during step 5 (micro-steps 9 and 10): the step finishes, is saved, and the run stops
    stopped = run(speech, "train_emotion.py", *emotion_args(speech, out), at=9, sig="SIGINT")
    assert stopped.returncode != 0 and "KeyboardInterrupt: stopped at step 5" in stopped.stderr, stopped.stderr[-3000:]
    assert [c.name for c in trainer.list_checkpoints(out)] == ["step_0000003", "step_0000005"]
    assert not (out / "model.safetensors").exists()
    # resumed, then SIGKILLed in step 8 (steps 6 and 7 are this process's micro-steps 1-4): the newest checkpoint is 6
    killed = run(speech, "train_emotion.py", *emotion_args(speech, out, "--resume"), at=5)
    assert killed.returncode == -signal.SIGKILL and "(step 5)" in killed.stdout, killed.stderr[-3000:]
    assert "emotion head warm-up" not in killed.stderr   # the warmed-up head is in the checkpoint
    assert [c.name for c in trainer.list_checkpoints(out)] == ["step_0000005", "step_0000006"]
    # what a crash in the middle of writing checkpoint 9 leaves: ignored, then cleaned up
    (out / "checkpoints" / "step_0000009.tmp").mkdir()
    (out / "checkpoints" / "step_0000009.tmp" / "model.safetensors").write_bytes(b"\x00" * 10)
    resumed = run(speech, "train_emotion.py", *emotion_args(speech, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 6)" in resumed.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000009", "step_0000010"]
    a, b = (load_file(str(d / "model.safetensors")) for d in (ref, out))
    assert any(".lora_" in n for n in a) and any(n.startswith("emotion_head.") for n in a)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)   # bitwise
    for split in ("train", "eval"):   # one row per step, in order, with the reference's numbers
        assert [{k: v for k, v in r.items() if k != "elapsed"} for r in log_rows(out, split)] == \
               [{k: v for k, v in r.items() if k != "elapsed"} for r in log_rows(ref, split)]
    assert [r["step"] for r in log_rows(out)] == list(range(1, 11))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["eval_ce"] == log_rows(ref, "eval")[-1]["ce"]
    assert {"eval_emotion", "eval_head_acc", "peak_rss_gb"} <= summary.keys()


def test_ddp_two_ranks_equal_one_process(speech):
    # 2 gloo ranks x 2 micro-steps of 2 against one process with 4 micro-steps of the same 2 items: the
    # same micro-batches, so the grads must add up to the same update (and grad norm) however they are split
    common = ["--batch_size=8", "--max_steps=6", "--lr=3e-3", "--warmup_steps=1", "--log_interval=1",
              "--eval_interval=3", "--ckpt_interval=3", "--device=cpu"]
    ddp, single = speech["root"] / "ddp", speech["root"] / "single"
    p = run(speech, "train_semantic.py", *semantic_args(speech, ddp, *common, "--grad_accum=2"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "micro-batch 2 x 2 accum x 2 ranks" in p.stdout
    p = run(speech, "train_semantic.py", *semantic_args(speech, single, *common, "--grad_accum=4"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (load_file(str(d / "model.safetensors")) for d in (ddp, single))
    for n in b:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)
    # only rank 0 writes: one row per step, not two; the logged means are over both ranks
    assert [r["step"] for r in log_rows(ddp)] == list(range(1, 7))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in log_rows(ddp)] == pytest.approx([r[key] for r in log_rows(single)], rel=1e-4)
    assert len(trainer.list_checkpoints(ddp)) == 2


# The collectives on 2 gloo ranks: grads averaged (a param no rank used keeps grad None), metrics averaged,
# a stop on one rank stops both, rank 0 fills a cache before the other rank reads it.
COLLECTIVES = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
import trainer
rank, world, _ = trainer.init_distributed(torch.device("cpu"))
both, mine, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
(both * torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)).sum().backward()
if rank == 1:
    (mine * 4).sum().backward()
trainer.all_reduce_grads([both, mine, unused])
cache = Path({cache!r})
def fill():
    if rank == 0:
        time.sleep(1)
        cache.write_text("filled")
    return cache.read_text()
out = dict(both=both.grad.tolist(), mine=mine.grad.tolist(), unused=unused.grad is None,
           mean=trainer.mean_over_ranks({{"loss": 2.0 * (rank + 1)}}, 2), stop=trainer.any_rank(rank == 1),
           cache=trainer.rank0_first(fill))
Path({cache!r} + f".rank{{rank}}.json").write_text(json.dumps(out))   # files: two ranks' stdout lines can interleave
trainer.end_distributed()
"""


def test_collectives_on_two_ranks(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES.format(repo=str(REPO), cache=str(tmp_path / "cache.txt")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("cache.txt.rank*.json"))]
    assert len(results) == 2
    for r in results:
        assert r == dict(both=[1.5, 3.0, 4.5], mine=[2.0, 2.0, 2.0], unused=True, mean={"loss": 1.5}, stop=True,
                         cache="filled")


def test_schedule_and_batch_order():
    lrs = [trainer.lr_at(s, 1.0, 0.1, 4, 20) for s in range(21)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])              # warmup
    assert lrs[12] == pytest.approx(0.55) and lrs[20] == pytest.approx(0.1)  # cosine to min_lr
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    # an epoch of 10 items in batches of 4: 2 batches, each item at most once, the remainder dropped
    batches = [trainer.micro_batches(s, 10, 4, 2, seed=0) for s in range(4)]
    assert all(len(b) == 2 and all(len(m) == 2 for m in b) for b in batches)   # 2 micro-batches of 2
    epoch0 = [i for b in batches[:2] for m in b for i in m]
    assert len(set(epoch0)) == 8 and batches[2] != batches[0]   # the next epoch is another permutation
    assert trainer.micro_batches(1, 10, 4, 2, seed=0) == batches[1] != trainer.micro_batches(1, 10, 4, 2, seed=1)
    assert [trainer.due(s, 3, 10) for s in range(1, 11)] == [s in (3, 6, 9, 10) for s in range(1, 11)]
    assert [trainer.due(s, 0, 10) for s in range(1, 11)] == [s == 10 for s in range(1, 11)]
    with pytest.raises(ValueError, match="multiple of grad_accum 3"):
        trainer.plan(20, 8, 3, 0, 1.0)
    assert trainer.plan(20, 8, 2, 0, 2.0) == 4   # two epochs of 2 full batches


def test_release_schedule_is_deepspeeds_warmup_decay():
    # DeepSpeed's WarmupDecayLR as the release's trainer fills it in (warmup_min_lr 0, warmup_max_lr = lr, the
    # default log warmup), 1000 warmup steps of 2500: 0 at step 0, lr from the end of the warmup, 0 at the end
    lrs = [trainer.lr_at(s, 1e-4, 123.0, 1000, 2500, "warmup_decay") for s in range(2501)]
    assert lrs[0] == 0.0 and lrs[999] == pytest.approx(1e-4) and lrs[1000] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-4 / 3) and lrs[99] == pytest.approx(2e-4 / 3)   # log10(step + 1) / 3
    assert lrs[1750] == pytest.approx(5e-5) and lrs[2500] == 0.0                       # min_lr plays no part
    steps = [a - b for a, b in zip(lrs[1000:], lrs[1001:])]
    assert steps == pytest.approx([1e-4 / 1500] * 1500)                                 # linear, to 0
    assert all(a < b for a, b in zip(lrs[:999], lrs[1:1000]))
    with pytest.raises(ValueError, match="schedule 'linear'"):
        trainer.lr_at(0, 1e-4, 0.0, 10, 100, "linear")


PRESETS = [("train_semantic.py", "config/paper_stage1.py"), ("train_emotion.py", "config/paper_stage2.py")]


def settings_and_preset(script, preset):
    """The script's default settings, and the keys the preset assigns."""
    src = (REPO / script).read_text()
    defaults = {}
    exec(src[src.index("# ---- settings"):src.index("config = configure(")], defaults)
    ns = {}
    exec((REPO / preset).read_text(), ns)
    return defaults, {k for k in ns if not k.startswith("_")}


@pytest.mark.parametrize("script,preset", PRESETS)
def test_paper_presets_set_known_keys_to_the_releases_values(script, preset):
    defaults, preset_keys = settings_and_preset(script, preset)
    config = configure(defaults, [str(REPO / preset)])   # ConfigError on a key the script does not have
    assert preset_keys <= config.keys()
    release = dict(padded=True, max_new_tokens=48, weight_decay=0.05, grad_clip=1.0, schedule="warmup_decay",
                   min_seconds=1.0, max_seconds=30.0, max_text_tokens=256, max_steps=0, dtype="bf16", seed=1)
    if script == "train_semantic.py":   # adapter only, KL at T = 2; 8 per GPU x 24 accumulation x 4 GPUs
        release.update(lr=1e-4, warmup_steps=1000, batch_size=768, grad_accum=24, epochs=1.0, kl_temperature=2.0)
    else:   # adapter + partial LoRA + head, CE + emotion loss summed, no head warm-up; 4 x 8 x 4 GPUs
        release.update(lr=2e-5, warmup_steps=200, batch_size=128, grad_accum=8, epochs=3.0, head_warmup_steps=0,
                       emotion_loss_weight=1.0, paper_prompts=True, lora_r=16, lora_alpha=16, lora_dropout=0.05)
    assert {k: config[k] for k in release} == release
    assert config["batch_size"] % (config["grad_accum"] * 4) == 0   # fits the release's 4 GPUs
    # its schedule over a run the size of the release's stage 1 (1.9 M pairs / 768 = 2473 steps): up to lr by
    # the end of the warmup, then linearly down to 0
    lr = [trainer.lr_at(s, config["lr"], config["min_lr"], config["warmup_steps"], 2473, config["schedule"])
          for s in (0, config["warmup_steps"] - 1, 2473)]
    assert lr == pytest.approx([0.0, config["lr"], 0.0])


@pytest.mark.parametrize("script,preset", [("train_semantic.py", "config/budget_1h_stage1.py"),
                                           ("train_emotion.py", "config/budget_1h_stage2.py")])
def test_budget_presets_change_only_settings_the_script_has(script, preset):
    """run.sh --budget=1h hands these to the scripts: every key must exist (else ConfigError) and move its default."""
    defaults, preset_keys = settings_and_preset(script, preset)
    before = dict(defaults)
    config = configure(defaults, [str(REPO / preset)])
    changed = {k for k in config if config[k] != before[k]}
    assert changed == preset_keys and {"max_steps", "max_new_tokens"} <= changed


def test_paper_presets_run_on_tiny_shapes(speech):
    """Both presets, as a GPU user runs them, with only the sizes overridden for tiny models: the filters drop
    what they should, the schedule is the release's, the runs record how they hear. Not a measurement."""
    tiny_sizes = ["--batch_size=4", "--grad_accum=1", "--warmup_steps=2", "--log_interval=1", "--eval_interval=0",
                  "--ckpt_interval=0", "--max_new_tokens=8", "--dtype=fp32", "--device=cpu"]
    s1, s2 = speech["root"] / "paper1", speech["root"] / "paper2"
    p = run(speech, "train_semantic.py", str(REPO / "config/paper_stage1.py"), f"--whisper={speech['whisper']}",
            f"--llm={speech['llm']}", f"--train_manifest={speech['train']}", f"--eval_manifest={speech['test']}",
            f"--out_dir={s1}", "--epochs=3.0", *tiny_sizes)
    assert p.returncode == 0, p.stderr[-3000:]
    # the clips last 0.6 to 1.2 s (k % 7 tenths over 0.6): under 1 s are dropped, 8 of the 20, 3 of the 6 kept
    assert f"{speech['train']}: 8 of 20 clips kept; dropped 12 under 1.0 s, 0 over 30.0 s" in p.stdout
    assert f"{speech['test']}: 3 of 6 clips kept; dropped 3 under 1.0 s" in p.stdout
    assert "'over 256 text tokens': 0" in p.stdout and "6 steps of 4 items (3.00 epochs)" in p.stdout
    want = [trainer.lr_at(s, 1e-4, 0.0, 2, 6, "warmup_decay") for s in range(6)]
    assert want == pytest.approx([0.0, 1e-4, 1e-4, 7.5e-5, 5e-5, 2.5e-5])
    assert [r["lr"] for r in log_rows(s1)] == pytest.approx(want)
    cfg = json.loads((s1 / "config.json").read_text())
    assert cfg["padded"] is True and cfg["schedule"] == "warmup_decay" and cfg["stage"] == "semantic"
    p = run(speech, "train_emotion.py", str(REPO / "config/paper_stage2.py"), f"--init_from={s1}",
            f"--train_manifest={speech['train']}", f"--eval_manifest={speech['test']}", f"--out_dir={s2}", *tiny_sizes)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "emotion head warm-up" not in p.stderr and "8 of 20 clips kept" in p.stdout
    assert [r["lr"] for r in log_rows(s2)] == pytest.approx([x / 5 for x in want])   # lr 2e-5
    cfg = json.loads((s2 / "config.json").read_text())
    assert cfg["padded"] is True and cfg["paper_prompts"] is True and cfg["lora"]["r"] == 16
    assert set(load_file(str(s2 / "model.safetensors"))) >= {"emotion_head.weight", "adapter.fc1.weight"}


def test_weight_decay_skips_biases_and_gains():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = trainer.adamw([w, b], lr=0.1, weight_decay=0.5)
    assert [(g["params"], g["weight_decay"]) for g in opt.param_groups] == [([w], 0.5), ([b], 0.0)]


def test_checkpoint_is_a_run_folder_and_resume_refuses_other_data(speech, tmp_path):
    from adapter import SpeechLM
    model = SpeechLM.from_run(speech["stage1"], device="cpu")
    trainable = model.trainable_parameters()
    opt = trainer.adamw(list(trainable.values()), lr=0.1, weight_decay=0.0)
    with torch.no_grad():
        trainable["adapter.fc1.weight"].add_(1.0)   # what training changed is what the checkpoint holds
    trainer.save_checkpoint(tmp_path, 3, model, opt, {**model.config, "lr": 0.1}, keep_last=0, n_items=20,
                            batch_size=4, elapsed=1.0)
    ckpt = trainer.last_checkpoint(tmp_path, resume=True)
    assert ckpt.name == "step_0000003"
    back = SpeechLM.from_run(str(ckpt), device="cpu")   # chat.py and evaluate.py read a checkpoint as a run
    assert back.config["lr"] == 0.1 and torch.equal(back.adapter.fc1.weight, trainable["adapter.fc1.weight"])
    assert trainer.start_or_resume(tmp_path, ckpt, model, opt, 0, n_items=20, batch_size=4) == (3, 1.0)
    # a checkpoint's place in the batch order means nothing for another item count or batch size
    with pytest.raises(ValueError, match="its place in the data"):
        trainer.start_or_resume(tmp_path, ckpt, model, opt, 0, n_items=24, batch_size=4)


def test_stage2_also_asks_how_the_speaker_feels(speech, tmp_path, monkeypatch):
    """Every ask_every-th clip comes twice: once for the continuation, once asked how the speaker feels, with the
    LLM's answer over the transcript (the emotion told) as its target; an answer that names another emotion goes."""
    import importlib

    import cache
    import evaluate
    from adapter import SpeechLM
    monkeypatch.chdir(speech["root"])
    monkeypatch.setattr(sys, "argv", ["train_emotion.py"])
    te = importlib.import_module("train_emotion")
    assert te.ask_every == 4 and te.ASK_EMOTION not in evaluate.SER_QUESTION   # the SER test asks in its own words
    prompts = []

    def targets(model, items, path, build_prompt, **_):   # stands in for the LLM: answers sad clips "happy"
        out = {}
        for n, it in enumerate(items):
            user = build_prompt(it)[-1]["content"]
            prompts.append(user)
            answer = "It sounds happy." if user.endswith("(said in a sad tone)") else f"Clearly {EMOTIONS[it['label']]}."
            it["target_key"] = str(n)
            out[str(n)] = {"key": str(n), "target": answer if user.startswith(te.ASK_EMOTION) else "A reply.",
                           "truncated": False}
        return out

    monkeypatch.setattr(cache, "make_targets", targets)
    model = SpeechLM.from_run(speech["stage1"], device="cpu")
    assert not any(it.get("ask") for it in te.load_items(model, speech["train"], 0, str(tmp_path)))   # held out
    prompts.clear()
    items = te.load_items(model, speech["train"], 0, str(tmp_path), ask=True)
    rows = cache.read_manifest(speech["train"])
    asked = [it for it in items if it.get("ask")]
    # clips 0, 4, 8, 12, 16 are asked; clip 8 is sad, its answer names happy and is dropped
    assert len(items) == 20 + 4 and [it["text"] for it in asked] == [rows[k]["text"] for k in (0, 4, 12, 16)]
    assert all(it["target"] == f"Clearly {EMOTIONS[it['label']]}." for it in asked)
    assert all(it["target"] == "A reply." for it in items if not it.get("ask"))
    assert sum(p.startswith(te.ASK_EMOTION) for p in prompts) == 5
    ask_ids = model.tok.encode(te.ASK_EMOTION.split("?")[0] + "?")

    def holds(ids, sub):
        return any(ids[i:i + len(sub)] == sub for i in range(len(ids)))
    assert all(holds(it["student"][0], ask_ids) == bool(it.get("ask")) for it in items)
    assert all(it["text"] not in model.tok.decode(it["student"][0]) for it in asked)   # the speech alone


def test_scripts_import_neither_the_model_here_nor_evaluate():
    def imported(name):
        tree = ast.parse((REPO / name).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    # trainer.py never imports the networks or their caches: it reaches a model only through its attributes
    assert not imported("trainer.py") & {"model", "adapter", "cache"}
    assert "evaluate" not in imported("train_semantic.py") | imported("train_emotion.py")


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
    with pytest.raises(ConfigError, match="lr expects float .* got bool True"):   # a bare flag sets only a bool
        configure(defaults(), ["--lr"])
    assert list(configure(defaults(), [])) == ["lr", "batch_size", "name", "resume", "betas", "init_from"]


def test_log_row_writes_and_prints(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    trainer.log_row(log, step=1, split="train", loss=1.0)
    assert capsys.readouterr().out == "step 1 train: loss 1\n"
    assert json.loads(log.read_text()) == {"step": 1, "split": "train", "loss": 1.0}


def test_atomic_write_keeps_the_old_file_when_a_write_dies(tmp_path):
    path = tmp_path / "feats.safetensors"
    path.write_bytes(b"old")

    def dies(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt   # a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        trainer.atomic_write(path, dies)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]
    trainer.atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == [path.name]
