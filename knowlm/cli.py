"""The ``knowlm`` command: one verb per job, each a thin layer over a library function.

Verbs import what they use when they run, so that ``knowlm --help`` and ``--version`` answer at once and verbs that
need no model (evaluate, kg2instruct, rank-table) never load MindSpore.
"""
import argparse
import os
import sys

from knowlm import __version__
from knowlm.edit.cli import add_edit
from knowlm.errors import KnowLMError, describe
from knowlm.frameworks import load_frameworks


def _frameworks(args):
    """MindSpore and MindFormers loaded quietly (``knowlm.frameworks``), before a verb imports them."""
    load_frameworks(args.verbose)


# ------------------------------------------------------------------------------------------------ models

def cmd_generate(args):
    _frameworks(args)
    from knowlm.generate import check_generation, generate
    from knowlm.models.load import RANDOM_INIT_PRESETS, load_model
    options = dict(max_new_tokens=args.max_new_tokens, **_sampling_options(args))
    check_generation(**options)         # before a model is loaded
    if args.model in RANDOM_INIT_PRESETS:
        print(f"knowlm: preset {args.model!r} has random weights: its text is noise; "
              "pass a converted model directory for real output", file=sys.stderr)
    chat = "model" if args.chat else args.template        # argparse's choices: a known template name
    if args.seq_length is not None and args.seq_length < 2:
        raise KnowLMError(f"--seq-length {args.seq_length}: expected an integer >= 2")
    sizes = {"seq_length": args.seq_length} if args.seq_length else {}
    model, tokenizer = load_model(args.model, use_past=not args.no_cache, batch_size=len(args.prompt), **sizes)
    for prompt, text in zip(args.prompt, generate(model, tokenizer, args.prompt, chat=chat, **options)):
        print(text if chat else prompt + text)      # a chat prints the answer; a raw prompt, its continuation


def _sampling():
    """How tokens are chosen, shared by generate and extract (``knowlm.generate.check_generation``)."""
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    sampling.add_argument("--top-k", type=int, default=50)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    return sampling


def _sampling_options(args):
    return dict(do_sample=args.do_sample, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def add_generate(verbs):
    gen = verbs.add_parser("generate", parents=[_sampling()], help="continue one or more prompts")
    gen.add_argument("prompt", nargs="+", help="prompt text; several prompts run as one batch")
    gen.add_argument("--model", default="tiny",
                     help="model directory, 'smollm2' (the packaged real model), yaml file, pipeline name "
                          "(knowlm_13b_zhixi, ...) or 'tiny' (random weights); default: tiny")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--seq-length", type=int, help="positions to run the model at (prompt + new tokens); default: "
                                                    "the model's (512 for smollm2)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    chat = gen.add_mutually_exclusive_group()
    chat.add_argument("--chat", action="store_true",
                      help="each prompt is a user turn in the model's own chat template (print the answer)")
    chat.add_argument("--template", choices=["alpaca", "llama2"],
                      help="each prompt inside KnowLM's Alpaca or OneKE's LLaMA-2 [INST] template")
    gen.set_defaults(run=cmd_generate)


def cmd_serve(args):
    _frameworks(args)
    from knowlm.serve.server import serve
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          api_key=args.api_key or os.environ.get("KNOWLM_API_KEY") or None, lora=args.lora, ctx_size=args.ctx_size,
          kv_tokens=args.kv_tokens, model_name=args.model_name, shutdown_timeout=args.shutdown_timeout)


