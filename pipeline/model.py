"""BERTRAM (Schick & Schütze, ACL 2020): infer an input embedding for a word from its form and contexts.

One model, one file, read top to bottom:

    NgramVocab            character n-grams of a word (n = 3..5, <S> and </S> boundaries)
    FormModel             the form vector: mean of the word's n-gram embeddings
    AttentiveMimicking    reliability weights of a word's contexts from their similarities
    Bertram               form | context | fused (add, add-quotes, replace, shallow, gated),
                          gated/shallow optionally with a third part: the word's pieces (`pieces`)

Shapes in comments: B words in a batch, N contexts in the batch (all words together),
C the most contexts of one word, T tokens per context, H the encoder's hidden size, D the
output size (the language model's input embedding size), G n-grams per word.

A model saves as a directory (`save_pretrained`): `config.json` (BERTRAM settings and the
encoder's config), `model.safetensors`, `ngram_vocab.json` and the base tokenizer. Loading
runs no code from the files and needs no network: the encoder is built from its saved config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from pipeline import storage
from pipeline.precision import bf16_available

MODES = ("form", "context", "add", "add-quotes", "replace", "shallow", "gated")
FUSED_MODES = ("add", "add-quotes", "replace", "shallow", "gated")
GATED_MODES = ("shallow", "gated")  # form and context combined after the encoder by a learned gate
# How one context becomes a vector: the encoder's state at [MASK] in the last layer (the
# paper), the mean of the last four layers there, or either next to the mean-pooled last
# layer over the context's tokens (what a sentence-embedding model is trained to output).
CONTEXT_FEATURES = ("mask", "mask4", "mask+pooled", "mask4+pooled")
PAD, UNK = 0, 1  # n-gram ids
SHARED_DIRECTIONS = 3  # directions projected out of a pieces model's context part, by default (BENCHMARKS.md)
CONFIG_NAME, WEIGHTS_NAME, NGRAMS_NAME = "config.json", "model.safetensors", "ngram_vocab.json"


def autocast(device, enabled: bool = True):
    """bf16 autocast for a forward pass of a frozen model where it pays off (`bf16_available`), else a
    no-op. On this project's 2-core CPU (AMX) the MiniLM encoder runs 2.1x faster, its states at
    cosine 0.99997 to float32 (benchmarks/bf16.py)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bf16_available(device))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random draws on the CPU inside come from `seed`; the process's random state is as it was after."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def fresh_gate(mode: str, pieces: bool) -> bool:
    """Whether `Bertram.fuse` initialises a part afresh (randomly, from its seed): the gate of a gated/shallow
    model without the pieces part (`PiecesGate` starts at zero; every other part comes from the form and
    context models)."""
    return mode in GATED_MODES and not pieces


def uses_form(mode: str) -> bool:
    return mode != "context"


def uses_context(mode: str) -> bool:
    return mode != "form"


def reads_cached_features(mode: str) -> bool:
    """Whether the encoder's input is the context alone (no form vector inside it), so that a
    context's features can be computed once and cached (`jobs.features`)."""
    return uses_context(mode) and form_slot(mode) is None and mode != "replace"


def embedding_size(lm_config) -> int:
    """The size of a language model's input embeddings: what BERTRAM infers and targets have. The hidden
    size, except in families that factorise the embeddings (ALBERT, ELECTRA: `embedding_size`)."""
    return getattr(lm_config, "embedding_size", None) or lm_config.hidden_size


def feature_size(kind: str, hidden_size: int) -> int:
    """Size of one context's feature vector (H')."""
    return 2 * hidden_size if kind.endswith("+pooled") else hidden_size


def context_features(hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor,
                     mask_positions: torch.Tensor, kind: str = "mask") -> torch.Tensor:
    """(N, H') features of N contexts from the encoder's hidden states (embeddings layer first,
    each (N, T, H)), per `CONTEXT_FEATURES`. Training on cached features and inference share it."""
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
    if kind.startswith("mask4"):
        at_mask = torch.stack([h[rows, mask_positions] for h in hidden_states[-4:]]).mean(0)  # (N, H)
    else:
        at_mask = hidden_states[-1][rows, mask_positions]  # (N, H)
    if not kind.endswith("+pooled"):
        return at_mask
    weights = attention_mask.to(hidden_states[-1].dtype).unsqueeze(-1)  # (N, T, 1)
    pooled = (hidden_states[-1] * weights).sum(1) / weights.sum(1).clamp(min=1)  # (N, H)
    return torch.cat([at_mask, pooled], dim=-1)  # (N, 2H)


