"""Export that checks itself: the GGUF just written is loaded by llama.cpp (llama-cpp-python) and
compared with the trained model as mlxft's backend runs it, on the run's validation
conversations (or, for a plain model, mlxft's general probe prompts):

    tokens   llama.cpp's token ids == the training tokenizer's, on every prompt and conversation
             (chat template applied, special tokens parsed), and the same BOS behaviour
    answers  greedy answers to the first N prompts, llama.cpp vs the backend, text for text
    top-1 / KL  next-token agreement (near-ties that rounding can swap excepted: tie_margin)
             and mean KL(backend || llama.cpp) over the conversations
    stops    every end-of-turn token the run trained with is end-of-generation for llama.cpp,
             and llama.cpp stops wherever the backend stopped with the same answer

A check passes within the tolerances of TOLERANCES (by tensor type; docs/export.md). The
Modelfile check renders its TEMPLATE with Go's text/template (py-go-template), as Ollama does,
and compares it character for character with the chat template's own rendering.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.templates import ChatSetup, adds_bos, render

# type -> (largest mean KL in nats, smallest top-1 agreement, smallest share of identical answers)
TOLERANCES = {
    "f32": (0.001, 0.99, 0.75), "f16": (0.005, 0.98, 0.5), "bf16": (0.02, 0.95, 0.5),
    "q8_0": (0.03, 0.93, 0.25), "q6_k": (0.06, 0.90, 0.0), "q5_k_m": (0.12, 0.85, 0.0),
    "q5_0": (0.15, 0.85, 0.0), "q5_1": (0.15, 0.85, 0.0), "q4_k_m": (0.25, 0.80, 0.0),
    "q4_0": (0.35, 0.75, 0.0), "q4_1": (0.35, 0.75, 0.0),
}
MAX_TOKENS_PER_TEXT = 384


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Prompt:
    messages: list[dict]   # the conversation up to the last user turn
    answer: str | None     # the reference assistant turn, when the data has one


def conversations(records: list[dict], system: str | None) -> list[Prompt]:
    """Chat / completions records, and preference pairs (their prompt and chosen answer), as
    (prompt turns, reference answer) pairs, the system prompt inserted as training inserts it."""
    out = []
    for rec in records:
        if "chosen" in rec and isinstance(rec.get("prompt"), list):  # a pair (mlxft/formats/pairs.py)
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["prompt"] + rec["chosen"]]
        elif "messages" in rec:
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        elif "prompt" in rec:
            msgs = [{"role": "user", "content": rec["prompt"]}]
            if rec.get("completion"):
                msgs.append({"role": "assistant", "content": rec["completion"]})
        else:
            continue
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            continue
        answer = msgs[last_user + 1]["content"] if last_user + 1 < len(msgs) else None
        out.append(Prompt(msgs[:last_user + 1], answer))
    return out


def probe_records() -> list[dict]:
    path = Path(__file__).resolve().parent.parent / "probes" / "general.jsonl"
    return [{"prompt": r["prompt"]} for r in map(json.loads, path.read_text().splitlines())
            if r.get("kind") == "chat"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray, tie: float = 0.0) -> tuple[float, float, float]:
    """(mean KL(ref || got) in nats, share of positions with the same top-1 token, share where
    `got`'s top-1 token is within `tie` nats of `ref`'s in `ref`'s own log-probabilities: a
    near-tie rounding can swap)."""
    lr, lg = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    pick = got.argmax(-1)
    behind = lr.max(-1) - np.take_along_axis(lr, pick[:, None], -1)[:, 0]
    return float(kl.mean()), float((ref.argmax(-1) == pick).mean()), float((behind <= tie).mean())


def tie_margin(max_kl: float) -> float:
    """The near-tie margin (nats) for a type allowed a mean KL of `max_kl`: a small perturbation
    of the log-probabilities with RMS r costs about r**2 / 2 nats of KL, so the type's bound
    allows r = sqrt(2 * max_kl), and two picks within 2r of each other can swap by rounding
    alone. q8_0: 0.49 nats. Measured on Gemma 3 270M q8_0 (AMD EPYC, AVX2, llama.cpp's 8-bit
    activations): the 14 flips of 192 positions were 0.003-0.42 nats behind but one (1.13)."""
    return 2 * float(np.sqrt(2 * max_kl))


def trained_context(path: Path) -> int | None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    field = reader.fields.get(f"{arch}.context_length")
    return int(field.contents()) if field is not None else None


def load_llama(path: Path, **kwargs):
    """llama_cpp.Llama without llama.cpp's extra CPU buffer types (weight repacking, AMX tiles):
    on a CPU that reports AMX in a process the kernel grants no AMX state, llama.cpp's AMX path
    crashes (SIGSEGV) on the first quantized matmul; without repacking the same GGUF computes the
    same numbers through the ordinary kernels."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


