"""Which leaves of a parameter tree get quantized, and how: QuantConfig and quantize_params.

Paths are the leaf's key path joined with "/" (`{"params": {"mlp": {"kernel": ...}}}` ->
"params/mlp/kernel"; sequence indices become numbers). A pattern is a bare name (no `*?[`, not
"re:"), which matches a path when it equals one of its components ("lm_head" matches
"params/lm_head/kernel"; "attn/q_proj" a run of components), a glob (`fnmatch` over the whole
path: `*` also crosses "/", so "*attn*" matches at any depth), a string starting with "re:" (a
regular expression searched in the path), or a compiled `re.Pattern` (see qjax._src.paths).

`QuantConfig.from_hf` / `to_hf` map transformers' `BitsAndBytesConfig` (its `to_dict()`, the
"quantization_config" of a model's config.json) to a QuantConfig and back.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core import formats
from qjax._src.paths import Pattern, is_name, matches, matches_any, path_str
from qjax._src.errors import float_dtype, named
from qjax._src.core.qarray import QuantizedArray, is_quantized
from qjax._src.core.quantize import (check_blocksize, check_flag, check_report, dequantize, quantize,
                                quantize_with_report)

# Leaves kept in 16-bit by default: embeddings, the output head and normalization scales.
DEFAULT_SKIP: tuple[str, ...] = ("*embed*", "*lm_head*", "*norm*", "*ln_*", "*layernorm*")

# The DEFAULT_SKIP patterns for leaves transformers never quantizes whatever `llm_int8_skip_modules`
# says (it replaces only nn.Linear layers; embeddings and norms are not). `from_hf` adds them to an
# explicit skip list; the remaining entry, "*lm_head*", is the output head transformers leaves dense
# when `llm_int8_skip_modules` is None.
HF_ALWAYS_SKIP: tuple[str, ...] = tuple(p for p in DEFAULT_SKIP if p != "*lm_head*")


def _pattern_text(pattern: Pattern) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)


def as_patterns(value, name: str) -> tuple | None:
    """value (None, a pattern, or a sequence of patterns) as a tuple; raises TypeError naming `name`."""
    if value is None:
        return None
    if isinstance(value, (str, re.Pattern)):
        value = (value,)
    if not isinstance(value, (Sequence, set, frozenset)) or isinstance(value, bytes):
        raise TypeError(f"{name}={value!r} must be a pattern (str or re.Pattern) or a sequence of patterns, "
                        f"got {type(value).__name__}")
    patterns = tuple(value)
    for p in patterns:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(f"{name} entries must be str or re.Pattern, got {p!r} ({type(p).__name__})")
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{name} pattern {p!r} is not a valid regular expression: {e}") from None
    return patterns


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a parameter tree.

    format: "nf4", "fp4", "nf3", "nf2" or "int8". blocksize: int elements per absmax (None:
      per-channel int8). double_quant: 8-bit quantize the absmax too (about 0.37 bits/param
      saved for nf4 at 64). compute_dtype: float dtype the matmuls run in. target: patterns a
      leaf's path must match to be quantized (None: every float leaf of rank >= 2). skip:
      patterns never quantized (default: embeddings, lm_head, norms). min_size: leaves with fewer
      elements stay dense.
    Patterns (target, skip) see a leaf's path, e.g. "params/layers_0/attn/q_proj/kernel":
      - a bare name (no `*`, `?`, `[`, not "re:") matches when it equals one of the path's
        components, as bitsandbytes' `llm_int8_skip_modules` and PEFT module names do:
        `skip=("lm_head",)` skips "lm_head/kernel" and "params/lm_head/kernel" (not
        "lm_head_2/kernel"); `target=("q_proj",)` selects every ".../q_proj/kernel"; a name with
        "/" ("attn/q_proj") matches a run of consecutive components;
      - a glob matches the whole path, `*` crossing "/" ("*attn*", "params/layers_0/*");
      - "re:<regex>" or a compiled `re.Pattern` is searched in the path.
      `quantize_params` warns for a pattern (beyond DEFAULT_SKIP) that matches no leaf.
    llm_int8_threshold: for format="int8" with blocksize=None, the LLM.int8 outlier threshold
      the layers pass to `int8_matmul` (0 disables the decomposition); ignored otherwise.
    `QuantConfig.from_hf(d)` / `q.to_hf()` translate transformers' BitsAndBytesConfig dicts.
    Raises TypeError for a field of the wrong type, ValueError for a bad value (each naming it).
    """

    format: str = "nf4"
    blocksize: int | None = 64
    double_quant: bool = True
    compute_dtype: Any = jnp.bfloat16
    target: Any = None
    skip: Any = DEFAULT_SKIP
    min_size: int = 0
    llm_int8_threshold: float = 6.0

    def __post_init__(self):
        if not isinstance(self.format, str):
            raise TypeError(f"QuantConfig.format={self.format!r} must be a str, one of {sorted(formats.FORMATS)}")
        object.__setattr__(self, "blocksize", check_blocksize(formats.get_format(self.format), self.blocksize))
        object.__setattr__(self, "double_quant", check_flag(self.double_quant, "QuantConfig.double_quant"))
        float_dtype(self.compute_dtype, "QuantConfig.compute_dtype")
        if isinstance(self.min_size, (bool, np.bool_)) or not isinstance(self.min_size, (int, np.integer)) \
                or self.min_size < 0:
            raise TypeError(f"QuantConfig.min_size={self.min_size!r} must be an int >= 0")
        threshold = self.llm_int8_threshold
        if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"QuantConfig.llm_int8_threshold={threshold!r} must be a number >= 0, "
                            f"got {type(threshold).__name__}")
        if not threshold >= 0:
            raise ValueError(f"QuantConfig.llm_int8_threshold must be >= 0, got {threshold!r}")
        if self.double_quant and self.is_llm_int8:
            raise ValueError(f"QuantConfig(format={self.format!r}, blocksize=None) is LLM.int8 (per-channel int8 for "
                             "int8_matmul), which has no double quantization: pass double_quant=False")
        object.__setattr__(self, "target", as_patterns(self.target, "QuantConfig.target"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "QuantConfig.skip") or ())

    def user_patterns(self) -> list[tuple[str, Pattern]]:
        """(field, pattern) for every pattern a user chose: target, and skip beyond DEFAULT_SKIP."""
        return ([("target", p) for p in self.target or ()]
                + [("skip", p) for p in self.skip if p not in DEFAULT_SKIP])

    def selects(self, path: str) -> bool:
        """True when a leaf at `path` is chosen by target and not excluded by skip."""
        if matches_any(path, self.skip):
            return False
        return self.target is None or matches_any(path, self.target)

    def config_for(self, path: str) -> "QuantConfig | None":
        """The config that quantizes the leaf at `path` (self), or None to keep it dense.

        Per-path policies (`QuantRules`) answer the same question with different configs.
        """
        return self if self.selects(path) else None

    @property
    def is_llm_int8(self) -> bool:
        """True when matmuls should use `int8_matmul` (per-channel int8 weights)."""
        return formats.get_format(self.format).is_llm_int8(self.blocksize)

    def quantize(self, x, *, transposed: bool = False, check_finite: bool = True) -> QuantizedArray:
        return quantize(x, self.format, blocksize=self.blocksize, double_quant=self.double_quant,
                        transposed=transposed, check_finite=check_finite)

    @classmethod
    def from_hf(cls, quantization_config) -> "QuantConfig":
        """The QuantConfig for a transformers `BitsAndBytesConfig` (its `to_dict()`, or the
        "quantization_config" of a config.json; a BitsAndBytesConfig object works too).

        load_in_4bit: format `bnb_4bit_quant_type` ("nf4" / "fp4"), blocksize 64 (bitsandbytes'
          4-bit blocksize), double_quant `bnb_4bit_use_double_quant`.
        load_in_8bit: LLM.int8 (format "int8", blocksize None, no double quant).
        Both: compute_dtype `bnb_4bit_compute_dtype` ("bfloat16", "torch.float16", a torch.dtype...),
          llm_int8_threshold `llm_int8_threshold`. Missing fields take transformers' defaults
          (fp4, no double quant, float32 compute, threshold 6.0).
        llm_int8_skip_modules: None (transformers then keeps the output head dense, found per model)
          gives DEFAULT_SKIP; a list gives its entries as bare names ("model.lm_head" ->
          "model/lm_head") plus HF_ALWAYS_SKIP (embeddings and norms, which transformers never
          quantizes), and no "*lm_head*": as in transformers, an explicit list replaces the head default.
        Raises ValueError naming the key for a dict that is not bitsandbytes (`quant_method`, neither
        or both of load_in_4bit / load_in_8bit), for what qjax does not implement
        (`bnb_4bit_quant_storage` other than uint8, `llm_int8_enable_fp32_cpu_offload`,
        `llm_int8_has_fp16_weight` for 8-bit, unknown keys, regex skip entries) and for bad values;
        TypeError for a value of the wrong type.
        """
        return _from_hf(cls, quantization_config)

    def to_hf(self) -> dict:
        """This config as a transformers `BitsAndBytesConfig` dict (what `to_dict()` gives, without its
        private keys): `BitsAndBytesConfig.from_dict(q.to_hf())` accepts it, and
        `QuantConfig.from_hf(q.to_hf()) == q` for every config `from_hf` makes.

        skip: DEFAULT_SKIP becomes `llm_int8_skip_modules=None`; otherwise skip must hold HF_ALWAYS_SKIP
        (transformers never quantizes embeddings or norms) and bare names (written with "."), plus
        optionally "*lm_head*" (written "lm_head").
        Raises ValueError naming why for a config BitsAndBytesConfig cannot express: nf3 / nf2,
        a 4-bit blocksize other than 64, blockwise int8, a `target` (transformers quantizes every
        nn.Linear not skipped), `min_size`, a skip glob / regex, a compute dtype torch lacks.
        """
        return _to_hf(self)


