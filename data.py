# Audio and text front end: wav -> 16 kHz mono -> Whisper log-mel; text <-> ids; the ChatML training example.
import base64
import binascii
import json
import os
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import soundfile as sf
import tiktoken
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

# hard-coded audio hyperparameters, as Whisper's audio.py has them
SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s chunk

EMOTIONS = ["neutral", "happy", "angry", "sad", "surprise"]  # label ids 0..4, the release's order
SYSTEM_PROMPT = "You are a helpful assistant."
EMOTION_SYSTEM_PROMPT = SYSTEM_PROMPT + " Your response should fulfill requests with empathy toward user's emotion tone."
# The paper's instructions. Stage 1: the LLM continues the transcript, the speech model the speech.
CONTINUE = "Continue the following sentence in a coherent style: "
# Stage 2: the LLM is told the label; the speech model must hear it (the label is not in its prompt).
CONTINUE_WITH_EMOTION = "Continue the following sentence that reflects a '{emotion}' emotion tone in a coherent style: "
CONTINUE_HEARD_EMOTION = "Continue the following sentence based on the conveyed emotion tone in a coherent style: "


def emotion_target_messages(text, emotion, paper=False):
    """Stage 2's teacher prompt: the transcript with its emotion told in words. paper=True is the release's
    continuation instruction; under it a 135M LLM repeats the sentence whatever the label (a valence gap
    of about 0 between happy and sad targets), so the default asks for a reply to
    the sentence said in that voice, which it answers in kind. The student hears the speech in the same
    turn (emotion_student_parts), with neither the words nor the label."""
    if paper:
        return [{"role": "system", "content": EMOTION_SYSTEM_PROMPT},
                {"role": "user", "content": CONTINUE_WITH_EMOTION.format(emotion=emotion) + text}]
    return [{"role": "system", "content": EMOTION_SYSTEM_PROMPT},
            {"role": "user", "content": f"{text} (said in a {emotion} voice)"}]


def emotion_student_parts(paper=False):
    """The user turn in which stage 2's speech model hears the clip, and chat.py's default after stage 2."""
    return [CONTINUE_HEARD_EMOTION, SPEECH] if paper else [SPEECH]


# The authors' SER question for evaluation.
SER_QUESTION = ("Please identify the emotion tone of the speech provided below. Select from the following "
                "options: neutral, sad, angry, happy, or surprise.\n\nSpeech: ")
SPEECH = -1  # one speech slot in a token list; the SpeechLM splices the adapter's embeddings in there
IGNORE = -100  # label of positions that carry no loss (torch cross_entropy's default ignore_index)

# ----------------------------------------------------------------------------------------------- audio


class AudioError(ValueError):
    """A file that cannot be used as speech; the message names the file and the problem."""


def load_audio(path, sr=SAMPLE_RATE):
    """Decode any soundfile-readable file (wav, flac, ogg, mp3) to a float32 mono tensor (N,) at `sr`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such audio file")
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)  # (N, channels)
    except (sf.SoundFileError, RuntimeError) as e:  # libsndfile says "Format not recognised" etc.
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio clip (0 samples)")
    audio = torch.from_numpy(data).mean(dim=1)  # mono mixdown: the plain channel average
    if file_sr != sr:
        audio = AF.resample(audio, file_sr, sr)
    return audio.contiguous()


def n_frames(n_samples):
    """Mel frames of an unpadded clip: the centered STFT has N//hop + 1 frames and Whisper drops the last."""
    return n_samples // HOP_LENGTH


@lru_cache(maxsize=None)
def mel_filters(n_mels, device=torch.device("cpu")):
    # Slaney-scale, Slaney-normalized triangles up to Nyquist: the same bank as librosa.filters.mel, which
    # produced Whisper's mel_filters.npz (80 and 128 bins). Cached: one bank per (size, device).
    # torchaudio builds it in the default dtype; in float32 the narrow triangles' edge weights are off by up to
    # 0.3%, 3e-4 in the 128-bin log-mel. Build in float64 (as librosa does), use in float32.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fb = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    finally:
        torch.set_default_dtype(default)
    return fb.T.to(device, torch.float32).contiguous()  # (n_mels, 201)


