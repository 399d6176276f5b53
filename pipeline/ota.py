"""One-Token-Approximation (OTA): one input embedding that stands in for a word's pieces.

For a word the tokenizer splits into pieces p1..pk, OTA finds the vector e that, put
in place of the pieces, best reproduces the frozen language model's hidden states of
every *other* token (all layers) in random templates

    [CLS] r1..rp  p1..pk  s1..ss . [SEP]     (real)
    [CLS] r1..rp    e     s1..ss . [SEP]     (approximation)

with r, s random vocabulary tokens. e starts at the mean of the pieces' embeddings and
is trained with Adam. The paper's schedule draws one template per word and step and runs
4,000 steps at lr 1e-3 (`OtaSettings.paper()`); `templates`, `reuse` (several updates on
one draw's target hidden states, which saves the no-grad pass over the real sequence) and
a cosine learning-rate decay reach the same objective in a fraction of the time
(measured: `benchmarks/ota.py`, BENCHMARKS.md). Words of any piece counts are optimised
together in one batch: sequences are padded and the positions after the word are
gathered per word, so there is no Python loop over words or piece counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.precision import bf16_available

SCHEDULES = ("constant", "cosine")


@dataclass
class OtaSettings:
    steps: int = 4000  # optimiser updates per word
    lr: float = 1e-3
    schedule: str = "constant"  # learning rate over the steps: constant | cosine (decays to 0)
    templates: int = 1  # templates drawn per word for each target pass
    reuse: int = 1  # updates on one draw of templates (its target hidden states are computed once)
    prefix_tokens: int = 1  # random tokens before the word
    suffix_tokens: int = 1  # random tokens after it (then ".")
    seed: int = 1234
    bf16: bool = False  # run the language model under bf16 autocast where it pays off (bf16_available; the vectors stay float32)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OTA schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.templates < 1 or self.reuse < 1 or self.steps < 0:
            raise ValueError("OTA templates and reuse must be >= 1 and steps >= 0")

    @classmethod
    def paper(cls, **overrides) -> "OtaSettings":
        """The paper's schedule (the dataclass defaults): Adam at lr 1e-3, one fresh template per word and
        step, 4,000 steps."""
        return cls(**overrides)


def template_vocabulary(tokenizer) -> torch.Tensor:
    """Ids of whole-word tokens to draw template words from (no specials, no continuation pieces)."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for token, i in tokenizer.get_vocab().items():
        if i in special or token.startswith("##") or not any(ch.isalpha() for ch in token):
            continue
        ids.append(i)
    return torch.tensor(sorted(ids))


def piece_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """The pieces each word is split into (as a word in running text: byte-level BPE sees a leading space)."""
    space = " " if is_byte_level(tokenizer) else ""
    return tokenizer([space + w for w in words], add_special_tokens=False)["input_ids"] if words else []


def tokenizer_key(tokenizer) -> tuple[str, int, str]:
    """What a per-tokenizer memo is keyed by: its name or path, its size (added tokens change it), its class."""
    return getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer is byte-level BPE (a word in running text has a leading space). Memoised: its
    vocabulary is rebuilt as a dict on each `get_vocab()` (~7 ms on a 30k vocabulary, per served request)."""
    key = tokenizer_key(tokenizer)
    if key not in _BYTE_LEVEL:
        _BYTE_LEVEL[key] = "Ġ" in "".join(list(tokenizer.get_vocab())[:2000])
    return _BYTE_LEVEL[key]


_BYTE_LEVEL: dict[tuple[str, int, str], bool] = {}


class _Templates:
    """Real and approximated template batches for B words, `n` templates each (rows word-major)."""

    def __init__(self, tokenizer, pieces: list[list[int]], settings: OtaSettings, device):
        self.tokenizer, self.device = tokenizer, device
        self.vocab = template_vocabulary(tokenizer)
        self.p, self.s = settings.prefix_tokens, settings.suffix_tokens
        self.dot = tokenizer(" ." if is_byte_level(tokenizer) else ".", add_special_tokens=False)["input_ids"][-1]
        self.B, self.k_max = len(pieces), max(len(p) for p in pieces)
        self.lengths = torch.tensor([len(x) for x in pieces], device=device)  # (B,)
        self.pieces = torch.full((self.B, self.k_max), tokenizer.pad_token_id, dtype=torch.long, device=device)
        for b, x in enumerate(pieces):
            self.pieces[b, :len(x)] = torch.tensor(x)

    def mean_of_pieces(self, embedding) -> torch.Tensor:
        valid = (torch.arange(self.k_max, device=self.device) < self.lengths[:, None]).unsqueeze(-1)
        return (embedding(self.pieces) * valid).sum(1) / self.lengths[:, None]  # (B, H)

    def draw(self, n: int, generator: torch.Generator) -> dict:
        """n random templates per word: the real ids/mask and the approximation's ids, plus gather indices."""
        tok, dev, p, s = self.tokenizer, self.device, self.p, self.s
        B, k_max = self.B * n, self.k_max
        lengths = self.lengths.repeat_interleave(n)  # (B*n,)
        pieces = self.pieces.repeat_interleave(n, dim=0)
        rand = self.vocab[torch.randint(len(self.vocab), (B, p + s), generator=generator)].to(dev)
        # Layout: [CLS] r(p) word s(s) . [SEP]; the word takes k_b positions (real) or 1 (approx).
        start, tail = 1 + p, s + 2
        real_len = start + lengths + tail
        positions = torch.arange(start + k_max + tail, device=dev)
        right_real = start + lengths[:, None] + torch.arange(tail, device=dev)  # (B, tail)
        rows = torch.arange(B, device=dev)[:, None]
        real = torch.full((B, len(positions)), tok.pad_token_id, dtype=torch.long, device=dev)
        real[:, 0] = tok.cls_token_id
        real[:, 1:start] = rand[:, :p]
        real[rows, start + torch.arange(k_max, device=dev)] = torch.where(
            torch.arange(k_max, device=dev) < lengths[:, None], pieces, tok.pad_token_id)
        real[rows, right_real] = torch.cat([rand[:, p:], torch.full((B, 1), self.dot, device=dev),
                                            torch.full((B, 1), tok.sep_token_id, device=dev)], dim=1)
        approx = torch.cat([real[:, :start], torch.full((B, 1), tok.pad_token_id, device=dev),
                            real[rows, right_real]], dim=1)
        return {"real": real, "real_mask": (positions[None, :] < real_len[:, None]).long(), "approx": approx,
                "rows": rows, "right_real": right_real, "start": start, "tail": tail, "n": n}


