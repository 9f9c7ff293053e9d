"""The ``knowlm edit`` and ``knowlm edit-eval`` verbs (``knowlm.cli`` adds them): thin layers over
``knowlm.edit.editor.Editor`` and ``knowlm.edit.evaluate.score_requests``. MindSpore loads only when a verb runs."""
import dataclasses
from pathlib import Path

from knowlm.edit.hparams import METHODS
from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_NAME, PACKAGE_DIR
from knowlm.frameworks import load_frameworks

EDIT_SET = PACKAGE_DIR / "assets" / "edit" / "smollm2_facts.json"


def _echo(line):
    print(line, flush=True)


def _model_dir(spec) -> Path:
    """A knowlm model directory, or the packaged model ``spec`` names (converted on first use)."""
    from knowlm.models.packaged import PACKAGED_MODELS, packaged_model_dir
    if spec in PACKAGED_MODELS and not Path(spec).exists():
        return packaged_model_dir(spec, echo=_echo)
    if not (Path(spec) / CONFIG_NAME).is_file():
        raise KnowLMError(f"--model {spec}: expected a knowlm model directory (config.json, weights, tokenizer) or "
                          f"'smollm2'; editing writes a copy of the directory with the edited matrices")
    return Path(spec)


def cmd_edit(args):
    from knowlm.edit.hparams import default_hparams_file, read_hparams
    from knowlm.edit.requests import read_requests
    from knowlm.files import refuse_output
    if not args.output and not args.each:
        raise KnowLMError("--output: expected the edited model's directory (or --each: score without writing)")
    if args.output and args.each:
        raise KnowLMError("--each: edits one request at a time from the original weights and writes no model; "
                          "drop --output, or --each to write a model holding every edit")
    if args.output and (Path(args.output) / CONFIG_NAME).exists() and not args.force:
        raise KnowLMError(f"{args.output}: already holds a model ({CONFIG_NAME}); pass --force to overwrite it")
    if args.report:
        refuse_output(args.report, args.force, args.requests)
    requests = read_requests(args.requests)            # checked before a model is loaded
    hparams = read_hparams(args.hparams) if args.hparams else None
    load_frameworks(args.verbose)
    from knowlm.checkpoints.model_dir import load_config
    from knowlm.checkpoints.replaced import check_replaceable, write_replaced
    from knowlm.edit.editor import Editor
    from knowlm.edit.evaluate import format_scores
    from knowlm.files import write_json
    from knowlm.models.load import load_model
    source = _model_dir(args.model)
    config = load_config(source)
    path = args.hparams or default_hparams_file(config, args.method)
    hparams = (hparams or read_hparams(path)).check(config.num_layers, args.method, str(path))
    if args.seed is not None:
        hparams = dataclasses.replace(hparams, seed=args.seed)
    model, tokenizer = load_model(str(source), use_past=False, seq_length=args.seq_length)
    editor = Editor(model, tokenizer, args.method, hparams, echo=_echo)
    if args.output:
        check_replaceable(source, editor.weights())      # an int8 source is refused before minutes of work
    _echo(f"knowlm edit: {args.method.upper()} of {len(requests)} request(s) on {source}, layers "
          f"{list(hparams.layers)} ({path})")
    scores = editor.each(requests) if args.each else editor.edit_and_score(requests)
    if args.output:
        write_replaced(source, args.output, editor.weights(), force=args.force, echo=_echo)
    print(format_scores(scores))
    if args.report:
        write_json(args.report, {"model": str(source), "method": args.method, "each": args.each,
                                 "hparams": dataclasses.asdict(hparams), **scores})


def cmd_edit_eval(args):
    from knowlm.edit.requests import read_requests
    from knowlm.files import refuse_output, write_json
    if args.output:
        refuse_output(args.output, args.force, args.requests)
    requests = read_requests(args.requests)        # checked before a model is loaded
    load_frameworks(args.verbose)
    from knowlm.edit.evaluate import format_scores, score_requests
    from knowlm.models.load import load_model
    model, tokenizer = load_model(args.model, use_past=False, seq_length=args.seq_length)
    base = load_model(args.base, use_past=False, seq_length=args.seq_length)[0] if args.base else None
    scores = score_requests(model, tokenizer, requests, base=base)
    print(format_scores(scores))
    if args.output:
        write_json(args.output, scores)


def add_edit(verbs):
    ed = verbs.add_parser("edit", help="ROME / MEMIT knowledge editing: write an edited model and print its scores")
    ed.add_argument("--model", required=True, help="knowlm model directory, or 'smollm2'")
    ed.add_argument("--method", choices=METHODS, default="rome")
    ed.add_argument("--requests", default=str(EDIT_SET),
                    help="edit requests, EasyEdit's format (JSON list or JSONL); default: the shipped SmolLM2 set")
    ed.add_argument("--output", help="the edited model directory (only the edited matrices differ from --model)")
    ed.add_argument("--hparams", help="hyperparameters yaml (EasyEdit's keys); default: the shipped one for the "
                                      "model (knowlm/assets/edit/hparams/<ROME|MEMIT>/<model>.yaml)")
    ed.add_argument("--each", action="store_true",
                    help="edit each request alone from the original weights and score it (EasyEdit's evaluation); "
                         "no model is written")
    ed.add_argument("--seed", type=int, help="seed of the sampled context templates (default: the hparams')")
    ed.add_argument("--seq-length", type=int, default=128, help="positions of the editing model; default 128")
    ed.add_argument("--report", help="the scores and settings as JSON")
    ed.add_argument("--force", action="store_true", help="replace --output / --report if they exist")
    ed.set_defaults(run=cmd_edit)

    ev = verbs.add_parser("edit-eval", help="EasyEdit's reliability / generalization / locality / portability of "
                                            "a model on edit requests")
    ev.add_argument("--model", required=True, help="the (edited) model: directory, 'smollm2', yaml or pipeline name")
    ev.add_argument("--requests", default=str(EDIT_SET),
                    help="edit requests, EasyEdit's format (JSON list or JSONL); default: the shipped SmolLM2 set")
    ev.add_argument("--base", help="the unedited model: locality compares with its predictions (else no locality)")
    ev.add_argument("--seq-length", type=int, default=128, help="positions of the scoring model; default 128")
    ev.add_argument("--output", help="the scores as JSON (per request and summary)")
    ev.add_argument("--force", action="store_true", help="replace --output if it exists")
    ev.set_defaults(run=cmd_edit_eval)