def log_mel(audio, n_mels=80, pad_to_30s=True):
    """Whisper's log-mel of (N,) or (B, N) 16 kHz audio -> (n_mels, T) or (B, n_mels, T).
    pad_to_30s: zero-pad or trim to 30 s, T = 3000 (what Whisper was trained on). Else T = N // 160: the
    real frames only (frames whose window reaches past the clip end see reflect- instead of zero-padding)."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.dim() not in (1, 2):
        raise ValueError(f"log_mel expects (N,) or (B, N) audio, got shape {tuple(audio.shape)}")
    n = audio.shape[-1]
    if pad_to_30s:
        # A frame lying wholly in the zero padding has power exactly 0, so only the frames whose window
        # touches the clip need an FFT (a 10 s clip: a third of them); the rest are
        # appended as zero power below. The clip's last frames still see zeros past it, as when padded.
        frames = min(N_FRAMES, (n + N_FFT // 2 + HOP_LENGTH - 1) // HOP_LENGTH)
        audio = F.pad(audio, (0, min(N_FFT, N_SAMPLES - n))) if n < N_SAMPLES else audio[..., :N_SAMPLES]
    else:
        frames = n_frames(n)
        if frames == 0:
            raise ValueError(f"log_mel: {n} samples is shorter than one {HOP_LENGTH}-sample hop")
        if n <= N_FFT // 2:  # reflect padding needs more than n_fft//2 samples; only clips under 12.5 ms
            audio = F.pad(audio, (0, N_FFT // 2 + 1 - n))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # center=True, reflect
    # drop the last frame, as Whisper does; re^2 + im^2 rather than whisper's abs() ** 2: the same power to
    # an ulp, without complex abs's sqrt
    power = stft.real[..., :frames].square() + stft.imag[..., :frames].square()
    log_spec = (mel_filters(n_mels, audio.device) @ power).clamp(min=1e-10).log10()
    if pad_to_30s:  # the all-silent frames of the 30 s window: power 0 clamps to 1e-10, log10 exactly -10
        log_spec = F.pad(log_spec, (0, N_FRAMES - frames), value=-10.0)
    # floor at max - 8 (80 dB) per clip, so batching never changes a clip's features
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_batch(clips, n_mels=80, pad_to_30s=True):
    """A list of (N_i,) clips -> (mel (B, n_mels, T), lengths (B,) real frames per clip, at most 3000).
    Each clip is computed alone (trimmed to 30 s, the encoder's limit), so its features are exactly its own;
    real-frames rows are right-padded with 0, what the encoder's conv1 zero padding would read there."""
    clips = [torch.as_tensor(c, dtype=torch.float32)[:N_SAMPLES] for c in clips]
    lengths = torch.tensor([n_frames(len(c)) for c in clips])
    if pad_to_30s:   # each clip alone: short ones skip their silent frames (log_mel)
        return torch.stack([log_mel(c, n_mels) for c in clips]), lengths
    mels = [log_mel(c, n_mels, pad_to_30s=False) for c in clips]
    T = max(m.shape[-1] for m in mels)
    return torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mels]), lengths


# ----------------------------------------------------------------------------------------------- text

# Pre-tokenizer regexes. Qwen-1/Qwen2 ship theirs (Qwen2's tokenizer.json Split pattern is this same one);
# Llama-3 differs only in grouping digits by up to three; GPT-2 is tokenizers' ByteLevel default.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (llama.cpp pre "smollm") runs two pre-tokenizers: Digits(individual) then the GPT-2 regex on each
# piece. One regex does the same: a digit stands alone and never takes the space before it, and a digit counts
# as the end of the text for the whitespace lookahead (a space run before a digit ends its piece).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

