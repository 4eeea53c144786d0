"""T5 prompt encoder: tokenizes and encodes prompts exactly as diffusers' CogView3PlusPipeline does."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from cogview_ray.model.loading import CheckpointError, build_and_load, check_weights_format, open_safetensors_state

TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
NO_LIMIT = 1_000_000_000
# the encoder's token embedding is the model's `shared` table (stored once, held once)
T5_TIED = {"encoder.embed_tokens.weight": "shared.weight"}


class TextEncoder:
    """A T5 tokenizer plus T5 encoder on one device, in one dtype. The tokenizer is transformers'
    Rust-backed T5Tokenizer (transformers 5), whose encodings report what truncation cut."""

    def __init__(self, tokenizer: T5Tokenizer, model: T5EncoderModel, device: torch.device, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_folders(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> "TextEncoder":
        """Load `text_encoder/` (safetensors only) and `tokenizer/` (spiece.model or tokenizer.json)."""
        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        device = torch.device(device)
        if not tokenizer_dir.is_dir():
            raise CheckpointError(f"Tokenizer folder {tokenizer_dir} does not exist.")
        if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(f"Tokenizer folder {tokenizer_dir} has neither spiece.model nor tokenizer.json.")
        check_weights_format(text_encoder_dir)
        tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        config = T5Config.from_pretrained(str(text_encoder_dir), local_files_only=True)
        # Built on the meta device and loaded tensor by tensor straight to `device` in `dtype`, as
        # every component is: host memory never holds the whole encoder on the way to a GPU.
        model = build_and_load(lambda: T5EncoderModel(config), open_safetensors_state(text_encoder_dir),
                               device, dtype, "text_encoder", tied=T5_TIED)
        vocab = model.config.vocab_size
        if len(tokenizer) > vocab:
            raise CheckpointError(
                f"Tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the text encoder's vocab_size is {vocab}."
            )
        return cls(tokenizer, model, device, dtype)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def model_max_length(self) -> int | None:
        """The tokenizer's declared token limit, or None where it declares none."""
        n = self.tokenizer.model_max_length
        # transformers marks "no limit" with a huge sentinel (1e30)
        return int(n) if isinstance(n, int) and 0 < n < NO_LIMIT else None

    def tokenize(self, prompts: list[str], max_sequence_length: int = 224) -> tuple[torch.Tensor, list[int]]:
        """Ids [B, max_sequence_length] (EOS appended, padded with 0) and the untruncated token counts.

        One tokenizer call, so each prompt is tokenized once: the Rust tokenizer keeps what
        truncation cut as `overflowing` encodings, each post-processed (special tokens added)
        and padded like the first, so the untruncated count is the real tokens of all of them,
        less the special tokens added to each overflowing part.
        """
        _check_prompts(prompts)
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        counts = [sum(sum(part.attention_mask) - specials for part in (enc, *enc.overflowing)) + specials
                  for enc in batch.encodings]
        return batch.input_ids, counts

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = 224) -> tuple[torch.Tensor, list[int]]:
        """Embeddings [B, max_sequence_length, d_model] in `dtype` on `device`, and token counts.

        A count above `max_sequence_length` means the prompt was truncated. As in the reference
        pipeline, no attention mask is given to the encoder, so padding tokens are attended.
        """
        _check_prompts(prompts)
        if len(prompts) == 0:
            empty = torch.empty(0, max_sequence_length, self.hidden_size, dtype=self.dtype, device=self.device)
            return empty, []
        ids, counts = self.tokenize(prompts, max_sequence_length)
        hidden = self.model(input_ids=ids.to(self.device))[0]  # [B, L, d_model]
        return hidden.to(dtype=self.dtype, device=self.device), counts


def _check_prompts(prompts) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings.")
