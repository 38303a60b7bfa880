"""The speech side of BLSP-Emo and the whole model: wav -> WhisperEncoder -> Adapter (x8 shorter, d_enc ->
d_llm) -> embeddings spliced into the chat prompt at the SPEECH slot -> Decoder, with partial LoRA on the
speech positions and an emotion head on the pooled adapter output. Follows the authors' release
(cwang621/blsp-emo: src/modeling_adapter.py, src/plora.py, src/modeling_blsp2.py); where we differ, the
comment says why."""
import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
from model import Decoder, DecoderConfig, WhisperConfig, WhisperEncoder, pick_device, pick_dtype
from tokenizer import Tokenizer

IGNORE = data.IGNORE  # label of positions that carry no loss (prompt, speech, padding)


# ----------------------------------------------------------------------------- adapter

class Adapter(nn.Module):
    """The release's "subsampler": 3 x (Conv1d stride 2 + GLU), a residual bottleneck, LayerNorm. Names mirror
    its adapter.subsampler.conv_layers.N, adapter.fc1, adapter.fc2, adapter.speech_ln (minus "subsampler.")."""

    def __init__(self, d_enc, d_llm, inner_dim=512, kernel_size=5, n_convs=3):
        super().__init__()
        # an even kernel would make the output length (L // 2 + 1), not the release's (L - 1) // 2 + 1
        assert kernel_size % 2 == 1, f"Adapter: kernel_size must be odd, got {kernel_size}"
        self.d_enc, self.d_llm, self.inner_dim = d_enc, d_llm, inner_dim
        self.kernel_size, self.n_convs = kernel_size, n_convs
        # GLU halves the channels: every conv but the last keeps d_enc, the last lands on d_llm
        outs = [2 * d_enc] * (n_convs - 1) + [2 * d_llm]
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(d_enc, c, kernel_size, stride=2, padding=kernel_size // 2) for c in outs)
        self.fc1 = nn.Linear(d_llm, inner_dim, bias=False)
        self.fc2 = nn.Linear(inner_dim, d_llm, bias=False)
        self.speech_ln = nn.LayerNorm(d_llm, eps=1e-5)

    def settings(self):
        return dict(d_enc=self.d_enc, d_llm=self.d_llm, inner_dim=self.inner_dim,
                    kernel_size=self.kernel_size, n_convs=self.n_convs)

    def out_lengths(self, lengths):
        for _ in range(self.n_convs):
            lengths = (lengths - 1) // 2 + 1
        return lengths

    def forward(self, x, lengths):
        """x (B, T, d_enc), lengths (B,) real frames per row -> (B, T', d_llm), lengths (B,)."""
        lengths = torch.as_tensor(lengths, device=x.device)
        x = x.transpose(1, 2)  # Conv1d wants (B, C, T)
        for conv in self.conv_layers:
            # The release does not mask here, so in a batch a short clip's last frames see its
            # neighbours' padding through the kernel. Zeroing it makes a batch equal each clip alone
            # (zero is also what the conv's own padding shows a clip that fills the batch).
            keep = torch.arange(x.shape[-1], device=x.device) < lengths[:, None]
            x = F.glu(conv(x * keep[:, None, :].to(x.dtype)), dim=1)
            lengths = (lengths - 1) // 2 + 1
        x = x.transpose(1, 2)
        x = x + self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU() in the release
        x = self.speech_ln(x)
        keep = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
        return x * keep[..., None].to(x.dtype), lengths  # padding frames are 0, not plausible garbage


# ----------------------------------------------------------------------------- partial LoRA

class LoRALinear(nn.Linear):
    """base(x) + B(A(dropout(x))) * alpha/r, at the positions partial_lora() marks and nowhere else. The base
    weight and bias stay the wrapped Linear's own Parameters (names unchanged); only lora_A / lora_B are added."""

    def __init__(self, base: nn.Linear, r=16, alpha=16, dropout=0.05):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        dev = base.weight.device  # fp32 whatever the frozen base is: these are what the optimizer updates
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: A random, B zero -> delta 0
        self.lora_dropout = nn.Dropout(dropout)
        self.mask = self.rows = None  # set by partial_lora for the forwards inside it

    def forward(self, x):
        y = super().forward(x)   # the base: nn.Linear's float matmul, or quantize.Int8Linear's int8 one
        if self.mask is None:
            return y
        if self.mask.shape != x.shape[:-1]:
            raise ValueError(f"partial_lora: speech mask {tuple(self.mask.shape)} does not match the input "
                             f"{tuple(x.shape[:-1])}")
        # The delta only at the speech rows (about a fifth of a training prompt, and only while the prompt is
        # read): the same numbers as a full-size delta times the mask, for a fraction of the work.
        xs = x.reshape(-1, x.shape[-1]).index_select(0, self.rows)
        d = F.linear(F.linear(self.lora_dropout(xs), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale
        return y.reshape(-1, y.shape[-1]).index_add(0, self.rows, d.to(y.dtype)).view_as(y)


@contextlib.contextmanager
def partial_lora(decoder, speech_mask):
    """The paper's partial LoRA (the release's lora_scope "audio"): inside this block every LoRA layer adds its
    delta only where speech_mask (B, S) is True, the prompt's speech positions; text prompts and generated
    tokens see the base LLM. A decoder without LoRA is unchanged."""
    layers = [m for m in decoder.modules() if isinstance(m, LoRALinear)]
    rows = speech_mask.reshape(-1).nonzero().squeeze(1)   # found once, shared by every layer
    for m in layers:
        m.mask, m.rows = speech_mask.bool(), rows
    try:
        yield
    finally:
        for m in layers:
            m.mask = m.rows = None


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(decoder, r=16, alpha=16, dropout=0.05, targets=LORA_TARGETS):
    """Wrap every nn.Linear child named in targets. The default is every projection, as the release's
    targets (Qwen-1's c_attn, c_proj, w1, w2) cover every projection of Qwen-1."""
    found = 0
    for module in list(decoder.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                if isinstance(child, LoRALinear):
                    raise ValueError(f"add_lora: {name} already has LoRA")
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
                found += 1
    if not found:
        raise ValueError(f"add_lora: no nn.Linear named any of {list(targets)} in the decoder")
    return decoder


def lora_settings(decoder):
    """The add_lora arguments that produced this decoder's LoRA, or None (for the run's config.json)."""
    mods = [(n.rsplit(".", 1)[-1], m) for n, m in decoder.named_modules() if isinstance(m, LoRALinear)]
    if not mods:
        return None
    m = mods[0][1]
    return dict(r=m.r, alpha=m.alpha, dropout=m.lora_dropout.p, targets=sorted({n for n, _ in mods}))


# ----------------------------------------------------------------------------- emotion head + losses

class EmotionHead(nn.Linear):
    """Linear(d_llm, 5, bias=False) on the masked mean of the adapter output (release: hidden2emotion)."""

    def __init__(self, d_llm, num_emotions=len(data.EMOTIONS)):
        super().__init__(d_llm, num_emotions, bias=False)


def masked_mean(x, lengths):
    """Mean over the first lengths[b] frames of x (B, T, D) -> (B, D)."""
    lengths = torch.as_tensor(lengths, device=x.device)
    keep = (torch.arange(x.shape[1], device=x.device) < lengths[:, None]).to(x.dtype)
    return (x * keep[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(x.dtype)


def kl_loss(student_logits, teacher_logits, T=2.0):
    """KL(teacher || student) at temperature T, summed over the vocabulary, averaged over positions: the
    release's response_kl, F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") on (N, V) logits
    gathered at the response positions. So "batch-mean" is a mean over the N positions, with no T^2 factor.
    Inputs (..., V) are flattened to (N, V)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kl_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (the response positions must line up)")
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, V).float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, V).float() / T, dim=-1)
    if s.shape[0] == 0:
        return s.sum()  # no response positions: 0, still connected to the graph
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


def ce_loss(logits, targets):
    """Cross-entropy of logits (N, V) gathered at the response positions with their targets (N,)
    (response_positions): the mean over the target tokens, as the release's response_ce."""
    return F.cross_entropy(logits.float(), targets)


def emotion_loss(logits, labels):
    """Cross-entropy of the emotion head: logits (B, 5), labels (B,) in data.EMOTIONS order."""
    return F.cross_entropy(logits.float(), torch.as_tensor(labels, device=logits.device))


def response_positions(labels):
    """Where to read the response's logits: (bool (B, S) row-major like Decoder(logits_at=...), targets (N,)):
    the positions that predict a target token, for ce_loss and the KL alike.
    The release's response_ce reads these same positions; its response_kl does not: it gathers the logits at
    the target tokens themselves (labels != -100), i.e. the predictions of target tokens 2..n and of the token
    after the last (what follows <|endoftext|> when the target ended, the 49th token when it was cut at 48),
    and never the prediction of the first target token. Ours scores exactly the n predictions the target
    defines: the first one included, which only the speech and the prompt precede (where hearing matters
    most), none past the end, and the same positions as the CE, so both losses read one set of logits."""
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = labels[:, 1:] != IGNORE
    return at, labels[:, 1:][labels[:, 1:] != IGNORE]


# ----------------------------------------------------------------------------- the whole model

class SpeechLM(nn.Module):
    """encoder + adapter + decoder (+ emotion head) + tokenizer. Trainable weights keep these names:
    adapter.*, emotion_head.*, decoder.layers.N.<...>.lora_A / lora_B."""

    def __init__(self, encoder, adapter, decoder, tok, emotion_head=None, config=None):
        super().__init__()
        self.encoder, self.adapter, self.decoder, self.emotion_head = encoder, adapter, decoder, emotion_head
        self.tok = tok
        self.config = dict(config or {})  # the run's config.json, paths resolved

    @property
    def dtype(self):
        """The frozen networks' dtype (the trainable weights stay fp32)."""
        return self.decoder.embed_tokens.weight.dtype

    @property
    def padded(self):
        """How this run hears: padded to 30 s (the release's way, its config says so) or real frames only."""
        return self.config.get("padded", False)

    @property
    def has_lora(self):
        return any(isinstance(m, LoRALinear) for m in self.decoder.modules())

    # --- audio -> speech embeddings

    @torch.no_grad()
    def encode_audio(self, audios, padded=None):
        """1-D 16 kHz clips (cut to 30 s) -> list of encoder frames (T_i, d_enc), T_i = (n_frames - 1)//2 + 1.
        padded=False: only each clip's real mel frames, padding keys masked. padded=True: the release's way,
        every clip padded to 30 s with whisper attending over the padding, cut to the real length after.
        None: as the run was trained to hear (its config's "padded"; a converted release says True)."""
        padded = self.padded if padded is None else padded
        w = self.encoder.layer_norm.weight
        clips = [torch.as_tensor(a, dtype=torch.float32).reshape(-1) for a in audios]
        for i, a in enumerate(clips):
            if data.n_frames(len(a)) < 1:
                raise ValueError(f"encode_audio: clip {i} has {len(a)} samples, less than one mel frame")
        # each clip's mel computed alone (cut to 30 s) and zero-padded: a batch equals each clip alone
        mel, frames = data.log_mel_batch([a.to(w.device) for a in clips], self.encoder.cfg.n_mels, pad_to_30s=padded)
        x, out_lengths = self.encoder(mel.to(w.dtype), lengths=frames.to(w.device), padded=padded)
        return [x[i, :n] for i, n in enumerate(out_lengths.tolist())]

    def speech_embeds(self, feats):
        """Encoder frames, a list of (T_i, d_enc) -> adapter output (B, T', d_llm) and lengths (B,)."""
        p = self.adapter.fc1.weight
        lengths = torch.tensor([f.shape[0] for f in feats], device=p.device)
        x = nn.utils.rnn.pad_sequence([f.to(p.device, p.dtype) for f in feats], batch_first=True)
        return self.adapter(x, lengths)

    def emotion_logits(self, embeds, lengths):
        """Adapter output (B, T', d_llm) + lengths -> (B, num_emotions). The release pools the adapter's
        output (after speech_ln, before the LLM) over its real frames: hidden2emotion(masked mean)."""
        if self.emotion_head is None:
            raise ValueError("emotion_logits: this model has no emotion head (num_emotions 0)")
        return self.emotion_head(masked_mean(embeds, lengths).to(self.emotion_head.weight.dtype))

    # --- prompt

    def splice(self, rows, speech, labels=None, pad="right"):
        """Token rows with SPEECH slots + speech segments (T_i', d_llm) in slot order (row 0's slots,
        then row 1's, ...) -> dict(embeds (B,S,d), valid (B,S) bool, speech_mask (B,S) bool,
        labels (B,S) long or None, ids (B,S): SPEECH at speech positions, pad_id at padding).
        Each slot becomes T_i' positions labelled IGNORE. pad="left" for generation."""
        n_slots = sum(t == data.SPEECH for row in rows for t in row)
        if n_slots != len(speech):
            raise ValueError(f"splice: the rows have {n_slots} SPEECH slots but {len(speech)} speech segments came")
        segs, ids, labs = iter(speech), [], []
        for r, row in enumerate(rows):
            if labels is not None and len(labels[r]) != len(row):
                raise ValueError(f"splice: row {r} has {len(row)} ids but {len(labels[r])} labels")
            i, lab = [], []
            for j, t in enumerate(row):
                n = next(segs).shape[0] if t == data.SPEECH else 1
                i += [t] * n
                lab += [IGNORE] * n if t == data.SPEECH or labels is None else [labels[r][j]]
            ids.append(i)
            labs.append(lab)
        ids, lab, valid = data.pad_batch(ids, self.tok.pad_id, labs if labels is not None else None, side=pad)
        dev = self.decoder.embed_tokens.weight.device
        ids, valid = ids.to(dev), valid.to(dev)
        sp = ids == data.SPEECH
        embeds = self.decoder.embed_tokens(ids.masked_fill(sp, self.tok.pad_id))
        if len(speech):
            # row-major order of the speech positions is slot order: one scatter places every segment
            src = torch.cat([s.to(dev, embeds.dtype) for s in speech])
            embeds = embeds.masked_scatter(sp[..., None], src)
        return dict(embeds=embeds, valid=valid, speech_mask=sp, ids=ids,
                    labels=lab.to(dev) if lab is not None else None)

    @torch.no_grad()
    def generate(self, messages, audios=None, *, feats=None, padded=None, max_new_tokens=256,
                 temperature=0.0, top_k=None, top_p=None, stop_ids=None, on_token=None, generator=None):
        """Reply to one conversation (a list of messages) or a batch (a list of conversations).

        Message content may hold data.SPEECH parts; audios (1-D 16 kHz) or feats (encoder frames) give
        them in slot order. Returns one list of new token ids per conversation (stop token excluded);
        on_token(ids (B,)) streams each step. LoRA, if any, sees only the prompt's speech positions.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        rows = [self.tok.encode_chat(c, add_generation_prompt=True) for c in convs]
        if feats is None:
            feats = self.encode_audio(audios, padded=padded) if audios else []
        speech = []
        if len(feats):
            emb, lengths = self.speech_embeds(feats)
            speech = [emb[i, :n] for i, n in enumerate(lengths.tolist())]
        batch = self.splice(rows, speech, pad="left")
        return self.decoder.generate(
            embeds=batch["embeds"], valid=batch["valid"], max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p,
            stop_ids=stop_ids if stop_ids is not None else self.tok.eos_ids,
            prompt_scope=partial_lora(self.decoder, batch["speech_mask"]), on_token=on_token, generator=generator)

    # --- training: logits at the positions that predict the target (response_positions)

    @torch.no_grad()
    def text_logits(self, examples):
        """Stage-1 teacher: (ids, labels) rows without speech -> (logits (N, V), targets (N,)), no grad.
        The LLM reads the transcript; LoRA, if any, is off (no speech positions)."""
        rows, labels = zip(*examples)
        b = self.splice(list(rows), [], list(labels))
        at, targets = response_positions(b["labels"])
        return self.decoder(embeds=b["embeds"], valid=b["valid"], logits_at=at), targets

    def speech_logits(self, examples, feats):
        """Student: (ids, labels) rows with SPEECH slots + encoder frames in slot order -> dict(logits
        (N, V), targets (N,), embeds (B, T', d_llm) adapter output, lengths (B,)). Same N as text_logits
        for the same targets, so kl_loss pairs them position by position."""
        rows, labels = zip(*examples)
        embeds, lengths = self.speech_embeds(feats)
        b = self.splice(list(rows), [embeds[i, :n] for i, n in enumerate(lengths.tolist())], list(labels))
        at, targets = response_positions(b["labels"])
        with partial_lora(self.decoder, b["speech_mask"]):
            logits = self.decoder(embeds=b["embeds"], valid=b["valid"], logits_at=at)
        return dict(logits=logits, targets=targets, embeds=embeds, lengths=lengths)

    # --- trainable weights, run folders

    def trainable_parameters(self):
        """{name: Parameter} of what BLSP-Emo trains: adapter, emotion head, LoRA. Encoder and LLM stay frozen."""
        return {n: p for n, p in self.named_parameters()
                if n.startswith(("adapter.", "emotion_head.")) or n.endswith((".lora_A", ".lora_B"))}

    def freeze_base(self):
        """requires_grad on exactly trainable_parameters(); everything else frozen. Returns those names."""
        train = self.trainable_parameters()
        for n, p in self.named_parameters():
            p.requires_grad_(n in train)
        return list(train)

    def trainable_state_dict(self):
        return {n: p.detach() for n, p in self.trainable_parameters().items()}

    def load_trainable(self, state_dict, source="state dict"):
        own = self.trainable_parameters()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
        for n, t in state_dict.items():
            if t.shape != own[n].shape:
                raise ValueError(f"{source}: {n} has shape {tuple(t.shape)} but the model needs {tuple(own[n].shape)}")
        with torch.no_grad():
            for n, t in state_dict.items():
                own[n].copy_(t)

    @classmethod
    def build(cls, whisper, llm, device=None, dtype=None, adapter=None):
        """A fresh stage-1 model: pretrained encoder + LLM from their folders (frozen weights, in dtype)
        and a new adapter (adapter: settings other than d_enc/d_llm). Trainable weights are kept in fp32
        whatever dtype the frozen networks use: they are the ones the optimizer updates."""
        device = device if isinstance(device, torch.device) else pick_device(device or None)
        dtype = pick_dtype(dtype or None, device)
        encoder = WhisperEncoder.from_pretrained(whisper, dtype=dtype, device=device)
        decoder = Decoder.from_pretrained(llm, dtype=dtype, device=device)
        settings = {k: v for k, v in (adapter or {}).items() if k not in ("d_enc", "d_llm")}
        ad = Adapter(encoder.cfg.d_model, decoder.cfg.dim, **settings).to(device)
        return cls(encoder, ad, decoder, Tokenizer.from_pretrained(llm), config=dict(whisper=whisper, llm=llm))

    def start_stage2(self, lora=None, num_emotions=len(data.EMOTIONS)):
        """Stage 2 adds partial LoRA (add_lora's arguments) and the emotion head, unless already there."""
        if lora and not self.has_lora:
            add_lora(self.decoder, **lora)
        if num_emotions and self.emotion_head is None:
            self.emotion_head = EmotionHead(self.decoder.cfg.dim, num_emotions).to(self.adapter.fc1.weight.device)
        return self

    @classmethod
    def from_run(cls, run_dir, device=None, dtype=None, whisper=None, llm=None):
        """The model a run folder describes (config.json + model.safetensors), in eval mode.
        whisper / llm override the run's folders (the adapter must still fit them)."""
        cfg_path, w_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "model.safetensors")
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"run folder {run_dir}: missing {p}")
        with open(cfg_path) as f:
            config = json.load(f)
        for key in ("whisper", "llm", "adapter"):
            if key not in config:
                raise ValueError(f"{cfg_path}: no {key!r} entry")

        def resolve(p):  # relative paths in config.json are relative to the run folder
            return p if os.path.isabs(p) else os.path.normpath(os.path.join(run_dir, p))
        paths = dict(whisper=whisper or resolve(config["whisper"]), llm=llm or resolve(config["llm"]))
        hf = {}
        for key, p in paths.items():
            if not os.path.isfile(os.path.join(p, "config.json")):
                raise FileNotFoundError(f"{cfg_path}: {key} folder {p} not found (or it has no config.json)")
            with open(os.path.join(p, "config.json")) as f:
                hf[key] = json.load(f)
        # the dimensions first, from the folders' config.json: no multi-GB load before this error
        d_enc, d_llm = WhisperConfig.from_hf(hf["whisper"]).d_model, DecoderConfig.from_hf(hf["llm"]).dim
        a = config["adapter"]
        pair = (f"the run {run_dir} was trained for whisper {config['whisper']} (d_enc {a.get('d_enc')}) + "
                f"llm {config['llm']} (d_llm {a.get('d_llm')}); loaded whisper {paths['whisper']} "
                f"(d_model {d_enc}) + llm {paths['llm']} (dim {d_llm})")
        if (a.get("d_enc"), a.get("d_llm")) != (d_enc, d_llm):
            raise ValueError(f"{cfg_path}: the adapter does not fit this encoder/LLM pair: {pair}")
        model = cls.build(paths["whisper"], paths["llm"], device, dtype, adapter=a)
        model.start_stage2(config.get("lora"), config.get("num_emotions") or 0)
        model.config = {**config, **paths}
        try:
            model.load_trainable(load_file(w_path, device="cpu"), source=w_path)
        except ValueError as e:  # a shape that does not fit: almost always another encoder/LLM pair
            raise ValueError(f"{e}: {pair}") from None
        return model.eval()

    def save_run(self, run_dir, config=None):
        """Write config.json + model.safetensors (trainable weights only), each atomically.

        config: the run's settings, whisper/llm paths usable from here (absolute or cwd-relative); they
        are written relative to run_dir. adapter, lora and num_emotions come from the model itself, so
        they cannot disagree with the weights.
        """
        os.makedirs(run_dir, exist_ok=True)
        config = dict(self.config if config is None else config)
        usable = {k: config[k] for k in ("whisper", "llm") if config.get(k)}
        config.update({k: os.path.relpath(os.path.abspath(p), os.path.abspath(run_dir)) for k, p in usable.items()},
                      adapter=self.adapter.settings(), lora=lora_settings(self.decoder),
                      num_emotions=self.emotion_head.out_features if self.emotion_head is not None else 0)
        w_path, cfg_path = os.path.join(run_dir, "model.safetensors"), os.path.join(run_dir, "config.json")
        weights = {n: t.to("cpu").contiguous() for n, t in self.trainable_state_dict().items()}
        data.atomic_write(w_path, lambda p: save_file(weights, p, metadata={"format": "pt"}))
        data.atomic_write(cfg_path, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
        self.config = {**config, **usable}
