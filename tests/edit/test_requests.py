"""Edit requests in EasyEdit's format: read from JSON or JSONL, every bad one refused with one line naming it."""
import json
import re

import pytest

from knowlm.edit.cli import EDIT_SET
from knowlm.edit.requests import read_requests
from reference import one_line_error

GOOD = {"prompt": "The capital of France is", "subject": "France", "target_new": "Berlin", "ground_truth": "Paris",
        "rephrase_prompt": ["France's capital city is", "The French capital is"],
        "locality_prompt": "The capital of Japan is", "locality_ground_truth": "Tokyo",
        "portability": [{"prompt": "The French government sits in", "ground_truth": "Berlin"}]}


def test_json_and_jsonl_give_the_same_requests(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD, GOOD]))
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    requests = read_requests(tmp_path / "a.json")
    assert requests == read_requests(tmp_path / "a.jsonl")
    assert requests[0].rephrase_prompts == ("France's capital city is", "The French capital is")
    assert requests[0].locality == (("The capital of Japan is", "Tokyo"),)
    assert requests[0].portability == (("The French government sits in", "Berlin"),)
    assert len(read_requests(EDIT_SET)) == 12


@pytest.mark.parametrize("change, message", [
    ({"subject": "Spain"}, "request 1: subject 'Spain' does not occur in prompt"),
    ({"target_new": ""}, "request 1: 'target_new' must be a non-empty string"),
    ({"target_new": 5}, "request 1: 'target_new' must be a non-empty string"),
    ({"prompt": None}, "request 1: missing prompt"),
    ({"locality_ground_truth": ["Tokyo", "Kyoto"]}, "1 locality_prompt for 2 locality_ground_truth"),
    ({"portability": {"prompt": "x"}}, "portability[0] must be {prompt, ground_truth}"),
    ({"rephrase_prompt": [""]}, "'rephrase_prompt' must be a non-empty string or a list of them"),
])
def test_a_bad_request_is_one_line_naming_it(tmp_path, change, message):
    bad = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    (tmp_path / "edits.json").write_text(json.dumps([GOOD, bad]))
    one_line_error(lambda: read_requests(tmp_path / "edits.json"), re.escape(message))


def test_an_empty_or_broken_file_is_one_line(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    one_line_error(lambda: read_requests(tmp_path / "empty.json"), "no requests")
    (tmp_path / "broken.json").write_text('[{"prompt": ')
    one_line_error(lambda: read_requests(tmp_path / "broken.json"), "invalid JSON")
    one_line_error(lambda: read_requests(tmp_path / "missing.json"), "missing.json")