def add_serve(verbs):
    srv = verbs.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, streaming, "
                                         "/v1/extract, /metrics)")
    srv.add_argument("--model", default="smollm2", help="model directory, 'smollm2' (the packaged real model), yaml "
                                                        "file or pipeline name; default: smollm2")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on; default 127.0.0.1 (this machine "
                                                         "only)")
    srv.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port (printed)")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together; default 16")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests waiting for a row beyond --max-batch; more get HTTP 503; default 64")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (also $KNOWLM_API_KEY)")
    srv.add_argument("--lora", help="an adapter directory merged into --model's weights before serving")
    srv.add_argument("--ctx-size", type=int, help="positions per request (prompt + answer); default: the model's "
                                                  "(512 for smollm2)")
    srv.add_argument("--kv-tokens", type=int, help="KV-cache tokens shared by all requests; default one context "
                                                   "per batch row, at most 16384")
    srv.add_argument("--model-name", help="the name clients use for it; default the --model folder's name")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM; default 30")
    srv.set_defaults(run=cmd_serve)


def cmd_convert(args):
    _frameworks(args)
    if args.source.endswith(".gguf"):
        from knowlm.checkpoints.gguf import convert_gguf as convert
    else:
        from knowlm.checkpoints.convert import convert_checkpoint as convert
    print(convert(args.source, args.out_dir, dtype=args.dtype, force=args.force, check_finite=args.check_finite,
                  echo=print))


def cmd_export(args):
    _frameworks(args)
    from knowlm.checkpoints.convert import export_checkpoint
    print(export_checkpoint(args.model_dir, args.hf_dir, force=args.force, echo=print))


def cmd_merge_lora(args):
    _frameworks(args)
    from knowlm.checkpoints.lora import merge_lora
    print(merge_lora(args.base_dir, args.lora, args.out_dir, lora_config=args.lora_config, force=args.force,
                     echo=print))


def cmd_import_peft(args):
    _frameworks(args)
    from knowlm.checkpoints.lora import import_peft_adapter
    print(import_peft_adapter(args.peft_dir, args.out_dir, force=args.force, echo=print))


def add_checkpoints(verbs):
    conv = verbs.add_parser("convert", help="Hugging Face LLaMA directory (.bin or .safetensors) or llama.cpp "
                                            ".gguf file -> knowlm model")
    conv.add_argument("source", help="a Hugging Face model directory or a .gguf file")
    conv.add_argument("out_dir", help="knowlm model directory to write (a name ending in .ckpt: one checkpoint file)")
    conv.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "int8"],
                      help="default: the checkpoint's own (a GGUF file's: fp32); int8: llama.cpp's Q8_0 for 2-D "
                           "weights, norms fp32")
    conv.add_argument("--check-finite", action="store_true", help="also check that no weight is inf or nan")
    conv.set_defaults(run=cmd_convert)

    export = verbs.add_parser("export", help="knowlm model -> Hugging Face directory (safetensors)")
    export.add_argument("model_dir")
    export.add_argument("hf_dir")
    export.set_defaults(run=cmd_export)

    merge = verbs.add_parser("merge-lora", help="merge a MindFormers LoRA checkpoint into its base model")
    merge.add_argument("base_dir", help="knowlm model directory the LoRA was trained on")
    merge.add_argument("lora", help="LoRA .ckpt file of the run, or an adapter directory")
    merge.add_argument("out_dir")
    merge.add_argument("--lora-config", help="the run's yaml or adapter_config.json (default: the "
                                             "adapter_config.json beside the LoRA checkpoint)")
    merge.set_defaults(run=cmd_merge_lora)

    peft = verbs.add_parser("import-peft", help="PEFT LoRA adapter -> knowlm adapter in MindFormers' names")
    peft.add_argument("peft_dir")
    peft.add_argument("out_dir")
    peft.set_defaults(run=cmd_import_peft)
    for verb in (conv, export, merge, peft):
        verb.add_argument("--force", action="store_true", help="overwrite an existing output")


# ---------------------------------------------------------------------------------------------- training

def cmd_prepare_data(args):
    _frameworks(args)
    from knowlm.tokenizer.load import load_tokenizer
    from knowlm.train.data import prepare_data
    report = prepare_data(args.input, load_tokenizer(args.tokenizer), args.output, args.seq_length,
                          skip_bad=args.skip_bad, force=args.force, template=args.template)
    for problem in report.problems:
        print(f"skipped {problem}", file=sys.stderr)
    print(f"prepare-data: {args.output}: {report.summary()}")


