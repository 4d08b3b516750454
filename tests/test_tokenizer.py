"""The tokenizer against independent references: transformers on the same GGUF, and llama.cpp's
pre-tokenizer definition re-implemented here with the `regex` module."""

import copy
import json
import random
from pathlib import Path

import gguf
import jinja2
import pytest
from jinja2.exceptions import SecurityError
from spm_gguf import write_spm_gguf

from jaxinfer.checkpoints import gguf_vocab
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer

# Input classes transformers and llama.cpp agree on.
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 'quoted', isn't it?",
    "accents": "Café naïve résumé façade Ångström, señor Müller über alles",
    "cjk": "你好，世界！日本語のテキストとカタカナ。한국어 텍스트입니다",
    "emoji": "Hi 😀! Family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, skin tone: 👍🏽 ok",
    "code": "def f(x):\n\tif x:\n        return x * 2\n\treturn None\n",
    "whitespace": "a   b\t\tc\n\n\nd  \n  \r\n e    ",
    "digits": "Pi is 3.14159, e=2.718; x12345y and $1,000.50 in 2024.",
    "special_tokens": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
}

# A run of whitespace followed by a digit. SmolLM2's own tokenizer.json splits digits out first
# (Sequence[Digits(individual_digits=True), ByteLevel]) and llama.cpp's "smollm" pre-tokenizer
# does the same, so "a  1" -> "a", "  ", "1" -> [a, ĠĠ, 1]. transformers' GGUF loader (5.24) has
# no entry for "smollm" and keeps plain ByteLevel, whose GPT-2 regex hands the last space to the
# number: "a", " ", " 1" -> [a, Ġ, Ġ, 1]. We follow the model's tokenizer and llama.cpp.
WHITESPACE_BEFORE_DIGITS = {
    "double_space": "a  1",
    "spaced_numbers": "  1  2   3",
    "tabs": "\t\t7",
    "indented_literal": "x = [\n    42,\n    7,\n]",
}


@pytest.fixture(scope="module")
def gguf_path(smollm2_path: Path) -> Path:
    """The packaged SmolLM2 GGUF (conftest's lookup; skips when the package is absent)."""
    return smollm2_path


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path) -> Tokenizer:
    return gguf_vocab.build(gguf_path)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def llama_cpp_smollm_pieces(text: str) -> list[str]:
    """llama.cpp's split for tokenizer.ggml.pre == "smollm" (llama-vocab.cpp): each regex in turn
    cuts every piece into its matches and the gaps between them."""
    regex = pytest.importorskip("regex")
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
    pieces = [text]
    for pattern in (regex.compile(r"\p{N}"), regex.compile(gpt2)):
        cut = []
        for piece in pieces:
            start = 0
            for match in pattern.finditer(piece):
                cut += [piece[start : match.start()], match.group()]
                start = match.end()
            cut.append(piece[start:])
        pieces = [p for p in cut if p]
    return pieces


def llama_cpp_reference_ids(hf_tokenizer, text: str) -> list[int]:
    """llama.cpp's pieces, each BPE-merged by transformers (where a piece is one pre-token too)."""
    return [i for piece in llama_cpp_smollm_pieces(text) for i in hf_tokenizer.encode(piece)]


# -- encoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEXTS)
def test_token_ids_match_transformers(tokenizer, hf_tokenizer, name):
    text = TEXTS[name]
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", [n for n in TEXTS if n != "special_tokens"])
def test_token_ids_match_llama_cpp_pre_tokenizer(tokenizer, hf_tokenizer, name):
    text = TEXTS[name]
    assert tokenizer.encode(text) == llama_cpp_reference_ids(hf_tokenizer, text)


@pytest.mark.parametrize("name", WHITESPACE_BEFORE_DIGITS)
def test_whitespace_before_digits_follows_llama_cpp(tokenizer, hf_tokenizer, name):
    text = WHITESPACE_BEFORE_DIGITS[name]
    assert tokenizer.encode(text) == llama_cpp_reference_ids(hf_tokenizer, text)


def test_whitespace_run_before_a_digit_is_one_token(tokenizer):
    double_space = tokenizer.encode("  ")
    assert len(double_space) == 1  # "ĠĠ" is in the vocabulary
    assert tokenizer.encode("a  1") == tokenizer.encode("a") + double_space + tokenizer.encode("1")


def test_special_token_text_encodes_to_its_id(tokenizer):
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("x<|im_end|>y") == tokenizer.encode("x") + [2] + tokenizer.encode("y")


