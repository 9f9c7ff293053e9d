"""Loading MindSpore and MindFormers quietly, once per process (the CLI's verbs, and the quickstart's child process).

MindSpore's C++ log at errors only (read once, when it loads); MindFormers' log files under knowlm's cache folder
instead of ``./output`` in the current folder, and its console log (which it starts on stdout) on stderr, at errors
only unless ``verbose``: results go to stdout, and one line tells what went wrong.
"""
import contextlib
import logging
import os
import sys


def load_frameworks(verbose=False):
    if "mindspore" not in sys.modules:
        os.environ.setdefault("GLOG_v", "2" if verbose else "3")
    from knowlm.files import cache_dir
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(cache_dir() / "mindformers"))
    if "mindformers" in sys.modules:
        return
    # Its import logs warnings (optional models it cannot load) before any logger of it can be set: logging is
    # off while it imports, and its logger is at errors afterwards. (knowlm's own warnings stay on.)
    disabled = logging.root.manager.disable
    if not verbose:
        logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from mindformers.tools.logger import get_logger
    finally:
        logging.disable(disabled)
    get_logger().setLevel(logging.INFO if verbose else logging.ERROR)
