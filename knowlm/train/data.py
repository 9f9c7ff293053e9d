"""Instruction data -> supervised training samples (``knowlm prepare-data``).

Input: JSON or JSONL records in the Alpaca layout ``{"instruction", "input", "output"}``; IE instruction records
(IEPile / ``knowlm kg2instruct`` output) have the same fields, ``input`` optional. Each record becomes

    input_ids = <s> prompt response </s> <pad>...      (seq_length + 1 tokens)
    labels    = -100 for <s> and the prompt, response and </s> as themselves, -100 for padding

with the tokenizer's own start (``<s>`` for LLaMA's SentencePiece, nothing for SmolLM2's BPE) and end of sequence
(``</s>``, ``<|im_end|>``). Pad ids only fill the row: the loss follows the labels, never the token values.

MindFormers' ``LlamaForCausalLM`` shifts both itself (position t predicts ``labels[t + 1]``), so the labels are
*not* pre-shifted here: MindFormers' own Alpaca handler shifts them too and trains every token one off.
Samples longer than ``seq_length + 1`` are truncated, never dropped: the response is cut first; a prompt is cut
only where it alone would leave fewer than ``min_response_tokens`` for the response. Counts are reported.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mindspore.mindrecord import FileWriter
from tqdm import tqdm

from knowlm.errors import KnowLMError
from knowlm.files import read_text, refuse_output, staged
from knowlm.tokenizer.chat import ALPACA, prompt_template

IGNORE_INDEX = -100

@dataclass
class PrepareReport:
    samples: int = 0
    truncated: int = 0
    prompt_truncated: int = 0
    skipped: int = 0
    supervised_tokens: int = 0
    problems: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.samples} samples, {self.supervised_tokens} supervised tokens, {self.truncated} truncated "
                f"({self.prompt_truncated} with the prompt cut), {self.skipped} bad records skipped")


def read_instructions(path, skip_bad=False, report=None):
    """Yield ``(line_number, record)`` from a JSON array or JSONL file, validating the fields.

    A bad record raises ``KnowLMError`` naming file and line, or with ``skip_bad`` is counted in ``report``.
    """
    path = Path(path)
    text = read_text(path, "Alpaca-style JSON or JSONL records")
    if text.lstrip().startswith("["):
        try:
            items = [(f"{path} (record {number})", number, item, None)
                     for number, item in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as err:
            raise KnowLMError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    else:
        items = [(f"{path}:{number}", number, *_parse_line(line))
                 for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    for where, number, item, problem in items:
        problem = problem or _record_problem(item)
        if problem is None:
            yield number, item
        elif skip_bad and report is not None:
            report.skipped += 1
            report.problems.append(f"{where}: {problem}")
        else:
            raise KnowLMError(f"{where}: {problem}" + ("" if skip_bad else "; pass --skip-bad to skip such records"))


def _parse_line(line):
    """``(record, None)`` for a JSONL line, or ``(None, problem)``."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg})"


def _record_problem(record):
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in ("instruction", "output"):
        if key not in record:
            return f"missing field {key!r}; expected 'instruction', 'output' and optionally 'input'"
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            return f"field {key!r} must be a string, got {type(record[key]).__name__}"
    return None


def encode_sample(tokenizer, record, seq_length, min_response_tokens=16, report=None, template=ALPACA):
    """``(input_ids, labels)`` numpy int32 arrays of length ``seq_length + 1`` for one record.

    A prompt that must be cut loses text before the template's end (``### Response:``), never the end itself:
    the model learns to answer after the marker it will see when it is used."""
    prompt = tokenizer.encode(template.render(record["instruction"], record.get("input", "")),
                              add_special_tokens=False)
    response = tokenizer.encode(record["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
    prefix = [] if template.writes_special_tokens else leading_ids(tokenizer)
    width = seq_length + 1
    room = width - len(prefix) - len(prompt)            # after <s> (if the tokenizer adds it) and the prompt
    if room < min(len(response), min_response_tokens):
        keep = width - len(prefix) - min(len(response), min_response_tokens)
        tail = _template_end(tokenizer, prompt, template.end)
        if keep < tail:
            raise KnowLMError(f"--seq-length {seq_length}: too short for the prompt's end ({tail} tokens of "
                              f"{template.end!r}) and {min(len(response), min_response_tokens)} response tokens; "
                              f"expected at least {tail + min(len(response), min_response_tokens)}")
        prompt = prompt[:keep - tail] + prompt[len(prompt) - tail:]
        if report is not None:
            report.prompt_truncated += 1
    tokens = prefix + prompt + response
    if len(tokens) > width and report is not None:
        report.truncated += 1
    tokens = tokens[:width]
    input_ids = np.full(width, tokenizer.pad_token_id, np.int32)
    labels = np.full(width, IGNORE_INDEX, np.int32)
    input_ids[:len(tokens)] = tokens
    start = len(prefix) + len(prompt)
    labels[start:len(tokens)] = tokens[start:]
    if report is not None:
        report.samples += 1
        report.supervised_tokens += len(tokens) - start
    return input_ids, labels


def leading_ids(tokenizer) -> list:
    """The special ids the tokenizer puts before a text (LLaMA's ``<s>``; none for SmolLM2, whose tokenizer adds
    none): a training sample starts the way a prompt does when it is generated from."""
    return [token for token in tokenizer("")["input_ids"] if token != tokenizer.eos_token_id]


def _template_end(tokenizer, prompt, end) -> int:
    """How many of the prompt's last tokens spell the template's end, as the whole prompt was tokenized."""
    for count in range(1, len(prompt) + 1):
        if end in tokenizer.decode(prompt[-count:]):
            return count
    return 0


def prepare_data(input_path, tokenizer, output_path, seq_length, skip_bad=False, force=False, template="alpaca"):
    """Write a MindRecord of ``input_ids``/``labels`` for every record of ``input_path``; returns the report.

    ``template``: ``alpaca`` (KnowLM's), ``llama2`` (OneKE's ``[INST]``) or ``model`` (the tokenizer's own chat
    template: one user turn, then its generation prompt; what ``knowlm generate --chat`` sends)."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise KnowLMError(f"--seq-length {seq_length}: expected the model's training seq_length, an integer >= 1")
    template = prompt_template(template, tokenizer)
    template.end            # a template that does not render fails here, before anything is written
    output_path = refuse_output(output_path, force, input_path)
    report = PrepareReport()
    records = list(read_instructions(input_path, skip_bad=skip_bad, report=report))
    if not records:
        raise KnowLMError(f"{input_path}: no usable records")
    # MindRecord writes <name> and <name>.db, and the index records the file's base name: the data file goes into
    # place last, so its presence says complete.
    with staged(f"{output_path}.db", output_path) as (_, partial):
        writer = FileWriter(str(partial), shard_num=1, overwrite=True)
        writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}},
                          "knowlm supervised samples")
        for _, record in tqdm(records, desc="prepare-data", unit="sample", disable=None):
            input_ids, labels = encode_sample(tokenizer, record, seq_length, report=report, template=template)
            writer.write_raw_data([{"input_ids": input_ids, "labels": labels}])
        writer.commit()
    return report