def cmd_finetune(args):
    _frameworks(args)
    from knowlm.train.finetune import finetune
    finetune(args.config, resume=args.resume, max_steps=args.max_steps, export_merged=args.export_merged,
             force=args.force, **_shaping(args))


def cmd_check_config(args):
    _frameworks(args)
    from knowlm.train.launch import check_config
    problems = check_config(args.config, devices=args.devices, **_shaping(args))
    if problems:
        raise KnowLMError("; ".join(problems))
    print(f"check-config: {args.config}: ready" + (f" for {args.devices} device(s)" if args.devices else ""))


def cmd_rank_table(args):
    from knowlm.train.launch import parse_devices, rank_table
    table = rank_table(parse_devices(args.devices), args.output, server_ip=args.server_ip,
                       device_ips=args.device_ips.split(",") if args.device_ips else None, force=args.force)
    print(f"rank-table: {args.output}: {len(table['server_list'][0]['device'])} devices")


def _shaping(args):
    return dict(data=args.data, base=args.base, output_dir=args.output_dir,
                overrides=dict(_key_value(item) for item in args.set))


def _key_value(item):
    import yaml
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise KnowLMError(f"--set {item!r}: expected KEY=VALUE, e.g. parallel_config.data_parallel=2")
    return key, yaml.safe_load(value)


def add_training(verbs):
    prep = verbs.add_parser("prepare-data", help="instruction JSON/JSONL -> MindRecord training samples")
    prep.add_argument("--input", required=True, help="Alpaca-style JSON or JSONL (instruction, input, output)")
    prep.add_argument("--tokenizer", required=True, help="a model directory, tokenizer.model or tokenizer.json")
    prep.add_argument("--output", required=True, help="MindRecord file to write")
    prep.add_argument("--seq-length", type=int, required=True, help="the model's seq_length in training")
    prep.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    prep.add_argument("--template", choices=["alpaca", "llama2", "model"], default="alpaca",
                      help="prompt format: KnowLM's Alpaca (default), OneKE's LLaMA-2 [INST], or the model's own "
                           "chat template (as generate --chat sends prompts)")
    prep.add_argument("--force", action="store_true", help="overwrite an existing output")
    prep.set_defaults(run=cmd_prepare_data)

    # Options that shape a training config, shared by finetune and check-config (the launchers pass both).
    shaping = argparse.ArgumentParser(add_help=False)
    shaping.add_argument("--data", help="MindRecord from prepare-data (else the yaml's dataset_dir)")
    shaping.add_argument("--base", help="model directory or checkpoint to adapt (else the yaml's)")
    shaping.add_argument("--output-dir", help="where logs and checkpoints go (else the yaml's output_dir)")
    shaping.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a yaml value, e.g. --set parallel_config.data_parallel=2")

    tune = verbs.add_parser("finetune", parents=[shaping], help="LoRA or full fine-tuning with MindFormers' Trainer")
    tune.add_argument("--config", required=True, help="finetune yaml, e.g. knowlm/configs/tiny/finetune_lora.yaml")
    tune.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    tune.add_argument("--force", action="store_true",
                      help="start over in an output folder that holds an earlier run's checkpoints")
    tune.add_argument("--max-steps", type=int, help="stop after this many steps")
    tune.add_argument("--export-merged", metavar="DIR",
                      help="at the end, write the trained model (LoRA merged) as a model directory")
    tune.set_defaults(run=cmd_finetune)

    check = verbs.add_parser("check-config", parents=[shaping], help="validate a yaml before launching it")
    check.add_argument("config")
    check.add_argument("--devices", type=int, help="number of devices that will run it")
    check.set_defaults(run=cmd_check_config)

    table = verbs.add_parser("rank-table", help="write the HCCL rank-table JSON for one Ascend server")
    table.add_argument("--devices", default="0-8", help="START-END (end exclusive) or a comma list; default 0-8")
    table.add_argument("--output", default="hccl_8p.json")
    table.add_argument("--server-ip", help="this host's IP (default: resolved from the host name)")
    table.add_argument("--device-ips", help="comma list, one per device (default: read with hccn_tool)")
    table.add_argument("--force", action="store_true")
    table.set_defaults(run=cmd_rank_table)


