"""The speech side of BLSP-Emo and the whole model: wav -> WhisperEncoder -> Adapter (x8 shorter, d_enc -> d_llm)
-> embeddings spliced into the chat prompt at the SPEECH slot -> Decoder, with partial LoRA on the speech positions
and an emotion head on the pooled adapter output. Follows the authors' release; where we differ, a comment says why."""
import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import data
from model import (Decoder, DecoderConfig, PrefixKV, WhisperConfig, WhisperEncoder, pick_device, pick_dtype,
                   read_config, shared_start)
from tokenizer import Tokenizer


class Adapter(nn.Module):
    """The release's "subsampler": 3 x (Conv1d stride 2 + GLU), a residual bottleneck, LayerNorm; its names."""

    def __init__(self, d_enc, d_llm, inner_dim=512, kernel_size=5, n_convs=3, d_in=None):
        super().__init__()
        assert kernel_size % 2 == 1, f"Adapter: kernel_size must be odd (the release's lengths), got {kernel_size}"
        d_in = d_in or d_enc   # the encoder's frames: d_enc wide, twice that with the tone layer beside them
        self.settings = dict(d_enc=d_enc, d_llm=d_llm, inner_dim=inner_dim, kernel_size=kernel_size, n_convs=n_convs,
                             d_in=d_in)
        # GLU halves the channels: every conv but the last keeps d_enc, the last lands on d_llm
        outs = [2 * d_enc] * (n_convs - 1) + [2 * d_llm]
        self.conv_layers = nn.ModuleList(nn.Conv1d(i, c, kernel_size, stride=2, padding=kernel_size // 2)
                                         for i, c in zip([d_in] + [d_enc] * (n_convs - 1), outs))
        self.fc1 = nn.Linear(d_llm, inner_dim, bias=False)
        self.fc2 = nn.Linear(inner_dim, d_llm, bias=False)
        self.speech_ln = nn.LayerNorm(d_llm, eps=1e-5)

    def out_lengths(self, lengths):
        return -(-lengths // 2 ** len(self.conv_layers))   # each conv maps L to (L - 1) // 2 + 1 = ceil(L / 2)

    def forward(self, x, lengths):
        lengths = torch.as_tensor(lengths, device=x.device)
        x = x.transpose(1, 2)
        for conv in self.conv_layers:
            # unlike the release, zero the padding: a batch then equals each clip alone
            keep = torch.arange(x.shape[-1], device=x.device) < lengths[:, None]
            x = F.glu(conv(x * keep[:, None, :].to(x.dtype)), dim=1)
            lengths = (lengths - 1) // 2 + 1
        x = x.transpose(1, 2)
        x = self.speech_ln(x + self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as nn.GELU() in the release
        keep = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
        return x * keep[..., None].to(x.dtype), lengths  # padding frames are 0, not plausible garbage


class LoRALinear(nn.Linear):
    """base(x) + B(A(dropout(x))) * alpha/r at the positions partial_lora() marks; the base keeps its own weights."""

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
        self.rows = None  # (positions computed, the speech rows among them), set by partial_lora inside it

    def forward(self, x):
        y = super().forward(x)   # the base: nn.Linear's float matmul, or quantize.Int8Linear's int8 one
        if self.rows is None:
            return y
        n, rows = self.rows
        xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if xs.shape[0] != n:   # a caller gave the decoder valid but not partial_lora
            raise ValueError(f"partial_lora marked {n} positions, the decoder computes {xs.shape[0]}")
        # the delta computed at the speech rows only: the same numbers as a full delta times the mask
        d = F.linear(F.linear(self.lora_dropout(xs[rows]), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        d = d * self.scale
        return ys.index_add(0, rows, d.to(y.dtype)).view_as(y)


@contextlib.contextmanager
def partial_lora(decoder, speech_mask, valid=None):
    """The paper's partial LoRA: inside this block LoRA adds its delta only where speech_mask (B, S) is True. valid:
    the one the decoder is given (it computes only the real positions: the speech rows are counted among those)."""
    layers = [m for m in decoder.modules() if isinstance(m, LoRALinear)]
    rows = (speech_mask if valid is None else speech_mask[valid]).reshape(-1)
    n, rows = len(rows), rows.nonzero().squeeze(1)   # found once, shared by every layer
    for m in layers:
        m.rows = n, rows
    try:
        yield
    finally:
        for m in layers:
            m.rows = None


def add_lora(decoder, r=16, alpha=16, dropout=0.05,
             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """LoRA on every projection by default, as the release's."""
    found = 0
    for module in list(decoder.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
                found += 1
    if not found:
        raise ValueError(f"add_lora: no nn.Linear named any of {list(targets)} in the decoder")
    return decoder


def kl_loss(student_logits, teacher_logits, T=2.0):
    """KL(teacher || student) at temperature T over (N, V) logits: the mean over positions, no T^2 (the release's)."""
    s, t = (F.log_softmax(x.float() / T, dim=-1) for x in (student_logits, teacher_logits))
    # no response positions: 0, still connected to the graph
    return F.kl_div(s, t, reduction="batchmean", log_target=True) if len(s) else s.sum()


class SpeechLM(nn.Module):
    def __init__(self, encoder, adapter, decoder, tok, emotion_head=None, config=None):
        super().__init__()
        self.encoder, self.adapter, self.decoder = encoder, adapter, decoder
        self.emotion_head, self.tok = emotion_head, tok
        self._prefixes = {}   # prefix_kv's: valid while the LLM's own weights stay as loaded
        self.config = dict(config or {})  # the run's config.json, paths resolved

    @property
    def padded(self):
        """How this run hears: padded to 30 s (the release's way, its config says so) or real frames only."""
        return self.config.get("padded", False)

    @property
    def tone_layer(self):
        """The encoder layer this run's adapter hears beside the output (0: none, as the paper and the release)."""
        return self.config.get("tone_layer") or 0

    @torch.no_grad()
    def encode_audio(self, audios, padded=None):
        """16 kHz clips (cut to 30 s) -> encoder frames (T_i, d_enc), heard as the run was trained unless padded."""
        padded = self.padded if padded is None else padded
        w = self.encoder.layer_norm.weight
        clips = [torch.as_tensor(a, dtype=torch.float32, device=w.device).reshape(-1) for a in audios]
        mel, frames = data.log_mel_batch(clips, self.encoder.cfg.n_mels, pad_to_30s=padded)
        x, out_lengths = self.encoder(mel.to(w.dtype), lengths=frames.to(w.device), padded=padded,
                                      tone_layer=self.tone_layer)
        return [x[i, :n] for i, n in enumerate(out_lengths.tolist())]

    def speech_embeds(self, feats, chunk=8):
        """Encoder frames, one (T_i, d_enc) per clip -> (adapter output (B, T', d_llm), zero past each row's length;
        lengths (B,)). The clips go through the adapter by length, `chunk` at a time: a random batch of 32 is about
        half padding, and each clip's output is the same alone or in any batch (Adapter zeroes the padding)."""
        p = self.adapter.fc1.weight
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long, device=p.device)
        out, order = [None] * len(feats), sorted(range(len(feats)), key=lambda i: feats[i].shape[0])
        for c in range(0, len(order), chunk):
            idx = order[c:c + chunk]
            x = nn.utils.rnn.pad_sequence([feats[i].to(p.device, p.dtype) for i in idx], batch_first=True)
            y, n = self.adapter(x, lengths[idx])
            for j, i in enumerate(idx):
                out[i] = y[j, :n[j]]
        if not out:   # a prompt without speech
            return p.new_zeros(0, 0, self.adapter.settings["d_llm"]), lengths
        return nn.utils.rnn.pad_sequence(out, batch_first=True), self.adapter.out_lengths(lengths)

    def emotion_logits(self, embeds, lengths):
        """Adapter output (zero past each row's length) -> (B, num_emotions), on the mean over the real frames."""
        pooled = embeds.sum(1) / lengths.clamp(min=1)[:, None].to(embeds.dtype)
        return self.emotion_head(pooled.to(self.emotion_head.weight.dtype))

    def splice(self, rows, speech, labels=None, pad="right"):
        """Token rows with SPEECH slots + speech segments (T_i', d_llm) in slot order -> dict(embeds, valid,
        speech_mask, labels or None), each (B, S); a slot becomes T_i' positions labelled IGNORE."""
        n_slots = sum(t == data.SPEECH for row in rows for t in row)
        if n_slots != len(speech):
            raise ValueError(f"splice: the rows have {n_slots} SPEECH slots but {len(speech)} speech segments came")
        segs, ids, labs = iter(speech), [], []
        for row, lab in zip(rows, labels if labels is not None else rows):
            n = [next(segs).shape[0] if t == data.SPEECH else 1 for t in row]   # positions per token
            ids.append([t for t, k in zip(row, n) for _ in range(k)])
            labs.append([data.IGNORE if t == data.SPEECH else y for t, y, k in zip(row, lab, n) for _ in range(k)])
        ids, lab, valid = data.pad_batch(ids, self.tok.pad_id, labs if labels is not None else None, side=pad)
        dev = self.decoder.embed_tokens.weight.device
        ids, valid = ids.to(dev), valid.to(dev)
        sp = ids == data.SPEECH
        embeds = self.decoder.embed_tokens(ids.masked_fill(sp, self.tok.pad_id))
        if len(speech):  # row-major order of the speech positions is slot order: one scatter places every segment
            embeds = embeds.masked_scatter(sp[..., None], torch.cat([s.to(dev, embeds.dtype) for s in speech]))
        return dict(embeds=embeds, valid=valid, speech_mask=sp, labels=lab.to(dev) if lab is not None else None)

    @torch.no_grad()
    def generate(self, messages, feats=(), *, max_new_tokens=256, pick=None, on_token=None):
        """Reply to one conversation or a batch: new ids per conversation; SPEECH parts are heard from feats.
        pick: Decoder.generate's (chat.sampler: sampling, the repetition penalty); None: greedy."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        rows = [self.tok.encode_chat(c, add_generation_prompt=True) for c in convs]
        emb, lengths = self.speech_embeds(feats)
        p = shared_start(rows)   # the system prompt and instruction: run once, kept (prefix_kv)
        batch = self.splice([r[p:] for r in rows], [emb[i, :n] for i, n in enumerate(lengths.tolist())], pad="left")
        return self.decoder.generate(
            embeds=batch["embeds"], valid=batch["valid"], max_new_tokens=max_new_tokens, stop_ids=self.tok.eos_ids,
            pick=pick, prompt_scope=partial_lora(self.decoder, batch["speech_mask"], batch["valid"]),
            on_token=on_token, prefix=self.prefix_kv(rows[0][:p]))

    def response_logits(self, examples, feats=()):
        """(ids, labels) rows + encoder frames for their SPEECH slots, if any -> dict(logits (N, V) at the response
        positions, targets (N,), embeds (B, T', d_llm) adapter output, lengths (B,)). LoRA sees speech only."""
        rows, labels = zip(*examples)
        embeds, lengths = self.speech_embeds(feats)
        # The rows' common start (system prompt, instruction) is run once and kept: before any speech and any
        # label, nothing trained reaches it. The rest of each row follows it.
        p = max(0, min(shared_start(rows), *(next((j for j, y in enumerate(lab) if y != data.IGNORE), len(lab)) - 1
                                             for lab in labels)))
        prefix = self.prefix_kv(rows[0][:p])   # before partial_lora: the prefix has no speech, LoRA adds nothing
        b = self.splice([r[p:] for r in rows], [embeds[i, :n] for i, n in enumerate(lengths.tolist())],
                        [lab[p:] for lab in labels])
        # The positions that predict a target token, for the CE and the KL alike. The release's KL reads the target
        # tokens' own positions: every prediction but the first target token's, and one past the end.
        at, targets = torch.zeros_like(b["labels"], dtype=torch.bool), b["labels"][:, 1:]
        at[:, :-1] = targets != data.IGNORE
        targets = targets[targets != data.IGNORE]
        with partial_lora(self.decoder, b["speech_mask"], b["valid"]):
            logits = self.decoder(embeds=b["embeds"], valid=b["valid"], cache=prefix, logits_at=at)
        return dict(logits=logits, targets=targets, embeds=embeds, lengths=lengths)

    def prefix_kv(self, ids):
        """The PrefixKV of a shared prompt start, kept for the next batches (a few: a run uses one or two)."""
        if not ids:
            return None
        key = tuple(ids)
        if key not in self._prefixes:
            if len(self._prefixes) >= 8:
                self._prefixes.pop(next(iter(self._prefixes)))
            dev = self.decoder.embed_tokens.weight.device
            self._prefixes[key] = PrefixKV(self.decoder, torch.tensor(ids, device=dev))
        return self._prefixes[key]

    def trainable_parameters(self):
        """{name: Parameter} of what BLSP-Emo trains (adapter, emotion head, LoRA); the rest is frozen here."""
        self.requires_grad_(False)
        return {n: p.requires_grad_() for n, p in self.named_parameters()
                if n.startswith(("adapter.", "emotion_head.")) or n.endswith((".lora_A", ".lora_B"))}

    @classmethod
    def build(cls, whisper, llm, device=None, dtype=None, adapter=None, tone_layer=0):
        """A fresh stage-1 model: a new adapter between the pretrained encoder and LLM (tone_layer: the encoder's)."""
        device = pick_device(device or None)
        dtype = pick_dtype(dtype or None, device)
        encoder = WhisperEncoder.from_pretrained(whisper, dtype=dtype, device=device)
        if not 0 <= tone_layer <= encoder.cfg.n_layers:
            raise ValueError(f"tone_layer {tone_layer}: {whisper} has {encoder.cfg.n_layers} layers (0: none)")
        decoder = Decoder.from_pretrained(llm, dtype=dtype, device=device)
        d = encoder.cfg.d_model
        ad = Adapter(**{"d_in": 2 * d if tone_layer else d, **(adapter or {}), "d_enc": d, "d_llm": decoder.cfg.dim})
        return cls(encoder, ad.to(device), decoder, Tokenizer.from_pretrained(llm),
                   config=dict(whisper=whisper, llm=llm, tone_layer=tone_layer))

    def start_stage2(self, lora=None, num_emotions=len(data.EMOTIONS)):
        """Stage 2 adds partial LoRA (add_lora's arguments) and the emotion head, unless already there."""
        if lora and not any(isinstance(m, LoRALinear) for m in self.decoder.modules()):
            add_lora(self.decoder, **lora)
        if num_emotions and self.emotion_head is None:
            head = nn.Linear(self.decoder.cfg.dim, num_emotions, bias=False)
            self.emotion_head = head.to(self.adapter.fc1.weight.device)
        return self

    @classmethod
    def from_run(cls, run_dir, device=None, dtype=None, whisper=None, llm=None):
        """The model a run folder describes, in eval mode; whisper / llm override its folders (the adapter must fit)."""
        files = Path(run_dir, "config.json"), Path(run_dir, "model.safetensors")
        if missing := [p for p in files if not p.is_file()]:
            raise FileNotFoundError(f"run folder {run_dir}: missing {missing[0]}")
        config = json.loads(files[0].read_text())
        if missing := [key for key in ("whisper", "llm", "adapter") if key not in config]:
            raise ValueError(f"{files[0]}: no {missing[0]!r} entry")
        paths = {k: v or os.path.normpath(os.path.join(run_dir, config[k]))   # relative to the run folder
                 for k, v in (("whisper", whisper), ("llm", llm))}
        # the dimensions from the folders' model.json first: no multi-GB load before a mismatch is found
        dims = (read_config(WhisperConfig, paths["whisper"], "whisper").d_model,
                read_config(DecoderConfig, paths["llm"], "llm").dim)
        a = config["adapter"]
        pair = (f"the run {run_dir} was trained for whisper {config['whisper']} (d_enc {a.get('d_enc')}) + llm "
                f"{config['llm']} (d_llm {a.get('d_llm')}); loaded whisper {paths['whisper']} (d_model {dims[0]}) + "
                f"llm {paths['llm']} (dim {dims[1]})")
        if (a.get("d_enc"), a.get("d_llm")) != dims:
            raise ValueError(f"{files[0]}: the adapter does not fit this encoder/LLM pair: {pair}")
        model = cls.build(paths["whisper"], paths["llm"], device, dtype, a, config.get("tone_layer") or 0)
        model.start_stage2(config.get("lora"), config.get("num_emotions") or 0)
        model.config = {**config, **paths}
        model.load_trainable(files[1], pair)
        return model.eval()

    def load_trainable(self, path, pair=""):
        """The trainable weights from a run's or checkpoint's model.safetensors, each present and of its shape."""
        weights, own = load_file(path), self.trainable_parameters()
        if set(weights) != set(own):
            raise KeyError(f"{path}: missing keys {sorted(set(own) - set(weights))}, "
                           f"unexpected keys {sorted(set(weights) - set(own))}")
        try:
            self.load_state_dict(weights, strict=False)
        except RuntimeError as e:   # a weight of another shape: almost always another encoder/LLM pair
            raise ValueError(f"{path}: {e}; {pair}") from None
