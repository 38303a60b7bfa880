"""Stage 2, emotion alignment (DESIGN.md): the model learns to hear *how* something is said.

The frozen LLM, told the transcript and its emotion label, writes an emotion-aware continuation (the
target). The speech model then learns to produce that continuation from the speech alone: the label is
not in its prompt, so it must be heard. Loss = cross-entropy on the target + an emotion head's
cross-entropy on the pooled adapter output. Trainable: adapter, emotion head, and partial LoRA (the
LoRA delta applies only at the speech positions, so the LLM's text behaviour is untouched).

    python train_emotion.py                                   # from runs/semantic, on speech/emo_*.jsonl
    python train_emotion.py --map="{'excited': 'happy', 'frustrated': 'angry'}"
    python train_emotion.py --eval_only --init_from=runs/emotion   # SER accuracy of a trained run
"""
import json
import os
import sys

import torch
from tqdm import tqdm

import cache
import evaluate as ev
from adapter import SpeechLM, ce_loss, emotion_loss
from configurator import configure
from data import (EMOTION_SYSTEM_PROMPT, EMOTIONS, emotion_label, emotion_student_parts, emotion_target_messages,
                  make_example, read_manifest)
from trainer import TrainConfig, init_distributed, rank0_first, train

# ---- settings: python train_emotion.py --key=value overrides any of these ----
init_from = "runs/semantic"     # the stage-1 run (its adapter, encoder and LLM)
train_manifest = "speech/emo_train.jsonl"
eval_manifest = "speech/emo_test.jsonl"
out_dir = "runs/emotion"
map = {}                        # fold a dataset's labels into the five, e.g. {"excited": "happy"}
device = ""
dtype = "auto"              # bf16 where the device runs it fast, else fp32 (model.pick_dtype)
padded = False
max_new_tokens = 48
gen_batch_size = 32
emotion_loss_weight = 1.0       # the paper: an unweighted sum; 0 trains on the continuation alone
paper_prompts = False           # True: the release's continuation prompts (data.emotion_target_messages says why not)
lora_r = 16
lora_alpha = 16
lora_dropout = 0.05
# CPU recipe: steps of the emotion loss alone (adapter + head on cached features, batches of 32, no LLM:
# about 2.5 s each on 2 cores) before the joint loop, so the head has seen 1,280 clips before the joint
# loop's first step (measured: train accuracy 0.94 after 25 steps, 1.00 by 150). 0 = the paper's recipe exactly.
head_warmup_steps = 40
head_warmup_lr = 1e-3
max_train = 0
max_eval = 0
eval_only = False
# the loop: the release used lr 2e-5, 200 warmup steps, batch 128, 3 epochs on ~70k utterances;
# a CPU run has ~1,000 clips and a few hundred steps.
batch_size = 8
grad_accum = 1
max_steps = 150
epochs = 1.0
lr = 5e-4
min_lr = 5e-5
warmup_steps = 20
weight_decay = 0.05
grad_clip = 1.0
autocast = None             # bf16 autocast for the trainable weights; None: exactly when dtype is bf16
log_interval = 10
eval_interval = 50
ckpt_interval = 50
keep_last = 2
resume = False
seed = 0
config = configure(globals(), sys.argv[1:])
# -------------------------------------------------------------------------------


def prompt_for_target(item):
    return emotion_target_messages(item["text"], EMOTIONS[item["label"]], paper=paper_prompts)


def load_items(model, manifest, limit, run_dir, with_targets=True):
    """Manifest rows -> items with their label, encoder features and (for training) the LLM's target."""
    rows = read_manifest(manifest)[:limit or None]
    for n, r in enumerate(rows, 1):
        r["label"] = emotion_label(r["emotion"], map, f"{manifest}:{n}")
    rows, n_bad = rank0_first(lambda: cache.with_features(model, rows, padded))
    if not with_targets:
        return rows
    targets = rank0_first(lambda: cache.make_targets(
        model.decoder, model.tok, rows, os.path.join(run_dir, "targets.jsonl"), prompt_for_target,
        max_new_tokens=max_new_tokens, batch_size=gen_batch_size, device=model.decoder.tok_embeddings.weight.device))
    def examples(row, t):
        return dict(student=make_example(model.tok, EMOTION_SYSTEM_PROMPT, emotion_student_parts(paper_prompts),
                                         t["target"], t["truncated"]))
    return cache.training_items(rows, targets, examples, n_bad, manifest)


