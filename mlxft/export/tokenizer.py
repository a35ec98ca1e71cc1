"""The tokenizer inside a GGUF, written the way llama.cpp's converter (convert_hf_to_gguf.py) writes
it, so that llama.cpp splits text exactly as the training tokenizer did:

- byte-level BPE (`tokenizer.ggml.model = gpt2`): tokens, types, merges and the `pre`
  pre-tokenizer name;
- SentencePiece (`llama`): pieces, real scores, types and `add_space_prefix`, from
  `tokenizer.model` when the folder has one, else from the SentencePiece-style BPE in
  `tokenizer.json` (what transformers saves, and what a GGUF import gives);
- special token ids, merges and add_sep through gguf-py's `SpecialVocab`; add_bos/add_eos from
  what the HF tokenizer really does; the chat template the run trained with.

`pre` is chosen the way llama.cpp's converter chooses it: the sha256 of the token ids the HF
tokenizer gives for llama.cpp's check text, looked up in a table of known tokenizers. Unknown
hashes fall back to recognising the pre-tokenizer's regex in tokenizer.json; if that fails too
we refuse, because a wrong `pre` silently changes how llama.cpp splits text.
"""

from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path

from mlxft.errors import ModelError

# llama.cpp's convert_hf_to_gguf.py check text, verbatim.
CHK_TXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# sha256(str(tokenizer.encode(CHK_TXT))) -> llama.cpp pre-tokenizer name (constants from
# llama.cpp's get_vocab_base_pre, for the families mlxft exports).
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama-3 Smaug
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen 1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # GPT-2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # Mistral Nemo
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",     # Phi-4 mini
}

# Pre-tokenizer regexes llama.cpp implements, for tokenizers whose hash is not in the table.
_LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_BY_REGEX = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}

# gguf TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# end-of-turn markers of the chat families mlxft knows (llama.cpp stops on `tokenizer.ggml.eot_token_id`)
EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def chk_hash(tokenizer) -> str:
    return sha256(str(tokenizer.encode(CHK_TXT)).encode()).hexdigest()