def form_slot(mode: str) -> int | None:
    """Where the form vector enters the encoder input in the `add` modes:
    `[CLS] <form> : context [SEP]` (position 1) or `[CLS] " <form> " : context [SEP]` (position 2)."""
    return {"add": 1, "add-quotes": 2}.get(mode)


# ---------------------------------------------------------------------------------------
# Form: a bag of character n-grams


class NgramVocab:
    """Character n-grams of words, with `<S>`/`</S>` boundaries; rare n-grams map to UNK."""

    def __init__(self, ngrams: list[str], n_min: int = 3, n_max: int = 5):
        self.itos = ["<PAD>", "<UNK>"] + list(ngrams)
        self.stoi = {g: i for i, g in enumerate(self.itos)}
        self.n_min, self.n_max = n_min, n_max

    @staticmethod
    def ngrams_of(word: str, n_min: int = 3, n_max: int = 5) -> list[str]:
        """All n-grams of `<S>word</S>` for n in [n_min, n_max]; boundary symbols count as one character."""
        chars = ["<S>"] + list(word) + ["</S>"]
        return ["".join(chars[i:i + n]) for n in range(n_min, n_max + 1) for i in range(len(chars) - n + 1)]

    @classmethod
    def build(cls, words: list[str], counts: list[int] | None = None, min_count: int = 4,
              n_min: int = 3, n_max: int = 5) -> "NgramVocab":
        """Keep the n-grams seen at least `min_count` times over the vocabulary (weighted by `counts` if given)."""
        seen: Counter = Counter()
        for i, word in enumerate(words):
            weight = counts[i] if counts is not None else 1
            for g in set(cls.ngrams_of(word, n_min, n_max)):
                seen[g] += weight
        kept = sorted(g for g, c in seen.items() if c >= min_count)
        return cls(kept, n_min, n_max)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: list[str]) -> torch.Tensor:
        """(B, G) n-gram ids, padded with PAD; unknown n-grams are UNK."""
        ids = [[self.stoi.get(g, UNK) for g in self.ngrams_of(w, self.n_min, self.n_max)] or [UNK] for w in words]
        out = torch.full((len(ids), max(len(x) for x in ids)), PAD, dtype=torch.long)
        for row, x in enumerate(ids):
            out[row, :len(x)] = torch.tensor(x)
        return out

    def to_json(self) -> str:
        return json.dumps({"n_min": self.n_min, "n_max": self.n_max, "ngrams": self.itos[2:]}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "NgramVocab":
        data = json.loads(text)
        return cls(data["ngrams"], data["n_min"], data["n_max"])


class FormModel(nn.Module):
    """The form vector of a word: the mean of its n-gram embeddings (PAD masked out)."""

    def __init__(self, vocab_size: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.dropout = dropout

    def forward(self, ngram_ids: torch.Tensor) -> torch.Tensor:
        keep = ngram_ids != PAD  # (B, G)
        if self.training and self.dropout > 0:
            dropped = keep & (torch.rand(keep.shape, device=keep.device) >= self.dropout)
            keep = torch.where(dropped.any(dim=1, keepdim=True), dropped, keep)  # never drop every n-gram
        vectors = self.embedding(ngram_ids) * keep.unsqueeze(-1)  # (B, G, D)
        return vectors.sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp(min=1)  # (B, D)


# ---------------------------------------------------------------------------------------
# Context: attentive mimicking over the encoder's [MASK] outputs


class AttentiveMimicking(nn.Module):
    """Reliability weights of a word's contexts (Schick & Schütze, 2019).

    Contexts are projected, compared pairwise with a scaled dot product, and a context's
    reliability is the sum of its similarities to the word's contexts, normalised to sum
    to 1 over the word's contexts. Padding contexts get weight 0.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, contexts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.linear(contexts)  # (B, C, H)
        similarity = q @ q.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, C, C)
        valid = mask.to(similarity.dtype)  # (B, C)
        similarity = similarity * valid.unsqueeze(1) * valid.unsqueeze(2)
        reliability = similarity.sum(dim=-1)  # (B, C)
        return reliability / (reliability.sum(dim=1, keepdim=True) + 1e-12)  # (B, C)


# ---------------------------------------------------------------------------------------
# The model


@dataclass
class BertramConfig:
    """What defines a BERTRAM model (saved as config.json)."""

    mode: str
    base_model: str  # the language model it was trained for (hub name or path)
    output_size: int  # D: the language model's input embedding size
    ngram_vocab_size: int = 0
    ngram_dropout: float = 0.1
    encoder_config: dict | None = None  # the encoder's transformers config (context modes)
    context_features: str = "mask"  # how a context becomes a vector (CONTEXT_FEATURES)
    # gated/shallow: the mean input embedding of the word's pieces under the LM's tokenizer is a third part
    # (`piece_ids`), the gate weighs the three parts' directions by how far to trust each, and a learned
    # scale sets the norm of the output (`PiecesGate`).
    pieces: bool = False
    shared_directions: int = SHARED_DIRECTIONS  # pieces: shared directions projected out of the context part

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.context_features not in CONTEXT_FEATURES:
            raise ValueError(f"context_features must be one of {', '.join(CONTEXT_FEATURES)}, got "
                             f"{self.context_features!r}")
        if self.pieces and self.mode not in GATED_MODES:
            raise ValueError(f"pieces: the word pieces are a third part of the gated and shallow modes, not of "
                             f"{self.mode!r}")
        if self.context_features != "mask" and not reads_cached_features(self.mode) and uses_context(self.mode):
            raise ValueError(f"mode {self.mode!r} feeds the form vector through the encoder; it reads the "
                             "paper's [MASK] state only (context_features 'mask')")


class Bertram(nn.Module):
    """Form, context or fused BERTRAM. Build with `Bertram.create` or `Bertram.from_pretrained`."""

    def __init__(self, config: BertramConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        # How the encoder is run, not what the model is: with a number, its contexts go through it in
        # length-sorted groups of at most this many padded tokens (`_encode_by_length`); None: one pass.
        self.tokens_per_pass: int | None = None
        if uses_form(config.mode):
            self.form = FormModel(config.ngram_vocab_size, config.output_size, config.ngram_dropout)
        if uses_context(config.mode):
            if encoder is None:
                raise ValueError(f"mode {config.mode!r} needs an encoder")
            self.encoder = encoder
            hidden = feature_size(config.context_features, encoder.config.hidden_size)
            self.mimicking = AttentiveMimicking(hidden)
            self.context_linear = nn.Linear(hidden, config.output_size)
        if config.pieces:
            self.gate = PiecesGate(config.output_size, counts=config.mode == "gated", shared=config.shared_directions)
        elif config.mode in GATED_MODES:  # gated: the gate also reads log(1 + number of contexts)
            self.gate = nn.Linear(2 * config.output_size + (config.mode == "gated"), 1)

    @classmethod
    def create(cls, mode: str, base_model: str, ngram_vocab: NgramVocab | None = None,
               ngram_dropout: float = 0.1, context_features: str = "mask") -> "Bertram":
        """A fresh model for `base_model` (any BERT/RoBERTa that `transformers.AutoModel` loads)."""
        from transformers import AutoModel

        lm = AutoModel.from_pretrained(base_model)
        output_size = lm.get_input_embeddings().embedding_dim
        config = BertramConfig(mode=mode, base_model=base_model, output_size=output_size,
                               ngram_vocab_size=len(ngram_vocab) if ngram_vocab else 0, ngram_dropout=ngram_dropout,
                               encoder_config=lm.config.to_dict() if uses_context(mode) else None,
                               context_features=context_features if uses_context(mode) else "mask")
        if uses_form(mode) and ngram_vocab is None:
            raise ValueError(f"mode {mode!r} needs an n-gram vocabulary")
        model = cls(config, lm if uses_context(mode) else None)
        model.ngram_vocab = ngram_vocab
        return model

    # -- forward ----------------------------------------------------------------------

    def forward(self, ngram_ids: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mask_positions: torch.Tensor | None = None,
                context_word: torch.Tensor | None = None, features: torch.Tensor | None = None,
                piece_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The inferred vectors (B, D) of a batch of words.

        ngram_ids (B, G): the words' n-grams (form modes). input_ids, attention_mask (N, T):
        every context of every word, the word replaced by the mask token (and, in the add
        modes, the form slot after [CLS]); mask_positions (N,): where the mask token is;
        context_word (N,): which of the B words each context belongs to (context modes).
        features (N, H'): instead of input_ids, the contexts' cached `encode_contexts`
        output (modes whose encoder reads the context alone: context, shallow, gated).
        piece_ids (B, P): a `pieces` model's word pieces (`targets.word_pieces`), padded with -1.
        """
        mode = self.config.mode
        form = self.form(ngram_ids) if uses_form(mode) else None  # (B, D)
        if mode == "form":
            return form
        if self.config.pieces and features is None and (input_ids is None or input_ids.shape[0] == 0):
            no_contexts = torch.zeros(form.shape[0], dtype=torch.long, device=form.device)
            return self.gate(torch.zeros_like(form), form, self.pieces_vector(piece_ids), no_contexts,
                             (piece_ids >= 0).sum(1))
        if features is None:
            if input_ids is None or input_ids.shape[0] == 0:
                raise ValueError(f"a {mode!r} model needs at least one context per word")
            features = self.encode_contexts(input_ids, attention_mask, mask_positions, form, context_word)
        elif not reads_cached_features(mode):
            raise ValueError(f"a {mode!r} model feeds the form through the encoder: it cannot read cached features")

        grouped, valid = group_by_word(features, context_word, self._num_words(ngram_ids, context_word))  # (B, C, H')
        weights = self.mimicking(grouped, valid)  # (B, C)
        context = self.context_linear((weights.unsqueeze(-1) * grouped).sum(dim=1))  # (B, D)
        if self.config.pieces:
            if piece_ids is None:
                raise ValueError("a pieces model needs the words' piece_ids (targets.word_pieces)")
            return self.gate(context, form, self.pieces_vector(piece_ids), valid.sum(dim=1), (piece_ids >= 0).sum(1))
        if mode in GATED_MODES:  # a = sigmoid(w . [context; form (; log(1 + n))] + b)
            parts = [context, form]
            if mode == "gated":
                parts.append(torch.log1p(valid.sum(dim=1, keepdim=True).to(context.dtype)))  # (B, 1)
            a = torch.sigmoid(self.gate(torch.cat(parts, dim=-1)))  # (B, 1)
            return a * context + (1 - a) * form
        return context

    @torch.no_grad()
    def context_vectors(self, features: list[torch.Tensor], batch_words: int = 256) -> torch.Tensor:
        """(W, D) the context vectors of the words with cached context features (each (n_w, H'); empty: skipped)."""
        out = []
        for start in range(0, len(features), batch_words):
            chunk = [f for f in features[start:start + batch_words] if len(f)]
            if not chunk:
                continue
            word = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor([len(f) for f in chunk]))
            grouped, valid = group_by_word(torch.cat(chunk).float(), word, len(chunk))
            weights = self.mimicking(grouped, valid)
            out.append(self.context_linear((weights.unsqueeze(-1) * grouped).sum(dim=1)))  # (b, D)
        if not out:
            raise ValueError("context_vectors: no word with features")
        return torch.cat(out)

    def pieces_vector(self, piece_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) mean input embedding of each word's pieces (B, P; -1 pads); zero for a word without any."""
        valid = piece_ids >= 0  # (B, P)
        rows = self.encoder.get_input_embeddings()(piece_ids.clamp(min=0))  # (B, P, D)
        return (rows * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)

    def encode_contexts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor,
                        form: torch.Tensor | None = None, context_word: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H') features of N contexts from the encoder (in the add and replace modes with the
        words' form vectors (B, D) inside the input)."""
        mode = self.config.mode
        embeds = self.encoder.get_input_embeddings()(input_ids)  # (N, T, H)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if mode == "replace":  # the form vector takes the place of the mask token's embedding
            embeds = embeds.index_put((rows, mask_positions), form[context_word].to(embeds.dtype))
        elif form_slot(mode) is not None:  # ... or of the placeholder after [CLS]
            slot = torch.full_like(mask_positions, form_slot(mode))
            embeds = embeds.index_put((rows, slot), form[context_word].to(embeds.dtype))
        if self.tokens_per_pass and input_ids.shape[0] > 1:
            return self._encode_by_length(embeds, attention_mask, mask_positions)
        return self._encode(embeds, attention_mask, mask_positions)

    def _encode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor) -> torch.Tensor:
        kind = self.config.context_features
        out = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask,
                           output_hidden_states=kind != "mask" and kind != "mask+pooled")
        hidden = out.hidden_states if out.hidden_states is not None else (out.last_hidden_state,)
        return context_features(hidden, attention_mask, mask_positions, kind)

    def _encode_by_length(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                          mask_positions: torch.Tensor) -> torch.Tensor:
        """The encoder over length-sorted groups of the rows, each cut to its own longest row and holding at most
        `tokens_per_pass` padded tokens: the same features (padding is masked out) from fewer padded tokens;
        gradients flow as through one pass."""
        from pipeline.batching import token_batches

        lengths = attention_mask.sum(1)  # (N,)
        groups = token_batches(lengths.cpu(), self.tokens_per_pass)
        if len(groups) == 1:
            return self._encode(embeds, attention_mask, mask_positions)
        parts = []
        for rows in groups:
            rows = rows.to(embeds.device)
            width = int(lengths[rows].max())
            parts.append(self._encode(embeds[rows, :width], attention_mask[rows, :width], mask_positions[rows]))
        order = torch.cat(groups).to(embeds.device)
        return torch.cat(parts)[torch.argsort(order)]  # (N, H') back in the rows' order

    @staticmethod
    def _num_words(ngram_ids: torch.Tensor | None, context_word: torch.Tensor) -> int:
        return ngram_ids.shape[0] if ngram_ids is not None else int(context_word.max()) + 1

    # -- fusion -----------------------------------------------------------------------

    @classmethod
    def fuse(cls, form_model: "Bertram", context_model: "Bertram", mode: str = "add",
             pieces: bool = False, context_vectors: torch.Tensor | None = None,
             shared: int = SHARED_DIRECTIONS, seed: int = 0) -> "Bertram":
        """A fused model whose form part comes from `form_model` and context part from `context_model`
        (with `pieces`, a gated/shallow model whose third part is the word's pieces; its output lies around
        the mean of the LM's input rows at their median distance from it, and the directions that
        `context_vectors` (W, D), the context vectors of training words (`context_vectors`), share are
        projected out of its context part: `shared_directions`). What it initialises afresh (`fresh_gate`)
        is drawn from `seed`, so the same parts and seed give the same model."""
        if form_model.config.mode != "form" or context_model.config.mode != "context":
            raise ValueError(f"fuse needs a form and a context model, got {form_model.config.mode!r} and "
                             f"{context_model.config.mode!r}")
        if mode not in FUSED_MODES:
            raise ValueError(f"fused mode must be one of {', '.join(FUSED_MODES)}, got {mode!r}")
        if form_model.config.output_size != context_model.config.output_size:
            raise ValueError("form and context models were trained for different embedding sizes")
        config = BertramConfig(mode=mode, base_model=context_model.config.base_model,
                               output_size=context_model.config.output_size,
                               ngram_vocab_size=form_model.config.ngram_vocab_size,
                               ngram_dropout=form_model.config.ngram_dropout,
                               encoder_config=context_model.config.encoder_config,
                               context_features=context_model.config.context_features, pieces=pieces,
                               shared_directions=shared)
        with seeded(seed):
            fused = cls(config, context_model.encoder)
        fused.load_state_dict({**context_model.state_dict(), **form_model.state_dict()}, strict=False)
        if pieces:
            rows = fused.encoder.get_input_embeddings().weight.detach()  # (V, D)
            fused.gate.center.copy_(rows.float().mean(0))
            if context_vectors is not None:
                fused.gate.context_directions.copy_(shared_directions(context_vectors, fused.gate.center, shared))
            fused.gate.log_scale.data.fill_(float((rows.float() - fused.gate.center).norm(dim=-1).median().log()))
        fused.ngram_vocab = form_model.ngram_vocab
        return fused

    # -- saving and loading -----------------------------------------------------------

    def save_pretrained(self, uri: str, tokenizer=None) -> None:
        """Write config.json, model.safetensors, ngram_vocab.json (+ the tokenizer) to a local or remote URI."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump(asdict(self.config), f, indent=2)
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
            if getattr(self, "ngram_vocab", None) is not None:
                with open(os.path.join(tmp, NGRAMS_NAME), "w", encoding="utf-8") as f:
                    f.write(self.ngram_vocab.to_json())
            if tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            storage.write_dir(tmp, uri)

    @classmethod
    def from_pretrained(cls, uri: str, device: str | torch.device = "cpu") -> "Bertram":
        """Load a saved model; executes nothing from the files and needs no network."""
        from safetensors.torch import load

        config = BertramConfig(**storage.read_json(storage.join(uri, CONFIG_NAME)))
        encoder = None
        if uses_context(config.mode):
            from transformers import AutoConfig, AutoModel

            encoder_config = dict(config.encoder_config)
            model_type = encoder_config.pop("model_type")
            encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **encoder_config))
        model = cls(config, encoder)
        weights = storage.join(uri, WEIGHTS_NAME)
        try:
            state = load(storage.read_bytes(weights))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise storage.UserError(f"{storage.redact(weights)} cannot be read ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:120] if str(exc) else ''}): it is truncated or "
                                    "corrupt; run the stage that wrote it again") from None
        model.load_state_dict(state)
        model.ngram_vocab = None
        if uses_form(config.mode):
            model.ngram_vocab = NgramVocab.from_json(storage.read_text(storage.join(uri, NGRAMS_NAME)))
        return model.to(device).eval()


def shared_directions(vectors: torch.Tensor, center: torch.Tensor, k: int = SHARED_DIRECTIONS) -> torch.Tensor:
    """(k, D) orthonormal directions that the (W, D) `vectors` share, seen from `center`: towards their mean,
    then the top k - 1 principal directions of what is left ("all-but-the-top", Mu & Viswanath 2018: the
    few dominant directions of a frozen encoder's outputs carry little about any one word)."""
    mean = vectors.float().mean(0) - center.float()
    first = nn.functional.normalize(mean, dim=0)
    rest = vectors.float() - center.float()
    rest = rest - (rest @ first).unsqueeze(-1) * first
    _, _, vt = torch.linalg.svd(rest - rest.mean(0), full_matrices=False)
    basis, _ = torch.linalg.qr(torch.cat([first.unsqueeze(0), vt[:k - 1]]).T)  # (D, k)
    return basis.T.contiguous()


class PiecesGate(nn.Module):
    """Combines the context, form and pieces vectors (B, D) of a `pieces` model.

    Each part's direction gets a softmax weight from a linear layer over a few numbers that say how far
    to trust it, not over the vectors themselves (a gate that reads 3 x D inputs learns the words of its
    training domain; these numbers carry over to another): the parts' pairwise cosines (agreement: a
    context vector far from both form and pieces is likely off), their log norms, log(1 + number of
    pieces) and, in gated mode, log(1 + number of contexts). A part a word lacks (no contexts, no pieces)
    gets weight 0. The parts are measured from the centre of the LM's rows (`center`, their mean), and
    the context part loses its components along `context_directions`, the few directions all context
    vectors share (`shared_directions`): a context vector that regresses towards its mean when its
    contexts say little, or drifts along them in another domain, would otherwise pull every word's
    vector the same way. The output is the centre plus the direction of
    the weighted sum of the parts' directions times a learned scale (exp(log_scale)), so that it lies
    among the rows at a row's distance, not at the shrunken norm of a mean. At the start every part
    weighs 1/3.
    """

    FEATURES = 8

    def __init__(self, dim: int, counts: bool = True, shared: int = SHARED_DIRECTIONS):
        super().__init__()
        self.counts = counts
        self.linear = nn.Linear(self.FEATURES, 3)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("center", torch.zeros(dim))  # the mean of the LM's input rows (set by Bertram.fuse)
        # The directions every context vector shares (orthonormal rows: towards the mean context vector of
        # training words, then their top principal directions; `Bertram.fuse`), projected out of the context
        # part; zero rows: nothing projected out.
        self.register_buffer("context_directions", torch.zeros(shared, dim))

    def forward(self, context: torch.Tensor, form: torch.Tensor, pieces: torch.Tensor, n_contexts: torch.Tensor,
                n_pieces: torch.Tensor | None = None) -> torch.Tensor:
        units, weights = self.weigh(context, form, pieces, n_contexts, n_pieces)
        mixed = (weights.unsqueeze(-1) * units).sum(1)  # (B, D)
        return nn.functional.normalize(mixed, dim=-1) * self.log_scale.exp() + self.center

    def weigh(self, context: torch.Tensor, form: torch.Tensor, pieces: torch.Tensor, n_contexts: torch.Tensor,
              n_pieces: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts' directions (B, 3, D) and their weights (B, 3): context, form, pieces."""
        parts = torch.stack([v.float() for v in (context, form, pieces)], 1) - self.center  # (B, 3, D)
        context = parts[:, 0] - (parts[:, 0] @ self.context_directions.T) @ self.context_directions  # (B, D)
        parts = torch.cat([context.unsqueeze(1), parts[:, 1:]], 1)
        norms = parts.norm(dim=-1)  # (B, 3)
        units = parts / norms.clamp_min(1e-12).unsqueeze(-1)
        agreement = units @ units.transpose(1, 2)  # (B, 3, 3)
        n_contexts = n_contexts.to(units.dtype)
        n_pieces = (pieces.abs().sum(-1) > 0).to(units.dtype) if n_pieces is None else n_pieces.to(units.dtype)
        features = torch.cat([agreement[:, 0, 1:], agreement[:, 1, 2:], norms.clamp_min(1e-6).log(),
                              torch.log1p(n_pieces).unsqueeze(-1),
                              torch.log1p(n_contexts).unsqueeze(-1) * self.counts], dim=-1)  # (B, 8)
        logits = self.linear(features)  # (B, 3)
        missing = torch.stack([n_contexts == 0, torch.zeros_like(n_contexts, dtype=torch.bool),
                               pieces.abs().sum(-1) == 0], -1)  # (B, 3): no contexts, no pieces
        return units, torch.softmax(logits.masked_fill(missing, float("-inf")), dim=-1)


def weights_problem(uri: str, config: dict | None = None) -> str | None:
    """What is wrong with the safetensors file at `uri` (truncated, not safetensors, or, given the model's
    `config`, tensors that are not the ones that config builds), from its header and size only (a few KB
    read, not the weights), or None when it looks whole."""
    import json

    try:
        with storage.open_read(uri, compression="disable") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 << 20:
                return "not a safetensors file"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = storage.list_files(uri)[0].size
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return "not a safetensors file"
    if size < 8 + n + end:
        return f"truncated: {size} of {8 + n + end} bytes"
    return None if config is None else _shapes_problem(config, header)


def _shapes_problem(config: dict, header: dict) -> str | None:
    """Whether the tensors a safetensors `header` lists are the ones `config` builds (names and shapes), checked
    on the meta device: nothing is allocated or initialised."""
    built = BertramConfig(**config)
    with torch.device("meta"):
        encoder = None
        if uses_context(built.mode):
            from transformers import AutoConfig, AutoModel

            encoder_config = dict(built.encoder_config)
            encoder = AutoModel.from_config(AutoConfig.for_model(encoder_config.pop("model_type"), **encoder_config))
        expected = {k: list(v.shape) for k, v in Bertram(built, encoder).state_dict().items()}
    found = {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__"}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        return (f"not the weights of the model config.json describes ({len(missing)} tensors missing, e.g. "
                f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]})")
    wrong = next((k for k in sorted(expected) if expected[k] != found[k]), None)
    if wrong:
        return f"not the weights of the model config.json describes ({wrong}: {found[wrong]}, config.json gives " \
               f"{expected[wrong]})"
    return None


def saved_config(uri: str, flag: str = "--bertram", fix: str = "run jobs.train (and jobs.fuse) first, or fix the URI",
                 modes: tuple[str, ...] | None = None, wanted: str = "") -> dict:
    """The saved config of the BERTRAM model at `uri`, once its files are known to be whole; one line
    (a storage.UserError) naming `flag` otherwise: no model there (`fix` says what to run), no mode,
    a missing or truncated file, or a mode not in `modes` (`wanted` says which model to give)."""
    where = f"{flag}{'' if flag.endswith('=') else ' '}{storage.redact(uri)}"  # (--compare name=URI)
    if not storage.exists(storage.join(uri, CONFIG_NAME)):
        raise storage.ConfigError(f"{where} holds no BERTRAM model ({CONFIG_NAME} missing); {fix}")
    try:
        config = storage.read_json(storage.join(uri, CONFIG_NAME))
    except ValueError as exc:  # a file cut short, or not JSON
        raise storage.ConfigError(f"{where}: {CONFIG_NAME} is not JSON ({str(exc).splitlines()[0][:120]}); give a "
                                  "jobs.train or jobs.fuse output, or run the stage that wrote it again") from None
    if not isinstance(config, dict) or "mode" not in config:
        raise storage.ConfigError(f"{where}: {CONFIG_NAME} is not a BERTRAM config (no mode); give a jobs.train or "
                                "jobs.fuse output")
    problem = config_problem(config)
    if problem:  # a damaged or foreign config: one line now, not a traceback in every worker after the corpus pass
        raise storage.ConfigError(f"{where}: {CONFIG_NAME} {problem}; give a jobs.train or jobs.fuse output, or run "
                                  "the stage that wrote it again")
    if modes is not None and config["mode"] not in modes:
        raise storage.ConfigError(f"{where} is a {config['mode']!r} model; {wanted}")
    needed = [WEIGHTS_NAME] + ([NGRAMS_NAME] if uses_form(config["mode"]) else [])
    missing = [name for name in needed if not storage.exists(storage.join(uri, name))]
    if missing:
        raise storage.ConfigError(f"{where} is an incomplete model ({', '.join(missing)} missing); run jobs.train "
                                "(and jobs.fuse) again")
    problem = weights_problem(storage.join(uri, WEIGHTS_NAME), config)
    if problem:  # found now, not by the workers after a corpus pass
        raise storage.ConfigError(f"{where}: {WEIGHTS_NAME} is {problem}; run jobs.train (and jobs.fuse) again")
    return config


def config_problem(config: dict) -> str | None:
    """What makes a saved BERTRAM config unusable (unknown or missing keys, wrong types, an unknown mode or
    encoder type, values the model refuses), in words; None when `Bertram.from_pretrained` can build it."""
    known = {f.name for f in fields(BertramConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        return f"has unknown keys ({', '.join(map(repr, unknown[:4]))}): not written by this version of the pipeline"
    try:
        built = BertramConfig(**config)
    except (TypeError, ValueError) as exc:
        return f"is not valid ({str(exc).splitlines()[0][:200]})"
    for name, kind in (("base_model", str), ("output_size", int), ("ngram_vocab_size", int), ("pieces", bool)):
        if not isinstance(getattr(built, name), kind):
            return f"has {name} {getattr(built, name)!r}, not a {kind.__name__}"
    if uses_context(built.mode):
        encoder = built.encoder_config
        if not isinstance(encoder, dict) or not isinstance(encoder.get("model_type"), str):
            return "has no encoder_config with a model_type (a context mode needs its encoder's config)"
        from transformers import AutoConfig

        rest = {k: v for k, v in encoder.items() if k != "model_type"}
        try:
            AutoConfig.for_model(encoder["model_type"], **rest)
        except (ValueError, KeyError, TypeError) as exc:
            return f"has an encoder_config transformers cannot build ({str(exc).splitlines()[0][:160]})"
    return None


def group_by_word(vectors: torch.Tensor, word: torch.Tensor, num_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter (N, H) context vectors into (B, C, H) by word, with a (B, C) validity mask; no Python loop."""
    counts = torch.bincount(word, minlength=num_words)  # (B,)
    order = torch.argsort(word, stable=True)
    first = torch.cumsum(counts, 0) - counts  # (B,) index of each word's first context in `order`
    slot = torch.empty_like(word)
    slot[order] = torch.arange(len(word), device=word.device) - first[word[order]]  # (N,) rank within its word
    width = int(counts.max()) if len(word) else 0
    grouped = vectors.new_zeros((num_words, width, vectors.shape[-1]))  # (B, C, H)
    grouped = grouped.index_put((word, slot), vectors)
    valid = torch.zeros((num_words, width), dtype=torch.bool, device=vectors.device)
    valid[word, slot] = True
    return grouped, valid
