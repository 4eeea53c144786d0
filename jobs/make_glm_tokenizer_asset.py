"""Train the small GLM-style byte-level BPE tokenizer shipped as
`cogview_ray/assets/glm_tokenizer/tokenizer.json` (CogView4 random-weight checkpoints).

The Hub's GLM-4 tokenizer (151k tokens) cannot be downloaded in tests, so we train a tiny one
on the same hand-written corpus as the T5 asset. Run once:

    python jobs/make_glm_tokenizer_asset.py [--out cogview_ray/assets/glm_tokenizer/tokenizer.json]

Like GLM-4's: byte-level BPE (any UTF-8 text, Chinese included, tokenizes), special tokens after
the learned vocabulary, and every encoding starts with `[gMASK]<sop>`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizer_asset import asset_main, build_corpus  # noqa: E402  (the T5 asset's corpus)

VOCAB_SIZE = 1024
# GLM-4's special tokens, in its order; <|endoftext|> is both eos and pad
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]


def train(out_path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(build_corpus(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    ids = {t: tok.token_to_id(t) for t in ("[gMASK]", "<sop>")}
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B", special_tokens=list(ids.items()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes, {tok.get_vocab_size()} tokens)")


def main() -> None:
    asset_main(__doc__, "glm_tokenizer/tokenizer.json", VOCAB_SIZE, train)


if __name__ == "__main__":
    main()
