# The front end: wav -> 16 kHz mono -> Whisper log-mel; the prompts of both stages; the training example.
import json
import os
from functools import lru_cache

import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from tokenizer import SPEECH

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


def continue_target_messages(text):
    """Stage 1's teacher prompt: the LLM continues the transcript (the paper's instruction)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": CONTINUE + text}]


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
    # padded: the frames the release keeps, counted as its feature extractor counts them (its attention mask,
    # one per sample, read every 160th: ceil(n / 160), one more than n // 160 when n is not a multiple of 160)
    lengths = torch.tensor([-(-len(c) // HOP_LENGTH) if pad_to_30s else n_frames(len(c)) for c in clips])
    if pad_to_30s:   # each clip alone: short ones skip their silent frames (log_mel)
        return torch.stack([log_mel(c, n_mels) for c in clips]), lengths
    mels = [log_mel(c, n_mels, pad_to_30s=False) for c in clips]
    T = max(m.shape[-1] for m in mels)
    return torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mels]), lengths


# ----------------------------------------------------------------------------------------------- text

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
