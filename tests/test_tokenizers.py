"""The shipped CLIP tokenizers equal the published vocabulary and SD3's two padding rules."""
import hashlib
import json

from flashsd3.tokenizers import clip_vocab_and_merges, sd3_clip_tokenizers, write_clip_tokenizer_folders
from helpers_reference import read_json


def test_vocab_and_merges_equal_the_reference_files():
    # the 1.6 MB reference files are checked by digest (tests/fixtures/clip_bpe_digest.json)
    digest = read_json("clip_bpe_digest.json")
    vocab, merges = clip_vocab_and_merges()
    assert (len(vocab), len(merges)) == (digest["vocab_entries"], digest["merges"])
    canonical = json.dumps(vocab, sort_keys=True, ensure_ascii=False).encode()
    assert hashlib.sha256(canonical).hexdigest() == digest["vocab_sha256"]
    assert hashlib.sha256("\n".join(merges).encode()).hexdigest() == digest["merges_sha256"]


def test_known_ids_and_padding():
    tok_l, tok_g = sd3_clip_tokenizers()
    assert tok_l("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # known CLIP ids
    ids_l = tok_l("hello!", padding="max_length", max_length=77).input_ids
    ids_g = tok_g("hello!", padding="max_length", max_length=77).input_ids
    assert len(ids_l) == len(ids_g) == 77
    # tokenizer/ pads with <|endoftext|>; tokenizer_2/ pads with "!" (id 0), which HF also splits out
    # of the text as a special token (its tokenizer_config.json lists "!" as an added token), exactly as
    # diffusers tokenizes.
    assert ids_l[:4] == [49406, 3306, 256, 49407] and ids_l[4:] == [49407] * 73
    assert ids_g[:4] == [49406, 3306, 0, 49407] and ids_g[4:] == [0] * 73


def test_folders_load_with_from_pretrained(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_folders(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer_2")
    assert tok.pad_token == "!" and tok.model_max_length == 77