# ----------------------------------------------------------------------------- transformers' BitsAndBytesConfig

_HF_KEYS = frozenset({
    "quant_method", "load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit", "llm_int8_threshold",
    "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage"})
_HF_DTYPES = {"float16": jnp.float16, "half": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32,
              "float": jnp.float32, "float64": jnp.float64, "double": jnp.float64}
_HF_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
_HF_MODULE_NAME = re.compile(r"[\w\-]+(?:\.[\w\-]+)*")
_HF_4BIT_BLOCKSIZE = 64


def _hf_where(key, value) -> str:
    return f"quantization_config[{key!r}]={value!r}"


def _hf_bool(d, key, default=False) -> bool:
    value = d.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"QuantConfig.from_hf: {_hf_where(key, value)} must be a bool")
    return bool(value)


def _hf_dtype_name(key, value) -> str:
    """A dtype written as transformers accepts it ("bfloat16", "torch.bfloat16", torch.bfloat16) as its name."""
    if not isinstance(value, str) and type(value).__module__.split(".")[0] == "torch":
        value = str(value)  # torch.dtype: "torch.bfloat16"
    if not isinstance(value, str):
        raise TypeError(f"QuantConfig.from_hf: {_hf_where(key, value)} must be a dtype name such as "
                        "'bfloat16' or 'torch.bfloat16'")
    return value.removeprefix("torch.")


