"""knowlm: the KnowLM models (zjunlp) as a MindSpore + MindFormers model-zoo plugin.

Importing this package registers ``KnowLMConfig``, ``KnowLMForCausalLM`` and ``KnowLMTokenizer`` with
MindFormers (yaml ``type:`` names, ``AutoConfig``/``AutoModel``) and the pipeline names ``knowlm_13b_base``,
``knowlm_13b_zhixi``, ``knowlm_13b_ie`` and ``knowlm_tiny``.
"""
import contextlib
import os
import sys

# MindSpore reads its C++ log level once, when it loads. The `knowlm` command shows its errors only: otherwise
# every run prints MindSpore's compile-cache notices (knowlm.model.compile_cache). Importers keep their setting.
if os.path.basename(sys.argv[0]) == "knowlm" and "mindspore" not in sys.modules:
    os.environ.setdefault("GLOG_v", "3")

# MindFormers creates its log handler on first use, which its import already triggers, writing to stdout.
# knowlm's commands print their results on stdout, so MindFormers' log is sent to stderr instead.
with contextlib.redirect_stdout(sys.stderr):
    import mindformers  # noqa: F401  pylint: disable=unused-import

from knowlm.config import PRESETS, KnowLMConfig  # noqa: E402
from knowlm.errors import KnowLMError  # noqa: E402
from knowlm.model import KnowLMForCausalLM  # noqa: E402
from knowlm.registry import register_pipelines  # noqa: E402
from knowlm.tokenizer import KnowLMTokenizer  # noqa: E402

register_pipelines()

__version__ = "0.1.0"
__all__ = ["KnowLMConfig", "KnowLMForCausalLM", "KnowLMTokenizer", "KnowLMError", "PRESETS"]
