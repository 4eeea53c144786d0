"""GLM prompt encoding: left padding to a multiple of 16, truncation counts, and embeddings equal
to the reference pipeline's `_get_glm_embeds` for one prompt."""
import pytest
import torch

from cogview_ray.model import CheckpointError
from cogview_ray.model.cogview4.text_encoder import GlmTextEncoder

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def encoder(cogview4_reference_checkpoint):
    root = cogview4_reference_checkpoint
    return GlmTextEncoder.from_folders(root / "text_encoder", root / "tokenizer", "cpu", torch.float32)


def test_ids_are_left_padded_to_a_multiple_of_16(encoder):
    tok = encoder.tokenizer
    pad, gmask, sop = tok.pad_token_id, tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("<sop>")
    ids, count = encoder.tokenize("a cat", 1024)
    assert ids.shape == (1, 16) and count < 16
    assert ids[0, :16 - count].tolist() == [pad] * (16 - count)
    assert ids[0, 16 - count:18 - count].tolist() == [gmask, sop]
    long_ids, long_count = encoder.tokenize(" ".join(["lighthouse"] * 40), 1024)
    assert long_ids.shape[1] % 16 == 0 and long_ids.shape[1] - 16 < long_count <= long_ids.shape[1]


def test_truncation_keeps_the_limit_and_reports_the_full_count(encoder):
    ids, count = encoder.tokenize(" ".join(["lighthouse"] * 40), 40)
    assert ids.shape == (1, 48) and count > 40
    assert (ids[0, :8] == encoder.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("prompt,max_len", [("a cat", 1024), ("一只红色的狐狸, watercolor", 1024),
                                             (" ".join(["lighthouse"] * 40), 32), ("", 1024)])
def test_embeddings_match_reference(encoder, cogview4_reference_checkpoint, prompt, max_len):
    from diffusers import CogView4Pipeline as Ref

    ref = Ref.from_pretrained(str(cogview4_reference_checkpoint), dtype=torch.float32)
    want = ref._get_glm_embeds([prompt], max_len, torch.device("cpu"), torch.float32)
    got, _ = encoder.encode(prompt, max_len)
    assert got.shape == want.shape and got.shape[1] % 16 == 0
    assert torch.equal(got, want)


def test_folder_without_tokenizer_json_refused(cogview4_reference_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        GlmTextEncoder.from_folders(cogview4_reference_checkpoint / "text_encoder", tmp_path, "cpu", torch.float32)
