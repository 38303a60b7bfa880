# The fast end-to-end smoke test (issue 9): run.sh's command path -- synthesized speech, train_semantic.py,
# train_emotion.py, evaluate.py, chat.py -- as subprocesses, on tiny random weights and a tiny synthesized
# set, then every report field checked present and sane. Plus: on a tiny config the stage-1 adapter can
# really fit (the KL on its training items falls by a large factor), in-process.
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cache
import data
import synth
import tiny
from adapter import SpeechLM, kl_loss
from trainer import adamw, lr_at, micro_batches

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread():
    # a model this small runs faster on one thread than on two when the CPU is shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def script(cwd, name, *args):
    """python <repo>/<name> args, in cwd: the scripts' caches (.cache/features) land in cwd, not the repo."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    t = time.time()
    p = subprocess.run([sys.executable, str(REPO / name), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr
    print(f"TIMING {name} {time.time() - t:.1f}s")
    return p


def test_end_to_end_smoke(tmp_path):
    t0 = time.time()
    speech = tmp_path / "speech"
    sets = synth.make_speech(str(speech), n_asr_train=16, n_asr_test=8, n_emo_train=20, n_emo_test_sentences=2,
                             n_asr_mix=8, workers=2, real=False, progress=False)
    # "real" human clips: a stand-in manifest in the same format (fetching LibriVox is not a unit test's job)
    real = speech / "real.jsonl"
    real.write_text("".join(json.dumps(dict(json.loads(ln), source="stand-in")) + "\n"
                            for ln in open(sets["asr_test"]).readlines()[:2]))
    models = tiny.make_models(tmp_path / "checkpoints")
    runs = tmp_path / "runs"
    tiny_loop = ["--max_new_tokens=8", "--batch_size=4", "--warmup_steps=2", "--log_interval=2", "--dtype=bf16"]

    script(tmp_path, "train_semantic.py", f"--whisper={models['whisper']}", f"--llm={models['llm']}",
           f"--train_manifest={sets['asr_train']}", f"--eval_manifest={sets['asr_test']}",
           f"--out_dir={runs / 'semantic'}", "--max_steps=8", "--eval_interval=4", "--ckpt_interval=4",
           "--max_eval=8", "--lr=3e-3", f"--ctc_manifest={sets['asr_mix']}", "--ctc_steps=4", "--ctc_batch_size=4",
           "--max_ctc=4", "--asr_batch_size=4", "--asr_weight=0.1", *tiny_loop)   # a light transcription loss: the KL must still fall
    script(tmp_path, "train_emotion.py", f"--init_from={runs / 'semantic'}", f"--train_manifest={sets['emo_train']}",
           f"--eval_manifest={sets['emo_test']}", f"--out_dir={runs / 'emotion'}", "--max_steps=6",
           "--eval_interval=3", "--ckpt_interval=3", "--lora_r=4", "--lora_alpha=8", *tiny_loop)
    ev = script(tmp_path, "evaluate.py", f"--stage1={runs / 'semantic'}", f"--stage2={runs / 'emotion'}",
                f"--out={runs / 'demo'}", f"--asr_manifest={sets['asr_test']}", f"--real_manifest={real}",
                f"--emo_manifest={sets['emo_test']}", f"--started={int(t0)}")
    clip = json.loads(open(sets["emo_test"]).readline())["audio"]
    chat = script(tmp_path, "chat.py", clip, f"--ckpt={runs / 'emotion'}", "--ser", "--max_new_tokens=6")
    elapsed = time.time() - t0

    # the run folders
    for stage, n_items in (("semantic", 16), ("emotion", 20)):
        d = runs / stage
        for f in ("model.safetensors", "config.json", "targets.jsonl", "log.jsonl", "summary.json"):
            assert (d / f).is_file(), (stage, f)
        assert (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir())
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["stage"] == stage and cfg["adapter"]["d_enc"] == 16 and cfg["adapter"]["d_llm"] == 32
        assert cfg["num_emotions"] == (5 if stage == "emotion" else 0) and (cfg["lora"] is None) == (stage == "semantic")
        targets = [json.loads(ln) for ln in (d / "targets.jsonl").read_text().splitlines()]
        assert len(targets) >= n_items and all(t["target"] for t in targets)
    # encoder features were cached under the cwd (tmp_path), one file per distinct clip
    feats = list((tmp_path / ".cache" / "features").glob("*.safetensors"))
    # + flite: one per emo_train row; + the first 4 of the 8 asr_mix clips (--max_ctc); + emo_other: the 2 test
    # sentences x 5 by the other engine
    assert len(feats) == 16 + 8 + 20 + 20 + 20 + 4 + 10

    # the report: every field present and sane
    r = json.loads((runs / "demo" / "report.json").read_text())
    for k in ("kl_start", "kl_end"):
        assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert r["kl_end"] < r["kl_start"]                 # 8 steps at a high rate already bring it down
    for k in ("ser_head_acc", "ser_text_acc", "ser_text_acc_stage1", "ser_text_oracle", "tone_differ",
              "head_acc_other_engine", "distinct_replies", "ser_closed_acc", "ser_closed_acc_stage1",
              "ser_closed_ceiling", "ser_closed_calibrated", "ser_closed_calibrated_stage1",
              "ser_closed_calibrated_ceiling", "content_acc", "content_acc_floor", "content_acc_ceiling", "distinct_replies_ceiling"):
        assert isinstance(r[k], (int, float)) and 0.0 <= r[k] <= 1.0, (k, r[k])
    # accuracies are fractions of the 20 held-out clips; the tone table has both held-out sentences
    assert all(round(r[k] * 20, 6) == int(round(r[k] * 20)) for k in ("ser_head_acc", "ser_text_acc", "ser_text_acc_stage1",
                                                                   "ser_text_oracle"))
    assert round(r["head_acc_other_engine"] * 10, 6) == int(round(r["head_acc_other_engine"] * 10))   # of 10 clips
    for k in ("fit_gap", "fit_gap_stage1", "fit_gap_ceiling"):
        assert isinstance(r[k], float) and -2.0 <= r[k] <= 2.0, (k, r[k])
    assert len(r["tone"]) == 2 and round(r["tone_differ"] * 2, 6) in (0.0, 1.0, 2.0)
    assert sum(map(sum, r["ser_confusion"])) == 20 and set(r["ser_recall"]) == set(data.EMOTIONS)
    assert 0 < r["wall_s"] <= elapsed + 1 and r["wall_s"] >= r["eval_s"]   # --started: the whole run
    assert 0 < r["peak_rss_gb"] < 8
    assert r["cpu"] == torch.backends.cpu.get_cpu_capability() and r["dtype"] in ("float32", "bfloat16")
    sets_seen = {s["set"] for s in r["stage1_side_by_side"]}
    assert sets_seen == {"real.jsonl", "asr_test.jsonl"} and len(r["stage1_side_by_side"]) == 2 + 6
    md = (runs / "demo" / "report.md").read_text()
    assert all((runs / "demo" / f"{s}_loss.png").stat().st_size > 1000 for s in ("semantic", "emotion"))
    assert f"{r['kl_start']:.3f} at step 0 -> {r['kl_end']:.3f}" in md and "same words, different tone" in md
    assert (runs / "demo" / "confusion.png").is_file()
    assert "free-text accuracy" in ev.stdout and "the LLM told the emotion in words" in ev.stdout

    # chat.py on a held-out clip with the stage-2 run
    head, reply = chat.stdout.split("\n", 1)
    assert head.startswith("emotion head: ") and reply.strip()


def test_stage1_adapter_fits_its_training_items(tmp_path, one_thread):
    """The student (speech through the adapter) can learn to match the teacher (the transcript as text):
    on 8 items with random encoder features, 80 steps bring the KL on those items down >= 5x."""
    m = tiny.make_models(tmp_path / "models")
    torch.manual_seed(0)
    lm = SpeechLM.build(m["whisper"], m["llm"], device="cpu", dtype="fp32", adapter=dict(inner_dim=32))
    texts = ["the cat sat on the mat", "hello world", "the mat sat", "a cat", "hello the cat sat on",
             "world on the mat", "sat sat hello", "the world"]
    targets = ["on the mat.", "hello cat.", "the cat sat on the mat.", "hello world.", "the world.", "a mat.",
               "cat.", "on the hello."]
    g = torch.Generator().manual_seed(1)
    items = [dict(teacher=cache.make_example(lm.tok, data.SYSTEM_PROMPT, [data.CONTINUE + x], y),
                  student=cache.make_example(lm.tok, data.SYSTEM_PROMPT, [data.CONTINUE, data.SPEECH], y),
                  feats=torch.randn(30 + 7 * k, 16, generator=g)) for k, (x, y) in enumerate(zip(texts, targets))]

    def loss_fn(batch):   # train_semantic.losses, without the script's globals
        with torch.no_grad():
            teacher = lm.response_logits([b["teacher"] for b in batch])
        s = lm.response_logits([b["student"] for b in batch], [b["feats"] for b in batch])
        kl = kl_loss(s["logits"], teacher["logits"])
        return kl, {"kl": kl.item()}

    def kl_all():
        with torch.no_grad():
            return loss_fn(items)[1]["kl"]

    start = kl_all()
    params = list(lm.trainable_parameters().values())
    opt = adamw(params, lr=1e-2, weight_decay=0.0)
    for step in range(80):   # the scripts' loop, less its logging and checkpoints
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-2, 1e-3, 10, 80)
        loss_fn([items[i] for i in micro_batches(step, len(items), 4, 1, seed=0)[0]])[0].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = kl_all()
    assert start > 0.05, start                         # the teacher is far from the untrained student
    assert end < start / 5, (start, end)
