"""Byte-level BPE on tiktoken (as llama3's tokenizer.py), and the chat formats with speech slots in them."""
import base64
import itertools
import json
import unicodedata
from pathlib import Path

import tiktoken

SPEECH = -1  # one speech slot in a token list; the SpeechLM splices the adapter's embeddings in there


class Tokenizer:
    """Read from the two files prepare.py writes into a checkpoint folder from its own tokenizer files:
    tokenizer.tiktoken, Qwen-1's rank file (base64 token, rank), and tokenizer.tiktoken.json with the rest."""

    def __init__(self, ranks, meta):
        added = meta["added"]  # name -> id: special and added tokens, ranked after the merges in tiktoken
        self._enc = tiktoken.Encoding("blsp", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                      special_tokens={s: len(ranks) + k for k, s in enumerate(added)})
        self._ranks, self._by_name = ranks, added
        # the checkpoint's id of each tiktoken rank; None is a byte the vocab lacks, dropped as HF drops it
        self._ids = (meta["ids"] or list(range(len(ranks)))) + list(added.values())
        self._bytes = {i: b for b, r in ranks.items() if (i := self._ids[r]) is not None}
        self._bytes.update({int(i): base64.b64decode(b) for i, b in meta["decode_only"].items()})
        self._bytes.update({i: s.encode() for s, i in added.items()})
        self._plain_added = set(meta["plain"])  # added but not special: HF matches them even in user text
        self.nfc, self.template = meta["nfc"], meta["template"]
        self.eos_ids, self.pad_id, self.vocab_size = meta["eos_ids"], meta["pad_id"], max(self._bytes) + 1
        # what cache.make_example appends after a complete target: the turn's end, so the model learns to stop
        end = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>\n" + ("<|endoftext|>" if "<|endoftext|>" in added else "")}
        self.closing_ids = self.encode(end[self.template], True) if self.template in end else self.eos_ids[:1]

    @classmethod
    def from_pretrained(cls, folder):
        path, meta = Path(folder) / "tokenizer.tiktoken", Path(folder) / "tokenizer.tiktoken.json"
        if not (path.is_file() and meta.is_file()):
            raise FileNotFoundError(f"{path}: missing; run `python scripts/prepare.py --llm={folder}` first, which "
                                    "writes it from the folder's own tokenizer files")
        # read here, not with tiktoken.load: that caches by path, so a rewritten file would read stale
        lines = path.read_bytes().splitlines()
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in lines if ln)}
        return cls(ranks, json.loads(meta.read_text(encoding="utf-8")))

    def encode(self, text, allowed_special=False):
        """Text -> ids. allowed_special=False reads special-token text ("<|im_end|>") as plain text, so user
        text can never forge a turn boundary; True turns it into the special token, as HF tokenizers do."""
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        allowed = "all" if allowed_special else self._plain_added
        ranks = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        return [i for r in ranks if (i := self._ids[r]) is not None]

    def decode(self, ids):
        # SPEECH slots print as [SPEECH] so a prompt with speech in it can be logged
        return b"".join(b"[SPEECH]" if i == SPEECH else self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_id(self, name):
        return self._by_name[name] if name in self._by_name else self._ids[self._ranks[name.encode()]]

    def encode_chat(self, messages, add_generation_prompt=True):
        """Messages -> ids in the family's chat format; a SPEECH content part becomes one SPEECH (-1) id.
        Text between two template tokens is encoded as one string, exactly as the rendered template would be;
        only SPEECH splits it. No default system prompt is inserted: callers pass their own."""
        if self.template not in ("chatml", "llama3"):
            raise ValueError("this tokenizer has no chat template (no <|im_start|> or <|start_header_id|> token)")
        t = self.token_id
        turns = [(m["role"], [m["content"]] if isinstance(m["content"], str) else m["content"]) for m in messages]
        items = [] if self.template == "chatml" else [t("<|begin_of_text|>")]
        for role, parts in turns + ([("assistant", None)] if add_generation_prompt else []):
            if self.template == "chatml":
                items += [t("<|im_start|>"), f"{role}\n"] + ([] if parts is None else [*parts, t("<|im_end|>"), "\n"])
            else:
                items += [t("<|start_header_id|>"), role, t("<|end_header_id|>"), "\n\n"]
                items += [] if parts is None else [*parts, t("<|eot_id|>")]
        ids = []
        for is_text, group in itertools.groupby(items, key=lambda x: isinstance(x, str)):
            ids += self.encode("".join(group)) if is_text else list(group)
        return ids
