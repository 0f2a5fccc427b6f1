"""LoRA adapters of the model's projections: their spec, initialisation, merging, and HF PEFT's files.

An adapter of a projection w (x -> x·w, w input-major as model/layers.py stores it) is a pair
a [in..., r] (w's input dimensions) and b [r, out...] (its output dimensions), stacked
[L, ...] over a stack's layers as the weights are: adapters are {stack: {module: {target:
{"a", "b"}}}} (config.stacks: `layers`, and `dense_layers` before it with dense-first experts).
The adapted projection is x·w + scale·(x·a)·b, scale = alpha / r, as HF PEFT's `LoraLayer`
(lora_B(lora_A(x)) * scaling): the model adds the low-rank path wherever its "lora" collection
holds a pair (layers.project; latent attention's absorbed wkv_b, layers.adapted), which
`variables` builds. Training differentiates only the pairs, the base frozen (trainer.py).

PEFT's files are adapter_config.json and adapter_model.safetensors, keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r], the layers numbered across the stacks: lora_B·lora_A is the update of HF's weight
[out, in], so a and b are a transpose and a reshape of them, lora_B's rows in HF's order
(latent attention's rope rows interleaved: layouts.row_order).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.checkpoints.layouts import LATENT_ATTENTION_TENSORS, LAYER_TENSORS, layer_tensors, row_order
from mistral_jax.checkpoints.store import atomic_directory
from mistral_jax.checkpoints.tensor_files import TensorFileError, read_tensor_file, write_safetensors
from mistral_jax.model import quantize
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import abstract_params
from mistral_jax.runtime.distributed import fetch, is_primary
from mistral_jax.runtime.options import OptionError

# What can be adapted: name -> (module under a layer, how many leading axes of the weight are
# its input). A model has some of them (model_targets): grouped-query attention wq, wk, wv, wo;
# latent attention wq_a, wq_b (or wq), wkv_a_with_mqa, wkv_b, wo; a dense feed-forward w1, w2, w3.
TARGETS = {"wq": ("attention", 1), "wk": ("attention", 1), "wv": ("attention", 1), "wo": ("attention", 2),
           "wq_a": ("attention", 1), "wq_b": ("attention", 1), "wkv_a_with_mqa": ("attention", 1),
           "wkv_b": ("attention", 1),
           "w1": ("feed_forward", 1), "w2": ("feed_forward", 1), "w3": ("feed_forward", 1)}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# Where PEFT keeps a layer's adapters: under MistralForCausalLM's layers, or with a vision encoder
# under Mistral3ForConditionalGeneration's language model, whose vision tower's own q_proj, ...
# `_VISION_TOWER` keeps out of target_modules' reach.
_PEFT_PREFIX = "base_model.model.model.layers."
_PEFT_PREFIX_VISION = "base_model.model.model.language_model.layers."
_VISION_TOWER = r".*vision_tower.*"


def _peft_prefix(config: MistralConfig) -> str:
    return _PEFT_PREFIX if config.vision is None else _PEFT_PREFIX_VISION
# Our target -> HF's name of its module within a layer ("self_attn.q_proj"), whose last part
# is what PEFT's target_modules lists.
PEFT_NAMES = {target: {**LAYER_TENSORS, **LATENT_ATTENTION_TENSORS}[(module, target)][1]
              for target, (module, _) in TARGETS.items()}
_TARGET_OF_MODULE = {name.split(".")[-1]: target for target, name in PEFT_NAMES.items()}


def model_targets(config: MistralConfig) -> tuple[str, ...]:
    """The projections every layer of the model has (of every stack), in TARGETS' order:
    its attention's, and a dense feed-forward's (a model with experts has none in them)."""
    def projections(stack: MistralConfig) -> set[str]:
        return {path[1] for path in layer_tensors(stack)
                if len(path) == 2 and path[1] in TARGETS and (path[0] == "attention" or stack.moe is None)}
    common = set.intersection(*(projections(stack) for _, stack in config.stacks))
    return tuple(t for t in TARGETS if t in common)


def attention_targets(config: MistralConfig) -> tuple[str, ...]:
    """The default targets: every projection of the model's attention."""
    return tuple(t for t in model_targets(config) if TARGETS[t][0] == "attention")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapters of rank `rank` on the projections `targets` (None: those of the model's attention,
    targets_of), scaled by alpha / rank (alpha defaults to the rank: scale 1)."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise OptionError("lora_rank", f"must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf):
            raise OptionError("lora_alpha", f"must be a positive number, got {self.alpha!r}")
        if self.targets is None:
            return
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise OptionError("lora_targets", f"must be distinct names among {', '.join(TARGETS)}, got "
                                              f"{','.join(self.targets) or 'none'}")

    @staticmethod
    def parse_targets(text: str) -> tuple[str, ...]:
        """"wq,wk,wv,wo" -> ("wq", "wk", "wv", "wo")."""
        return tuple(t.strip() for t in text.split(",") if t.strip())

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def targets_of(self, config: MistralConfig) -> tuple[str, ...]:
        """The projections adapted in config's model."""
        return attention_targets(config) if self.targets is None else self.targets

    def check(self, config: MistralConfig) -> None:
        """Refuses targets that are not a projection of each of the model's layers."""
        absent = [t for t in self.targets_of(config) if t not in model_targets(config)]
        if absent:
            dense_ffn = config.moe is not None and all(TARGETS[t][0] == "feed_forward" for t in absent)
            why = "a model with experts has no dense feed-forward" if dense_ffn else "not a projection of this model"
            raise OptionError("lora_targets", f"{','.join(absent)}: {why}; its layers have "
                                              f"{', '.join(model_targets(config))}")


