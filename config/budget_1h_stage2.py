# Stage 2 of the shorter CPU recipe, `bash run.sh --budget=1h` (see config/budget_1h_stage1.py): shorter targets,
# two thirds of the steps, a longer head warm-up (it runs no LLM, so it is cheap), 100 held-out clips for the eval loss.
max_new_tokens = 32
head_warmup_steps = 100
max_eval = 100
max_steps = 100
warmup_steps = 10