def _from_hf(cls, quantization_config) -> QuantConfig:
    d = quantization_config
    if not isinstance(d, Mapping) and callable(getattr(d, "to_dict", None)):
        d = d.to_dict()  # a BitsAndBytesConfig object
    if not isinstance(d, Mapping):
        raise TypeError(f"QuantConfig.from_hf takes a BitsAndBytesConfig dict (quantization_config), "
                        f"got {type(quantization_config).__name__}")
    unknown = sorted(str(k) for k in d if k not in _HF_KEYS)
    if unknown:
        raise ValueError(f"QuantConfig.from_hf: quantization_config has keys {unknown} that qjax does not know; "
                         f"a BitsAndBytesConfig has only {sorted(k for k in _HF_KEYS if not k.startswith('_'))}")
    method = d.get("quant_method", "bitsandbytes")
    if str(getattr(method, "value", method)) != "bitsandbytes":
        raise ValueError(f"QuantConfig.from_hf: {_hf_where('quant_method', method)} is not 'bitsandbytes'; "
                         "qjax reads only bitsandbytes (BitsAndBytesConfig) quantization configs")
    flags = {}
    for bits in ("4", "8"):
        public, private = _hf_bool(d, f"load_in_{bits}bit"), _hf_bool(d, f"_load_in_{bits}bit")
        if f"load_in_{bits}bit" in d and f"_load_in_{bits}bit" in d and public != private:
            raise ValueError(f"QuantConfig.from_hf: {_hf_where(f'load_in_{bits}bit', d[f'load_in_{bits}bit'])} "
                             f"contradicts {_hf_where(f'_load_in_{bits}bit', d[f'_load_in_{bits}bit'])}")
        flags[bits] = public or private
    if flags["4"] and flags["8"]:
        raise ValueError("QuantConfig.from_hf: quantization_config has both 'load_in_4bit' and 'load_in_8bit' "
                         "true; a BitsAndBytesConfig sets exactly one")
    if not (flags["4"] or flags["8"]):
        raise ValueError("QuantConfig.from_hf: quantization_config has neither 'load_in_4bit' nor 'load_in_8bit' "
                         "true, so it quantizes nothing; set exactly one")
    if _hf_bool(d, "llm_int8_enable_fp32_cpu_offload"):
        raise ValueError("QuantConfig.from_hf: quantization_config['llm_int8_enable_fp32_cpu_offload']=True keeps "
                         "the modules device_map puts on the CPU dense in float32; qjax does not implement it")
    if flags["8"] and _hf_bool(d, "llm_int8_has_fp16_weight"):
        raise ValueError("QuantConfig.from_hf: quantization_config['llm_int8_has_fp16_weight']=True runs LLM.int8 "
                         "with 16-bit main weights (re-quantized each step); qjax does not implement it")
    threshold = d.get("llm_int8_threshold", 6.0)
    threshold = 6.0 if threshold is None else threshold
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"QuantConfig.from_hf: {_hf_where('llm_int8_threshold', threshold)} must be a number")
    if not threshold >= 0:
        raise ValueError(f"QuantConfig.from_hf: {_hf_where('llm_int8_threshold', threshold)} must be >= 0")
    dtype = d.get("bnb_4bit_compute_dtype")
    if dtype is None:
        compute_dtype = jnp.float32  # transformers' default
    else:
        name = _hf_dtype_name("bnb_4bit_compute_dtype", dtype)
        if name not in _HF_DTYPES:
            raise ValueError(f"QuantConfig.from_hf: {_hf_where('bnb_4bit_compute_dtype', dtype)} is not a float "
                             f"dtype qjax computes in; use one of {list(_HF_DTYPE_NAMES)}")
        compute_dtype = _HF_DTYPES[name]
    skip = _hf_skip(d.get("llm_int8_skip_modules"))
    common = dict(compute_dtype=compute_dtype, skip=skip, llm_int8_threshold=float(threshold))
    if flags["8"]:
        return cls(format="int8", blocksize=None, double_quant=False, **common)
    storage = d.get("bnb_4bit_quant_storage")
    if storage is not None and _hf_dtype_name("bnb_4bit_quant_storage", storage) != "uint8":
        raise ValueError(f"QuantConfig.from_hf: {_hf_where('bnb_4bit_quant_storage', storage)}: qjax stores packed "
                         "4-bit codes as uint8 (bitsandbytes' default); other storage dtypes are not supported")
    quant_type = d.get("bnb_4bit_quant_type", "fp4")
    quant_type = "fp4" if quant_type is None else quant_type
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"QuantConfig.from_hf: {_hf_where('bnb_4bit_quant_type', quant_type)} must be 'nf4' or 'fp4'")
    return cls(format=quant_type, blocksize=_HF_4BIT_BLOCKSIZE,
               double_quant=_hf_bool(d, "bnb_4bit_use_double_quant"), **common)


