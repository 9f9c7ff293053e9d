"""ROME / MEMIT hyperparameters: EasyEdit's yaml keys (``hparams/ROME/llama-7b.yaml``, ``hparams/MEMIT/...``),
one file per method and model, ``knowlm/assets/edit/hparams/<ROME|MEMIT>/<model>.yaml`` (EasyEdit's own layout).

The keys keep EasyEdit's names so that a value can be carried over from its files; knowlm adds ``seed`` (context
templates are sampled from the model) and ``stats_width`` (corpus tokens per row when the down-projection inputs'
second moment is collected). Keys EasyEdit has but knowlm has no use for (module templates, device, stats_dir,
model_name) are accepted and ignored; unknown keys are refused by name.
"""
from dataclasses import dataclass, fields
from pathlib import Path

from knowlm.errors import KnowLMError
from knowlm.files import PACKAGE_DIR, read_yaml

METHODS = ("rome", "memit")
HPARAMS_DIR = PACKAGE_DIR / "assets" / "edit" / "hparams"      # <METHOD>/<model>.yaml, as EasyEdit's hparams/
# EasyEdit keys that describe where things live in a torch model or on disk, not the algorithm.
IGNORED = {"alg_name", "model_name", "device", "stats_dir", "model_parallel", "rewrite_module_tmp",
           "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
           "mom2_dataset", "mom2_dtype", "v_loss_layer", "layer_selection", "fp16", "max_length", "batch_size"}


@dataclass(frozen=True)
class EditHParams:
    layers: tuple                           # ROME: one layer; MEMIT: the layer range the edit is spread over
    v_num_grad_steps: int = 25              # Adam iterations on the value (the last only evaluates)
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3            # times |delta| / |t0|^2 (EasyEdit's form, not squared)
    clamp_norm_factor: float = 4.0          # |delta| <= factor * |t0| after each step
    kl_factor: float = 0.0625               # KL of "{subject} is a" next-token distributions, new vs old
    mom2_adjustment: bool = False           # ROME: key direction C^-1 k (True) or k (False, EasyEdit's LLaMA)
    mom2_update_weight: float = 15000.0     # MEMIT: lambda in (lambda C + K K^T)^-1
    mom2_n_samples: int = 100000            # corpus paragraphs for C (capped at the corpus' size)
    context_template_length_params: tuple = ((5, 10), (10, 10))   # ROME: (max length, count) of sampled prefixes
    fact_token: str = "subject_last"
    seed: int = 0
    stats_width: int = 256

    def __post_init__(self):
        if not self.layers or not all(isinstance(layer, int) and layer >= 0 for layer in self.layers):
            raise KnowLMError(f"hparams: layers must be a non-empty list of layer numbers, got {self.layers!r}")
        if self.fact_token != "subject_last":
            raise KnowLMError(f"hparams: fact_token {self.fact_token!r} is not supported; expected subject_last")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise KnowLMError("hparams: v_num_grad_steps >= 1, v_lr > 0 and clamp_norm_factor > 0 expected")

    def check(self, num_layers, method, where="hparams"):
        """Refuse layers the model does not have, or several layers for ROME."""
        if max(self.layers) >= num_layers - 1:
            # A value written after the last block reaches no later token: the target's loss cannot depend on it.
            raise KnowLMError(f"{where}: layers {list(self.layers)}; the model's {num_layers} layers allow "
                              f"0..{num_layers - 2} (the last block's output reaches no later token)")
        if method == "rome" and len(self.layers) != 1:
            raise KnowLMError(f"{where}: ROME edits one layer, got layers {list(self.layers)}")
        return self


def read_hparams(path) -> EditHParams:
    values = read_yaml(path, "ROME/MEMIT hyperparameters (EasyEdit's keys: layers, v_lr, v_num_grad_steps, ...)")
    known = {f.name for f in fields(EditHParams)}
    unknown = sorted(set(values) - known - IGNORED)
    if unknown:
        raise KnowLMError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    values = {key: value for key, value in values.items() if key in known}
    for key in ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight"):
        if isinstance(values.get(key), str):            # yaml reads 5e-1 as a string (EasyEdit converts too)
            try:
                values[key] = float(values[key])
            except ValueError:
                raise KnowLMError(f"{path}: {key} must be a number, got {values[key]!r}") from None
    values["layers"] = tuple(values.get("layers") or ())
    values["context_template_length_params"] = tuple(
        tuple(pair) for pair in values.get("context_template_length_params", EditHParams.context_template_length_params))
    try:
        return EditHParams(**values)
    except (TypeError, KnowLMError) as err:
        raise KnowLMError(f"{path}: {err}") from None


def default_hparams_file(config, method) -> Path:
    """The shipped yaml for a model of ``config``'s shape (a preset's dimensions), else a one-line error."""
    from knowlm.models.config import PRESETS     # here: the CLI imports this module before any framework
    shape = ("hidden_size", "num_layers", "intermediate_size", "vocab_size")
    for name, (_, preset) in PRESETS.items():
        if all(getattr(config, key) == preset[key] for key in shape):
            path = HPARAMS_DIR / method.upper() / f"{_model_name(name)}.yaml"
            if path.is_file():
                return path
    raise KnowLMError(f"--hparams: no shipped {method.upper()} hyperparameters for a model of hidden size "
                      f"{config.hidden_size} and {config.num_layers} layers; pass --hparams FILE.yaml "
                      f"(see {HPARAMS_DIR / method.upper() / 'smollm2.yaml'})")


def _model_name(preset):
    return "knowlm-13b" if preset.startswith("knowlm-13b") else preset