def bpe_pre(tokenizer, tokenizer_json: dict, where: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer."""
    digest = chk_hash(tokenizer)
    if digest in PRE_BY_HASH:
        return PRE_BY_HASH[digest]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel" and not steps[-1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_BY_REGEX:
            return PRE_BY_REGEX[regex]
    raise ModelError(f"{where}: BPE pre-tokenizer not recognised (check hash {digest[:16]}...); "
                     "llama.cpp would split text differently from the model's tokenizer")


def looks_special(text: str) -> bool:
    """llama.cpp's heuristic for added tokens that should be CONTROL even if not marked special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def load_hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelError(f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None


class Vocab:
    """Everything tokenizer-related that goes into the GGUF, computed before writing starts.
    `chat_template` overrides the folder's own (the run's recorded training template)."""

    def __init__(self, folder: Path, n_vocab: int, arch: str, chat_template: str | None = None):
        self.folder = Path(folder)
        self.arch = arch
        self.tok = load_hf_tokenizer(self.folder)
        tj_path = self.folder / "tokenizer.json"
        # the tokenizer as transformers built it (its class may override tokenizer.json's pre-tokenizer)
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            self.tokenizer_json = json.loads(backend.to_str())
        else:
            self.tokenizer_json = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
        model = self.tokenizer_json.get("model") or {}
        self.scores = None
        self.merges: list[str] = []
        self.add_space_prefix = None
        if (self.folder / "tokenizer.model").is_file():
            self.model, self.pre = "llama", "default"
            self._sentencepiece(n_vocab)
        elif model.get("type") == "BPE" and not self._byte_level():
            self.model, self.pre = "llama", "default"
            self._sentencepiece_json(n_vocab)
        elif model.get("type") == "BPE":
            self.model = "gpt2"
            self.pre = bpe_pre(self.tok, self.tokenizer_json, str(tj_path))
            self._bpe(n_vocab)
        else:
            raise ModelError(f"{self.folder}: tokenizer type {model.get('type') or 'unknown'} is not supported "
                             "(byte-level BPE or SentencePiece)")
        if self.model == "llama":
            self.add_space_prefix = self._adds_space_prefix()
        self._specials(n_vocab)
        if chat_template is not None:
            self.chat_template = chat_template

    def _byte_level(self) -> bool:
        text = json.dumps(self.tokenizer_json.get("pre_tokenizer")) + json.dumps(self.tokenizer_json.get("decoder"))
        return "ByteLevel" in text

    def _adds_space_prefix(self) -> bool:
        """Whether the tokenizer puts a "▁" before the first word. llama.cpp's converter sets this
        per family (False for Gemma); asking the tokenizer gives the same answer for every family,
        and llama.cpp's default (True) would otherwise prepend a space to every text."""
        pieces = self.tok.convert_ids_to_tokens(self.tok.encode("Hello", add_special_tokens=False))
        return bool(pieces) and pieces[0].startswith("\u2581")

    def _bpe(self, n_vocab: int) -> None:
        vocab = self.tok.get_vocab()
        if max(vocab.values()) >= n_vocab:
            raise ModelError(f"{self.folder}: tokenizer has ids beyond the embedding rows ({n_vocab})")
        reverse = {i: t for t, i in vocab.items()}
        added = {int(i): t for i, t in self.tok.added_tokens_decoder.items()}
        self.tokens, self.types = [], []
        for i in range(n_vocab):
            if i in added:
                tok = added[i]
                self.tokens.append(tok.content)
                self.types.append(CONTROL if tok.special or looks_special(tok.content) else USER_DEFINED)
            elif i in reverse:
                self.tokens.append(reverse[i])
                self.types.append(NORMAL)
            else:
                self.tokens.append(f"[PAD{i}]")
                self.types.append(UNUSED)

    def _added(self, i: int, tok) -> None:
        """An added token, typed and spelled as llama.cpp's converter does: CONTROL when special
        (or named like one), else USER_DEFINED with "▁" written as the space llama.cpp matches."""
        special = tok.special or looks_special(tok.content)
        self.tokens[i] = tok.content if special else tok.content.replace("\u2581", " ")
        self.scores[i] = -1000.0
        self.types[i] = CONTROL if special else USER_DEFINED

    def _sentencepiece(self, n_vocab: int) -> None:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(self.folder / "tokenizer.model"))
        self.tokens = [f"[PAD{i}]" for i in range(n_vocab)]
        self.scores = [-10000.0] * n_vocab
        self.types = [UNUSED] * n_vocab
        for i in range(min(sp.vocab_size(), n_vocab)):
            kind = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
            self.tokens[i], self.scores[i], self.types[i] = sp.IdToPiece(i), sp.GetScore(i), kind
        for i, tok in self.tok.added_tokens_decoder.items():
            i = int(i)
            if i >= n_vocab or (i < sp.vocab_size() and self.tokens[i] == tok.content and self.types[i] != NORMAL):
                continue
            self._added(i, tok)

    def _sentencepiece_json(self, n_vocab: int) -> None:
        """A SentencePiece vocabulary stored as BPE in tokenizer.json (byte fallback, "▁" for
        spaces): what transformers saves without tokenizer.model, and what a GGUF import gives.
        llama.cpp merges the adjacent pair whose joined piece has the highest score, where HF BPE
        merges the pair with the lowest merge rank; so a piece's score is minus the rank of the
        first merge that makes it, and the two agree merge for merge. Pieces no merge makes are
        never looked up as a merge result; they keep their order below every merged piece."""
        model = self.tokenizer_json["model"]
        vocab = model.get("vocab") or {}
        if max(vocab.values(), default=0) >= n_vocab:
            raise ModelError(f"{self.folder}: tokenizer has ids beyond the embedding rows ({n_vocab})")
        rank: dict[str, int] = {}
        for r, merge in enumerate(model.get("merges") or []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            rank.setdefault(left + right, r)
        floor = len(rank) + 1
        self.tokens = [f"[PAD{i}]" for i in range(n_vocab)]
        self.scores = [-1000.0] * n_vocab
        self.types = [UNUSED] * n_vocab
        byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        for piece, i in vocab.items():
            self.tokens[i] = piece
            if model.get("byte_fallback") and byte_piece.fullmatch(piece):
                self.scores[i], self.types[i] = 0.0, BYTE
            elif piece == model.get("unk_token"):
                self.scores[i], self.types[i] = 0.0, UNKNOWN
            else:
                self.scores[i], self.types[i] = -float(rank.get(piece, floor + i)), NORMAL
        for i, tok in self.tok.added_tokens_decoder.items():
            if int(i) < n_vocab:
                self._added(int(i), tok)

    def _specials(self, n_vocab: int) -> None:
        """Special ids, merges and add_sep from gguf-py's SpecialVocab (as llama.cpp's converter
        reads them). add_bos/add_eos are decided by encoding a text with the HF tokenizer instead:
        SpecialVocab leaves them unset when tokenizer_config.json does not say, and llama.cpp's
        default for an unset key depends on the vocabulary type, not on what training did."""
        import logging

        import gguf

        log = logging.getLogger("gguf.vocab")
        level = log.level
        log.setLevel(logging.ERROR)  # its notes on unusual post-processors are not the user's concern
        try:
            self.special = gguf.SpecialVocab(self.folder, load_merges=self.model == "gpt2", n_vocab=n_vocab)
        finally:
            log.setLevel(level)
        self.special.chat_template = None  # the template is chosen by the run (see mlxft.templates)
        if self.model == "gpt2":
            self.merges = list(self.special.merges)
            if not self.merges:
                raise ModelError(f"{self.folder}/tokenizer.json: BPE tokenizer without merges")
        self.special.merges, self.special.load_merges = [], False  # written by write() itself
        ids = self.special.special_token_ids
        tok = self.tok
        for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id)):
            if key not in ids and value is not None and 0 <= value < n_vocab:
                ids[key] = int(value)
        self.bos, self.eos, self.unk, self.pad = ids.get("bos"), ids.get("eos"), ids.get("unk"), ids.get("pad")
        with_special = tok.encode("a", add_special_tokens=True)
        without = tok.encode("a", add_special_tokens=False)
        self.add_bos = bool(self.bos is not None and with_special[:1] == [self.bos] and without[:1] != [self.bos])
        self.add_eos = bool(self.eos is not None and with_special[-1:] == [self.eos] and without[-1:] != [self.eos])
        self.special.add_special_token.update(bos=self.add_bos, eos=self.add_eos)
        self.chat_template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
        self.eot = None
        for text in EOT_TEXTS:
            if text in self.tokens and self.types[self.tokens.index(text)] == CONTROL:
                self.eot = self.tokens.index(text)
                break

    def write(self, w) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        self.special.add_to_gguf(w, quiet=True)
        if self.eot is not None:
            w.add_eot_token_id(int(self.eot))
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)

    def stop_tokens(self) -> list[str]:
        """Texts that end a turn: EOS, end-of-turn, and generation_config's extra EOS ids."""
        out = []
        for i in self.stop_ids():
            if self.tokens[i] not in out:
                out.append(self.tokens[i])
        return out

    def stop_ids(self) -> list[int]:
        ids = [i for i in (self.eos, self.eot) if i is not None]
        gen = self.folder / "generation_config.json"
        if gen.is_file():
            try:
                extra = json.loads(gen.read_text()).get("eos_token_id")
            except ValueError:
                extra = None
            ids += extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
        seen = []
        for i in ids:
            if isinstance(i, int) and 0 <= i < len(self.tokens) and i not in seen:
                seen.append(i)
        return seen