def _autocast(bf16: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)


def _target_states(lm, batch: dict, bf16: bool) -> torch.Tensor:
    """Hidden states (all layers) of the real template at the positions the approximation must reproduce."""
    left = torch.arange(batch["start"], device=batch["real"].device)
    with torch.no_grad(), _autocast(bf16, batch["real"].device.type):
        states = lm(input_ids=batch["real"], attention_mask=batch["real_mask"], output_hidden_states=True)
        states = torch.stack(states.hidden_states[1:], dim=1)  # (B, L, T_real, H)
        return torch.cat([states[:, :, left], states[batch["rows"], :, batch["right_real"]].transpose(1, 2)], dim=2)


def _per_word_loss(lm, embedding, batch: dict, vector: torch.Tensor, target: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The OTA objective (B,): MSE between the approximation's and the real template's hidden states,
    averaged over the word's templates."""
    start, n = batch["start"], batch["n"]
    rows = torch.arange(len(batch["approx"]), device=vector.device)
    embeds = embedding(batch["approx"])  # (B*n, approx_len, H)
    embeds = embeds.index_put((rows, torch.full_like(rows, start)), vector.repeat_interleave(n, 0).to(embeds.dtype))
    with _autocast(bf16, vector.device.type):
        hidden = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    hidden = torch.stack(hidden[1:], dim=1)  # (B*n, L, approx_len, H)
    keep = torch.cat([torch.arange(start, device=vector.device),
                      start + 1 + torch.arange(batch["tail"], device=vector.device)])
    loss = F.mse_loss(hidden[:, :, keep].float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.view(-1, n).mean(1)


def approximate(lm, tokenizer, pieces: list[list[int]], settings: OtaSettings,
                init: torch.Tensor | None = None,
                monitor: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """OTA vectors (B, H) and their losses (B,) for words given as piece-id lists.

    The loss is averaged over the last updates (up to 50): each draw has new templates, so
    a single update's loss is noisy. `init` (B, H) overrides the mean-of-pieces start.
    `monitor(update, vectors)` is called before the first update and after every target
    pass (benchmarks use it to record convergence). The language model is frozen; only
    the B vectors are trained; each word's vector only sees its own loss.
    """
    device = next(lm.parameters()).device
    lm.eval().requires_grad_(False)
    embedding = lm.get_input_embeddings()
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    templates = _Templates(tokenizer, pieces, settings, device)
    vector = torch.nn.Parameter((templates.mean_of_pieces(embedding) if init is None else init).detach().clone().float())
    optimizer = torch.optim.Adam([vector], lr=settings.lr)
    if settings.schedule == "cosine" and settings.steps:
        n = settings.steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, n) / n)))
    else:
        scheduler = None
    bf16 = settings.bf16 and bf16_available(device)
    recent: list[torch.Tensor] = []
    update = 0
    if monitor:
        monitor(0, vector.detach())
    while update < settings.steps:
        batch = templates.draw(settings.templates, generator)
        target = _target_states(lm, batch, bf16)
        for _ in range(min(settings.reuse, settings.steps - update)):
            per_word = _per_word_loss(lm, embedding, batch, vector, target, bf16)
            optimizer.zero_grad(set_to_none=True)
            per_word.sum().backward()
            optimizer.step()
            if scheduler:
                scheduler.step()
            recent = (recent + [per_word.detach()])[-50:]
            update += 1
        if monitor:
            monitor(update, vector.detach())
    return vector.detach(), torch.stack(recent).mean(0) if recent else torch.zeros(len(pieces), device=device)


def objective(lm, tokenizer, pieces: list[list[int]], vectors: torch.Tensor, templates: int = 16,
              seed: int = 987654, settings: OtaSettings | None = None) -> torch.Tensor:
    """The OTA objective (B,) of `vectors` on `templates` fixed templates per word (seeded, so
    every schedule is judged on the same held-out templates)."""
    settings = settings or OtaSettings()
    device = next(lm.parameters()).device
    batch = _Templates(tokenizer, pieces, settings, device).draw(templates, torch.Generator().manual_seed(seed))
    bf16 = settings.bf16 and bf16_available(device)
    with torch.no_grad():
        target = _target_states(lm, batch, bf16)
        return _per_word_loss(lm, lm.get_input_embeddings(), batch, vectors.to(device), target, bf16)
