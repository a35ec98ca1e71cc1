"""The tokenizer inside a GGUF: BPE (byte-level, `tokenizer.ggml.model = gpt2`: tokens, types,
merges, and the `pre` pre-tokenizer name) or SentencePiece (`llama`: pieces, scores, types),
plus special token ids, add_bos/add_eos and the chat template.

`pre` is chosen the way llama.cpp's converter chooses it: the sha256 of the token ids the HF
tokenizer gives for llama.cpp's check text, looked up in a table of known tokenizers. Unknown
hashes fall back to recognising the pre-tokenizer's regex in tokenizer.json; if that fails too
we refuse, because a wrong `pre` silently changes how llama.cpp splits text.
"""

from __future__ import annotations

import json
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
    """Everything tokenizer-related that goes into the GGUF, computed before writing starts."""

    def __init__(self, folder: Path, n_vocab: int, arch: str):
        self.folder = Path(folder)
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
            if arch == "gemma3":
                self.add_space_prefix = False
        elif model.get("type") == "BPE" and not self._byte_level():
            self.model, self.pre = "llama", "default"
            self._llama_hf(n_vocab)
        elif model.get("type") == "BPE":
            self.model = "gpt2"
            self.pre = bpe_pre(self.tok, self.tokenizer_json, str(tj_path))
            self._bpe(n_vocab)
        else:
            raise ModelError(f"{self.folder}: tokenizer type {model.get('type') or 'unknown'} is not supported "
                             "(byte-level BPE or SentencePiece)")
        self._specials()

    def _byte_level(self) -> bool:
        text = json.dumps(self.tokenizer_json.get("pre_tokenizer")) + json.dumps(self.tokenizer_json.get("decoder"))
        return "ByteLevel" in text

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
        merges = (self.tokenizer_json.get("model") or {}).get("merges") or []
        self.merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        if not self.merges:
            raise ModelError(f"{self.folder}/tokenizer.json: BPE tokenizer without merges")

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
            special = tok.special or looks_special(tok.content)
            self.tokens[i] = tok.content if special else tok.content.replace("\u2581", " ")
            self.scores[i] = -1000.0
            self.types[i] = CONTROL if special else USER_DEFINED

    def _llama_hf(self, n_vocab: int) -> None:
        import gguf

        vocab = gguf.LlamaHfVocab(self.folder)
        self.tokens, self.scores, self.types = [], [], []
        for text, score, kind in vocab.all_tokens():
            self.tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
            self.scores.append(score)
            self.types.append(int(kind))
        for i in range(len(self.tokens), n_vocab):
            self.tokens.append(f"[PAD{i}]")
            self.scores.append(-1000.0)
            self.types.append(UNUSED)
        if len(self.tokens) != n_vocab:
            raise ModelError(f"{self.folder}: tokenizer has more tokens than the embedding rows ({n_vocab})")

    def _specials(self) -> None:
        tok = self.tok
        self.bos, self.eos, self.unk, self.pad = tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id
        with_special = tok.encode("a", add_special_tokens=True)
        without = tok.encode("a", add_special_tokens=False)
        self.add_bos = bool(self.bos is not None and with_special[:1] == [self.bos] and without[:1] != [self.bos])
        self.add_eos = bool(self.eos is not None and with_special[-1:] == [self.eos] and without[-1:] != [self.eos])
        self.chat_template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
        self.eot = None
        for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
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
        for setter, value in ((w.add_bos_token_id, self.bos), (w.add_eos_token_id, self.eos),
                              (w.add_unk_token_id, self.unk), (w.add_pad_token_id, self.pad),
                              (w.add_eot_token_id, self.eot)):
            if value is not None:
                setter(int(value))
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)

    def stop_tokens(self) -> list[str]:
        """Texts that end a turn: EOS, end-of-turn, and generation_config's extra EOS ids."""
        ids = [i for i in (self.eos, self.eot) if i is not None]
        gen = self.folder / "generation_config.json"
        if gen.is_file():
            try:
                extra = json.loads(gen.read_text()).get("eos_token_id")
            except ValueError:
                extra = None
            ids += extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
        out = []
        for i in ids:
            if 0 <= i < len(self.tokens) and self.tokens[i] not in out:
                out.append(self.tokens[i])
        return out
