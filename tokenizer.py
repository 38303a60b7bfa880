"""Byte-level BPE on tiktoken (as llama3's tokenizer.py), and the chat formats with speech slots in them."""
import base64
import json
import unicodedata
from pathlib import Path

import tiktoken

SPEECH = -1  # one speech slot in a token list; the SpeechLM splices the adapter's embeddings in there


class Tokenizer:
    """Byte-level BPE on tiktoken, read from the two files prepare.py writes into a checkpoint folder
    (convert.write_tokenizer reconciles the folder's own tokenizer files once): tokenizer.tiktoken, Qwen-1's
    rank file (base64 token, rank), and tokenizer.tiktoken.json with the rest. Ids are the checkpoint's."""

    def __init__(self, ranks, meta):
        added = meta["added"]  # name -> id: special and added tokens, ranked after the merges in tiktoken
        self._enc = tiktoken.Encoding("blsp", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                      special_tokens={s: len(ranks) + k for k, s in enumerate(added)})
        self._ranks = ranks
        # the checkpoint's id of each tiktoken rank; None is a byte the vocab lacks, dropped as HF drops it
        self._ids = (meta["ids"] or list(range(len(ranks)))) + list(added.values())
        self._drops = None in self._ids
        self._bytes = {i: b for b, r in ranks.items() if (i := self._ids[r]) is not None}
        self._bytes.update({int(i): base64.b64decode(b) for i, b in meta["decode_only"].items()})
        self._bytes.update({i: s.encode() for s, i in added.items()})
        self._by_name = added
        self._plain_added = set(meta["plain"])  # added but not special: HF matches them even in user text
        self.nfc, self.template, self.eos_ids, self.pad_id = meta["nfc"], meta["template"], meta["eos_ids"], meta["pad_id"]
        self.vocab_size = max(self._bytes) + 1
        # what make_example appends after a complete target: the turn's end, so the model learns to stop
        if self.template == "llama3":
            self.closing_ids = [self.token_id("<|eot_id|>")]
        elif self.template == "chatml":
            self.closing_ids = [self.token_id("<|im_end|>")] + self.encode("\n")
            self.closing_ids += [self.token_id("<|endoftext|>")] if "<|endoftext|>" in added else []
        else:
            self.closing_ids = self.eos_ids[:1]

    @classmethod
    def from_pretrained(cls, folder):
        path, meta = Path(folder) / "tokenizer.tiktoken", Path(folder) / "tokenizer.tiktoken.json"
        if not (path.is_file() and meta.is_file()):
            raise FileNotFoundError(f"{path}: missing; run `python scripts/prepare.py --llm={folder}` first, which writes "
                                    "it from the folder's own tokenizer files")
        # read here, not with tiktoken.load: that caches by path, so a rewritten file would read stale
        lines = path.read_bytes().splitlines()
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in lines if ln)}
        return cls(ranks, json.loads(meta.read_text(encoding="utf-8")))

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
