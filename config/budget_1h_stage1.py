# Stage 1 of the shorter CPU recipe, `bash run.sh --budget=1h`: about half the default's time, for a first look.
# A third of the steps and of the recombined sentences, half the CTC warm-up, shorter targets. It still hears the
# words (content retrieval), the README's results table shows what it loses against the default.
max_new_tokens = 32
max_train = 400
max_ctc = 1000
ctc_steps = 200
max_steps = 50
