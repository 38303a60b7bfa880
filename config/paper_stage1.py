# Stage 1 as the authors trained BLSP-Emo: the settings of the release's stage-1 script and its DeepSpeed config.
#
#   python scripts/prepare.py --whisper=PATH/whisper-large-v2 --llm=PATH/Qwen-7B-Chat --no-speech
#   torchrun --nproc_per_node=4 train_semantic.py config/paper_stage1.py --train_manifest=asr.jsonl \
#       --eval_manifest=asr_dev.jsonl    # with --no-speech there is no default speech/asr_test.jsonl
#
# prepare.py links the Whisper folder and converts Qwen-1 (model.py reads Qwen2's names) once into
# checkpoints/Qwen-7B-Chat, the llm below.
#
# What trains: the adapter only (Whisper and the LLM frozen), on the KL at T = 2 between the LLM reading the
# transcript and hearing the speech. Not measured here: no GPU has run this preset.
whisper = "checkpoints/whisper-large-v2"
llm = "checkpoints/Qwen-7B-Chat"
out_dir = "runs/paper_stage1"
dtype = "bf16"              # --bf16 True
padded = True               # its feature extractor pads every clip to 30 s; the encoder attends over the padding
max_new_tokens = 48         # greedy continuations of at most 48 tokens are the targets
gen_batch_size = 32         # a 7B LLM's keys and values for 128 prompts: up to about 20 GB of the GPU
kl_temperature = 2.0
min_seconds = 1.0           # clips under 1 s dropped
max_seconds = 30.0          # and over 30 s
max_text_tokens = 256       # examples over 256 text tokens dropped (prompt, transcript, target)
lr = 1e-4
schedule = "warmup_decay"   # DeepSpeed WarmupDecayLR: warmup from 0 (log-shaped, its default), then linear to 0
min_lr = 0.0                # unused by warmup_decay
warmup_steps = 1000
batch_size = 768            # 8 per GPU x 24 accumulation steps x 4 GPUs
grad_accum = 24             # the micro-batch is 768 / (24 x GPUs): 8 on 4 GPUs; raise it on fewer
max_steps = 0               # 0: `epochs` passes over the data
epochs = 1.0
weight_decay = 0.05
grad_clip = 1.0
log_interval = 20
ckpt_interval = 200
seed = 1
ctc_steps = 0               # the paper has no warm-up
asr_weight = 0.0            # nor a transcription loss
tone_layer = 0              # and its adapter hears the encoder's last layer alone