def _hf_skip(modules) -> tuple:
    if modules is None:
        return DEFAULT_SKIP
    if isinstance(modules, str) or not isinstance(modules, (Sequence, set, frozenset)):
        raise TypeError(f"QuantConfig.from_hf: {_hf_where('llm_int8_skip_modules', modules)} must be None or a "
                        "list of module names")
    names = []
    for m in modules:
        if not isinstance(m, str):
            raise TypeError(f"QuantConfig.from_hf: llm_int8_skip_modules entry {m!r} must be a str")
        if not _HF_MODULE_NAME.fullmatch(m):
            raise ValueError(f"QuantConfig.from_hf: llm_int8_skip_modules entry {m!r} is not a module name "
                             "('lm_head', 'model.layers.0.mlp'); qjax does not map transformers' regex entries: "
                             "build the QuantConfig with a skip pattern instead")
        names.append(m.replace(".", "/"))
    return tuple(dict.fromkeys(names + list(HF_ALWAYS_SKIP)))


def _to_hf(q: QuantConfig) -> dict:
    def refuse(why):
        raise ValueError(f"QuantConfig.to_hf: {q!r} has no BitsAndBytesConfig equivalent: {why}")

    if q.format in ("nf4", "fp4"):
        if q.blocksize != _HF_4BIT_BLOCKSIZE:
            refuse(f"bitsandbytes' 4-bit layers use blocksize {_HF_4BIT_BLOCKSIZE}, not {q.blocksize}")
    elif q.format == "int8":
        if not q.is_llm_int8:
            refuse(f"blockwise int8 (blocksize={q.blocksize}) is not a transformers layer format; load_in_8bit is "
                   "LLM.int8 (format='int8', blocksize=None)")
    else:
        refuse(f"format {q.format!r} is qjax's own; bitsandbytes layers store nf4, fp4 or LLM.int8")
    if q.target is not None:
        refuse(f"target={q.target!r}: transformers quantizes every nn.Linear that llm_int8_skip_modules does not "
               "name, so express the choice as skip names")
    if q.min_size:
        refuse(f"min_size={q.min_size}: transformers has no size threshold")
    name = np.dtype(q.compute_dtype).name
    if name not in _HF_DTYPE_NAMES:
        refuse(f"compute_dtype {name} is not one of {list(_HF_DTYPE_NAMES)}")
    if set(q.skip) == set(DEFAULT_SKIP):
        skip_modules = None
    else:
        missing = [p for p in HF_ALWAYS_SKIP if p not in q.skip]
        if missing:
            refuse(f"skip={q.skip!r} lacks {missing}, so it quantizes embeddings or norms, which transformers "
                   "never does; keep those DEFAULT_SKIP patterns")
        skip_modules = []
        for p in q.skip:
            if p in HF_ALWAYS_SKIP:
                continue
            if p == "*lm_head*":
                p = "lm_head"
            elif not is_name(p) or not _HF_MODULE_NAME.fullmatch(p.strip("/").replace("/", ".")):
                refuse(f"skip pattern {_pattern_text(p)} is not a module name; llm_int8_skip_modules takes module "
                       "names such as 'lm_head' or 'model/layers/0/mlp'")
            elif "." in p:
                refuse(f"skip name {p!r} holds '.', which llm_int8_skip_modules reads as a module separator")
            skip_modules.append(p.strip("/").replace("/", "."))
        skip_modules = list(dict.fromkeys(skip_modules))
    four = q.format != "int8"
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "llm_int8_threshold": float(q.llm_int8_threshold),
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": q.format if four else "fp4",
        "bnb_4bit_use_double_quant": bool(q.double_quant),
        "bnb_4bit_compute_dtype": name,
        "bnb_4bit_quant_storage": "uint8",
    }


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _check_policy(config) -> None:
    if not callable(getattr(config, "config_for", None)):
        raise TypeError(f"config must be a QuantConfig or QuantRules (anything with config_for(path)), "
                        f"got {type(config).__name__} {config!r}")


