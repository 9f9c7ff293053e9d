"""The conversion command of MindFormers' ``research/knowlm`` README, kept working::

    python -m knowlm.convert_weight --torch_bin_path <any .bin of the Hugging Face directory> \\
        --mindspore_ckpt_path <output>

Every weight file of that directory is read (all shards, not only the one named). An output ending in
``.ckpt`` is one MindSpore checkpoint file, as the original wrote; any other name is a knowlm model directory.
Same as ``knowlm convert <dir> <output>``, reading ``.bin`` files first.
"""
import argparse
import sys
from pathlib import Path

from knowlm.cli import _frameworks, run
from knowlm.errors import KnowLMError


def cmd_convert_weight(args):
    _frameworks(args)
    from knowlm.checkpoints.convert import convert_checkpoint
    source = Path(args.torch_bin_path)
    if not source.is_file():
        raise KnowLMError(f"{source}: not found; expected a .bin file inside the Hugging Face model directory")
    print(convert_checkpoint(source.parent, args.mindspore_ckpt_path, dtype=args.dtype, force=args.force,
                             prefer="bin", echo=print))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m knowlm.convert_weight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch_bin_path", required=True, help="any .bin file of the Hugging Face directory")
    parser.add_argument("--mindspore_ckpt_path", required=True,
                        help="output: a .ckpt file, or a knowlm model directory for any other name")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: the checkpoint's own")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    parser.add_argument("--verbose", action="store_true", help="show MindSpore's and MindFormers' log messages")
    parser.set_defaults(run=cmd_convert_weight)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
