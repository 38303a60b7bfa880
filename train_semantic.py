"""Stage 1, semantic alignment: the speech model learns to behave on speech as the LLM does on text.
The frozen LLM continues each transcript (the target); the LLM reading the transcript (teacher) and hearing the
speech through the adapter (student) should then give the same next-token distributions over the target: KL at
temperature 2. Only the adapter learns.

    python train_semantic.py --max_steps=1000 --batch_size=16 --llm=checkpoints/qwen2.5-0.5b-instruct
    torchrun --nproc_per_node=4 train_semantic.py --device=cuda --dtype=bf16
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
from adapter import SpeechLM, kl_loss
from configurator import configure
from data import CONTINUE, SPEECH, SYSTEM_PROMPT
from model import pick_device
from trainer import (adamw, all_reduce_grads, any_rank, bf16_autocast, due, end_distributed, evaluate,
                     init_distributed, last_checkpoint, log_row, lr_at, mean_over_ranks, micro_batches, peak_rss_gb,
                     plan, rank0_first, save_checkpoint, save_run, start_or_resume, stop_signal)

# ---- settings: python train_semantic.py --key=value overrides any of these ----
whisper = "checkpoints/whisper-base"
llm = "checkpoints/smollm2-135m-instruct"
train_manifest = "speech/asr_train.jsonl"
eval_manifest = "speech/asr_test.jsonl"
out_dir = "runs/semantic"
device = ""                 # "" picks cuda, then mps, then cpu
dtype = "auto"              # the frozen encoder and LLM: "auto" is bf16 where the device runs it fast, else fp32
padded = False              # encode clips padded to 30 s as the release does (slower, slightly different numbers)
max_new_tokens = 48         # target length
gen_batch_size = 128         # prompts per generation batch: larger matmuls, each target cheaper on a CPU
kl_temperature = 2.0
max_train = 0               # 0 = every clip in the manifest
max_eval = 48
min_seconds = 0.0           # drop clips shorter than this (0: keep all; the release: 1.0)
max_seconds = 0.0           # drop clips longer than this (0: cut to 30 s instead; the release: 30.0)
max_text_tokens = 0         # drop examples whose text side is longer (0: keep all; the release: 256)
# A CPU-scale addition, not in the paper: before the KL, a warm-up teaches the adapter to spell each transcript
# in the LLM's own token embeddings (CTC, no LLM run), on new sentences recombined from the training sentences'
# words (synth.recombine), so that it learns words, not 379 sentences. 0 steps: the paper's stage 1 alone.
ctc_manifest = "speech/asr_mix.jsonl"   # heard with train_manifest's clips; "": those alone
max_ctc = 0                 # only its first clips, each encoded once (0: all 3,000)
ctc_steps = 400
ctc_batch_size = 32
ctc_lr = 1e-3
# A second CPU-scale addition, also not in the paper: during the KL, the speech model also writes down what it hears
# (cross-entropy on the transcript after TRANSCRIBE) for asr_batch_size of those recombined sentences a step: the
# LLM's own reading of the speech then learns from 3,000 sentences, not 379. 0: the paper's KL alone.
asr_weight = 1.0
asr_batch_size = 8
# A third, also not in the paper: the adapter hears Whisper's first layer beside its last. whisper-base's last layer
# keeps little of the tone that voices of another speech engine share (a probe on its pooled frames: 54% on Piper's;
# on the first layer's, 85%). 0: the last layer alone, as the paper.
tone_layer = 1
# the loop: a CPU run sees ~1,200 pairs, not the release's 1.9M (batch 768): a higher lr, a shorter warmup
batch_size = 8
grad_accum = 1
max_steps = 150
epochs = 1.0                 # passes over the items, when max_steps = 0
lr = 1e-3                   # CPU recipe: 10x the release's 1e-4 (config/paper_stage1.py has the release's)
min_lr = 1e-4               # CPU recipe: cosine decay to this floor; the release decays linearly to 0
schedule = "cosine"         # or "warmup_decay", the release's (trainer.lr_at)
warmup_steps = 25
weight_decay = 0.05
grad_clip = 1.0
autocast = None             # bf16 autocast for the trainable weights; None: exactly when dtype is bf16
log_interval = 10
eval_interval = 50          # 0: only at the end (as for ckpt_interval)
ckpt_interval = 50
keep_last = 2               # checkpoints kept; 0: all
resume = False              # continue from the newest checkpoint in out_dir/checkpoints
seed = 0
config = configure(globals(), sys.argv[1:]) | {"stage": "semantic"}   # what chat.py reads to prompt it
# -------------------------------------------------------------------------------


def load_items(model, manifest, limit, run_dir):
    """Manifest rows -> items with encoder features, the LLM's continuation and both prompts."""
    rows = cache.drop_by_duration(cache.read_manifest(manifest)[:limit or None], min_seconds, max_seconds, manifest)
    rows, n_bad = rank0_first(lambda: cache.with_features(model, rows, padded))
    targets = rank0_first(lambda: cache.make_targets(
        model, rows, os.path.join(run_dir, "targets.jsonl"), lambda row: cache.continue_target_messages(row["text"]),
        max_new_tokens=max_new_tokens, batch_size=gen_batch_size))
    def examples(row, t):
        return {name: cache.make_example(model.tok, SYSTEM_PROMPT, parts, t["target"], t["truncated"])
                for name, parts in (("teacher", [CONTINUE + row["text"]]), ("student", [CONTINUE, SPEECH]))}
    return cache.training_items(rows, targets, examples, n_bad, manifest, max_text_tokens)


TRANSCRIBE = "Write down exactly what the speech says.\n\nSpeech: "


