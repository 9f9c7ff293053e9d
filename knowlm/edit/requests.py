"""Edit requests in EasyEdit's format, read and checked.

A request file is a JSON list (or JSONL) of objects::

    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
     "rephrase_prompt": "France's capital city is",
     "locality_prompt": "The capital of Japan is", "locality_ground_truth": "Tokyo",
     "portability": {"prompt": "The Eiffel Tower stands in the capital of", "ground_truth": "Rome"}}

``prompt``, ``subject`` (a substring of ``prompt``) and ``target_new`` are required; ``ground_truth`` (the model's
answer before the edit), ``rephrase_prompt``, ``locality_prompt`` + ``locality_ground_truth`` and ``portability``
are optional. ``rephrase_prompt``, the locality fields and the portability fields may also be lists (several
prompts, paired in order). Everything is checked before any model is loaded; a bad request is one line naming its
index.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from knowlm.errors import KnowLMError
from knowlm.files import read_text

REQUIRED = ("prompt", "subject", "target_new")
OPTIONAL = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "portability")


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple = ()
    locality: tuple = ()            # (prompt, ground truth) pairs
    portability: tuple = ()         # (prompt, answer) pairs
    extra: dict = field(default_factory=dict, compare=False)


def read_requests(path) -> list:
    """The ``EditRequest`` list of a JSON (list) or JSONL file; ``KnowLMError`` naming the file and request."""
    path = Path(path)
    text = read_text(path, "edit requests: a JSON list of {prompt, subject, target_new, ...}")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise KnowLMError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not rows:
        raise KnowLMError(f"{path}: no requests; expected a JSON list of {{prompt, subject, target_new, ...}}")
    return [check_request(row, f"{path}: request {index}") for index, row in enumerate(rows)]


def check_request(row, where) -> EditRequest:
    """One request (a dict in EasyEdit's format) as an ``EditRequest``."""
    if not isinstance(row, dict):
        raise KnowLMError(f"{where}: expected an object with {', '.join(REQUIRED)}, got {type(row).__name__}")
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise KnowLMError(f"{where}: missing {', '.join(missing)}")
    for key in REQUIRED + ("ground_truth",):
        if key in row and (not isinstance(row[key], str) or not row[key].strip()):
            raise KnowLMError(f"{where}: '{key}' must be a non-empty string, got {json.dumps(row[key])[:60]}")
    if row["subject"] not in row["prompt"]:
        raise KnowLMError(f"{where}: subject {row['subject']!r} does not occur in prompt {row['prompt']!r}")
    rephrases = _strings(row.get("rephrase_prompt", []), where, "rephrase_prompt")
    locality = _pairs(row.get("locality_prompt", []), row.get("locality_ground_truth", []), where,
                      "locality_prompt", "locality_ground_truth")
    portability = row.get("portability", [])
    portability = portability if isinstance(portability, list) else [portability]
    pairs = []
    for number, item in enumerate(portability):
        if not isinstance(item, dict) or set(item) != {"prompt", "ground_truth"}:
            raise KnowLMError(f"{where}: portability[{number}] must be {{prompt, ground_truth}}")
        pairs += _pairs(item["prompt"], item["ground_truth"], where, "portability prompt", "portability ground_truth")
    return EditRequest(row["prompt"], row["subject"], row["target_new"], row.get("ground_truth"), tuple(rephrases),
                       tuple(locality), tuple(pairs), {k: v for k, v in row.items() if k not in REQUIRED + OPTIONAL})


def _strings(value, where, key) -> list:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise KnowLMError(f"{where}: '{key}' must be a non-empty string or a list of them")
    return values


def _pairs(prompts, answers, where, prompt_key, answer_key) -> list:
    prompts, answers = _strings(prompts, where, prompt_key), _strings(answers, where, answer_key)
    if len(prompts) != len(answers):
        raise KnowLMError(f"{where}: {len(prompts)} {prompt_key} for {len(answers)} {answer_key}; expected one each")
    return list(zip(prompts, answers))