def quantize_tree(params, config, on_report: Callable[[str, Any, Any, int], None]):
    """`quantize_params` without its checks: on_report(path, leaf, report, blocks) gets each report."""
    _check_policy(config)

    def visit(path, x):
        name = path_str(path)
        if is_quantized(x):
            raise ValueError(f"parameter {name!r} is already quantized ({x!r}); "
                             "quantize_params takes a dense tree")
        chosen = config.config_for(name) if np.ndim(x) >= 2 else None
        if chosen is None or np.size(x) < chosen.min_size:
            return x
        if not _is_float(x):
            if chosen.target is not None:
                raise TypeError(f"target pattern selects non-float parameter {named(name, x)}")
            return x
        try:
            q, report = quantize_with_report(x, chosen.format, blocksize=chosen.blocksize,
                                             double_quant=chosen.double_quant)
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter {named(name, x)}: {e}") from None
        on_report(name, x, report, q.num_blocks)
        return q

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)


def warn_unmatched_patterns(config, params, quantized) -> None:
    """UserWarning for each user pattern of `config` that matches no leaf path of `params`.

    A target pattern that matches only leaves kept dense (rank < 2, non-float, skipped, below
    min_size) warns too. quantized: the tree `params` quantized to (to see which leaves changed).
    """
    if not callable(getattr(config, "user_patterns", None)):
        return
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    paths = [path_str(p) for p, _ in leaves]
    done = {path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(quantized, is_leaf=is_quantized)[0]
            if is_quantized(x)}
    problems = []
    for field, pattern in dict.fromkeys(config.user_patterns()):
        hits = [path for path in paths if matches(path, pattern)]
        if not hits:
            problems.append(f"{field} pattern {_pattern_text(pattern)} matched no parameter path")
        elif field.endswith("target") and not done.intersection(hits):
            problems.append(f"{field} pattern {_pattern_text(pattern)} matched only parameters that stay dense "
                            f"(rank < 2, non-float, skipped or below min_size), e.g. {hits[:3]}")
    if problems:
        warnings.warn("quantize_params: " + "; ".join(problems) + f". Paths look like {paths[:4]} "
                      "(a bare name matches whole components: 'up_proj' matches '.../up_proj/kernel', 'up' does not; "
                      "globs match the whole path: '*up*')", UserWarning, stacklevel=3)


