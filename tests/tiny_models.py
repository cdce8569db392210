"""Tiny, randomly initialised models built offline in milliseconds, for fast tests.

In: a directory. Out: a saved Hugging Face checkpoint (model + tokenizer) there, loadable
with the same `from_pretrained` calls the backend uses for the real defaults.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "How do I bake bread? Mix flour, water, salt and yeast, then bake it.",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side.",
    "There are 7 days in a week and 12 months in a year, 365 days in all.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100. Letters: a b c d e f g h i j k l m n o p.",
    "I am sorry, I cannot help with that. Please ask something else.",
]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_policy(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a trained byte-level BPE vocabulary and a ChatML template."""
    torch.manual_seed(seed)
    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with a WordPiece vocabulary, standing in for MiniLM."""
    torch.manual_seed(seed)
    # the vocabulary is spelt out, not trained: WordPieceTrainer's output changed with PYTHONHASHSEED,
    # and with it every tiny-encoder test's numbers from one run to the next
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = list(dict.fromkeys(specials + words + chars + ["##" + c for c in chars]))
    tok = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path
