"""T5 prompt encoding: parity with diffusers' CogView3PlusPipeline.encode_prompt on the same folder."""
import shutil

import pytest
import sentencepiece
import torch

from cogview_ray.model.checkpoint import make_checkpoint
from cogview_ray.model.loading import CheckpointError
from cogview_ray.model.text_encoder import TextEncoder

pytestmark = pytest.mark.timeout(120)

LONG = "A red fox sleeping in the snow under a pine tree at dawn, " * 30
PROMPTS = [
    "A photo of a zebra eating pizza in Paris, 4k!",
    "",
    "Ünïcode 漢字, ﬁ ligatures and ＡＢＣ  with  double  spaces",
    "an <extra_id_3> sentinel and a literal </s> inside",
    LONG,
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def tokenizer_json_dir(tmp_path_factory, checkpoint):
    """The same tokenizer re-saved by transformers: tokenizer.json instead of spiece.model."""
    from transformers import T5Tokenizer

    path = tmp_path_factory.mktemp("tokenizer_json")
    T5Tokenizer.from_pretrained(str(checkpoint / "tokenizer")).save_pretrained(str(path))
    assert (path / "tokenizer.json").is_file() and not (path / "spiece.model").exists()
    return path


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return TextEncoder.from_folders(checkpoint / "text_encoder", checkpoint / "tokenizer", "cpu", torch.float32)


def _reference(checkpoint, dtype):
    from diffusers import CogView3PlusPipeline

    return CogView3PlusPipeline.from_pretrained(str(checkpoint), torch_dtype=dtype)


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_len", [224, 8])
def test_encode_matches_diffusers_encode_prompt(checkpoint, dtype, max_len):
    ours = TextEncoder.from_folders(checkpoint / "text_encoder", checkpoint / "tokenizer", "cpu", dtype)
    ref = _reference(checkpoint, dtype)
    embeds, counts = ours.encode(PROMPTS, max_sequence_length=max_len)
    with torch.no_grad():
        expected, negative = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                               max_sequence_length=max_len, device=torch.device("cpu"), dtype=dtype)
    assert negative is None
    assert embeds.shape == (len(PROMPTS), max_len, 32) and embeds.dtype == dtype
    torch.testing.assert_close(embeds, expected, atol=0, rtol=0)
    # counts are the untruncated lengths the reference tokenizer gives (EOS included)
    untruncated = ref.tokenizer(PROMPTS, add_special_tokens=True).input_ids
    assert counts == [len(ids) for ids in untruncated]


def test_token_counts_flag_truncation(encoder, checkpoint):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer" / "spiece.model"))
    plain = ["A photo of a zebra eating pizza in Paris, 4k!", "", LONG]
    ids, counts = encoder.tokenize(plain, max_sequence_length=224)
    assert counts == [len(sp.encode(p)) + 1 for p in plain]
    assert counts[1] == 1 and counts[2] > 224 >= counts[0]
    assert ids.shape == (3, 224) and ids.dtype == torch.int64
    # truncated rows keep 223 content tokens then EOS; short rows are EOS then pad 0
    assert ids[2].tolist() == sp.encode(LONG)[:223] + [1]
    assert ids[0, counts[0] - 1] == 1 and ids[0, counts[0]:].eq(0).all()
    assert ids[1].tolist() == [1] + [0] * 223


def test_spiece_and_tokenizer_json_folders_tokenize_identically(checkpoint, tokenizer_json_dir, encoder):
    other = TextEncoder.from_folders(checkpoint / "text_encoder", tokenizer_json_dir, "cpu", torch.float32)
    for max_len in (224, 8):
        ids_a, counts_a = encoder.tokenize(PROMPTS, max_len)
        ids_b, counts_b = other.tokenize(PROMPTS, max_len)
        assert torch.equal(ids_a, ids_b) and counts_a == counts_b
    assert torch.equal(encoder.encode(PROMPTS)[0], other.encode(PROMPTS)[0])


def test_special_ids_follow_t5(encoder):
    tok = encoder.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    assert len(tok) <= encoder.model.config.vocab_size


def test_empty_batch_gives_empty_embeddings(encoder):
    embeds, counts = encoder.encode([], max_sequence_length=16)
    assert embeds.shape == (0, 16, 32) and counts == []


def test_prompts_must_be_a_list_of_strings(encoder):
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("a single string")
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode(["ok", None])


def test_pickle_only_text_encoder_is_refused(tmp_path, checkpoint):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(checkpoint / "text_encoder" / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle checkpoints can execute code"):
        TextEncoder.from_folders(folder, checkpoint / "tokenizer", "cpu", torch.float32)


def test_tokenizer_folder_without_vocabulary_is_refused(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="neither spiece.model nor tokenizer.json"):
        TextEncoder.from_folders(checkpoint / "text_encoder", tmp_path, "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="does not exist"):
        TextEncoder.from_folders(checkpoint / "text_encoder", tmp_path / "absent", "cpu", torch.float32)


class _CountingTokenizer:
    """The encoder's tokenizer, counting how often it is called."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("max_len", [1, 2, 3, 8, 224])
def test_one_tokenizer_call_gives_truncated_ids_and_full_counts(encoder, max_len):
    prompts = PROMPTS + ["x </s>", "</s>" * 40, "<pad> <pad> a", "a <unk>"]
    tok = encoder.tokenizer
    counting = _CountingTokenizer(tok)
    single = TextEncoder(counting, encoder.model, encoder.device, encoder.dtype)
    ids, counts = single.tokenize(prompts, max_sequence_length=max_len)
    assert counting.calls == 1
    expected = tok(prompts, padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True,
                   return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    untruncated = tok(prompts, add_special_tokens=True, truncation=False, verbose=False).input_ids
    assert counts == [len(x) for x in untruncated]
    assert [c > max_len for c in counts] == [len(x) > max_len for x in untruncated]
    counting.calls = 0
    single.encode(prompts, max_sequence_length=max_len)
    assert counting.calls == 1


def test_encoder_is_built_on_meta_and_loaded_by_assignment(checkpoint, monkeypatch):
    """No `from_pretrained` (it loads on the host, then moves): the meta-device path, embedding held once."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("T5EncoderModel.from_pretrained must not be used")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    model = TextEncoder.from_folders(checkpoint / "text_encoder", checkpoint / "tokenizer", "cpu",
                                     torch.bfloat16).model
    assert not model.training and not any(p.requires_grad or p.is_meta for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
