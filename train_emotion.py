"""Stage 2, emotion alignment: the model learns to hear *how* something is said.
The frozen LLM, told the transcript and its emotion label, writes an emotion-aware reply (the target). The speech
model learns to give that reply from the speech alone, so both words and emotion must be heard. Loss = CE on the
target + the emotion head's CE. Trainable: adapter, emotion head, partial LoRA (at the speech positions only).

    python train_emotion.py --map="{'excited': 'happy', 'frustrated': 'angry'}"   # from runs/semantic
"""
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cache
from adapter import SpeechLM
from configurator import configure
from data import CONTINUE_HEARD_EMOTION, EMOTION_SYSTEM_PROMPT, EMOTIONS, SPEECH
from model import pick_device
from trainer import (adamw, all_reduce_grads, any_rank, bf16_autocast, due, end_distributed, evaluate,
                     init_distributed, last_checkpoint, log_row, lr_at, mean_over_ranks, micro_batches, peak_rss_gb,
                     plan, rank0_first, save_checkpoint, save_run, start_or_resume, stop_signal)

# ---- settings: python train_emotion.py --key=value overrides any of these ----
init_from = "runs/semantic"     # the stage-1 run (its adapter, encoder and LLM)
train_manifest = "speech/emo_train.jsonl"
eval_manifest = "speech/emo_test.jsonl"
out_dir = "runs/emotion"
map = {}                        # fold a dataset's labels into the five, e.g. {"excited": "happy"}
device = ""
dtype = "auto"                  # bf16 where the device runs it fast, else fp32 (model.pick_dtype)
padded = None                   # None: as the init_from run hears (a converted release: padded to 30 s)
max_new_tokens = 48
gen_batch_size = 128             # prompts per generation batch: larger matmuls, each target cheaper on a CPU
emotion_loss_weight = 1.0       # the paper: an unweighted sum; 0 trains on the continuation alone
paper_prompts = False           # True: the release's continuation prompts (cache.emotion_target_messages says why not)
lora_r = 16
lora_alpha = 16
lora_dropout = 0.05
min_seconds = 0.0               # drop clips shorter than this (0: keep all; the release: 1.0)
max_seconds = 0.0               # drop clips longer than this (0: cut to 30 s instead; the release: 30.0)
max_text_tokens = 0             # drop examples whose text side is longer (0: keep all; the release: 256)
# CPU-scale addition, not in the paper: every ask_every-th clip is also asked how the speaker feels, in other words
# than evaluate.py's SER question; the target is the LLM's answer over the transcript, the emotion told (<= 0: none)
ask_every = 4
# Steps of the emotion loss alone (adapter + head on cached features, batches of 32, no LLM) before the joint loop
head_warmup_steps = 80          # CPU recipe: 2,560 clips drawn from both engines (espeak, flite); the release: 0
head_warmup_lr = 1e-3
max_train = 0
max_eval = 0
# the loop: the release used lr 2e-5, 200 warmup steps, batch 128, 3 epochs on ~70k utterances
batch_size = 8
grad_accum = 1
max_steps = 150
epochs = 1.0                    # passes over the items, when max_steps = 0
lr = 5e-4                       # CPU recipe: 25x the release's 2e-5 (config/paper_stage2.py has the release's)
min_lr = 5e-5                   # CPU recipe: cosine decay to this floor; the release decays linearly to 0
schedule = "cosine"             # or "warmup_decay", the release's (trainer.lr_at)
warmup_steps = 20
weight_decay = 0.05
grad_clip = 1.0
autocast = None                 # bf16 autocast for the trainable weights; None: exactly when dtype is bf16
log_interval = 10
eval_interval = 50              # 0: only at the end (as for ckpt_interval)
ckpt_interval = 50
keep_last = 2                   # checkpoints kept; 0: all
resume = False                  # continue from the newest checkpoint in out_dir/checkpoints
seed = 0
config = configure(globals(), sys.argv[1:])
# -------------------------------------------------------------------------------


ASK_EMOTION = "How does the speaker feel? Answer with one word: happy, sad, angry, surprised or neutral.\n\n"


def prompt_for_target(item):
    if item.get("ask"):
        return [{"role": "system", "content": EMOTION_SYSTEM_PROMPT},
                {"role": "user", "content": ASK_EMOTION + cache.told(item)}]
    return cache.emotion_target_messages(item["text"], EMOTIONS[item["label"]], paper=paper_prompts)


def load_items(model, manifest, limit, run_dir, ask=False):
    """Manifest rows -> items with their label, encoder features and the LLM's target; ask: and the asked clips."""
    rows = cache.drop_by_duration(cache.read_manifest(manifest)[:limit or None], min_seconds, max_seconds, manifest)
    for n, r in enumerate(rows, 1):
        r["label"] = cache.emotion_label(r["emotion"], map, f"{manifest}:{n}")
    ask = ask and ask_every > 0
    rows += [dict(r, ask=True) for r in rows[::ask_every]] if ask else []
    rows, n_bad = rank0_first(lambda: cache.with_features(model, rows))   # padded as model.config says
    targets = rank0_first(lambda: cache.make_targets(model, rows, os.path.join(run_dir, "targets.jsonl"),
                                                     prompt_for_target, max_new_tokens=max_new_tokens,
                                                     batch_size=gen_batch_size))
    def named(r):   # an answer that names another emotion first, or none, would teach the wrong one
        return cache.extract_label(targets[r["target_key"]]["target"]) == EMOTIONS[r["label"]]
    kept = [r for r in rows if not r.get("ask") or named(r)]
    if ask:
        print(f"{manifest}: {len(rows) - len(kept)} answers to how the speaker feels dropped (another emotion or none)")
    rows = kept
    def examples(row, t):
        system, user = (m["content"] for m in prompt_for_target(row))   # what the LLM read to write the target
        heard = ([ASK_EMOTION, SPEECH] if row.get("ask") else   # neither the words nor the label
                 [CONTINUE_HEARD_EMOTION, SPEECH] if paper_prompts else [SPEECH])
        return dict(teacher=cache.make_example(model.tok, system, [user], t["target"], t["truncated"]),
                    student=cache.make_example(model.tok, EMOTION_SYSTEM_PROMPT, heard, t["target"], t["truncated"]))
    return cache.training_items(rows, targets, examples, n_bad, manifest, max_text_tokens)


