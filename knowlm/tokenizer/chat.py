"""Chat templates: the text a model continues.

By name, the ones KnowLM-family models were trained with: ``alpaca``, KnowLM's fine-tuning template (zjunlp/KnowLM,
Stanford Alpaca's), with and without an input; ``llama2``, LLaMA-2 chat's ``[INST]`` markers with KnowLM's bilingual
system prompt, which OneKE was trained with. And a model's own Jinja ``chat_template`` (from its
``tokenizer_config.json``), rendered by ``apply_chat_template`` exactly as transformers renders it.

A model's template is untrusted code: it runs in Jinja's ``ImmutableSandboxedEnvironment`` (no attribute that leads
out of the sandbox, no method that mutates), set up as transformers sets it up. The setup is copied, not imported:
``transformers.utils.chat_template_utils`` loads transformers, which knowlm's runtime otherwise never loads.
"""
import functools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from knowlm.errors import KnowLMError, first_line
from knowlm.files import CHAT_TEMPLATE_NAME, TOKENIZER_CONFIG_NAME, read_json


@dataclass(frozen=True)
class ChatTemplate:
    with_input: str         # {instruction} and {input}
    without_input: str      # {instruction}
    next_turn: str          # what starts the next turn: a model's answer ends before it
    writes_special_tokens = False   # a prompt is text: the tokenizer's own start (<s>) goes before it

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


class ModelChat:
    """A model's own chat template used as a prompt template (``prepare-data --template model``): the instruction
    (and input) as one user turn, then the template's generation prompt, which is what ``end`` is. The template
    writes every special token itself, so the text is encoded without adding any."""
    writes_special_tokens = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, instruction: str, input_text: str = "") -> str:
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        return apply_chat_template(self.tokenizer, [{"role": "user", "content": content}])

    @property
    def end(self) -> str:
        turn = [{"role": "user", "content": "\x00"}]
        with_prompt = apply_chat_template(self.tokenizer, turn)
        return with_prompt.rsplit("\x00", 1)[1]


def prompt_template(name: str, tokenizer=None):
    """``alpaca`` or ``llama2`` (``ChatTemplate``), or ``model``: ``tokenizer``'s own chat template (``ModelChat``)."""
    return ModelChat(tokenizer) if name == "model" else chat_template(name)


def chat_template(name: str) -> ChatTemplate:
    if name not in CHAT_TEMPLATES:
        raise KnowLMError(f"unknown chat template {name!r}; expected one of {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def read_chat_template(directory, config=None):
    """(the model's Jinja chat template or None, the file it is in) of a tokenizer directory.

    ``chat_template.jinja`` wins over the ``chat_template`` of ``tokenizer_config.json`` (``config``: that file,
    already parsed), as in transformers; of transformers' named templates, the one named "default". Not run here.
    """
    directory = Path(directory)
    source = directory / CHAT_TEMPLATE_NAME
    if source.is_file():
        try:
            return source.read_bytes().decode("utf-8"), source
        except UnicodeDecodeError as err:
            raise KnowLMError(f"{source}: not UTF-8 text (byte {err.start}); expected a Jinja chat template") from None
    source = directory / TOKENIZER_CONFIG_NAME
    if config is None:
        config = read_json(source) if source.is_file() else {}
    value = config.get("chat_template") if isinstance(config, dict) else None
    if value is None or isinstance(value, str):
        return value, source
    if isinstance(value, list) and all(isinstance(item, dict) and isinstance(item.get("name"), str)
                                       and isinstance(item.get("template"), str) for item in value):
        return next((item["template"] for item in value if item["name"] == "default"), None), source
    raise KnowLMError(f"{source}: 'chat_template' must be a Jinja template string or a list of {{name, template}}")


def apply_chat_template(tokenizer_or_template, messages, add_generation_prompt=True, source=None) -> str:
    """``messages`` (a list of ``{"role": str, "content": str}``) as the model's chat template writes them.

    ``tokenizer_or_template``: a tokenizer with a ``chat_template`` (its special tokens are the template's
    ``bos_token``, ``eos_token``... as in transformers), or the Jinja source itself. ``source`` names where the
    template came from in errors (default: the tokenizer's file). Any failure is one line, never a traceback.
    """
    template, variables, source = _template_of(tokenizer_or_template, source)
    messages = _checked_messages(messages)
    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=bool(add_generation_prompt), **variables)
    except Exception as err:    # noqa: BLE001  the template is untrusted code: whatever it raises is its fault
        where = f"line {err.lineno}: " if getattr(err, "lineno", None) else ""
        raise KnowLMError(f"{source}: chat_template failed to render: {where}{first_line(err)}") from None


def _template_of(tokenizer_or_template, source):
    """(template, its variables, the name errors give it) of a tokenizer or of a template string."""
    if isinstance(tokenizer_or_template, str):
        return tokenizer_or_template, {}, source or "chat_template"
    tokenizer = tokenizer_or_template
    source = source or getattr(tokenizer, "chat_template_source", None) or getattr(tokenizer, "vocab_file", None) \
        or type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):      # transformers' named templates
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise KnowLMError(f"{source}: has no chat_template; use --template {'|'.join(CHAT_TEMPLATES)}")
    variables = getattr(tokenizer, "chat_template_variables", None)
    variables = variables() if callable(variables) else dict(getattr(tokenizer, "special_tokens_map", {}))
    return template, {name: value if isinstance(value, list) else str(value) for name, value in variables.items()}, \
        source


def _checked_messages(messages) -> list:
    """A copy of ``messages``, each checked to be ``{"role": str, "content": str}``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise KnowLMError(f"messages: expected a non-empty list of {{role, content}}, got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            keys = sorted(map(str, message)) if isinstance(message, dict) else type(message).__name__
            raise KnowLMError(f"messages[{index}]: expected {{role, content}}, got {keys}"[:300])
        if not isinstance(message["role"], str) or not message["role"]:
            raise KnowLMError(f"messages[{index}]: 'role' must be a non-empty string, got {message['role']!r}"[:300])
        if not isinstance(message["content"], str):
            raise KnowLMError(f"messages[{index}]: 'content' must be a string, got {type(message['content']).__name__}")
        checked.append(dict(message))
    return checked


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """``template`` compiled in transformers' chat-template environment (``_compile_jinja_template``)."""
    import json

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' ``{% generation %}`` tag (it marks assistant text for training masks): its body, as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        @staticmethod
        def _body(caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # As transformers: no HTML escaping (Jinja's own tojson escapes <, >, &), and its options exposed.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
