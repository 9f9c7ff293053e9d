"""Chat templates by name: KnowLM's Alpaca template and OneKE's LLaMA-2 markers, and where an answer ends."""
import pytest

from knowlm.errors import KnowLMError
from knowlm.ie.prompts import build_prompt
from knowlm.tokenizer.chat import chat_template


def test_alpaca_wraps_instruction_and_input_as_knowlm_trained():
    text = chat_template("alpaca").render("Extract the triples.", "Lin was born in Baishi.")
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert text.endswith("### Instruction:\nExtract the triples.\n\n### Input:\nLin was born in Baishi.\n\n"
                         "### Response:\n")
    assert "### Input" not in chat_template("alpaca").render("Say hi.")


def test_llama2_wraps_the_oneke_json_as_oneke_does():
    prompt = build_prompt("re", "text", ["r"], "oneke", "en")
    assert chat_template("llama2").render(prompt.instruction, prompt.input) == (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
        + prompt.instruction + "[/INST]")


def test_answer_is_cut_where_the_model_starts_a_new_turn():
    assert chat_template("alpaca").answer(" (a,r,b)\n\n### Instruction:\nmore") == "(a,r,b)"
    assert chat_template("llama2").answer('{"r": []} [INST] again') == '{"r": []}'


def test_unknown_template_is_one_line():
    with pytest.raises(KnowLMError, match="unknown chat template 'chatml'; expected one of alpaca, llama2"):
        chat_template("chatml")