def abstract_adapters(config: MistralConfig, spec: LoRA) -> dict:
    """The adapters' shapes (float32), boxed with logical axis names: a takes its weight's
    input axes, b its output axes, the rank axis is never split."""
    spec.check(config)
    params = abstract_params(config)
    tree: dict = {}
    for stack, _ in config.stacks:
        for target in spec.targets_of(config):
            module, n_in = TARGETS[target]
            weight = params[stack][module][target]
            (L, *shape), (layer_axis, *names) = weight.value.shape, weight.names
            ins, outs = shape[:n_in], shape[n_in:]
            tree.setdefault(stack, {}).setdefault(module, {})[target] = {
                "a": _boxed((L, *ins, spec.rank), (layer_axis, *names[:n_in], None)),
                "b": _boxed((L, spec.rank, *outs), (layer_axis, None, *names[n_in:]))}
    return tree


def _boxed(shape, names) -> nn.Partitioned:
    return nn.Partitioned(jax.ShapeDtypeStruct(tuple(shape), jnp.float32), names=tuple(names))


def init_adapters(config: MistralConfig, spec: LoRA, key: jax.Array) -> dict:
    """Fresh adapters, as PEFT initialises them: a uniform in ±1/sqrt(fan-in) (kaiming-uniform
    with a = sqrt(5)), b zero, so the adapted model starts equal to its base."""
    shapes = nn.unbox(abstract_adapters(config, spec))
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = iter(jax.random.split(key, len(flat)))
    leaves = []
    for path, shape in flat:
        if path[-1].key == "b":
            leaves.append(jnp.zeros(shape.shape, shape.dtype))
        else:
            bound = 1 / math.sqrt(math.prod(shape.shape[1:-1]))
            leaves.append(jax.random.uniform(next(keys), shape.shape, shape.dtype, -bound, bound))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def variables(params: dict, adapters: dict | None, spec: LoRA | None) -> dict:
    """What Mistral(config).apply takes: the base params and, with adapters, the "lora"
    collection, b times the scale."""
    if adapters is None:
        return {"params": params}
    scaled = {stack: {module: {target: {"a": pair["a"], "b": pair["b"] * spec.scale}
                               for target, pair in targets.items()} for module, targets in modules.items()}
              for stack, modules in adapters.items()}
    return {"params": params, "lora": scaled}


