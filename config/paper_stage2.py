# Stage 2 as the authors trained BLSP-Emo: the settings of the release's stage-2 script and its DeepSpeed config.
#
#   torchrun --nproc_per_node=4 train_emotion.py config/paper_stage2.py --train_manifest=ser.jsonl \
#       --eval_manifest=ser_dev.jsonl    # with --no-speech there is no default speech/emo_test.jsonl
#
# What trains: the adapter, partial LoRA (r 16, alpha 16, dropout 0.05 on every Qwen projection, at the speech
# positions only) and the emotion head, on the continuation's cross-entropy plus the head's, summed; no head
# warm-up. The targets come from the release's emotion-aware continuation prompt. Not measured here: no GPU has
# run this preset.
init_from = "runs/paper_stage1"
out_dir = "runs/paper_stage2"
dtype = "bf16"              # --bf16 True
padded = True               # its feature extractor pads every clip to 30 s; the encoder attends over the padding
paper_prompts = True        # the release's continuation prompts, for the targets and for the speech turn
max_new_tokens = 48         # greedy continuations of at most 48 tokens are the targets
gen_batch_size = 32         # a 7B LLM's keys and values for 128 prompts: up to about 20 GB of the GPU
emotion_loss_weight = 1.0   # input_er + response_ce
lora_r = 16
lora_alpha = 16
lora_dropout = 0.05
head_warmup_steps = 0
ask_every = 0               # only the continuation: no clip is asked how the speaker feels
min_seconds = 1.0           # clips under 1 s dropped
max_seconds = 30.0          # and over 30 s
max_text_tokens = 256       # examples over 256 text tokens dropped (prompt with the label, transcript, target)
lr = 2e-5
schedule = "warmup_decay"   # DeepSpeed WarmupDecayLR: warmup from 0 (log-shaped, its default), then linear to 0
min_lr = 0.0                # unused by warmup_decay
warmup_steps = 200
batch_size = 128            # 4 per GPU x 8 accumulation steps x 4 GPUs
grad_accum = 8              # the micro-batch is 128 / (8 x GPUs): 4 on 4 GPUs; raise it on fewer
max_steps = 0               # 0: `epochs` passes over the data
epochs = 3.0
weight_decay = 0.05
grad_clip = 1.0
log_interval = 20
ckpt_interval = 500
seed = 1
