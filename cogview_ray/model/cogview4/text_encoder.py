"""GLM prompt encoder for CogView4: tokenizes and encodes one prompt exactly as diffusers'
CogView4Pipeline does (left padding to a multiple of 16, the second-to-last hidden state).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GlmModel, PreTrainedTokenizerFast

from ..loading import CheckpointError, check_weights_format

PAD_MULTIPLE = 16  # prompt lengths come in multiples of 16: a bounded set of transformer shapes
NO_LIMIT = 1_000_000_000


class GlmTextEncoder:
    """GLM's fast tokenizer plus a `GlmModel` on one device, in one dtype."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, model: GlmModel, device: torch.device,
                 dtype: torch.dtype):
        self.tokenizer, self.model = tokenizer, model
        self.device, self.dtype = device, dtype
        if tokenizer.pad_token_id is None:
            raise CheckpointError("The GLM tokenizer declares no pad token; CogView4 pads prompts with it.")

    @classmethod
    def from_folders(cls, text_encoder_dir: str | Path, tokenizer_dir: str | Path, device: str | torch.device,
                     dtype: torch.dtype) -> "GlmTextEncoder":
        """Load `text_encoder/` (safetensors only) and `tokenizer/` (tokenizer.json; no remote code)."""
        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"Tokenizer folder {tokenizer_dir} has no tokenizer.json.")
        check_weights_format(text_encoder_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model = GlmModel.from_pretrained(str(text_encoder_dir), dtype=dtype, use_safetensors=True,
                                         local_files_only=True)
        model = model.to(device).eval().requires_grad_(False)
        if len(tokenizer) > model.config.vocab_size:
            raise CheckpointError(f"Tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the text encoder's "
                                  f"vocab_size is {model.config.vocab_size}.")
        return cls(tokenizer, model, torch.device(device), dtype)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def model_max_length(self) -> int | None:
        """The tokenizer's declared token limit, or None where it declares none."""
        n = self.tokenizer.model_max_length
        return int(n) if isinstance(n, int) and 0 < n < NO_LIMIT else None

    def tokenize(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, int]:
        """Ids [1, L] with L a multiple of 16 (pad tokens on the left), and the untruncated token count."""
        if not isinstance(prompt, str):
            raise TypeError("a prompt must be a string.")
        ids = self.tokenizer(prompt, max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                             return_tensors="pt").input_ids
        count = len(self.tokenizer(prompt, add_special_tokens=True).input_ids)
        pad = -ids.shape[1] % PAD_MULTIPLE
        if pad:
            ids = torch.cat([torch.full((1, pad), self.tokenizer.pad_token_id, dtype=ids.dtype), ids], dim=1)
        return ids, count

    @torch.no_grad()
    def encode(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, int]:
        """Embeddings [1, L, hidden] in `dtype` on `device`, and the untruncated token count (above
        `max_sequence_length` means truncated). As in the reference, no attention mask: the causal
        model attends to the left padding."""
        ids, count = self.tokenize(prompt, max_sequence_length)
        out = self.model(input_ids=ids.to(self.device), output_hidden_states=True, use_cache=False)
        return out.hidden_states[-2].to(dtype=self.dtype, device=self.device), count
