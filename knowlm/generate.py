"""Text in, text out: ``generate`` continues prompts with a loaded model and its tokenizer; ``text_generator`` makes
such a function from anything ``load_model`` accepts, for ``knowlm.ie.extract``.

Every option is checked where it enters, under the name of its command-line flag; nothing is capped or replaced
without a word.
"""
from knowlm.constrain.constraint import vocabulary_of
from knowlm.constrain.decode import Picker
from knowlm.errors import KnowLMError
from knowlm.models.llama import padding_id
from knowlm.models.load import load_model
from knowlm.tokenizer.chat import apply_chat_template, chat_template


class PromptTooLong(KnowLMError):
    """A prompt leaves no room for the tokens asked for; ``index`` is its position in the batch."""

    def __init__(self, message, index):
        super().__init__(message)
        self.index = index


def check_generation(max_new_tokens=64, do_sample=False, top_k=50, top_p=1.0, temperature=1.0,
                     repetition_penalty=1.0, seed=None):
    """Refuse an option out of its range (``KnowLMError`` naming the flag), before any model is loaded."""
    checks = [("--max-new-tokens", max_new_tokens, int, lambda v: v >= 1, "an integer >= 1"),
              ("--top-k", top_k, int, lambda v: v >= 0, "an integer >= 0 (0: no top-k filter)"),
              ("--top-p", top_p, (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
              ("--temperature", temperature, (int, float), lambda v: v > 0, "a number > 0"),
              ("--repetition-penalty", repetition_penalty, (int, float), lambda v: v > 0,
               "a number > 0 (1: no penalty)"),
              ("--seed", seed, int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)")]
    for flag, value, kind, valid, expected in checks:
        if value is None and flag == "--seed":      # no seed: MindSpore's own
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or not valid(value):
            raise KnowLMError(f"{flag} {value}: expected {expected}")
    if not isinstance(do_sample, bool):
        raise KnowLMError(f"--do-sample {do_sample!r}: expected true or false")


def generate(model, tokenizer, prompts, max_new_tokens=64, do_sample=False, top_k=50, top_p=1.0,
             temperature=1.0, repetition_penalty=1.0, seed=None, chat=None, grammars=None):
    """Continue each prompt; returns the generated text only (prompt excluded), one string per prompt.

    ``chat``: None, the prompt is raw text; ``"model"``, each prompt is a user turn in the model's own chat template
    (``tokenizer_config.json``/GGUF's ``chat_template``, rendered as transformers renders it); ``"alpaca"`` or
    ``"llama2"``, KnowLM's and OneKE's templates by name (``knowlm.tokenizer.chat``).

    Prompts of different lengths are right-padded; MindFormers' ``generate`` reads a row's valid length as "up to
    its last token that is not ``pad_token_id``", so the padding id is one that no prompt ends with (the
    tokenizer's pad id unless a prompt ends with it: any id may stand inside or at the end of a prompt). Every row
    then decodes from its own last token. A prompt whose tokens and ``max_new_tokens`` do not fit the model's
    ``seq_length`` is refused (``PromptTooLong``).
    """
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k, top_p=top_p,
                   temperature=temperature, repetition_penalty=repetition_penalty, seed=seed)
    check_generation(**options)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise KnowLMError("no prompt given; expected at least one prompt")
    encoded = encode_prompts(tokenizer, prompts, chat)
    seq_length = model.config.seq_length
    for index, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > seq_length:
            raise PromptTooLong(f"prompt {index + 1} is {len(ids)} tokens; with --max-new-tokens "
                                f"{max_new_tokens} that passes the model's seq_length {seq_length}: shorten the "
                                f"prompt, lower --max-new-tokens to at most {max(seq_length - len(ids), 0)}, or "
                                "raise seq_length", index)
    width = max(len(ids) for ids in encoded)
    pad = padding_id(encoded, tokenizer.pad_token_id)
    padded = [ids + [pad] * (width - len(ids)) for ids in encoded]
    if grammars is None:
        outputs = model.generate(padded, pad_token_id=pad, **options)
    else:
        if len(grammars) != len(prompts):
            raise KnowLMError(f"{len(grammars)} grammars for {len(prompts)} prompts; expected one per prompt")
        eos = model.config.eos_token_id
        vocabulary = vocabulary_of(tokenizer, eos if isinstance(eos, (list, tuple)) else [eos])
        pick = Picker(grammars, vocabulary, encoded, **{k: v for k, v in options.items() if k != "max_new_tokens"})
        outputs = model.generate(padded, pad_token_id=pad, max_new_tokens=max_new_tokens, pick=pick)
    return [tokenizer.decode(list(out[len(ids):]), skip_special_tokens=True) for ids, out in zip(encoded, outputs)]


def encode_prompts(tokenizer, prompts, chat=None) -> list:
    """The ids of each prompt, as raw text or inside chat template ``chat`` (see ``generate``)."""
    if chat is None:
        return [tokenizer(prompt)["input_ids"] for prompt in prompts]
    if chat == "model":
        # As transformers' apply_chat_template(tokenize=True): the template writes every special token itself.
        return [tokenizer.encode(apply_chat_template(tokenizer, [{"role": "user", "content": prompt}]),
                                 add_special_tokens=False) for prompt in prompts]
    template = chat_template(chat)
    return [tokenizer(template.render(prompt))["input_ids"] for prompt in prompts]


def text_generator(model, batch_size, seq_length=None, **generation):
    """A function from a list of prompts (and optionally their answer grammars) to their continuations:
    ``generate`` with ``generation`` options over ``load_model(model)`` (at ``seq_length`` positions, default the
    model's), loaded at the first call, so that bad input fails before a large model is loaded."""
    check_generation(**generation)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KnowLMError(f"--batch-size {batch_size}: expected an integer >= 1")
    loaded = []

    def run(prompts, grammars=None):
        if not loaded:
            sizes = {"seq_length": seq_length} if seq_length else {}
            loaded.extend(load_model(model, use_past=True, batch_size=batch_size, **sizes))
        return generate(*loaded, prompts, grammars=grammars, **generation)
    return run