class LlamaCpp:
    """One GGUF in llama.cpp: tokenize, logits of a sequence, greedy answers, EOG tokens."""

    def __init__(self, path: Path, n_ctx: int = 1024):
        import llama_cpp

        self.lib = llama_cpp
        n_ctx = min(n_ctx, trained_context(path) or n_ctx)
        self.llm = load_llama(path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def add_bos(self) -> bool:
        return bool(self.lib.llama_vocab_get_add_bos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_tokens: int) -> tuple[list[int], bool]:
        """(answer ids, whether it ended at an end-of-generation token)."""
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if self.is_eog(token):
                return out, True
            out.append(token)
            self.llm.eval([token])
        return out, False

    def close(self) -> None:
        self.llm.close()


def _backend_greedy(engine, prompts: list[list[int]], max_tokens: int,
                    stop_ids: list[int]) -> list[tuple[list[int], bool]]:
    """(answer ids, whether it stopped) per prompt, generated side by side: the backends drop the
    stop token from what they return, so an answer shorter than max_tokens ended at one."""
    outs = engine.generate_batch(prompts, max_tokens, temperature=0.0, stop_ids=set(stop_ids))
    return [(list(out), len(out) < max_tokens) for out in outs]


def run_selfcheck(gguf_path: Path, engine, chat: ChatSetup, quant: str, records: list[dict],
                  n_answers: int = 4, max_tokens: int = 32, n_texts: int = 8) -> dict:
    """Figures and verdicts of the checks above. `engine` is the trained model loaded through
    mlxft's backend with the run's chat template installed."""
    tok = engine.tokenizer
    prompts = conversations(records, chat.system_prompt)
    if not prompts:
        prompts = conversations(probe_records(), chat.system_prompt)
    kl_max, top1_min, answers_min = TOLERANCES.get(quant, TOLERANCES["q4_0"])
    llm = LlamaCpp(gguf_path)
    try:
        prompt_texts = [render(tok, chat.template, p.messages, add_generation_prompt=True) for p in prompts]
        full_texts = [render(tok, chat.template, p.messages + [{"role": "assistant", "content": p.answer}])
                      for p in prompts if p.answer]
        texts = prompt_texts + full_texts
        mismatched = []
        for text in texts:
            if llm.tokenize(text) != list(tok(text, add_special_tokens=False)["input_ids"]):
                mismatched.append(text)
        tokens = {"equal": len(texts) - len(mismatched), "total": len(texts),
                  "add_bos_equal": llm.add_bos() == adds_bos(tok),
                  "first_mismatch": mismatched[0][:200] if mismatched else None}
        tokens["ok"] = not mismatched and tokens["add_bos_equal"]

        same = stopped_both = stopped_backend = 0
        answers = []
        texts = prompt_texts[:n_answers]
        all_ids = [list(tok(text, add_special_tokens=False)["input_ids"])[-MAX_TOKENS_PER_TEXT:] for text in texts]
        for text, ids, (ref, ref_stop) in zip(texts, all_ids, _backend_greedy(engine, all_ids, max_tokens,
                                                                               chat.stop_ids)):
            got, got_stop = llm.greedy(ids, max_tokens)
            a, b = tok.decode(ref, skip_special_tokens=True), tok.decode(got, skip_special_tokens=True)
            same += a == b
            if ref_stop and a == b:
                stopped_backend += 1
                stopped_both += got_stop
            answers.append({"prompt": text[-120:], "mlxft": a, "llama_cpp": b, "mlxft_stopped": ref_stop,
                            "llama_cpp_stopped": got_stop})
        n = len(answers)
        answer_check = {"same": same, "total": n, "ok": n == 0 or same / n >= answers_min, "min_share": answers_min,
                        "samples": answers}

        eog = {t: llm.is_eog(t) for t in chat.stop_ids}
        stops = {"tokens": chat.stop_tokens, "end_of_generation": all(eog.values()),
                 "stopped": stopped_both, "should_stop": stopped_backend}
        stops["ok"] = stops["end_of_generation"] and stopped_both == stopped_backend

        tie = tie_margin(kl_max)
        kls, agree, agree_near, positions = [], [], [], 0
        for text in (full_texts or prompt_texts)[:n_texts]:
            ids = list(tok(text, add_special_tokens=False)["input_ids"])[:MAX_TOKENS_PER_TEXT]
            if len(ids) < 2:
                continue
            kl, top1, near = compare_logits(engine.logits(ids), llm.logits(ids), tie)
            agree_near.append(near * len(ids))
            kls.append(kl * len(ids))
            agree.append(top1 * len(ids))
            positions += len(ids)
        mean_kl = sum(kls) / positions if positions else float("nan")
        top1 = sum(agree) / positions if positions else float("nan")
        top1_near = sum(agree_near) / positions if positions else float("nan")
        # The top-1 bound holds for picks outside near-ties: which of two nearly equal tokens wins
        # depends on how the CPU's kernels round (llama.cpp rounds activations to 8 bits for
        # quantized types, differently on each instruction set), not on the export.
        logit_check = {"mean_kl": mean_kl, "top1": top1, "top1_beyond_ties": top1_near, "tie_nats": tie,
                       "positions": positions, "max_kl": kl_max, "min_top1": top1_min,
                       "ok": positions > 0 and mean_kl <= kl_max and top1_near >= top1_min}
    finally:
        llm.close()
    checks = {"tokens": tokens, "answers": answer_check, "logits": logit_check, "stops": stops}
    return {"ok": all(c["ok"] for c in checks.values()), "quant": quant, "prompts": len(prompts), **checks}


def summary_line(result: dict) -> str:
    if result.get("skipped"):
        return f"self-check skipped: {result['skipped']}"
    t, a, lg, s = result["tokens"], result["answers"], result["logits"], result["stops"]

    def mark(check):
        return "ok" if check["ok"] else "FAIL"

    parts = [f"tokens {t['equal']}/{t['total']} equal ({mark(t)})",
             f"answers {a['same']}/{a['total']} same ({mark(a)})",
             f"top-1 {lg['top1']:.1%} ({lg['top1_beyond_ties']:.1%} beyond near-ties), "
             f"KL {lg['mean_kl']:.4f} ({mark(lg)})",
             f"stops {s['stopped']}/{s['should_stop']} at {', '.join(s['tokens'])} ({mark(s)})"]
    if "modelfile" in result:
        ok = result["modelfile"]["ok"]
        parts.append("Modelfile template " + ("matches" if ok else "DIFFERS" if ok is False
                                              else f"not checked ({result['modelfile']['reason']})"))
    return f"self-check {'passed' if result['ok'] else 'FAILED'}: " + "; ".join(parts)


# ---------------------------------------------------------------------------- Modelfile


SAMPLES = [
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2+2?\nAnswer with a digit."}],
    [{"role": "user", "content": "Name a colour of the sky."}],
]


def ollama_values(messages: list[dict]) -> dict:
    """What Ollama hands its template: the messages (consecutive same-role ones merged, as its
    collate does) and every system message's text joined as .System."""
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["Content"] for m in merged if m["Role"] == "system")
    return {"Messages": merged, "System": system, "Prompt": "", "Response": ""}


