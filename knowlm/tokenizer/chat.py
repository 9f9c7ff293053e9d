"""The chat templates KnowLM-family models were trained with, by name: the text a model continues.

``alpaca``: KnowLM's fine-tuning template (zjunlp/KnowLM, Stanford Alpaca's), with and without an input; ``llama2``:
LLaMA-2 chat's ``[INST]`` markers with KnowLM's bilingual system prompt, which OneKE was trained with.
"""
from dataclasses import dataclass

from knowlm.errors import KnowLMError


@dataclass(frozen=True)
class ChatTemplate:
    with_input: str         # {instruction} and {input}
    without_input: str      # {instruction}
    next_turn: str          # what starts the next turn: a model's answer ends before it

    def render(self, instruction: str, input_text: str = "") -> str:
        """The prompt for one instruction (and its input)."""
        if input_text:
            return self.with_input.format(instruction=instruction, input=input_text)
        return self.without_input.format(instruction=instruction)

    @property
    def end(self) -> str:
        """What every prompt ends with (after its last placeholder): the marker the model answers after."""
        return self.without_input.rsplit("}", 1)[1]

    def answer(self, text: str) -> str:
        """A model's continuation without whatever it went on to write after the next turn's marker."""
        return text.split(self.next_turn, 1)[0].strip()


ALPACA = ChatTemplate(
    with_input="Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    without_input="Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    next_turn="### ")
_LLAMA2_SYSTEM = "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
LLAMA2 = ChatTemplate(with_input=_LLAMA2_SYSTEM + "{instruction}\n{input}[/INST]",
                      without_input=_LLAMA2_SYSTEM + "{instruction}[/INST]", next_turn="[INST]")
CHAT_TEMPLATES = {"alpaca": ALPACA, "llama2": LLAMA2}


def chat_template(name: str) -> ChatTemplate:
    if name not in CHAT_TEMPLATES:
        raise KnowLMError(f"unknown chat template {name!r}; expected one of {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]