# --------------------------------------------------------------------------------- information extraction

def cmd_extract(args):
    _frameworks(args)
    from knowlm.generate import text_generator
    from knowlm.ie.extract import extract_file
    from knowlm.ie.prompts import default_family
    generate = text_generator(args.model, args.batch_size, max_new_tokens=args.max_new_tokens,
                              **_sampling_options(args))
    written, skipped = extract_file(generate, args.input, args.output, args.task, args.schema, resume=args.resume,
                                    batch_size=args.batch_size, family=args.family or default_family(args.model),
                                    chat=args.chat, constrained=args.constrained, **_ie_prompting(args))
    print(f"extract: {args.output}: {written} records written" + (f", {skipped} already there" if skipped else ""))


def cmd_evaluate(args):
    from knowlm.files import refuse_output, write_json
    from knowlm.ie.evaluate import evaluate, format_table
    if args.output:
        refuse_output(args.output, args.force, args.pred, args.gold)
    scores = evaluate(args.pred, args.gold, task=args.task, by=args.by, match_mode=args.match_mode, fmt=args.format)
    print(format_table(scores))
    if args.output:
        write_json(args.output, scores)


def cmd_kg2instruct(args):
    from knowlm.ie.kg2instruct import kg2instruct_file
    count = kg2instruct_file(args.input, args.output, schema_path=args.schema, force=args.force, family=args.family,
                             neg_ratio=args.neg_ratio, seed=args.seed, **_ie_prompting(args))
    print(f"kg2instruct: {args.output}: {count} samples")


def _ie_prompting(args):
    return dict(language=args.language, template=args.template, fmt=args.format, split_num=args.split_num)


def _template(value):
    if value == "random":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a template number or 'random'") from None


def _prompting():
    """Options that shape extraction prompts, shared by extract and kg2instruct (knowlm.ie.prompts)."""
    prompting = argparse.ArgumentParser(add_help=False)
    prompting.add_argument("--language", default="auto",
                           help="zh, en, or auto: each record's 'lang', else zh for text with Chinese characters")
    prompting.add_argument("--template", type=_template, default=0,
                           help="knowlm family: template number, or 'random' (one per sample); default 0")
    prompting.add_argument("--format", help="answer format (knowlm.ie.formats): tuple (default), relation_first, "
                                            "json_list, ...; the oneke family has only oneke")
    prompting.add_argument("--split-num", type=int,
                           help="schema items per prompt, -1 for all in one; default IEPile's (RE/EE 4, NER 6)")
    return prompting


def add_extract(verbs):
    ext = verbs.add_parser("extract", parents=[_prompting(), _sampling()],
                           help="extract relations, entities or events with a model")
    ext.add_argument("--model", required=True, help="model directory, yaml file, pipeline name or 'tiny'")
    ext.add_argument("--task", default="re", help="re (relations, default), ner (entities) or ee (events)")
    ext.add_argument("--schema", required=True,
                     help="JSON list of relation / entity type names (ee: event objects), or {lang: list}")
    ext.add_argument("--input", required=True, help="JSONL records with 'id' and 'text' (optional 'source', 'lang')")
    ext.add_argument("--output", required=True, help="JSONL, one line per record, written as it goes")
    ext.add_argument("--resume", action="store_true", help="continue an existing output, skipping its ids")
    ext.add_argument("--batch-size", type=int, default=4, help="prompts generated together; default 4")
    ext.add_argument("--family", choices=("knowlm", "oneke"),
                     help="prompt family; default from the model name: oneke for *oneke*, else knowlm")
    ext.add_argument("--chat", choices=("alpaca", "llama2"), help="chat template; default the family's")
    ext.add_argument("--max-new-tokens", type=int, default=256)
    ext.add_argument("--constrained", action="store_true",
                     help="decode only valid answers: names from the schema, entities from the input text, in the "
                          "answer format (re and ner; tuple formats and oneke), ended within --max-new-tokens")
    ext.set_defaults(run=cmd_extract)