def losses(model, batch):
    s = model.speech_logits([b["student"] for b in batch], [b["feats"] for b in batch])
    ce = ce_loss(s["logits"], s["targets"])
    emo_logits = model.emotion_logits(s["embeds"], s["lengths"])
    labels = torch.tensor([b["label"] for b in batch], device=emo_logits.device)
    emo = emotion_loss(emo_logits, labels)
    acc = (emo_logits.argmax(-1) == labels).float().mean().item()
    return ce + emotion_loss_weight * emo, {"ce": ce.item(), "emotion": emo.item(), "head_acc": acc}


def warm_up_head(model, items):
    """The emotion loss alone on the adapter output: cheap, since the LLM is not run at all."""
    named = {n: p for n, p in model.trainable_parameters().items() if n.startswith(("adapter.", "emotion_head."))}
    opt = torch.optim.AdamW(named.values(), lr=head_warmup_lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(head_warmup_steps), desc="emotion head warm-up", unit="step")
    for step in bar:
        batch = [items[i] for i in torch.randint(len(items), (32,), generator=g).tolist()]
        emb, lengths = model.speech_embeds([b["feats"] for b in batch])
        logits = model.emotion_logits(emb, lengths)
        labels = torch.tensor([b["label"] for b in batch], device=logits.device)
        loss = emotion_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(named.values(), grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(logits.argmax(-1) == labels).float().mean():.2f}")


def main():
    rank, world, dev = init_distributed(device or None)
    if eval_only:
        model = SpeechLM.from_run(init_from, device=dev, dtype=dtype)
        items = load_items(model, eval_manifest, max_eval, init_from, with_targets=False)
        res = ev.ser_eval(model, items)
        ev.print_ser(res, f"SER on {eval_manifest} ({init_from})")
        return
    model = SpeechLM.from_run(init_from, device=dev, dtype=dtype)
    model.start_stage2(lora=dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout), num_emotions=len(EMOTIONS))
    model.freeze_base()
    items = load_items(model, train_manifest, max_train, out_dir)
    held_out = load_items(model, eval_manifest, max_eval, out_dir) if eval_manifest else []

    def evaluate():
        stats = [losses(model, held_out[i:i + batch_size])[1] for i in range(0, len(held_out), batch_size)]
        return {k: sum(s[k] for s in stats) / max(len(stats), 1) for k in ("ce", "emotion", "head_acc")}

    cfg = TrainConfig.from_dict({**config, "run_dir": out_dir,
                                 "autocast": model.dtype == torch.bfloat16 if autocast is None else autocast})
    if head_warmup_steps and not (resume and os.path.isdir(os.path.join(out_dir, "checkpoints"))):
        warm_up_head(model, items)   # a resumed run restores the warmed-up weights from its checkpoint
    result = train(model, lambda b: losses(model, b), items, cfg, eval_fn=evaluate if held_out else None,
                   trainable=model.trainable_parameters().items(), run_config=config)
    if rank == 0:
        model.save_run(out_dir, {**config, "stage": "emotion", "whisper": model.config["whisper"],
                                 "llm": model.config["llm"]})
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({"steps": result["step"], **{f"eval_{k}": v for k, v in result["eval"].items()},
                       "peak_rss_gb": ev.peak_rss_gb()}, f, indent=2)
        print(f"held-out: {result['eval']}; wrote {out_dir}/model.safetensors")


if __name__ == "__main__":
    main()