def merge(params: dict, adapters: dict, spec: LoRA, dtype: str | None = None) -> dict:
    """params with each adapted weight w replaced by w + scale·a·b, summed in float32 and
    stored in dtype (default: the weight's own; a quantized one's dequantized float32), where
    the weights lie."""
    return _merge(params, adapters, spec.scale, dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _merge(params, adapters, scale, dtype):
    merged = dict(params)
    for stack, modules in adapters.items():
        layers = merged[stack] = {module: dict(weights) for module, weights in params[stack].items()}
        for module, targets in modules.items():
            for target, pair in targets.items():
                w, a, b = layers[module][target], pair["a"], pair["b"]
                if quantize.is_quantized(w):  # merged into its dequantized values: a float weight
                    w = quantize.dequantize(w["q"], w["scale"])
                L, r = a.shape[0], a.shape[-1]
                delta = jnp.einsum("LIr,LrO->LIO", a.reshape(L, -1, r), b.reshape(L, r, -1),
                                   precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
                layers[module][target] = (w.astype(jnp.float32) + scale * delta).astype(dtype or w.dtype)
    return merged


# ---- HF PEFT's files ------------------------------------------------------------------------

def save_peft(path: str, config: MistralConfig, adapters: dict, spec: LoRA, base_model: str = "",
              overwrite: bool = False) -> None:
    """Writes the adapters as HF PEFT saves a LoRA of the model's HF class (float32), which
    `PeftModel.from_pretrained(model, path)` loads onto the base exported with --to-hf.
    Every process must call it (the adapters are fetched from all of them); process 0 writes."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    host = jax.tree_util.tree_unflatten(treedef, fetch(*leaves))
    targets = spec.targets_of(config)
    entries = []
    for layer, (stack, i) in enumerate(_layers(config)):
        for target in targets:
            pair = host[stack][TARGETS[target][0]][target]
            name = f"{_peft_prefix(config)}{layer}.{PEFT_NAMES[target]}"
            lora_a = np.asarray(pair["a"][i], np.float32).reshape(-1, spec.rank).T  # [r, in]
            lora_b = np.asarray(pair["b"][i], np.float32).reshape(spec.rank, -1).T  # [out, r], the model's rows
            order = row_order(target, config, "hf")
            if order is not None:
                lora_b = lora_b[order]
            entries += [(f"{name}.lora_A.weight", lora_a.shape, np.float32, lambda w=lora_a: w),
                        (f"{name}.lora_B.weight", lora_b.shape, np.float32, lambda w=lora_b: w)]
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.rank if spec.alpha is None else spec.alpha, "lora_dropout": 0.0,
        "target_modules": sorted(module for module, target in _TARGET_OF_MODULE.items() if target in targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "exclude_modules": None if config.vision is None else _VISION_TOWER}
    with atomic_directory(path, overwrite) as tmp:
        if is_primary():
            write_safetensors(os.path.join(tmp, WEIGHTS_FILE), entries)
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(peft_config, f, indent=2)


class AdapterError(ValueError):
    """An adapter directory this model cannot take."""


# PEFT options that change what the adapter computes, and the value under which it is a plain LoRA.
_PLAIN = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
          "layers_to_transform": None, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def load_peft(path: str, config: MistralConfig) -> tuple[LoRA, dict]:
    """(spec, adapters as numpy arrays) of a PEFT LoRA directory of config's model as HF
    computes it (MistralForCausalLM, Ministral's, Mixtral's or Mistral 4's attention; with a
    vision encoder, Mistral3ForConditionalGeneration's language model)."""
    config_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"adapter {path} has no {os.path.basename(file)}")
    try:
        with open(config_file, encoding="utf-8") as f:
            peft = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(peft, dict) or peft.get("peft_type") != "LORA":
        raise AdapterError(f"{config_file} is not a LoRA adapter (peft_type "
                           f"{peft.get('peft_type') if isinstance(peft, dict) else None!r})")
    for key, plain in _PLAIN.items():
        value = peft.get(key, plain)
        if value != plain and not (plain == {} and value is None):
            raise AdapterError(f"{config_file} sets {key} = {peft[key]!r}: only plain LoRA adapters are supported")
    if peft.get("exclude_modules") not in (None, [], _VISION_TOWER):
        raise AdapterError(f"{config_file} sets exclude_modules = {peft['exclude_modules']!r}: only plain LoRA "
                           "adapters of every layer are supported")
    modules = peft.get("target_modules")
    if not isinstance(modules, list) or any(m not in _TARGET_OF_MODULE for m in modules):
        raise AdapterError(f"{config_file}: target_modules {modules!r} must be a list of "
                           f"{', '.join(_TARGET_OF_MODULE)}")
    chosen = {_TARGET_OF_MODULE[m] for m in modules}
    try:
        spec = LoRA(peft.get("r"), peft.get("lora_alpha"), tuple(t for t in TARGETS if t in chosen))
        spec.check(config)
    except OptionError as e:
        raise AdapterError(f"{config_file}: {e.problem if e.field != 'lora_rank' else 'r ' + e.problem}") from None
    try:
        tensors = read_tensor_file(weights_file)
    except TensorFileError as e:
        raise AdapterError(str(e)) from None
    shapes = nn.unbox(abstract_adapters(config, spec))
    expected = set()
    per_layer: dict = {}  # (stack, target) -> its layers' (a, b)
    for layer, (stack, _) in enumerate(_layers(config)):
        for target in spec.targets:
            shape = shapes[stack][TARGETS[target][0]][target]
            a_shape, b_shape = shape["a"].shape, shape["b"].shape
            name = f"{_peft_prefix(config)}{layer}.{PEFT_NAMES[target]}"
            lora_a = _tensor(tensors, f"{name}.lora_A.weight", (spec.rank, math.prod(a_shape[1:-1])), weights_file)
            lora_b = _tensor(tensors, f"{name}.lora_B.weight", (math.prod(b_shape[2:]), spec.rank), weights_file)
            expected |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight"}
            order = row_order(target, config, "hf")
            if order is not None:  # HF's rows in the model's order
                lora_b = lora_b[np.argsort(order)]
            per_layer.setdefault((stack, target), []).append((lora_a.T.reshape(a_shape[1:]),
                                                              lora_b.T.reshape(b_shape[1:])))
    adapters: dict = {}
    for (stack, target), pairs in per_layer.items():
        adapters.setdefault(stack, {}).setdefault(TARGETS[target][0], {})[target] = {
            "a": np.stack([a for a, _ in pairs]), "b": np.stack([b for _, b in pairs])}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise AdapterError(f"{weights_file} holds tensors this model has no place for, e.g. {extra[0]}")
    return spec, adapters


def _layers(config: MistralConfig) -> list[tuple[str, int]]:
    """Each layer of the model, in order: (its stack, its index in the stack)."""
    return [(name, i) for name, stack in config.stacks for i in range(stack.n_layers)]


def _tensor(tensors, name: str, shape: tuple[int, ...], file: str) -> np.ndarray:
    if name not in tensors:
        raise AdapterError(f"{file} lacks {name}")
    array = np.asarray(tensors[name], np.float32)
    if array.shape != shape:
        raise AdapterError(f"{file}: {name} has shape {list(array.shape)}, this model's is {list(shape)}")
    return array
