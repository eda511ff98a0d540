"""Build the tiny offline test models: a byte-level BPE tokenizer and random Llama teacher/student.

Everything is made here, in about a second, from the Jargon File text in data/jargon/: no download.
head_dim is 32 (hidden 64, 2 heads) because vLLM's CPU attention needs head_dim >= 32.

    python data/tiny_models.py OUT_DIR     # writes OUT_DIR/tokenizer, OUT_DIR/teacher, OUT_DIR/student
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def corpus_lines():
    for split in ("train", "heldout"):
        with open(DATA / "jargon" / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield row["prompt"]
                yield row["response"]


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_llama(out_dir: Path, tokenizer, *, layers: int, hidden: int, heads: int, intermediate: int, seed: int,
                head_padding: int = 0, head_scale: float = 1.0, max_positions: int = 512):
    """A random Llama of that shape on ``tokenizer`` (head padded by ``head_padding`` ids, its weights
    multiplied by ``head_scale``), saved with the tokenizer as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + head_padding,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_model(out_dir: Path, tokenizer, *, layers: int, seed: int, head_padding: int = 0):
    """The tests' tiny Llama: hidden 64, 2 heads, a sharper head (× 8: peaked distributions, like a
    trained teacher's)."""
    return build_llama(out_dir, tokenizer, layers=layers, hidden=64, heads=2, intermediate=128, seed=seed,
                       head_padding=head_padding, head_scale=8.0)


def build_tiny_models(out_dir: str | Path) -> dict[str, Path]:
    """Write tokenizer/, teacher/ (2 layers) and student/ (1 layer, head padded by 16) under out_dir."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(out / "tokenizer")
    return {
        "tokenizer": out / "tokenizer",
        "teacher": build_model(out / "teacher", tokenizer, layers=2, seed=0),
        "student": build_model(out / "student", tokenizer, layers=1, seed=1, head_padding=16),
    }


if __name__ == "__main__":
    print(build_tiny_models(sys.argv[1]))
