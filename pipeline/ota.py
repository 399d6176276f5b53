"""One-Token-Approximation (OTA): one input embedding that stands in for a word's pieces.

For a word the tokenizer splits into pieces p1..pk, OTA finds the vector e that, put
in place of the pieces, best reproduces the frozen language model's hidden states of
every *other* token (all layers) in random templates

    [CLS] r1..rp  p1..pk  s1..ss . [SEP]     (real)
    [CLS] r1..rp    e     s1..ss . [SEP]     (approximation)

with r, s random vocabulary tokens drawn afresh at every step. e starts at the mean of
the pieces' embeddings and is trained with Adam (lr 1e-3). Words of any piece counts
are optimised together in one batch: sequences are padded and the positions after the
word are gathered per word, so there is no Python loop over words or piece counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class OtaSettings:
    steps: int = 4000
    lr: float = 1e-3
    prefix_tokens: int = 1  # random tokens before the word
    suffix_tokens: int = 1  # random tokens after it (then ".")
    seed: int = 1234
    bf16: bool = False  # run the language model under bf16 autocast on a GPU (the vectors stay float32)


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
    space = " " if _is_byte_level(tokenizer) else ""
    return tokenizer([space + w for w in words], add_special_tokens=False)["input_ids"] if words else []


def _is_byte_level(tokenizer) -> bool:
    return "Ġ" in "".join(list(tokenizer.get_vocab())[:2000])


def approximate(lm, tokenizer, pieces: list[list[int]], settings: OtaSettings,
                init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """OTA vectors (B, H) and their losses (B,) for words given as piece-id lists.

    The loss is averaged over the last steps (up to 50): each step draws new templates,
    so a single step's loss is noisy.

    `init` (B, H) overrides the mean-of-pieces start (used by the self-check on words the
    tokenizer keeps whole). The language model is frozen; only the B vectors are trained.
    """
    device = next(lm.parameters()).device
    lm.eval().requires_grad_(False)
    embedding = lm.get_input_embeddings()
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    vocab = template_vocabulary(tokenizer)
    B, k_max = len(pieces), max(len(p) for p in pieces)
    p, s = settings.prefix_tokens, settings.suffix_tokens
    dot = tokenizer(" ." if _is_byte_level(tokenizer) else ".", add_special_tokens=False)["input_ids"][-1]

    lengths = torch.tensor([len(x) for x in pieces], device=device)  # (B,)
    piece_tensor = torch.full((B, k_max), tokenizer.pad_token_id, dtype=torch.long, device=device)
    for b, x in enumerate(pieces):
        piece_tensor[b, :len(x)] = torch.tensor(x)
    if init is None:
        valid = (torch.arange(k_max, device=device) < lengths[:, None]).unsqueeze(-1)  # (B, k, 1)
        init = (embedding(piece_tensor) * valid).sum(1) / lengths[:, None]  # (B, H)
    vector = torch.nn.Parameter(init.detach().clone().float())
    optimizer = torch.optim.Adam([vector], lr=settings.lr)

    # Layout: [CLS] r(p) word s(s) . [SEP]; the word takes k_b positions (real) or 1 (approx).
    start = 1 + p
    tail = s + 2  # s random tokens, ".", [SEP]
    real_len = start + lengths + tail  # (B,)
    T_real = start + k_max + tail
    positions = torch.arange(T_real, device=device)
    real_mask = positions[None, :] < real_len[:, None]  # (B, T_real)
    # Positions to compare: the prefix as is, the tail shifted by the word's length.
    left = torch.arange(start, device=device)
    right_approx = start + 1 + torch.arange(tail, device=device)  # (tail,)
    right_real = start + lengths[:, None] + torch.arange(tail, device=device)  # (B, tail)
    rows = torch.arange(B, device=device)[:, None]

    bf16 = settings.bf16 and device.type == "cuda"
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    recent: list[torch.Tensor] = []
    for _ in range(settings.steps):
        rand = vocab[torch.randint(len(vocab), (B, p + s), generator=generator)].to(device)  # (B, p+s)
        real = torch.full((B, T_real), tokenizer.pad_token_id, dtype=torch.long, device=device)
        real[:, 0] = tokenizer.cls_token_id
        real[:, 1:start] = rand[:, :p]
        real[rows, start + torch.arange(k_max, device=device)] = torch.where(
            torch.arange(k_max, device=device) < lengths[:, None], piece_tensor, tokenizer.pad_token_id)
        real[rows, right_real] = torch.cat([rand[:, p:], torch.full((B, 1), dot, device=device),
                                            torch.full((B, 1), tokenizer.sep_token_id, device=device)], dim=1)
        approx = torch.cat([real[:, :start], torch.full((B, 1), tokenizer.pad_token_id, device=device),
                            real[rows, right_real]], dim=1)  # (B, approx_len)

        with torch.no_grad(), autocast():
            target = lm(input_ids=real, attention_mask=real_mask.long(), output_hidden_states=True).hidden_states
            target = torch.stack(target[1:], dim=1)  # (B, L, T_real, H)
            target = torch.cat([target[:, :, left], target[rows, :, right_real].transpose(1, 2)], dim=2)
        embeds = embedding(approx)  # (B, approx_len, H)
        embeds = embeds.index_put((torch.arange(B, device=device), torch.full((B,), start, device=device)),
                                  vector.to(embeds.dtype))
        with autocast():
            hidden = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        hidden = torch.stack(hidden[1:], dim=1)  # (B, L, approx_len, H)
        hidden = torch.cat([hidden[:, :, left], hidden[:, :, right_approx]], dim=2)
        per_word = F.mse_loss(hidden.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        optimizer.zero_grad(set_to_none=True)
        per_word.sum().backward()  # words are independent: each vector only sees its own loss
        optimizer.step()
        recent = (recent + [per_word.detach()])[-50:]
    return vector.detach(), torch.stack(recent).mean(0) if recent else torch.zeros(B, device=device)