QWEN1_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
LLAMA3_SPECIALS = [  # meta-llama/llama3 tokenizer.py: 256 specials after the ranks
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>"] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
STOP_NAMES = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>"]


@lru_cache(maxsize=None)
def _byte_decoder():
    # GPT-2's byte-level BPE writes each byte as a printable char: printable latin-1 bytes as themselves, the
    # rest as chr(256 + k) in byte order. Invert that table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in bs]
    return {chr(c): b for b, c in zip(bs + rest, bs + [256 + k for k in range(len(rest))])}


def _read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None


def _read_tiktoken(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{n}: not a tiktoken rank line ('<base64 token> <rank>')") from None
    return ranks


def _bpe_ranks(vocab, merges, where, unk=None):
    """HF byte-level vocab + merges -> (tiktoken ranks in merge order, the vocab id of each rank, id -> bytes).
    tiktoken merges the adjacent pair whose *result* has the lowest rank; HF BPE merges the pair whose *rule*
    comes first. They agree when a token's rank is the index of the rule that made it, so ranks are the 256
    single bytes (in id order) and then the merges in file order, whatever ids the vocab gives them."""
    dec = _byte_decoder()

    def to_bytes(s):
        return bytes(dec[c] for c in s) if all(c in dec for c in s) else None

    id_bytes = {i: b for s, i in vocab.items() if (b := to_bytes(s)) is not None}
    singles = sorted((i, b) for i, b in id_bytes.items() if len(b) == 1)
    # Real vocabs can lack a few bytes (SmolLM2 lacks 21: six rare controls, bytes never in UTF-8). HF emits unk
    # for them, or drops them when there is no unk; tiktoken needs every byte ranked, so they rank as `unk`
    # (None: dropped after encoding). One difference stays: HF drops before merging, so its neighbours may
    # merge across a dropped byte; here they cannot (only for such a control byte inside a punctuation run).
    missing = sorted(set(range(256)) - {b[0] for _, b in singles})
    ranks = {b: r for r, (_, b) in enumerate(singles + [(unk, bytes([m])) for m in missing])}
    rank_ids = [i for i, _ in singles] + [unk] * len(missing)
    for n, (a, b) in enumerate(merges, 1):
        if a + b not in vocab:
            raise ValueError(f"{where}: merge {n} ({a!r} {b!r}) makes a token that is not in the vocab")
        tok = to_bytes(a + b)
        if tok not in ranks:
            ranks[tok] = len(ranks)
            rank_ids.append(vocab[a + b])
    return ranks, rank_ids, id_bytes


def _pattern_from_json(pre, normalizer, where):
    """tokenizer.json's pre_tokenizer -> one tiktoken regex; its normalizer -> whether to NFC first (Qwen2)."""
    steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre] if pre else []
    split, byte_regex, digits = None, False, False
    for s in steps:
        if s["type"] == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            p = s["pattern"]
            split = p["Regex"] if "Regex" in p else re.escape(p["String"])
        elif s["type"] == "ByteLevel" and not s.get("add_prefix_space"):
            byte_regex = s.get("use_regex", True)
        elif s["type"] == "Digits" and s.get("individual_digits"):
            digits = True
        else:
            raise ValueError(f"{where}: unsupported pre-tokenizer step {s}")
    norms = normalizer["normalizers"] if normalizer and normalizer["type"] == "Sequence" else [normalizer]
    if any(n and n["type"] != "NFC" for n in norms):
        raise ValueError(f"{where}: unsupported normalizer {normalizer}")
    nfc = any(n and n["type"] == "NFC" for n in norms)
    if split and not byte_regex and not digits:
        return split, nfc
    if byte_regex and not split:
        return (SMOLLM_PATTERN if digits else GPT2_PATTERN), nfc
    raise ValueError(f"{where}: unsupported pre-tokenizer combination {pre}")


class Tokenizer:
    """Byte-level BPE on tiktoken, built from a checkpoint's own tokenizer files. Ids are the checkpoint's."""

    def __init__(self, ranks, pattern, added, *, rank_ids=None, id_bytes=None, nfc=False, config=None, template=None):
        # ranks: bytes -> merge priority; rank_ids: vocab id of each rank (None: id == rank);
        # added: content -> (id, special). Added tokens become tiktoken specials ranked after the merges.
        config = config or {}
        names = list(added)
        specials = {s: len(ranks) + k for k, s in enumerate(names)}
        self._enc = tiktoken.Encoding("blsp", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self._ranks = ranks
        self._ids = list(rank_ids if rank_ids is not None else range(len(ranks))) + [added[s][0] for s in names]
        self._drops = None in self._ids  # bytes the vocab lacks, with no unk to stand for them
        self._bytes = dict(id_bytes) if id_bytes is not None else {self._ids[r]: b for b, r in ranks.items()}
        self._bytes.update({i: s.encode() for s, (i, _) in added.items()})
        self._by_name = {s: i for s, (i, _) in added.items()}
        self._plain_added = {s for s, (_, special) in added.items() if not special}  # HF always matches these
        self.nfc = nfc
        self.vocab_size = max(self._bytes) + 1

        ct = config.get("chat_template") or ""
        if isinstance(ct, list):  # several named templates
            ct = " ".join(t.get("template", "") for t in ct)
        if "<|start_header_id|>" in ct:
            template = "llama3"
        elif "<|im_start|>" in ct:
            template = "chatml"
        elif template is None:
            template = "chatml" if "<|im_start|>" in added else "llama3" if "<|start_header_id|>" in added else None
        self.template = template

        def name_of(v):  # tokenizer_config writes tokens as strings or AddedToken dicts
            return v.get("content") if isinstance(v, dict) else v

        stops = [n for n in STOP_NAMES if n in self._by_name]
        eos = name_of(config.get("eos_token"))
        if eos in self._by_name and eos not in stops:
            stops.append(eos)
        self.eos_ids = [self._by_name[n] for n in stops]
        pad = name_of(config.get("pad_token"))
        pad = next((n for n in [pad, "<|endoftext|>", "<|finetune_right_pad_id|>", "<|end_of_text|>"]
                    if n in self._by_name), None)
        self.pad_id = self._by_name[pad] if pad else (self.eos_ids[0] if self.eos_ids else 0)
        # what make_example appends after a complete target: the turn's end, so the model learns to stop
        if template == "llama3":
            self.closing_ids = [self.token_id("<|eot_id|>")]
        elif template == "chatml":
            self.closing_ids = [self.token_id("<|im_end|>")] + self.encode("\n")
            self.closing_ids += [self.token_id("<|endoftext|>")] if "<|endoftext|>" in added else []
        else:
            self.closing_ids = self.eos_ids[:1]

    @classmethod
    def from_pretrained(cls, folder):
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json") or {}
        if (folder / "chat_template.jinja").is_file():  # newer transformers save the template on its own
            config.setdefault("chat_template", (folder / "chat_template.jinja").read_text(encoding="utf-8"))
        added = {v["content"]: (int(i), v.get("special", True))
                 for i, v in (config.get("added_tokens_decoder") or {}).items()}

        if (folder / "tokenizer.json").is_file():
            where = folder / "tokenizer.json"
            tj = _read_json(where)
            model = tj["model"]
            if model.get("type", "BPE") != "BPE":
                raise ValueError(f"{where}: model type {model.get('type')} is not BPE")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            ranks, rank_ids, id_bytes = _bpe_ranks(model["vocab"], merges, where, model["vocab"].get(model.get("unk_token")))
            pattern, nfc = _pattern_from_json(tj.get("pre_tokenizer"), tj.get("normalizer"), where)
            added.update({t["content"]: (t["id"], t.get("special", False)) for t in tj.get("added_tokens", [])})
            return cls(ranks, pattern, added, rank_ids=rank_ids, id_bytes=id_bytes, nfc=nfc, config=config)

        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            where = folder / "merges.txt"
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
            ranks, rank_ids, id_bytes = _bpe_ranks(vocab, merges, where)
            # no pre_tokenizer written down: the family decides (what transformers' slow tokenizers hard-code)
            model_type = (_read_json(folder / "config.json") or {}).get("model_type", "")
            if "Qwen2" in str(config.get("tokenizer_class")) or model_type.startswith("qwen2"):
                pattern, nfc = QWEN_PATTERN, True
            elif model_type == "llama":  # the byte-level BPE llama we use is SmolLM2
                pattern, nfc = SMOLLM_PATTERN, False
            else:
                pattern, nfc = GPT2_PATTERN, False
            if not added:  # no added-token list: control tokens that sit in the vocab, as SmolLM2's do
                reachable = set(rank_ids)
                added = {s: (i, True) for s, i in vocab.items() if re.fullmatch(r"<\|[^|]+\|>", s) and i not in reachable}
            return cls(ranks, pattern, added, rank_ids=rank_ids, id_bytes=id_bytes, nfc=nfc, config=config)

        if (folder / "qwen.tiktoken").is_file():  # Qwen-1 (Qwen-7B-Chat): tokenization_qwen.py normalizes NFC
            ranks = _read_tiktoken(folder / "qwen.tiktoken")
            added = added or {s: (len(ranks) + k, True) for k, s in enumerate(QWEN1_SPECIALS)}
            return cls(ranks, QWEN_PATTERN, added, nfc=True, config=config, template="chatml")

        if (folder / "tokenizer.model").is_file():  # Llama-3 original/tokenizer.model
            ranks = _read_tiktoken(folder / "tokenizer.model")
            added = added or {s: (len(ranks) + k, True) for k, s in enumerate(LLAMA3_SPECIALS)}
            return cls(ranks, LLAMA3_PATTERN, added, config=config, template="llama3")

        raise FileNotFoundError(f"{folder}: no tokenizer.json, vocab.json + merges.txt, qwen.tiktoken or tokenizer.model")

    def encode(self, text, allowed_special=False):
        """Text -> ids. allowed_special=False reads special-token text ("<|im_end|>") as plain text, so user
        text can never forge a turn boundary; True turns it into the special token, as HF tokenizers do."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        allowed = "all" if allowed_special else self._plain_added
        ids = [self._ids[r] for r in self._enc.encode(text, allowed_special=allowed, disallowed_special=())]
        return [i for i in ids if i is not None] if self._drops else ids

    def decode(self, ids):
        # SPEECH slots print as [SPEECH] so a prompt with speech in it can be logged
        return b"".join(b"[SPEECH]" if i == SPEECH else self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_id(self, name):
        if name in self._by_name:
            return self._by_name[name]
        r = self._ranks.get(name.encode())
        if r is None:
            raise KeyError(f"token {name!r} is not in this tokenizer")
        return self._ids[r]

    def _turn(self, role, content, close=True):
        parts = [content] if isinstance(content, str) else list(content)
        for p in parts:
            if not isinstance(p, str) and p != SPEECH:
                raise ValueError(f"message content parts must be str or SPEECH, got {p!r}")
        if self.template == "chatml":
            return [self.token_id("<|im_start|>"), f"{role}\n", *parts] + ([self.token_id("<|im_end|>"), "\n"] if close else [])
        if self.template == "llama3":
            head = [self.token_id("<|start_header_id|>"), role, self.token_id("<|end_header_id|>"), "\n\n", *parts]
            return head + ([self.token_id("<|eot_id|>")] if close else [])
        raise ValueError("this tokenizer has no chat template (no <|im_start|> or <|start_header_id|> token)")

    def encode_chat(self, messages, add_generation_prompt=True):
        """Messages -> ids in the family's chat format; a SPEECH content part becomes one SPEECH (-1) id.
        Text between two template tokens is encoded as one string, exactly as the rendered template would be;
        only SPEECH splits it. No default system prompt is inserted: callers pass their own."""
        items = [self.token_id("<|begin_of_text|>")] if self.template == "llama3" else []
        for m in messages:
            items += self._turn(m["role"], m["content"])
        if add_generation_prompt:
            items += self._turn("assistant", [], close=False)
        ids, text = [], ""
        for x in items:
            if isinstance(x, str):
                text += x
            else:
                ids += self.encode(text) if text else []
                ids.append(x)
                text = ""
        return ids + (self.encode(text) if text else [])


def make_example(tok, system, user_parts, target, truncated=False):
    """One training example: (ids with SPEECH slots, labels). Labels are -100 except the target and, unless the
    LLM's continuation was cut off by the token limit, the closing tokens (the model must not learn to stop
    mid-thought)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user_parts}]
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    answer = tok.encode(target) + ([] if truncated else tok.closing_ids)
    return prompt + answer, [IGNORE] * len(prompt) + answer


