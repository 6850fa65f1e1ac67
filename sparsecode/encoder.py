"""The encoder contract: a typed config, `fit(dictionary, x=None)`, `encode(x) -> codes`."""
from __future__ import annotations

import abc
import ast
import copy
import dataclasses
import difflib
import importlib.util
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch

from . import native
from ._validation import as_tensor, check_int_range, check_positive
from .dictionary import Dictionary, as_dictionary
from .memory import memory_budget, parse_memory


@dataclass(frozen=True)
class EncoderConfig:
    """Base of every encoder's config. Field docstrings become CLI help (see `field_docs`).

    Every field is type-checked against its annotation when the config is built (`check_types`),
    so a subclass, a built-in or a plug-in's, gets the check by declaring its fields' types.
    """

    def __post_init__(self) -> None:
        self.check_types()

    def check_types(self) -> None:
        """Refuse a field value whose type is not its annotation's, naming the field and the value.

        bool fields take only True/False (a string such as "no" would otherwise read as true);
        int fields take ints (numpy integers too), never bools or floats such as 3.0; float fields
        take ints and floats (stored as float); str fields take strings or paths (stored as str);
        ``X | None`` adds None and ``Literal[...]`` lists the accepted values. Fields annotated
        with other types are not checked here. Text from the command line is parsed first
        (`coerce_field`).
        """
        for name, kind in _field_types(type(self)):
            value = getattr(self, name)
            converted = _check_type(name, kind, value)
            if converted is not value:
                object.__setattr__(self, name, converted)

    def validate(self) -> None:
        """Reject values no encoder could use; fields with these names share one meaning everywhere."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "k" and value is not None:
                check_int_range("k", value, 1)
            elif f.name in ("lam", "l1_coefficient", "tol") and value is not None:
                check_positive(f.name, value)
            elif f.name == "max_iter":
                check_int_range("max_iter", value, 1)
            elif f.name == "memory":
                parse_memory(value)


@dataclass(frozen=True)
class MemoryConfig(EncoderConfig):
    """Config of an encoder whose working memory is bounded by a budget (chunk sizes come from it)."""

    memory: str | int | None = None
    """Working-memory budget for encoding, e.g. '4GB' or '512MiB' [default: half the device's free memory]."""


@dataclass(frozen=True)
class KernelConfig(MemoryConfig):
    """Config of an encoder whose per-signal loops also exist as compiled CPU kernels (`sparsecode.native`)."""

    kernel: str = "auto"
    """How the per-signal loops run on the CPU: 'native' (compiled, one signal at a time; built on first use
    with the system's C compiler), 'torch' (batched torch operations, as on a GPU) or 'auto' (native on the
    CPU where it builds)."""

    def validate(self) -> None:
        super().validate()
        if self.kernel not in native.KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(native.KERNELS)}, got {self.kernel!r}")


@lru_cache(maxsize=None)
def _field_types(config_cls: type) -> tuple:
    """(name, annotation) of each init field, with annotations resolved from their module."""
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError):     # an annotation that cannot be resolved is left unchecked
        hints = {}
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(config_cls) if f.init and f.name in hints)


def _type_name(kind) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    return getattr(kind, "__name__", str(kind))


def _check_type(name: str, kind, value):
    """`value` (converted to the field's exact type where lossless) or a TypeError naming both."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        allowed = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(name, option, value)
            except TypeError:
                allowed.append(_type_name(option))
        allowed = " or ".join(allowed + (["None"] if type(None) in options else []))
        raise TypeError(f"option {name} takes {allowed}, got {value!r} ({type(value).__name__})")
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise TypeError(f"option {name} takes {_type_name(kind)}, got {value!r}")
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError(f"option {name} takes True or False, got {value!r} ({type(value).__name__})")
    if kind is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value) if type(value) is not int else value
        raise TypeError(f"option {name} takes an integer, got {value!r} ({type(value).__name__})")
    if kind is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            return float(value) if type(value) is not float else value
        raise TypeError(f"option {name} takes a number, got {value!r} ({type(value).__name__})")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"option {name} takes a string, got {value!r} ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class Encoded:
    """What one `encode_with_info` call produced: the codes and how far the method got with them."""

    codes: torch.Tensor
    """Codes (n, n_atoms) on the input's device, in the input's dtype."""
    n_iter: float | None = None
    """Mean iterations per signal (iterative methods; None where the method does not iterate)."""
    uncertified: int | None = None
    """Signals whose stopping criterion was not met when the iteration budget ran out (None: the
    method gives no certificate)."""
    variant: str | None = None
    """The variant of the method this call ran, where it chooses one from the sizes (e.g. 'gram')."""
    working_bytes: int | None = None
    """The working memory this call planned (bytes), where the method plans it from a budget."""
    precision: str | None = None
    """The dtype of the call's products with all atoms, where the method chooses it (e.g. 'bfloat16')."""
    kernel: str | None = None
    """'native' where the call's per-signal loops ran in the compiled kernels (`sparsecode.native`), 'torch'
    where they ran as torch operations (None: the method has no such choice)."""


