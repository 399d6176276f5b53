"""Tiny random models of every encoder family BERTRAM serves, built locally (no network).

Each is a masked-LM checkpoint (hidden size 32, 2 layers) with the family's kind of tokenizer,
built the way the family's real tokenizer works, over the same small vocabulary (TINY_WORDS):

    bert, distilbert, electra   WordPiece (uncased; ELECTRA: embedding size 16 < hidden size 32)
    roberta, modernbert         byte-level BPE (cased; `Ġ` marks a word start)
    albert                      SentencePiece unigram, uncased (embedding size 16 < hidden size 32)
    deberta-v2, xlm-roberta     SentencePiece unigram, cased (DeBERTa-v3 is a deberta-v2 model)
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "modernbert", "xlm-roberta")
MLM_CLASS = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "distilbert": "DistilBertForMaskedLM",
             "albert": "AlbertForMaskedLM", "electra": "ElectraForMaskedLM", "deberta-v2": "DebertaV2ForMaskedLM",
             "modernbert": "ModernBertForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM"}
EMBEDDING_SIZE = {"albert": 16, "electra": 16}  # the others: the hidden size, 32
PUNCT = [":", '"', ".", ",", "!"]
PIECES = ["s", "ing", "quat", "ly", "e", "r"]


def _words() -> list[str]:
    from tests.conftest import TINY_WORDS

    return TINY_WORDS


def _unigram(specials: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece unigram vocabulary: whole words `▁w`, a few pieces, every letter (no unknown letters)."""
    words = _words()
    letters = sorted(set("".join(words)) | set("zebrapl"))
    vocab = [(s, 0.0) for s in specials] + [("▁" + w, -2.0) for w in words] + [("▁", -3.0)]
    vocab += [("▁" + p, -2.5) for p in PUNCT] + [(p, -3.0) for p in PUNCT] + [(p, -4.0) for p in PIECES]
    vocab += [(c, -6.0) for c in letters if c not in PIECES] + [("▁" + c, -6.0) for c in letters if c != "a"]
    return vocab


def _byte_bpe(specials: list[str]) -> dict:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" " + " ".join(_words()) + ' : " , .'] * 20, vocab_size=420, min_frequency=1,
                            special_tokens=specials)
    return bpe


def _tokenizer(family: str):
    import transformers as tf
    from tokenizers import AddedToken, processors

    if family in ("bert", "distilbert", "electra"):
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + PUNCT + _words() + ["##" + p for p in PIECES]
        vocab += ["app", "##le"]  # so that "apple" splits when its own token is removed (the OTA self-check)
        cls = {"bert": tf.BertTokenizer, "distilbert": tf.DistilBertTokenizer, "electra": tf.ElectraTokenizer}[family]
        return cls(vocab={w: i for i, w in enumerate(vocab)})
    if family == "albert":
        return tf.AlbertTokenizer(vocab=_unigram(["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]))
    if family == "deberta-v2":
        return tf.DebertaV2Tokenizer(vocab=_unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]))
    if family == "xlm-roberta":
        return tf.XLMRobertaTokenizer(vocab=_unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    # The mask absorbs the space before it (lstrip), as in roberta-base's and ModernBERT's tokenizers.
    mask = AddedToken("<mask>" if family == "roberta" else "[MASK]", lstrip=True, special=True, normalized=False)
    if family == "roberta":
        spec = json.loads(_byte_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])._tokenizer.to_str())["model"]
        return tf.RobertaTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]], mask_token=mask)
    # modernbert: byte-level BPE with BERT's special tokens around it, as ModernBERT's tokenizer.json has
    backend = _byte_bpe(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])._tokenizer
    backend.add_special_tokens([mask])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))])
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                      sep_token="[SEP]", pad_token="[PAD]",
                                      mask_token="[MASK]")


def build(family: str, out: Path) -> Path:
    """Save a tiny random masked-LM `family` model and its tokenizer to `out`."""
    import torch
    import transformers as tf

    tokenizer = _tokenizer(family)
    tokenizer.save_pretrained(out)
    n, ids = len(tokenizer), dict(pad_token_id=tokenizer.pad_token_id)
    small = dict(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=130)
    config = {
        "bert": lambda: tf.BertConfig(**small),
        "roberta": lambda: tf.RobertaConfig(**small, **ids),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=n, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                                                  max_position_embeddings=130),
        "albert": lambda: tf.AlbertConfig(**small, embedding_size=16, **ids),
        "electra": lambda: tf.ElectraConfig(**small, embedding_size=16),
        "deberta-v2": lambda: tf.DebertaV2Config(**small, **ids, relative_attention=True, position_buckets=16,
                                                 pos_att_type=["p2c", "c2p"]),
        "modernbert": lambda: tf.ModernBertConfig(**small, **ids, local_attention=16, global_attn_every_n_layers=2,
                                                  cls_token_id=tokenizer.cls_token_id,
                                                  sep_token_id=tokenizer.sep_token_id,
                                                  bos_token_id=tokenizer.cls_token_id,
                                                  eos_token_id=tokenizer.sep_token_id),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**small, **ids),
    }[family]()
    torch.manual_seed(0)
    getattr(tf, MLM_CLASS[family])(config).save_pretrained(out)
    return out