def losses(model, batch):
    with torch.no_grad():
        teacher = model.response_logits([b["teacher"] for b in batch])
    s = model.response_logits([b["student"] for b in batch], [b["feats"] for b in batch])
    kl = kl_loss(s["logits"], teacher["logits"], T=kl_temperature)
    return kl, {"kl": kl.item(), "ce": F.cross_entropy(s["logits"].float(), s["targets"]).item()}


def ctc_warmup(model, rows):
    """CTC between the adapter's frames and each transcript's tokens, the frames scored against the LLM's
    (tied) embedding table and a learnt blank. Only the tokens these transcripts use are scored: the other
    49k never appear as a target and would cost 40x the work."""
    ids = [model.tok.encode(" " + r["text"].strip()) for r in rows]
    vocab = sorted({t for row in ids for t in row})
    index = {t: i + 1 for i, t in enumerate(vocab)}            # 0: the blank
    table = model.decoder.embed_tokens.weight.detach()[vocab].float()
    spelled = [torch.tensor([index[t] for t in row], device=table.device) for row in ids]
    blank = torch.zeros(1, table.shape[1], device=table.device, requires_grad=True)
    params = list(model.adapter.parameters()) + [blank]
    opt = adamw(params, ctc_lr, weight_decay)
    g, history = torch.Generator().manual_seed(seed), []
    for step in (bar := tqdm(range(ctc_steps), desc="CTC warm-up", unit="step")):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, ctc_lr, ctc_lr / 10, 50, ctc_steps)
        batch = torch.randint(len(rows), (ctc_batch_size,), generator=g).tolist()
        frames, lengths = model.speech_embeds([rows[i]["feats"] for i in batch])
        logp = (frames.float() @ torch.cat([blank, table]).T).log_softmax(-1)
        targets = [spelled[i] for i in batch]
        loss = F.ctc_loss(logp.transpose(0, 1), torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]),
                          zero_infinity=True)   # a clip too short for its transcript adds nothing
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        history.append(loss.item())
        bar.set_postfix(ctc=f"{history[-1]:.3f}")
    return history[0], history[-1]


def main():
    rank, world, dev = init_distributed(pick_device(device or None))
    if asr_weight and asr_batch_size % (grad_accum * world):
        raise ValueError(f"asr_batch_size {asr_batch_size} must be a multiple of grad_accum {grad_accum} x {world} ranks")
    cache.check_manifests(train_manifest, eval_manifest, ctc_manifest if ctc_steps or asr_weight else None)
    ckpt = last_checkpoint(out_dir, resume)    # None: a fresh run
    torch.manual_seed(seed)                    # new weights start the same in every run
    model = SpeechLM.build(whisper, llm, device=dev, dtype=dtype, tone_layer=tone_layer)
    items = load_items(model, train_manifest, max_train, out_dir)
    held_out = load_items(model, eval_manifest, max_eval, out_dir) if eval_manifest else []
    params = list(model.trainable_parameters().values())   # the adapter
    opt = adamw(params, lr, weight_decay)
    bf16 = model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    ctx = bf16_autocast(dev, bf16 if autocast is None else autocast)
    steps = plan(len(items), batch_size, grad_accum, max_steps, epochs)
    ctc, spoken = (None, None), []
    if ctc_manifest and (ctc_steps or asr_weight):
        rows = cache.read_manifest(ctc_manifest)[:max_ctc or None]
        spoken = rank0_first(lambda: cache.with_features(model, rows, padded))[0]
    if ckpt is None and ctc_steps:   # before start_or_resume, which hands every rank rank 0's adapter
        ctc = ctc_warmup(model, spoken + items)
    spoken = [cache.make_example(model.tok, SYSTEM_PROMPT, [TRANSCRIBE, SPEECH], r["text"].strip()) + (r["feats"],)
              for r in spoken or items]   # (ids, labels, feats) of the transcription task
    step, elapsed = start_or_resume(out_dir, ckpt, model, opt, seed, n_items=len(items), batch_size=batch_size)
    log, summary_path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "summary.json")
    if ckpt is None and held_out:   # where the adapter starts from, kept for the summary
        start = evaluate(model, losses, held_out, batch_size, ctx)
        if rank == 0:
            log_row(log, step=0, split="eval", **start)
            with open(summary_path, "w") as f:
                json.dump({"ctc_start": ctc[0], "ctc_end": ctc[1], "kl_start": start["kl"], "ce_start": start["ce"]}, f)

    stop, t0 = stop_signal(), time.time() - elapsed   # elapsed counts across resumes
    sums, n, last_eval = defaultdict(float), 0, {}
    model.train()
    while step < steps:
        lr_now = lr_at(step, lr, min_lr, warmup_steps, steps, schedule)
        for group in opt.param_groups:
            group["lr"] = lr_now
        heard = micro_batches(step, len(spoken), asr_batch_size, grad_accum, seed) if asr_weight else []
        for m, idx in enumerate(micro_batches(step, len(items), batch_size, grad_accum, seed)):
            with ctx:
                loss, stats = losses(model, [items[i] for i in idx])
                if asr_weight:
                    ids, labels, feats = zip(*[spoken[i] for i in heard[m]])
                    s = model.response_logits(list(zip(ids, labels)), feats)
                    asr = F.cross_entropy(s["logits"].float(), s["targets"])
                    loss, stats["asr"] = loss + asr_weight * asr, asr.item()
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
        summary = {**(json.load(open(summary_path)) if os.path.exists(summary_path) else {}), "steps": step,
                   "kl_end": last_eval.get("kl"), "ce_end": last_eval.get("ce"), "peak_rss_gb": peak_rss_gb()}
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"summary: {summary}; wrote {out_dir}/model.safetensors")
    end_distributed()


if __name__ == "__main__":
    main()