_RENDER = """import json, sys
from pathlib import Path
import go_template
sys.stdout.write(go_template.render(Path(sys.argv[1]), json.loads(sys.stdin.read())).decode("utf-8"))
"""


def render_go(template: str, values: dict) -> str:
    """Go's text/template output (py-go-template), in a subprocess: its parse errors exit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "template.tmpl"
        path.write_text(template, encoding="utf-8")
        res = subprocess.run([sys.executable, "-c", _RENDER, str(path)], input=json.dumps(values),
                             capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise ValueError((res.stderr or res.stdout).strip().splitlines()[-1] if (res.stderr or res.stdout).strip()
                         else f"exit code {res.returncode}")
    return res.stdout


def go_renderer_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("go_template") is not None


def check_modelfile(go_tpl: str | None, system: str | None, tokenizer, chat: ChatSetup) -> dict:
    """Render the Modelfile TEMPLATE as Ollama would (SYSTEM prepended to a conversation that has
    no system message) and the chat template for the same turns (BOS left out when the runtime
    adds it); they must be equal character for character."""
    if go_tpl is None:
        return {"ok": False, "reason": "no TEMPLATE (chat template family not recognised)"}
    if not go_renderer_installed():
        return {"ok": None, "reason": "skipped: py-go-template (Go's text/template) not installed"}
    for sample in SAMPLES:
        messages = list(sample)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        expected = render(tokenizer, chat.template, messages, add_generation_prompt=True)
        if chat.bos_token and expected.startswith(chat.bos_token):
            expected = expected[len(chat.bos_token):]
        try:
            got = render_go(go_tpl, ollama_values(messages))
        except (ValueError, subprocess.TimeoutExpired) as exc:
            return {"ok": False, "reason": f"TEMPLATE does not render: {exc}"}
        if got != expected:
            at = next((i for i, (x, y) in enumerate(zip(got, expected)) if x != y), min(len(got), len(expected)))
            return {"ok": False, "reason": f"differs at character {at}", "expected": expected, "rendered": got}
    return {"ok": True, "samples": len(SAMPLES)}
