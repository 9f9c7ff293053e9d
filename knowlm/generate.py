"""Text in, text out: ``generate`` continues prompts with a loaded model and its tokenizer; ``text_generator`` makes
such a function from anything ``load_model`` accepts, for ``knowlm.ie.extract``."""
from knowlm.errors import KnowLMError
from knowlm.models.load import load_model


def generate(model, tokenizer, prompts, max_new_tokens=64, do_sample=False, top_k=50, top_p=1.0,
             temperature=1.0, repetition_penalty=1.0, seed=None):
    """Continue each prompt; returns the generated text only (prompt excluded), one string per prompt.

    Prompts of different lengths are right-padded with the pad token, which MindFormers' ``generate`` reads as
    "valid length ends here"; every row then decodes from its own last token.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise KnowLMError("no prompt given; expected at least one prompt")
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    padded = [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in encoded]
    if do_sample and temperature <= 0:
        raise KnowLMError(f"temperature {temperature}: expected a value > 0 when sampling")
    outputs = model.generate(padded, max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k, top_p=top_p,
                             temperature=temperature, repetition_penalty=repetition_penalty, seed=seed)
    return [tokenizer.decode(list(out[len(ids):]), skip_special_tokens=True) for ids, out in zip(encoded, outputs)]


def text_generator(model, batch_size, **generation):
    """A function from a list of prompts to their continuations: ``generate`` with ``generation`` options over
    ``load_model(model)``, loaded at the first call, so that bad input fails before a large model is loaded."""
    loaded = []

    def run(prompts):
        if not loaded:
            loaded.extend(load_model(model, use_past=True, batch_size=batch_size))
        return generate(*loaded, prompts, **generation)
    return run
