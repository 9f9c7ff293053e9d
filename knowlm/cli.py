"""The ``knowlm`` command: one verb per job, each a thin layer over a library function."""
import argparse
import logging
import os
import sys


def _quiet_frameworks():
    # MindSpore reads GLOG_v when it is imported; MindFormers logs INFO to stdout. Users see only knowlm's output.
    os.environ.setdefault("GLOG_v", "3")
    from mindformers.tools.logger import get_logger  # pylint: disable=import-outside-toplevel
    get_logger().setLevel(logging.WARNING)


def cmd_generate(args):
    from knowlm.generate import generate  # pylint: disable=import-outside-toplevel
    from knowlm.pretrained import RANDOM_INIT_PRESETS, load_model  # pylint: disable=import-outside-toplevel
    if args.model in RANDOM_INIT_PRESETS:
        print(f"knowlm: preset {args.model!r} has random weights (seed {args.seed or 0}): its text is noise; "
              "pass a converted model directory for real output", file=sys.stderr)
    model, tokenizer = load_model(args.model, use_past=not args.no_cache, batch_size=len(args.prompt))
    texts = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                     top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                     repetition_penalty=args.repetition_penalty, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(prompt + text)


def build_parser():
    parser = argparse.ArgumentParser(prog="knowlm", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    gen = verbs.add_parser("generate", help="continue one or more prompts")
    gen.add_argument("prompt", nargs="+", help="prompt text; several prompts run as one batch")
    gen.add_argument("--model", default="tiny",
                     help="model directory, yaml file, pipeline name (knowlm_13b_zhixi, ...) or 'tiny' "
                          "(random weights); default: tiny")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    gen.set_defaults(run=cmd_generate)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    _quiet_frameworks()
    from knowlm.errors import KnowLMError  # pylint: disable=import-outside-toplevel
    try:
        args.run(args)
    except KnowLMError as err:
        print(f"knowlm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