def test_smollm2_metadata(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        49152,
        1,
        2,
        2,
    )
    assert tokenizer.add_bos is False
    # eos <|im_end|> plus <|endoftext|>, which llama.cpp also treats as end of generation.
    assert tokenizer.stop_ids == (0, 2)


def test_add_bos_prepends_bos(tokenizer):
    assert tokenizer.encode("hi", add_bos=True) == [1, *tokenizer.encode("hi")]


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [*TEXTS.values(), *WHITESPACE_BEFORE_DIGITS.values()])
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_decode_skips_special_tokens_by_default(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>")
    assert tokenizer.decode(ids) == "user\nHello"


# -- chat template --------------------------------------------------------------------------------

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_and_user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help? 😀"},
        {"role": "user", "content": "Count to 3:\n1, 2, ..."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Thanks."},
    ],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, name):
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.apply_chat_template(messages) == expected


def test_chat_template_without_generation_prompt_matches_transformers(tokenizer, hf_tokenizer):
    messages = CONVERSATIONS["multi_turn"]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected


# Exercises what transformers adds to jinja: tojson without HTML escaping, bos/eos variables,
# loop controls, {% generation %}, strftime_now, trim_blocks/lstrip_blocks.
HELPERS_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}{% continue %}{% endif %}
    {{ message | tojson }}|{{ message | tojson(indent=2) }}
    {% generation %}{{ message.content }}{% endgeneration %}
{% endfor %}
{{ {"ü": "<b>&"} | tojson }}{{ strftime_now("%Y") }}{{ eos_token }}
{% if add_generation_prompt %}GO{% endif %}"""


def test_template_helpers_match_transformers(tokenizer, hf_tokenizer):
    custom = copy.copy(tokenizer)
    custom.chat_template = HELPERS_TEMPLATE
    messages = CONVERSATIONS["system_and_user"]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=HELPERS_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert custom.apply_chat_template(messages) == expected


def test_raise_exception_in_template_raises_template_error(tokenizer):
    custom = copy.copy(tokenizer)
    custom.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        custom.apply_chat_template(CONVERSATIONS["single_user"])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
    ],
)
def test_sandbox_blocks_malicious_template(tokenizer, template):
    custom = copy.copy(tokenizer)
    custom.chat_template = template
    with pytest.raises(SecurityError):
        custom.apply_chat_template(CONVERSATIONS["single_user"])


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        ([], "non-empty list"),
        ({"role": "user", "content": "hi"}, "non-empty list"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] needs a string 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\].*'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\] needs a string 'content'"),
    ],
)
def test_bad_messages_raise_clear_error(tokenizer, messages, complaint):
    with pytest.raises(ValueError, match=complaint):
        tokenizer.apply_chat_template(messages)


# -- streaming detokenization ---------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("name", ["emoji", "cjk", "accents"])
def test_streamed_pieces_never_split_a_character(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name])
    pieces = stream(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXTS[name]
    # Some characters span several tokens, so some steps had to hold text back.
    assert len(ids) > len([p for p in pieces if p])


def test_streaming_holds_back_an_unfinished_character_until_flush(tokenizer):
    ids = tokenizer.encode("ok 😀")
    emoji_ids = ids[len(tokenizer.encode("ok")) :]
    assert len(emoji_ids) > 1  # " 😀" is split across byte-level tokens
    truncated = ids[:-1]
    pieces = stream(tokenizer, truncated)
    assert pieces[-1] == tokenizer.decode(truncated)[len("ok") :]
    assert pieces[-1].endswith("\ufffd")
    assert "".join(pieces[:-1]) == "ok"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_random_ids_concatenate_to_decode(tokenizer, seed, skip_special_tokens):
    rng = random.Random(seed)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]
    ids[::7] = [rng.randrange(17) for _ in ids[::7]]  # plenty of special tokens
    pieces = stream(tokenizer, ids, skip_special_tokens)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# -- other sources and bad input ------------------------------------------------------------------


def write_gguf(path: Path, model: str, pre: str | None = None) -> Path:
    """A tokenizer-only GGUF: byte tokens for the digits, a few merges, one control token."""
    tokens = ["<|endoftext|>", *"0123456789", "12", "123", "45"]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(["1 2", "12 3", "4 5"])
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("smollm", ["1", "2", "3", "4", "5"]),  # \p{N}: one digit per pre-token
        ("llama-bpe", ["123", "45"]),  # \p{N}{1,3}
        ("qwen2", ["1", "2", "3", "4", "5"]),  # \p{N}
        ("gpt-2", ["123", "45"]),  # " ?\p{N}+" then the merges
        ("default", ["123", "45"]),  # \p{N}+ then [0-9]{3}
    ],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(tmp_path, pre, expected):
    tokenizer = gguf_vocab.build(write_gguf(tmp_path / "tiny.gguf", "gpt2", pre))
    ids = tokenizer.encode("12345")
    assert [tokenizer.token_text(i) for i in ids] == expected
    assert tokenizer.decode(ids) == "12345"


def test_from_gguf_accepts_an_open_reader(tmp_path):
    reader = gguf.GGUFReader(write_gguf(tmp_path / "tiny.gguf", "gpt2", "llama-bpe"))
    tokenizer = gguf_vocab.build(reader)
    assert tokenizer.encode("<|endoftext|>123") == [0, 12]
    assert tokenizer.add_bos is False  # no BOS id in this file, so none is added


def test_unsupported_tokenizer_model_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "t5.gguf", "t5")
    with pytest.raises(ValueError, match=r"t5\.gguf.*tokenizer\.ggml\.model is 't5'.*gpt2.*llama"):
        gguf_vocab.build(path)


def test_unsupported_pre_tokenizer_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "tekken.gguf", "gpt2", "tekken")
    with pytest.raises(ValueError, match=r"tekken\.gguf.*'tekken'.*supported: .*'smollm'"):
        gguf_vocab.build(path)


def test_missing_chat_template_is_a_clear_error(tmp_path):
    tokenizer = gguf_vocab.build(write_gguf(tmp_path / "tiny.gguf", "gpt2", "gpt-2"))
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template(CONVERSATIONS["single_user"])


def test_from_file_loads_a_hugging_face_tokenizer_json(tmp_path, hf_tokenizer):
    hf_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": hf_tokenizer.chat_template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (1, 2, False)
    for text in TEXTS.values():
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    messages = CONVERSATIONS["multi_turn"]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.apply_chat_template(messages) == expected


# -- sentencepiece-style vocabularies (tokenizer.ggml.model "llama": Llama 2, Mistral) -------------

SPM_TEXTS = {
    "known_words": "the quick brown fox jumps over the lazy dog",
    "unknown_words": "Zebra xylophones QUIZ! it's jumping, is it?",
    "accents": "café naïve über Ångström",
    "cjk": "你好，世界！日本語のテキスト 한국어",
    "emoji": "hello 😀 family 👨‍👩‍👧 flag 🏳️‍🌈",
    "multiple_spaces": "a  b   c    the     dog",
    "newlines": "new line\nthe text\n\n  and\ttabs\r\n",
    "trailing_spaces": "the end  ",
    "special_tokens": "[INST] hello world [/INST] the answer</s>",
}
# Text starting with a space gets no extra "▁" from transformers (so " hi" == "hi"), and no "▁"
# is added after a special token; llama.cpp adds one in both places. We follow transformers.
SPM_LEADING_SPACE = {
    "one_space": " hello",
    "two_spaces": "  the dog",
    "newline_first": "\nhello",
    "after_special_token": "<s>the</s> dog",
}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


@pytest.fixture(scope="module")
def spm_tokenizer(spm_path: Path) -> Tokenizer:
    return gguf_vocab.build(spm_path)


@pytest.fixture(scope="module")
def spm_hf_tokenizer(spm_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(spm_path.parent, gguf_file=spm_path.name)


@pytest.mark.parametrize("name", [*SPM_TEXTS, *SPM_LEADING_SPACE])
def test_spm_token_ids_match_transformers(spm_tokenizer, spm_hf_tokenizer, name):
    text = {**SPM_TEXTS, **SPM_LEADING_SPACE}[name]
    assert spm_tokenizer.encode(text) == spm_hf_tokenizer.encode(text)  # both add BOS
    expected = spm_hf_tokenizer.encode(text, add_special_tokens=False)
    assert spm_tokenizer.encode(text, add_bos=False) == expected


def test_spm_known_words_are_single_pieces(spm_tokenizer):
    ids = spm_tokenizer.encode("hello world the", add_bos=False)
    assert [spm_tokenizer.token_text(i) for i in ids] == ["▁hello", "▁world", "▁the"]


def test_spm_characters_outside_the_vocabulary_fall_back_to_bytes(spm_tokenizer):
    ids = spm_tokenizer.encode("é😀", add_bos=False)
    pieces = [spm_tokenizer.token_text(i) for i in ids]
    assert pieces == ["▁", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_spm_metadata_and_bos_added_by_default(spm_tokenizer):
    assert (spm_tokenizer.bos_id, spm_tokenizer.eos_id, spm_tokenizer.add_bos) == (1, 2, True)
    assert spm_tokenizer.encode("hello") == [1, *spm_tokenizer.encode("hello", add_bos=False)]
    assert spm_tokenizer.encode("") == [1]


def test_spm_add_bos_token_false_is_honoured(tmp_path):
    tokenizer = gguf_vocab.build(write_spm_gguf(tmp_path / "no_bos.gguf", add_bos=False))
    assert tokenizer.add_bos is False
    assert tokenizer.encode("hello") == tokenizer.encode("hello", add_bos=False)


def test_spm_leading_space_is_absorbed_as_in_transformers(spm_tokenizer):
    assert spm_tokenizer.encode(" hello") == spm_tokenizer.encode("hello")
    assert spm_tokenizer.decode(spm_tokenizer.encode(" hello")) == "hello"


@pytest.mark.parametrize("name", SPM_TEXTS)
def test_spm_decode_round_trips(spm_tokenizer, name):
    text = SPM_TEXTS[name]
    ids = spm_tokenizer.encode(text, add_bos=False)
    assert spm_tokenizer.decode(ids, skip_special_tokens=False) == text
    if name != "special_tokens":
        assert spm_tokenizer.decode([spm_tokenizer.bos_id, *ids]) == text


@pytest.mark.parametrize("name", SPM_TEXTS)
def test_spm_decode_matches_transformers(spm_tokenizer, spm_hf_tokenizer, name):
    ids = spm_tokenizer.encode(SPM_TEXTS[name])
    for skip in (True, False):
        expected = spm_hf_tokenizer.decode(ids, skip_special_tokens=skip)
        assert spm_tokenizer.decode(ids, skip_special_tokens=skip) == expected


def test_spm_merges_in_the_file_take_precedence_over_scores(tmp_path):
    merges = ["▁ h", "▁h e", "▁he l", "▁hel l", "▁hell o", "▁ t", "▁t h"]  # no "▁th e"
    path = write_spm_gguf(tmp_path / "merges.gguf", merges=merges)
    tokenizer = gguf_vocab.build(path)
    ids = tokenizer.encode("hello the", add_bos=False)
    assert [tokenizer.token_text(i) for i in ids] == ["▁hello", "▁th", "e"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SPM_TEXTS.values():
        assert tokenizer.encode(text) == hf.encode(text)


def test_spm_add_space_prefix_false_adds_no_space(tmp_path):
    # transformers ignores this flag; llama.cpp honours it, and so do we.
    path = write_spm_gguf(tmp_path / "no_prefix.gguf", add_space_prefix=False)
    tokenizer = gguf_vocab.build(path)
    ids = tokenizer.encode("hello world", add_bos=False)
    assert [tokenizer.token_text(i) for i in ids] == ["h", "e", "l", "l", "o", "▁world"]
    assert tokenizer.decode(tokenizer.encode(" hello")) == " hello"


def test_spm_gemma_vocabulary_is_a_clear_error(tmp_path):
    path = write_spm_gguf(tmp_path / "gemma.gguf", arch="gemma2")
    with pytest.raises(ValueError, match=r"gemma\.gguf.*'gemma2' is not supported"):
        gguf_vocab.build(path)


@pytest.mark.parametrize("name", ["cjk", "emoji", "accents", "unknown_words"])
def test_spm_streamed_pieces_never_split_a_character(spm_tokenizer, name):
    ids = spm_tokenizer.encode(SPM_TEXTS[name])
    pieces = stream(spm_tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == spm_tokenizer.decode(ids) == SPM_TEXTS[name]
    assert len(ids) > len([p for p in pieces if p])  # some characters took several byte tokens


@pytest.mark.parametrize("name", ["multiple_spaces", "newlines", "special_tokens"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_spm_streamed_pieces_keep_spaces(spm_tokenizer, name, skip_special_tokens):
    ids = spm_tokenizer.encode(SPM_TEXTS[name])
    pieces = stream(spm_tokenizer, ids, skip_special_tokens)
    assert "".join(pieces) == spm_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_spm_streamed_random_ids_concatenate_to_decode(spm_tokenizer, seed, skip_special_tokens):
    rng = random.Random(seed)
    ids = [rng.randrange(spm_tokenizer.vocab_size) for _ in range(300)]
    ids[::5] = [rng.choice([1, 2, 3, 259, 260]) for _ in ids[::5]]  # specials, "▁", unk, bytes
    pieces = stream(spm_tokenizer, ids, skip_special_tokens)
    assert "".join(pieces) == spm_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
