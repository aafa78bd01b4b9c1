"""Make a random-weight Llama with a locally trained tokenizer, saved as a HF model directory.

Nothing is downloaded: the weights are random (seeded, so every process and
every run makes the same model) and the tokenizer is a byte-level BPE trained
here on generated text. The model cannot produce meaningful text; it exists so
that vLLM and transformers run their real code paths on something that fits a
laptop. Outputs are deterministic under greedy decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

_WORDS = (
    "cache tier memory block chunk layer token prefix shared region disk redis "
    "vector kernel page host device stream copy load store evict promote flush "
    "alpha beta gamma delta river mountain forest ocean city market garden engine "
    "report summary question answer document section figure table value result"
).split()


@dataclass(frozen=True)
class LlamaSpec:
    num_layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vocab_size: int = 4096
    max_positions: int = 8192
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def sample_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-prose, used for corpora and prompts."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) + (str(rng.randrange(100)) if rng.random() < 0.2 else "")
                    for _ in range(n_words))


def make_local_llama(directory: str | os.PathLike, spec: LlamaSpec = LlamaSpec()) -> Path:
    """Create (or reuse, when the same spec is already there) a local Llama model directory."""
    path = Path(directory).expanduser()
    stamp = path / "stratacache_spec.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("digest") == spec.digest():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((sample_text(200, seed) for seed in range(200)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=spec.max_positions)
    fast.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    stamp.write_text(json.dumps({"digest": spec.digest(), "spec": asdict(spec)}))
    return path