def field_docs(config_cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, read from the source (base classes too)."""
    return dict(_field_docs(config_cls))


@lru_cache(maxsize=None)
def _field_docs(config_cls: type) -> tuple:
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return tuple(docs.items())


def coerce_field(config_cls: type, name: str, text: str):
    """Parse `text` as the type of field `name` (used for `--set encoder.field=value`)."""
    hints = typing.get_type_hints(config_cls)
    kind = hints[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = args[0]
        if text.lower() in ("none", "null"):
            return None
    if typing.get_origin(kind) is typing.Literal:
        choices = {str(c): c for c in typing.get_args(kind)}
        if text not in choices:
            raise ValueError(f"{name} takes {_type_name(kind)}, got {text!r}")
        return choices[text]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} takes true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} takes a {kind.__name__}, got {text!r}") from None


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


class Encoder(abc.ABC):
    """Infers sparse codes for a fixed dictionary.

    Subclasses set `name`, `family`, `Config` (a frozen dataclass), optionally `requires`
    (import name -> pip name), `knob` (the config field that sets sparsity) and the capabilities
    below, and implement `_encode(x)` (or `_encode_with_info`) on a validated tensor; `_fit` when
    fitting precomputes or learns something. The framework asks these attributes, never the name,
    so a plug-in gets exactly the treatment of a built-in encoder.

    `fit` and `encode` are template methods: the dictionary's and the signals' checks, the dtype
    handling, the decoder bias and the not-fitted check live here, once, for every encoder.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    Config: ClassVar[type[EncoderConfig]]
    requires: ClassVar[dict[str, str]] = {}
    #: the config field that sets sparsity: "k" (active atoms per signal), "lam" (the lasso penalty)
    #: or the method's own continuous penalty (e.g. "l1_coefficient"); None: none
    knob: ClassVar[str | None] = None
    #: a config field that only encoding reads (an inference threshold), along which the mean L0 falls
    #: as it grows: calibration fits the encoder once and searches this field on the fitted encoder
    #: (`inference_range`, `retuned`) instead of refitting for every value of `knob`; None: none
    inference_knob: ClassVar[str | None] = None
    #: learns a network from signals in `fit(dictionary, x)` (with the dictionary frozen)
    trainable: ClassVar[bool] = False
    #: can learn its own dictionary too, in `learn(x, n_atoms)`: a dictionary learning method
    learns_dictionary: ClassVar[bool] = False
    #: the method removes the dictionary's bias itself (a network trained on raw signals, an imported
    #: SAE): `encode` passes it x as given instead of x - bias
    sees_raw_input: ClassVar[bool] = False
    #: encoding a thousand signals takes seconds or more: benchmarks time it once, not a median of several
    slow: ClassVar[bool] = False
    #: the CPU speed reference of `bench speed` for the encoders that solve its problem (the same knob,
    #: the same `solves_lasso`)
    speed_reference: ClassVar[bool] = False
    #: k may not exceed d either: the method refits the selected atoms by least squares (OMP)
    k_within_d: ClassVar[bool] = False
    #: The codes minimise the lasso objective 0.5||x - z D||^2 + lam ||z||_1 at the config's `lam`
    #: (and `positive`), so comparisons report that objective and its gap to a reference solver.
    #: Left unset, a class that declares its `family` gets True exactly when the family is "lasso".
    solves_lasso: ClassVar[bool | None] = None
    #: bytes per entry of the full n_atoms x n_atoms Gram matrix the method always forms (0: none, or only
    #: where it fits the memory budget); benchmarks skip the method where that matrix cannot fit
    gram_itemsize: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "solves_lasso" not in cls.__dict__ and "family" in cls.__dict__:
            cls.solves_lasso = cls.family == "lasso"

    def __init__(self, config: EncoderConfig | None = None, **fields):
        config = config if config is not None else self.Config()
        names = {f.name for f in dataclasses.fields(self.Config)}
        for key in fields:
            if key not in names:
                raise TypeError(f"encoder {self.name!r} has no option {key!r}.{suggest(key, names)} "
                                f"Options: {', '.join(sorted(names))}")
        self.config = dataclasses.replace(config, **fields)
        self.config.validate()
        self.dictionary: Dictionary | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """pip names of the packages this encoder needs that are not installed."""
        return [pip for module, pip in cls.requires.items() if importlib.util.find_spec(module) is None]

    # --- capabilities the framework asks for (class-level: no instance or dictionary needed) --------
    @classmethod
    def max_k(cls, n_atoms: int, d: int) -> int:
        """The largest k this method accepts for a dictionary of n_atoms atoms in R^d."""
        return min(n_atoms, d) if cls.k_within_d else n_atoms

    @classmethod
    def lam_per_unit(cls, n_atoms: int, d: int) -> float:
        """The lasso penalty per signal that one unit of this encoder's penalty knob amounts to: 1 for
        `lam` itself; a penalty on a loss averaged over dimensions and atoms converts otherwise. Calibration
        brackets a penalty knob with it."""
        return 1.0

    @classmethod
    def budget_params(cls, budget: int) -> dict:
        """Config fields that give exactly `budget` iterations per signal ({}: the method does not iterate)."""
        return {}

    @classmethod
    def reference_params(cls, lam: float, positive: bool) -> dict:
        """Config fields that make this lasso solver the (tightly converged) reference of a comparison at
        (lam, positive): the optimum that rows' objective gaps are measured against."""
        if not cls.solves_lasso:
            raise ValueError(f"{cls.name!r} does not solve the lasso objective: it cannot be a reference")
        params = {"lam": lam}
        if "positive" in cls.Config.__dataclass_fields__:
            params["positive"] = positive
        elif positive:
            raise ValueError(f"reference {cls.name!r} has no positive option, but a row constrains codes to be >= 0")
        return params

    # --- an inference knob (see `inference_knob`) ----------------------------------------------------
    def inference_range(self, x) -> tuple[float, float]:
        """Values of `inference_knob` between which the fitted encoder goes from its densest codes of the
        signals `x` (low) to all-zero codes (high): the interval calibration searches."""
        raise ValueError(f"encoder {self.name!r} has no inference knob (inference_knob is None)")

    def retuned(self, **fields) -> "Encoder":
        """A copy of this fitted encoder with its `inference_knob` set as given; what fitting made (the
        network, the dictionary) is shared, not copied or refitted."""
        allowed = {self.inference_knob} - {None}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"encoder {self.name!r} can change only {', '.join(sorted(allowed)) or 'nothing'} "
                             f"after fitting, not {', '.join(sorted(unknown))}")
        twin = copy.copy(self)
        twin.config = dataclasses.replace(self.config, **fields)
        twin.config.validate()
        return twin

    # --- the template: fit ------------------------------------------------------------------------
    def fit(self, dictionary, x=None, y=None, **targets) -> "Encoder":
        """Bind to `dictionary` (a Dictionary, atoms array or saved path) and precompute what encoding needs.

        Trainable encoders also learn from `x` of shape (n, d) (or an activation store), with the
        dictionary frozen; `y` (n, d_out) is a transcoder's targets (default x) and `targets` are a
        method's other training targets (LISTA's `codes`).
        """
        if y is not None:
            targets["y"] = y
        missing = self.missing_requirements()
        if missing:
            raise ImportError(f"encoder {self.name!r} needs {', '.join(missing)}: pip install {' '.join(missing)}")
        if self.trainable and x is None:
            raise ValueError(f"encoder {self.name!r} is trained: call fit(dictionary, x_train)")
        if targets and not self.trainable:
            raise TypeError(f"encoder {self.name!r} is not trained: it takes no {', '.join(sorted(targets))}")
        dictionary = as_dictionary(dictionary)
        self._check_dictionary(dictionary)
        self.dictionary = dictionary
        if x is not None and not self.trainable:
            x = self._check_x(x)          # a trainable encoder's x may be a store: its `_fit` reads it
        self._fit(x, **targets)
        return self

    # --- the template: encode ---------------------------------------------------------------------
    def encode(self, x) -> torch.Tensor:
        """Codes of shape (n, n_atoms) for signals `x` of shape (n, d), on x's device and in x's dtype."""
        return self.encode_with_info(x).codes

    def encode_with_info(self, x) -> Encoded:
        """`encode`, with what the call itself knows about its answer (iterations, uncertified signals).

        Per-call facts are returned, not kept on the encoder, so that one encoder can serve several
        callers (threads, a comparison and its calibration) without one reading another's numbers.
        """
        if not self.is_fitted:
            how = "fit(dictionary, x_train)" if self.trainable else "fit(dictionary)"
            raise RuntimeError(f"encoder {self.name!r} is not fitted: call .{how} first")
        x = self._check_x(x)
        self._follow(x.device)
        work = x.to(self._work_dtype(x))
        if self.dictionary.bias is not None and not self.sees_raw_input:
            work = work - self.dictionary.bias.to(device=work.device, dtype=work.dtype)
        with torch.no_grad():
            info = self._encode_with_info(work)
        return dataclasses.replace(info, codes=info.codes.to(x.dtype))

    @property
    def is_fitted(self) -> bool:
        """Whether `encode` can run: a dictionary is bound (and, for trained encoders, the network learned)."""
        return self.dictionary is not None

    @property
    def d_input(self) -> int:
        """Features per input signal (the dictionary's d; a transcoder's input width differs)."""
        return self.dictionary.d

    def flops_per_signal(self, encoded: Encoded | None = None) -> float:
        """Analytic floating-point operations to encode one signal.

        `encoded` (what an `encode_with_info` call returned) gives the counts of that call where the
        cost depends on them (iterations, atoms selected, the variant run); without it, the method's
        planned or worst case. NaN where the method has no closed-form count (interior-point solvers).
        """
        return float("nan")

    def planned_flops(self, dictionary: Dictionary) -> float:
        """`flops_per_signal()` (the planned case) on `dictionary` without fitting: nothing is
        precomputed or trained, so listing costs at LLM scale is instant. NaN where the count needs
        what only fitting provides (an imported SAE's file)."""
        probe = copy.copy(self)
        probe._bind_for_count(dictionary)
        try:
            return float(probe.flops_per_signal())
        except (AttributeError, TypeError):     # a count that reads state only fitting creates
            return float("nan")

    def _bind_for_count(self, dictionary: Dictionary) -> None:
        self.dictionary = dictionary

    def memory_budget(self, device) -> int:
        """Bytes this encoder may use for working memory on `device` (its `memory` option, if it has one)."""
        return memory_budget(getattr(self.config, "memory", None), device)

    # --- for subclasses -----------------------------------------------------------------------
    def _check_dictionary(self, dictionary: Dictionary) -> None:
        k = getattr(self.config, "k", None)
        if k is None:
            return
        if k > dictionary.n_atoms:
            raise ValueError(f"k={k} is larger than the dictionary's n_atoms={dictionary.n_atoms}")
        if k > self.max_k(dictionary.n_atoms, dictionary.d):
            raise ValueError(f"k={k} is larger than d={dictionary.d}: {self.name} cannot select more linearly "
                             "independent atoms than the signal has dimensions")

    def _check_x(self, x) -> torch.Tensor:
        x = as_tensor(x, "x")
        if x.shape[1] != self.d_input:
            raise ValueError(f"x has d={x.shape[1]} features per signal but encoder {self.name!r} takes "
                             f"d={self.d_input}")
        return x

    def _work_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype `_encode` computes in: x's own when float32/float64, else float32."""
        return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    def skip_term(self, x) -> torch.Tensor | None:
        """The part of the reconstruction of `x` that does not go through the codes (a skip-transcoder's
        linear map of its input), to add to the dictionary's decode; None for most encoders."""
        return None

    def _follow(self, device: torch.device) -> None:
        """Make ready to encode signals on `device`. Codes come back on the signals' device; solvers
        read the dictionary there through its per-device cache, so only encoders holding their own
        tensors (a trained network) have anything to move."""

    def _fit(self, x: torch.Tensor | None, **targets) -> None:
        """Precompute (iterative solvers) or train (learned encoders); `self.dictionary` is set."""

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (n, n_atoms) for validated signals `x` (n, d) in the working dtype, bias removed
        (unless `sees_raw_input`)."""

    def _encode_with_info(self, x: torch.Tensor) -> Encoded:
        """`_encode` with per-call information; methods that can certify their answers override this."""
        return Encoded(self._encode(x))


def to_numpy64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float64).numpy()