def head_loss(model, embeds, lengths, batch):
    """The emotion head's loss and accuracy on the adapter output."""
    logits = model.emotion_logits(embeds, lengths)
    labels = torch.tensor([b["label"] for b in batch], device=logits.device)
    return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean().item()


def losses(model, batch):
    s = model.response_logits([b["student"] for b in batch], [b["feats"] for b in batch])
    ce = F.cross_entropy(s["logits"].float(), s["targets"])   # the release's response_ce
    emo, acc = head_loss(model, s["embeds"], s["lengths"], batch)
    return ce + emotion_loss_weight * emo, {"ce": ce.item(), "emotion": emo.item(), "head_acc": acc}


def warm_up_head(model, items):
    """The emotion loss alone on the adapter output: cheap, since the LLM is not run at all."""
    named = {n: p for n, p in model.trainable_parameters().items() if n.startswith(("adapter.", "emotion_head."))}
    opt = torch.optim.AdamW(named.values(), lr=head_warmup_lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(head_warmup_steps), desc="emotion head warm-up", unit="step")
    for step in bar:
        batch = [items[i] for i in torch.randint(len(items), (32,), generator=g).tolist()]
        loss, acc = head_loss(model, *model.speech_embeds([b["feats"] for b in batch]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(named.values(), grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")


def main():
    cache.check_manifests(train_manifest, eval_manifest)
    rank, _, dev = init_distributed(pick_device(device or None))
    ckpt = last_checkpoint(out_dir, resume)    # None: a fresh run
    torch.manual_seed(seed)                    # new weights start the same in every run
    model = SpeechLM.from_run(init_from, device=dev, dtype=dtype)
    model.start_stage2(lora=dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout), num_emotions=len(EMOTIONS))
    config["padded"] = model.config["padded"] = model.padded if padded is None else padded
    config.update(stage="emotion", whisper=model.config["whisper"], llm=model.config["llm"])   # the run's folders
    items = load_items(model, train_manifest, max_train, out_dir, ask=True)
    held_out = load_items(model, eval_manifest, max_eval, out_dir) if eval_manifest else []   # the paper's task
    params = list(model.trainable_parameters().values())   # adapter, emotion head, LoRA
    opt = adamw(params, lr, weight_decay)
    bf16 = model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    ctx = bf16_autocast(dev, bf16 if autocast is None else autocast)
    steps = plan(len(items), batch_size, grad_accum, max_steps, epochs)
    if ckpt is None and head_warmup_steps:
        warm_up_head(model, items)   # a resumed run finds the warmed-up weights in its checkpoint
    step, elapsed = start_or_resume(out_dir, ckpt, model, opt, seed, n_items=len(items), batch_size=batch_size)
    log = os.path.join(out_dir, "log.jsonl")

    stop, t0 = stop_signal(), time.time() - elapsed   # elapsed counts across resumes
    sums, n, last_eval = defaultdict(float), 0, {}
    model.train()
    while step < steps:
        lr_now = lr_at(step, lr, min_lr, warmup_steps, steps, schedule)
        for group in opt.param_groups:
            group["lr"] = lr_now
        for idx in micro_batches(step, len(items), batch_size, grad_accum, seed):
            with ctx:
                loss, stats = losses(model, [items[i] for i in idx])
            (loss / grad_accum).backward()   # summed over the micro-steps: the gradient of their mean loss
            for k, v in {"loss": loss.item(), **stats}.items():
                sums[k] += v / grad_accum
        all_reduce_grads(params)             # under torchrun: the mean over ranks, as one process would have
        if grad_clip > 0:
            sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, n = step + 1, n + 1

        if due(step, log_interval, steps):
            row, sums, n = mean_over_ranks(sums, n), defaultdict(float), 0
            log_row(log, step=step, split="train", lr=lr_now, **row, elapsed=round(time.time() - t0, 3))
        if held_out and due(step, eval_interval, steps):
            last_eval = evaluate(model, losses, held_out, batch_size, ctx)
            log_row(log, step=step, split="eval", **last_eval, elapsed=round(time.time() - t0, 3))
        stopping = any_rank(stop.is_set())   # Ctrl-C: every rank saves this step, then stops
        if stopping or due(step, ckpt_interval, steps):
            save_checkpoint(out_dir, step, model, opt, config, keep_last, n_items=len(items),
                            batch_size=batch_size, elapsed=time.time() - t0)
        if stopping:
            raise KeyboardInterrupt(f"stopped at step {step}, checkpoint saved: rerun with --resume")

    if rank == 0:
        save_run(model, out_dir, config)
        summary = {"steps": step, **{f"eval_{k}": v for k, v in last_eval.items()}, "peak_rss_gb": peak_rss_gb()}
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"summary: {summary}; wrote {out_dir}/model.safetensors")
    end_distributed()


if __name__ == "__main__":
    main()
