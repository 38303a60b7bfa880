# The front end: wav -> 16 kHz mono -> Whisper log-mel; the prompts of both stages; batches; files.
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
N_SAMPLES = 30 * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in 30 s

EMOTIONS = ["neutral", "happy", "angry", "sad", "surprise"]  # label ids 0..4, the release's order
SYSTEM_PROMPT = "You are a helpful assistant."
EMOTION_SYSTEM_PROMPT = SYSTEM_PROMPT + (" Your response should fulfill requests with empathy toward user's "
                                         "emotion tone.")
# The paper's instructions. Stage 1: the LLM continues the transcript, the speech model the speech. Stage 2: the LLM
# is told the label, the speech model must hear it.
CONTINUE = "Continue the following sentence in a coherent style: "
CONTINUE_WITH_EMOTION = "Continue the following sentence that reflects a '{emotion}' emotion tone in a coherent style: "
CONTINUE_HEARD_EMOTION = "Continue the following sentence based on the conveyed emotion tone in a coherent style: "
IGNORE = -100  # label of positions that carry no loss (torch cross_entropy's default ignore_index)


class AudioError(ValueError):   # a file that cannot be used as speech; the message names it
    pass


def load_audio(path, sr=SAMPLE_RATE):
    """Any soundfile-readable file (wav, flac, ogg, mp3) -> float32 mono (N,) at `sr`."""
    if not os.path.isfile(path):
        raise AudioError(f"{path}: {'a folder, not an audio file' if os.path.isdir(path) else 'no such audio file'}")
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)  # (N, channels)
    except (sf.SoundFileError, RuntimeError) as e:  # libsndfile says "Format not recognised" etc.
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio clip (0 samples)")
    audio = torch.from_numpy(data).mean(dim=1)  # mono mixdown: the plain channel average
    audio = (AF.resample(audio, file_sr, sr) if file_sr != sr else audio).contiguous()
    if audio.numel() < HOP_LENGTH:   # not one 10 ms mel frame: nothing the encoder could hear
        raise AudioError(f"{path}: {audio.numel() / sr * 1000:.1f} ms is shorter than one 10 ms mel frame")
    return audio


@lru_cache(maxsize=None)
def mel_filters(n_mels, device=torch.device("cpu")):
    # Slaney triangles, as librosa.filters.mel made Whisper's mel_filters.npz. Built in float64 as librosa does:
    # in float32 the narrow triangles' edge weights are off by up to 0.3%.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fb = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, "slaney", "slaney")
    finally:
        torch.set_default_dtype(default)
    return fb.T.to(device, torch.float32).contiguous()  # (n_mels, 201)


def log_mel(audio, n_mels=80, pad_to_30s=True):
    """Whisper's log-mel of (N,) or (B, N) 16 kHz audio; pad_to_30s: T = 3000 frames as Whisper was trained,
    else T = N // 160, the real frames only."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    n = audio.shape[-1]
    if pad_to_30s:
        # A frame wholly in the zero padding has power exactly 0: only the frames whose window touches the
        # clip need an FFT; the rest are appended below as the log of zero power.
        frames = min(N_FRAMES, (n + N_FFT // 2 + HOP_LENGTH - 1) // HOP_LENGTH)
        audio = F.pad(audio, (0, min(N_FFT, N_SAMPLES - n))) if n < N_SAMPLES else audio[..., :N_SAMPLES]
    else:
        frames = n // HOP_LENGTH   # the centered STFT has N // hop + 1 frames; Whisper drops the last
        if frames == 0:
            raise ValueError(f"log_mel: {n} samples is shorter than one {HOP_LENGTH}-sample hop")
        if n <= N_FFT // 2:  # reflect padding needs more than n_fft//2 samples; only clips under 12.5 ms
            audio = F.pad(audio, (0, N_FFT // 2 + 1 - n))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # center=True, reflect
    # drop the last frame, as Whisper does; re^2 + im^2 is its abs() ** 2 without the sqrt
    power = stft.real[..., :frames].square() + stft.imag[..., :frames].square()
    log_spec = (mel_filters(n_mels, audio.device) @ power).clamp(min=1e-10).log10()
    if pad_to_30s:  # the all-silent frames: power 0 clamps to 1e-10, log10 exactly -10
        log_spec = F.pad(log_spec, (0, N_FRAMES - frames), value=-10.0)
    # floor at max - 8 (80 dB) per clip, so batching never changes a clip's features
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_batch(clips, n_mels=80, pad_to_30s=True):
    """Clips, each computed alone and cut to 30 s -> (mel (B, n_mels, T), lengths (B,) real frames). Padded: the
    frames the release keeps, ceil(n / 160) as its feature extractor's mask counts them."""
    clips = [torch.as_tensor(c, dtype=torch.float32)[:N_SAMPLES] for c in clips]
    lengths = torch.tensor([-(-len(c) // HOP_LENGTH) if pad_to_30s else len(c) // HOP_LENGTH for c in clips])
    mels = [log_mel(c, n_mels, pad_to_30s) for c in clips]
    T = max(m.shape[-1] for m in mels)   # real-frames rows are right-padded with 0, as the encoder's conv1 pads
    return torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mels]), lengths


def pad_batch(rows, pad_id, labels=None, side="right"):
    """-> (ids, labels or None, valid), each (B, S); generation pads left."""
    S = max(len(r) for r in rows)

    def pad(row, value):
        return list(row) + [value] * (S - len(row)) if side == "right" else [value] * (S - len(row)) + list(row)
    ids = torch.tensor([pad(r, pad_id) for r in rows], dtype=torch.long)
    valid = torch.tensor([pad([True] * len(r), False) for r in rows], dtype=torch.bool)
    return ids, None if labels is None else torch.tensor([pad(l, IGNORE) for l in labels], dtype=torch.long), valid