def add_ie(verbs):
    add_extract(verbs)
    ev = verbs.add_parser("evaluate", help="precision / recall / F1 of predictions against gold, IEPile-style")
    ev.add_argument("--pred", required=True, help="JSONL predictions (knowlm extract output, or raw 'output' lines)")
    ev.add_argument("--gold", required=True, help="JSONL gold records (InstructIE, or IEPile with 'label')")
    ev.add_argument("--task", default="re", help="re (default), ner or ee")
    ev.add_argument("--by", help="also score per value of this gold field, e.g. source")
    ev.add_argument("--match-mode", default="normal", help="normal (duplicates count, default) or set")
    ev.add_argument("--format", default="oneke", help="answer format of raw 'output' predictions; default oneke")
    ev.add_argument("--output", help="write the scores here as JSON")
    ev.add_argument("--force", action="store_true", help="overwrite an existing --output")
    ev.set_defaults(run=cmd_evaluate)

    kg = verbs.add_parser("kg2instruct", parents=[_prompting()],
                          help="relation-extraction instruction data from InstructIE records")
    kg.add_argument("--input", required=True, help="JSONL records {id, text, relation: [{head, relation, tail}]}")
    kg.add_argument("--output", required=True, help="JSONL instruction samples for prepare-data")
    kg.add_argument("--family", choices=("knowlm", "oneke"), default="knowlm", help="prompt family; default knowlm")
    kg.add_argument("--schema", help="relations to ask about (list or {lang: list}); default those in the input")
    kg.add_argument("--neg-ratio", type=float, default=1.0,
                    help="probability of asking about each absent relation; default 1 (all, as IEPile)")
    kg.add_argument("--seed", type=int, default=42)
    kg.add_argument("--force", action="store_true", help="overwrite an existing output")
    kg.set_defaults(run=cmd_kg2instruct)


# -------------------------------------------------------------------------------------------- quickstart

def cmd_quickstart(args):
    _frameworks(args)
    from knowlm.quickstart import quickstart, report
    steps = {"steps": args.steps} if args.steps is not None else {}
    print(report(quickstart(workdir=args.workdir, seed=args.seed, keep=args.keep, **steps)))


def add_quickstart(verbs):
    start = verbs.add_parser("quickstart", help="the whole workflow on the real model SmolLM2-135M-Instruct: "
                                                "convert, extract, LoRA-finetune, extract and score, on CPU")
    start.add_argument("--workdir", help="keep every intermediate file here (an empty or new folder)")
    start.add_argument("--steps", type=int, help="LoRA fine-tuning steps (default 30)")
    start.add_argument("--seed", type=int, default=0)
    start.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    start.set_defaults(run=cmd_quickstart)


def build_parser():
    parser = argparse.ArgumentParser(prog="knowlm", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=f"knowlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    parser.add_argument("--verbose", action="store_true", help="show MindSpore's and MindFormers' log messages")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for add in (add_quickstart, add_generate, add_serve, add_training, add_ie, add_edit, add_checkpoints):
        add(verbs)
    for verb in verbs.choices.values():     # also after the verb; SUPPRESS keeps a value given before it
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        verb.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    return run(build_parser().parse_args(argv))


def run(args):
    """Run ``args.run(args)``; bad input, and files that cannot be read or written, end with one line on stderr and
    exit status 2 (``--debug``: the traceback too); Ctrl-C with one line and status 130."""
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("knowlm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:        # noqa: BLE001  (describe() picks the expected classes; others re-raise)
        message = describe(err)
        if message is None or args.debug:
            raise
        print(f"knowlm: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