def pad_batch(rows, pad_id, labels=None, side="right"):
    """Lists of ids (and labels) -> (ids (B,S) long, labels (B,S) or None, valid (B,S) bool). SPEECH slots stay -1.
    Generation prompts go left-padded so every row's next token sits in the last column."""
    B, S = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    lab = torch.full((B, S), IGNORE, dtype=torch.long) if labels is not None else None
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(S - len(r), S)
        ids[b, cols] = torch.tensor(r, dtype=torch.long)
        valid[b, cols] = True
        if labels is not None:
            lab[b, cols] = torch.tensor(labels[b], dtype=torch.long)
    return ids, lab, valid


def emotion_label(name, mapping=None, where="manifest"):
    """An emotion name -> its id in EMOTIONS, after folding a dataset's own labels through mapping
    (e.g. {"excited": "happy", "frustrated": "angry"}). Unknown names are an error listing the allowed ones."""
    e = (mapping or {}).get(name, name)
    if e not in EMOTIONS:
        raise ValueError(f"{where}: unknown emotion {name!r}; allowed: {', '.join(EMOTIONS)} "
                         f"(fold other labels in with --map=\"{{'{name}': 'happy'}}\")")
    return EMOTIONS.index(e)


def atomic_write(path, write):
    """write(tmp) then rename tmp over path: a killed run leaves the old file or the new one, never a part
    that a rerun would take for finished. The name is per process, so concurrent writers never share a tmp;
    fsync before the rename, so a power cut cannot leave the new name on unwritten blocks."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):   # write failed or was interrupted
            os.remove(tmp)


def read_manifest(path):
    """JSON lines -> list of dicts. Blank lines are skipped; a bad line is a ValueError naming file:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
