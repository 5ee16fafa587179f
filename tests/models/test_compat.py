import pytest

from dspark.errors import IncompatibleTokenizersError
from dspark.models import CompatMode, check_pair, check_tokenizers, load_model, load_tokenizer, tokenizer_hash
from dspark.models.compat import shared_token_count

from .conftest import STORIES, builtin_ready

needs_draft_s = pytest.mark.skipif(not builtin_ready("tiny-code-draft-s"), reason="tiny-code-draft-s not built")
needs_draft_m = pytest.mark.skipif(not builtin_ready("tiny-code-draft-m"), reason="tiny-code-draft-m not built")
needs_target = pytest.mark.skipif(not builtin_ready("tiny-code"), reason="tiny-code not built")


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """stories260K with its embedding matrix grown by 64 rows, saved and reloaded through dspark."""
    base = load_model(str(STORIES), offline=True)
    base.model.resize_token_embeddings(base.vocab_size + 64)
    out = tmp_path_factory.mktemp("stories-padded")
    base.model.save_pretrained(out, safe_serialization=True)
    base.tokenizer.save_pretrained(out)
    return load_model(str(out), offline=True)


@needs_draft_s
def test_stories_vs_builtin_family_is_different(stories):
    draft = load_model("tiny-code-draft-s")
    c = check_pair(stories, draft)
    assert c.mode is CompatMode.DIFFERENT and not c.compatible
    assert (c.target_tokenizer_size, c.draft_tokenizer_size) == (512, 4096)
    assert c.common_vocab_size is None
    assert c.shared_tokens == shared_token_count(stories.tokenizer.get_vocab(), draft.tokenizer.get_vocab())
    assert c.shared_tokens < 512
    assert c.message.startswith("different tokenizers")
    assert c.target_hash != c.draft_hash
    with pytest.raises(IncompatibleTokenizersError, match="different tokenizers"):
        c.require_shared_vocab("distillation")


@needs_draft_s
@needs_draft_m
def test_builtin_drafts_share_the_tokenizer():
    s, m = load_tokenizer("tiny-code-draft-s"), load_tokenizer("tiny-code-draft-m")
    c = check_tokenizers(s, m)
    assert c.mode is CompatMode.SAME and c.compatible
    assert c.shared_tokens == len(s) == len(m) == c.common_vocab_size
    assert c.target_hash == c.draft_hash and not c.special_token_diffs


@needs_target
@needs_draft_s
def test_builtin_target_and_draft_are_same():
    target, draft = load_model("tiny-code"), load_model("tiny-code-draft-s")
    c = check_pair(target, draft)
    assert c.mode is CompatMode.SAME
    assert c.target_vocab_size == c.draft_vocab_size == target.vocab_size
    assert c.require_shared_vocab() is c


def test_padded_embeddings_are_same_padded(stories, padded):
    assert padded.vocab_size == 512 + 64 and padded.tokenizer_size == 512
    c = check_pair(padded, stories)
    assert c.mode is CompatMode.SAME_PADDED and c.compatible
    assert (c.target_vocab_size, c.draft_vocab_size, c.common_vocab_size) == (576, 512, 512)
    assert c.shared_tokens == 512 and c.target_hash == c.draft_hash
    assert "padded" in c.message
    # Symmetric the other way round.
    r = check_pair(stories, padded)
    assert (r.mode, r.target_vocab_size, r.draft_vocab_size) == (CompatMode.SAME_PADDED, 512, 576)
    # Without the model sizes, the tokenizers alone look identical.
    assert check_tokenizers(stories.tokenizer, padded.tokenizer).mode is CompatMode.SAME


def test_identical_map_with_other_eos_is_same_but_reported():
    a, b = load_tokenizer(str(STORIES)), load_tokenizer(str(STORIES))
    b.eos_token = "<unk>"
    c = check_tokenizers(a, b)
    assert c.mode is CompatMode.SAME
    assert len(c.special_token_diffs) == 1 and c.special_token_diffs[0].startswith("eos:")
    assert "special tokens differ" in c.message
    assert c.target_hash != c.draft_hash


def test_an_extra_token_makes_tokenizers_different():
    a, b = load_tokenizer(str(STORIES)), load_tokenizer(str(STORIES))
    b.add_tokens(["<extra>"])
    c = check_tokenizers(a, b)
    assert c.mode is CompatMode.DIFFERENT
    assert (c.shared_tokens, c.draft_tokenizer_size) == (512, 513)


def test_tokenizer_hash_is_stable_and_sensitive():
    a, b = load_tokenizer(str(STORIES)), load_tokenizer(str(STORIES))
    h = tokenizer_hash(a)
    assert len(h) == 64 and h == tokenizer_hash(b)
    # Setting a pad token at run time does not change what ids mean.
    b.pad_token = b.eos_token
    assert tokenizer_hash(b) == h
    b.add_tokens(["<extra>"])
    assert tokenizer_hash(b) != h


def test_to_dict_is_json_ready(stories, padded):
    import json

    d = check_pair(padded, stories).to_dict()
    assert json.loads(json.dumps(d))["mode"] == "same-padded"