def quantize_params(params, config: QuantConfig = QuantConfig(), *, check_finite: bool = True):
    """Quantizes the selected leaves of a parameter tree.

    config: a QuantConfig, or any policy with `config_for(path) -> QuantConfig | None` (e.g.
      `QuantRules` for mixed precision).
    Every float leaf of rank >= 2 for which `config.config_for(path)` gives a config becomes a QuantizedArray;
    everything else (biases, norms, embeddings in `skip`, integer leaves) is returned as is.
    check_finite: raise ValueError naming the leaf (path, shape, dtype) if it holds NaN/Inf or its
      statistics overflow; under jit each quantized leaf checks in a `jax.debug.callback` (a host
      round trip; `quantize_params_sharded` checks all leaves with one read instead). False skips it.
    Warns (UserWarning) for target / skip / rule patterns that match no parameter.
    Raises ValueError if the tree already holds QuantizedArrays, or (checked) a leaf holds NaN/Inf;
    TypeError if an explicit `target` pattern selects a non-float leaf (naming its path).
    """
    check = check_flag(check_finite, "check_finite")

    def on_report(name, x, report, blocks):
        if check:
            check_report(report, f"parameter {name!r}", x, blocks)

    out = quantize_tree(params, config, on_report)
    warn_unmatched_patterns(config, params, out)
    return out


def dequantize_params(params, dtype=None):
    """The dense tree: every QuantizedArray replaced by `dequantize(q, dtype)` (a float dtype).

    Raises TypeError for a non-float dtype, ValueError naming the parameter whose leaves do not
    fit its static shape and format.
    """
    if dtype is not None:
        float_dtype(dtype)

    def visit(path, x):
        if not is_quantized(x):
            return x
        try:
            return dequantize(x, dtype)
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter {path_str(path)!r}: {e}") from None

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)
