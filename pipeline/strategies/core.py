"""The strategy registry, the budgets, and the one selection path every caller uses.

A strategy is declared once, with :func:`strategy`, beside its function::

    @strategy("mine", needs=("projected",), version="1", label="Mine", style=("tab:pink", "h"))
    def mine(req: Request) -> torch.Tensor:          # (crops, L) bool keep mask
        return req.top(req.need("projected").norm(dim=-1))

That declaration is all the rest of the project reads: CLI choices and help, the
eval cache keys (``version``), which tower outputs a shard computes (``needs``),
plugin validation, the peers' table and the plot styles. Built-in strategies live
in the modules of this package (each module is imported on first use); another
installed package adds its own through the entry-point group ``atr.strategies``
(``docs/strategies.md``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import ConfigError

BUDGETS = ("per-crop", "global", "stock", "threshold")
# per-crop: k = round(r * valid tokens) in every crop (the paper's); global: K = round(r * the image's valid
# tokens) over the whole image; stock: K = round(r * the encoder tokens the *stock* model sends of the image,
# newlines aside), spread as global spreads it (see :func:`stock_request`). On a family that never shrinks
# its grid (LLaVA-NeXT) stock sends exactly what global does. threshold (adaptive strategies only: the
# selector): each image keeps the valid tokens whose keep probability reaches the threshold, at least
# round(floor * valid) and at most round(r * valid) of them (r is the cap), so the count varies per image
# (:func:`adaptive_keep`).
FIXED_BUDGETS = BUDGETS[:3]


@dataclass(frozen=True)
class Threshold:
    """The ``threshold`` budget, as ``select``/``selections`` take it in place of a budget name: the keep
    probability a token needs and the least fraction of valid tokens kept (the retention is the cap)."""

    value: float
    floor: float = 0.0
ENTRY_POINT_GROUP = "atr.strategies"

# What a strategy may need (the fields of Context) and where eval gets each one (pipeline.evaluate).
TOWER_FIELDS = ("cls_attention", "early_attention", "keys", "cls_tokens")  # the tower computes these with attention
MODEL_FIELDS = ("regions", "projected")                                   # computed from the model per image
NEEDS = ("selector", "generator", "relevance", "grid", *TOWER_FIELDS, *MODEL_FIELDS)
DEFAULT_STYLES = (("tab:pink", "h"), ("tab:green", "p"), ("black", "d"), ("tab:olive", "<"), ("tab:gray", ">"))


@dataclass
class Context:
    """What strategies may need beyond the features (all per image)."""

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    selector: Any = None  # a TokenSelector (pipeline.selector)
    cls_attention: torch.Tensor | None = None  # (crops, L) CLS -> token attention of the feature layer
    early_attention: torch.Tensor | None = None  # (crops, L) CLS -> token attention of encoder layer 0
    keys: torch.Tensor | None = None  # (crops, L, d) feature layer's attention keys, mean over heads
    regions: torch.Tensor | None = None  # (L,) the grid crop (1..) each base-crop token lies in, 0 for none
    projected: torch.Tensor | None = None  # (crops, L, D) the projector's output: LLM-space tokens
    relevance: torch.Tensor | None = None  # (crops, L) relevance of each token to the question (cdpruner)
    cls_tokens: torch.Tensor | None = None  # (crops, C) the feature layer's CLS token per crop (visionzip)
    grid: tuple[int, int] | None = None  # a dynamic-grid family (Qwen-VL): the image's (rows, cols) of tokens


@dataclass
class Selection:
    """What one image sends the LLM: ``mask`` (crops, L) of kept encoder tokens and ``extra`` (E, C)
    new tokens in tower space (None: none), which go after the kept ones."""

    mask: torch.Tensor
    extra: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """Encoder-side tokens sent (kept + extra; row newlines not counted)."""
        return int(self.mask.sum()) + (0 if self.extra is None else int(self.extra.shape[0]))


@dataclass(frozen=True)
class Request:
    """One image's selection problem, as a strategy function receives it: ``features`` (crops, L, C),
    the retention and budget mode, ``valid`` (crops, L) bool (only those are candidates), the Context
    and the strategy's resolved ``options`` (its declared params, defaults filled in). A ``stock`` budget
    arrives as its ``global`` equivalent (:func:`stock_request`): the retention that gives its K."""

    strategy: str
    features: torch.Tensor
    retention: float
    budget: str
    valid: torch.Tensor
    context: Context
    options: Mapping[str, Any] = field(default_factory=dict)
    threshold: float = 0.0   # the threshold budget: the keep probability a token needs (0: a fixed budget)
    floor: float = 0.0       # the threshold budget: the least fraction of valid tokens kept

    @property
    def per_crop(self) -> bool:
        return self.budget == "per-crop"

    @property
    def adaptive(self) -> bool:
        """Is this the threshold budget (the count follows the image's keep probabilities)?"""
        return self.budget == "threshold"

    def counts(self) -> torch.Tensor:
        """:func:`budget_counts` of this request: k per crop (per-crop) or a 1-element K (global)."""
        return budget_counts(self.valid, self.retention, self.budget)

    def keep_by_probability(self, probability: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """(crops, L) mask of the threshold budget from each token's keep probability (crops, L):
        :func:`adaptive_keep` with this request's threshold, floor and cap (the retention) over
        ``candidates`` (crops, L; default: the valid tokens -- a strategy may narrow them, never widen)."""
        return adaptive_keep(probability, self.valid if candidates is None else candidates & self.valid,
                             self.threshold, self.floor, self.retention)

    def image_budget(self) -> int:
        """K: every token this image may send the LLM."""
        return image_budget(self.valid, self.retention, self.budget)

    def need(self, name: str) -> Any:
        """The Context field ``name``, refused in one line when missing or of the wrong shape."""
        return _need(self.context, name, self.strategy, *self.features.shape[:2])

    def top(self, scores: torch.Tensor) -> torch.Tensor:
        """(crops, L) mask of the top-k valid tokens by ``scores`` (crops, L), k from the budget."""
        return top_k(scores, self.counts(), self.valid, per_crop=self.per_crop)


@dataclass(frozen=True)
class Strategy:
    """One strategy's declaration (see :func:`strategy`)."""

    name: str
    fn: Callable[[Request], Any]
    needs: tuple[str, ...] = ()       # Context fields it cannot run without
    uses: tuple[str, ...] = ()        # Context fields it uses when present (cdpruner: relevance)
    version: str | None = None        # bumped when its choice changes: part of its eval cache keys
    label: str = ""                   # the name in tables (default: the name)
    peer: str = ""                    # a published pruner: its citation ("Alvar et al., CVPR 2025")
    style: tuple[str, str] | None = None  # (matplotlib colour, marker); None: a default
    retention: float | None = None    # a fixed retention (full: 1.0, none: 0.0); None: swept
    seeded: bool = False              # draws at random: one result per seed
    sends_image: bool = True          # False: the prompt carries no image (none)
    params: Mapping[str, Any] = field(default_factory=dict)  # ablation switches and their defaults
    choices: Mapping[str, tuple] = field(default_factory=dict)  # the allowed values of a param, where limited
    batch: Callable[[list[Request]], list[Any]] | None = None  # many images at once (selector)
    adaptive: bool = False            # takes the threshold budget (has a keep probability per token)
    files: tuple[str, ...] = ()       # options whose value names a file: eval keys hold the file's sha256
    crops: bool = False               # needs AnyRes crops (a base crop and a grid): refused on a family without
                                      # them (``Family.has_crops`` False: Qwen-VL), see :func:`check_family`
    check: Callable[[Mapping[str, Any]], None] | None = None  # validates resolved options (one ConfigError line)
    available: Callable[[str, Any], str | None] | None = None  # (model, its options in an eval config: a dict
                                      # or a list of them) -> why it cannot run for that model, None when it can;
                                      # atr run leaves it out with that line (see :func:`unavailable`)
    help: str = ""
    rank: float = 100.0               # listing order (built-ins first)

    def __post_init__(self) -> None:
        for name in ("needs", "uses", "files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "label", self.label or self.name)

    @property
    def prunes(self) -> bool:
        """Does it choose a subset at a swept retention (everything but full and none)?"""
        return self.retention is None

    def wants(self, name: str) -> bool:
        return name in self.needs or name in self.uses

    @property
    def tower_attention(self) -> bool:
        """Does it need the tower's attention outputs (CLS attention, keys, CLS tokens)?"""
        return any(self.wants(n) for n in TOWER_FIELDS)

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Its params with ``options`` applied; an unknown name or a value of the wrong type is refused."""
        out = dict(self.params)
        for key, value in (options or {}).items():
            if key not in self.params:
                valid = ", ".join(self.params) or "none"
                raise ConfigError(f"strategy {self.name!r} has no option {key!r}; its options: {valid}")
            default = self.params[key]
            if isinstance(default, tuple) and isinstance(value, (list, tuple)):
                value = tuple(value)
            if type(value) is not type(default) and not (isinstance(default, float) and isinstance(value, int)
                                                         and not isinstance(value, bool)):
                raise ConfigError(f"option {self.name}.{key} must be a {type(default).__name__}, got {value!r}")
            if key in self.choices and value not in self.choices[key]:
                raise ConfigError(f"option {self.name}.{key} must be one of {', '.join(map(str, self.choices[key]))}, "
                                  f"got {value!r}")
            out[key] = value
        if self.check is not None:
            self.check(out)
        return out

    def changed_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The options that differ from the defaults (what enters a cache key; {} keeps the old keys)."""
        resolved = self.resolve_options(options)
        return {k: v for k, v in sorted(resolved.items()) if v != self.params[k]}

    def variant(self, options: Mapping[str, Any] | None) -> str:
        """The options that differ from the defaults as one short text, ``name=value`` joined by ``,`` in
        name order ('' for the defaults): the ``variant`` column of the results store."""
        return variant_text(self.changed_options(options))


def variant_text(changed: Mapping[str, Any]) -> str:
    """``{"allocation": "image", "cls": False}`` -> ``allocation=image,cls=false`` (JSON for non-strings)."""
    import json

    return ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(changed.items()))


_REGISTRY: dict[str, Strategy] = {}
_LOADED = False


def strategy(name: str, **declaration: Any) -> Callable:
    """Decorator: declare ``fn(req: Request)`` as strategy ``name``; ``declaration`` sets the other fields of
    :class:`Strategy` (``needs``, ``version``, ``peer``, ``style``, ...). ``fn`` returns a (crops, L) bool keep
    mask, a :class:`Selection` (mask plus extra tokens), or None (no image)."""
    fields = {f.name for f in dataclasses.fields(Strategy)} - {"name", "fn"}
    unknown = sorted(set(declaration) - fields)
    if unknown:
        raise ConfigError(f"strategy {name!r}: unknown declaration field(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(fields))}")

    def register_fn(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        register(Strategy(name, fn, **declaration))
        return fn

    return register_fn


def register(spec: Strategy) -> Strategy:
    """Add a strategy to the registry (what :func:`strategy` does); a clash or an unknown need is refused."""
    if not spec.name or not all(c.isalnum() or c in "-_" for c in spec.name):
        raise ConfigError(f"strategy name {spec.name!r} must be letters, digits, '-' or '_'")
    unknown = [n for n in (*spec.needs, *spec.uses) if n not in NEEDS]
    if unknown:
        raise ConfigError(f"strategy {spec.name!r} needs {', '.join(unknown)}, which atr cannot give; "
                          f"known: {', '.join(NEEDS)}")
    if not _LOADED and not getattr(spec.fn, "__module__", "").startswith(f"{__package__}."):
        load()  # the built-ins first: a clash with one is refused whatever was imported before
    old = _REGISTRY.get(spec.name)
    if old is not None and old.fn is not spec.fn and getattr(old.fn, "__qualname__", None) != spec.fn.__qualname__:
        raise ConfigError(f"strategy {spec.name!r} is declared twice ({_where(old.fn)} and {_where(spec.fn)})")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a strategy (tests that declare their own)."""
    _REGISTRY.pop(name, None)


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def load() -> dict[str, Strategy]:
    """Import every built-in strategy module of this package, then the ``atr.strategies`` entry points
    (once per process); the registry, in listing order."""
    global _LOADED
    if not _LOADED:
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("core",) and not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")
        _LOADED = True
        try:
            load_plugins()
        except ConfigError:
            _LOADED = False  # a broken plugin is refused on every call, not only the first
            raise
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].rank, list(_REGISTRY).index(kv[0]))))


def load_plugins() -> list[str]:
    """Load the ``atr.strategies`` entry points: each names a module that declares strategies with
    :func:`strategy`, or a :class:`Strategy` (or a list of them). A plugin that fails to load is refused in
    one line naming it. Returns the entry points' names."""
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 (a broken plugin: one line naming it)
            raise ConfigError(f"strategy plugin {ep.name!r} ({ep.value}) does not load: "
                              f"{type(exc).__name__}: {exc}") from None
        for spec in obj if isinstance(obj, (list, tuple)) else [obj]:
            if isinstance(spec, Strategy):
                register(spec)
        names.append(ep.name)
    return names


def get(name: str) -> Strategy:
    """The declaration of ``name``; an unknown name is refused in one line listing the known ones."""
    registry = load()
    if name not in registry:
        import difflib

        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown strategy {name!r}{hint}; valid: {', '.join(registry)}")
    return registry[name]


def names() -> tuple[str, ...]:
    """Every strategy, in listing order."""
    return tuple(load())


def pruners() -> tuple[str, ...]:
    """The strategies that choose a subset at a swept retention (not full, not none)."""
    return tuple(n for n, s in load().items() if s.prunes)


def prunes(name: str) -> bool:
    """Is ``name`` swept over retentions (not full, not none)? A name not registered in this process (a
    plugin's, read back from the results store) counts as swept."""
    spec = load().get(name)
    return spec is None or spec.prunes


def seeded(name: str) -> bool:
    """Does ``name`` draw at random (one result per seed)? False for a name not registered here."""
    spec = load().get(name)
    return spec is not None and spec.seeded


def peers() -> tuple[str, ...]:
    """The published pruners."""
    return tuple(n for n, s in load().items() if s.peer)


def unavailable(name: str, family=None, model: str | None = None, options: Any = None) -> str | None:
    """Why strategy ``name`` cannot run for a model of ``family`` (None: unknown), or None when it can: a
    strategy that needs AnyRes crops on a family without them, then (only when ``model`` is given) the
    strategy's own ``available`` hook with ``model`` and its ``options``. ``atr run`` leaves such a strategy
    out for that model (one warning line each) so that one config runs every family; the default strategy
    list leaves out the crop-needing ones for a known family."""
    spec = get(name)
    if spec.crops and family is not None and not getattr(family, "has_crops", True):
        return f"{family.label} has no AnyRes crops"
    if model is not None and spec.available is not None:
        return spec.available(model, options)
    return None


def check_family(strategies: Sequence[str], family) -> None:
    """One line for a strategy the model's ``family`` cannot run: one that needs AnyRes crops
    (``Strategy.crops``: HiRED) on a family without them (``family.has_crops`` False: Qwen-VL, whose
    image is one dynamic-resolution grid). Asked up front (eval planning, the lmms-eval plugin, ``atr
    mask``), before any tower pass."""
    for name in strategies:
        spec = get(name)
        if spec.crops and not getattr(family, "has_crops", True):
            able = ", ".join(n for n, s in load().items() if s.prunes and not s.crops and "selector" not in s.needs
                             and not s.files)
            raise ConfigError(f"strategy {name!r} needs AnyRes crops (a base crop and a grid to split its budget "
                              f"over); {family.label} has none (one dynamic-resolution image): use {able} or "
                              f"the selector")


def check_strategy(name: str) -> str:
    get(name)
    return name


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    return budget


def style(name: str) -> tuple[str, str]:
    """(colour, marker) for plots: the declared one, else a default that is stable per name."""
    spec = load().get(name)
    if spec is not None and spec.style:
        return spec.style
    return DEFAULT_STYLES[sum(map(ord, name)) % len(DEFAULT_STYLES)]


def label(name: str) -> str:
    spec = load().get(name)
    return spec.label if spec is not None else name


@dataclass(frozen=True)
class TowerOutputs:
    """What the vision tower must compute for a set of strategies (``prune.encode_images``)."""

    images: bool = True      # any strategy sends an image
    attention: bool = False  # CLS attention, keys, CLS tokens
    embeds: bool = False     # the post-norm last layer (the relevance of a text encoder)


def tower_outputs(strategies: Sequence[str], relevance: bool = False) -> TowerOutputs:
    """The tower outputs ``strategies`` need; ``relevance``: a text encoder is given (embeds for those
    strategies that use relevance)."""
    specs = [get(s) for s in strategies]
    return TowerOutputs(images=any(s.sends_image for s in specs), attention=any(s.tower_attention for s in specs),
                        embeds=relevance and any(s.wants("relevance") for s in specs))


def seeded_generator(seed: int, index: int, slot: int = 0) -> torch.Generator:
    """The generator of image ``slot`` of row ``index`` under ``seed``: a random keep depends on the row,
    not on how rows are cut into shards, batches or crops (eval and the held-out selector metrics)."""
    base = seed * 1_000_003 + index
    return torch.Generator().manual_seed(base if slot == 0 else base * 64 + slot)


# ---------------------------------------------------------------- the one selection path

@torch.no_grad()
def select(strategy: str, features: torch.Tensor, retention: float, budget: "str | Threshold" = "per-crop",
           context: Context | None = None, valid: torch.Tensor | None = None,
           options: Mapping[str, Any] | None = None, stock: int | None = None) -> Selection | None:
    """What ``strategy`` sends the LLM of one image ``(crops, L, C)``; None for ``none``. ``stock``: the
    encoder tokens the stock model sends of this image (``Family.stock_tokens(...).features``), which the
    ``stock`` budget needs. ``budget`` a :class:`Threshold` is the ``threshold`` budget (``retention`` is
    its cap)."""
    spec = get(strategy)
    return _finish(spec.fn(_request(spec, features, retention, budget, context, valid, options, stock)))


def check_threshold(spec: Strategy, budget: str, threshold: float, floor: float, cap: float) -> None:
    """The threshold budget's one-line refusals: a strategy without keep probabilities, a threshold outside
    (0, 1), a floor outside [0, cap]."""
    if budget != "threshold":
        return
    if not spec.adaptive:
        adaptive = ", ".join(n for n, s in load().items() if s.adaptive) or "none"
        raise ConfigError(f"strategy {spec.name!r} has no keep probability, so it cannot take the threshold "
                          f"budget; adaptive strategies: {adaptive}")
    if not 0.0 < threshold < 1.0:  # also refuses nan
        raise ConfigError(f"threshold must be in (0, 1), got {threshold!r}")
    if not 0.0 <= floor <= cap:
        raise ConfigError(f"threshold floor must be in [0, cap={cap:g}], got {floor!r}")


def _request(spec: Strategy, features: torch.Tensor, retention: float, budget: "str | Threshold",
             context: Context | None, valid: torch.Tensor | None, options: Mapping[str, Any] | None,
             stock: int | None = None) -> Request:
    threshold, floor = (budget.value, budget.floor) if isinstance(budget, Threshold) else (0.0, 0.0)
    budget = "threshold" if isinstance(budget, Threshold) else budget
    check_budget(budget)
    if budget == "threshold" and not threshold:
        raise ConfigError("the threshold budget needs its threshold: pass budget=Threshold(value, floor)")
    check_threshold(spec, budget, threshold, floor, retention)
    context = context or Context()
    crops, tokens = features.shape[:2]
    valid = _valid(valid, crops, tokens, features.device)
    if budget == "stock":
        retention, budget = stock_request(valid, retention, stock, spec.name)
    req = Request(spec.name, features, retention, budget, valid, context, spec.resolve_options(options),
                  threshold if budget == "threshold" else 0.0, floor if budget == "threshold" else 0.0)
    for name in spec.needs:
        req.need(name)
    return req


def _finish(out: Any) -> Selection | None:
    if out is None or isinstance(out, Selection):
        return out
    return Selection(out)


def keep_mask(strategy: str, features: torch.Tensor, retention: float, budget: str = "per-crop",
              context: Context | None = None, valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """(crops, L) bool mask of the encoder tokens ``strategy`` keeps (its extra tokens aside); None for ``none``."""
    sel = select(strategy, features, retention, budget, context, valid)
    return None if sel is None else sel.mask


@dataclass(frozen=True)
class Batch:
    """The per-image inputs of :func:`selections` beside the features: ``valid[i]`` (crops_i, L) and
    ``per_image[i]``, Context fields for image i (``cls_attention``, ``projected``, ``generator``, ...)."""

    valid: Sequence[torch.Tensor | None] | None = None
    per_image: Sequence[Mapping[str, Any]] | None = None
    stock: Sequence[int | None] | None = None  # the ``stock`` budget: encoder tokens the stock model sends per image


@torch.no_grad()
def selections(strategy: str, features: Sequence[torch.Tensor], retention: float, budget: "str | Threshold" = "per-crop",
               context: Context | None = None, batch: Batch | None = None,
               options: Mapping[str, Any] | None = None) -> list[Selection | None]:
    """:func:`select` for a batch of images, each ``(crops_i, L, C)``; one Selection (or None) per image
    (``batch.stock``: each image's stock token count, which the ``stock`` budget needs).

    A strategy with a ``batch`` function (``selector``: one forward over all crops of all images, which
    gives every image the mask it gets alone) runs once; the others run image by image, in order."""
    spec = get(strategy)
    context = context or Context()
    batch = batch or Batch()
    valid = list(batch.valid) if batch.valid is not None else [None] * len(features)
    extra = list(batch.per_image) if batch.per_image is not None else [{}] * len(features)
    stock = list(batch.stock) if batch.stock is not None else [None] * len(features)
    reqs = [_request(spec, f, retention, budget, replace(context, **e), v, options, s)
            for f, e, v, s in zip(features, extra, valid, stock, strict=True)]
    if spec.batch is not None and reqs:
        return [_finish(o) for o in spec.batch(reqs)]
    return [_finish(spec.fn(r)) for r in reqs]


def keep_masks(strategy: str, features: Sequence[torch.Tensor], retention: float, budget: str = "per-crop",
               context: Context | None = None,
               valid: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
    """The masks of :func:`selections`."""
    return [None if s is None else s.mask
            for s in selections(strategy, features, retention, budget, context, Batch(valid=valid))]


def _need(context: Context, name: str, strategy: str, crops: int, tokens: int) -> Any:
    value = getattr(context, name)
    if value is None:
        what = {"cls_attention": "the tower's CLS attention (encode with attention=True)",
                "early_attention": "the tower's layer-0 CLS attention (encode with attention=True)",
                "keys": "the feature layer's attention keys (encode with attention=True)",
                "cls_tokens": "the feature layer's CLS tokens (encode with attention=True)",
                "selector": "a selector checkpoint (--selector)",
                "regions": "the base crop's token regions (pipeline.prune.base_regions)",
                "relevance": "each token's relevance to the question (--text-encoder)"}
        raise ConfigError(f"strategy {strategy!r} needs "
                          f"{what.get(name, 'the projected tokens (crops, L, D) of the same image')}")
    if name in ("cls_attention", "early_attention", "keys", "projected", "relevance") \
            and tuple(value.shape[:2]) != (crops, tokens):
        raise ValueError(f"{name} shape {tuple(value.shape)} does not match features {(crops, tokens)}")
    return value


def _valid(valid: torch.Tensor | None, crops: int, tokens: int, device) -> torch.Tensor:
    if valid is None:
        return torch.ones(crops, tokens, dtype=torch.bool, device=device)
    if tuple(valid.shape) != (crops, tokens):
        raise ValueError(f"valid-token mask shape {tuple(valid.shape)} does not match features {(crops, tokens)}")
    return valid.to(device=device, dtype=torch.bool)


# ---------------------------------------------------------------- budgets

def budget_counts(valid: torch.Tensor, retention: float, budget: str) -> torch.Tensor:
    """Tokens to keep: (crops,) per crop for ``per-crop``, a 1-element tensor for ``global``.

    round(retention * valid tokens), at least 1 where there is any valid token."""
    if not 0.0 < retention <= 1.0:  # also refuses nan
        raise ConfigError(f"retention must be in (0, 1], got {retention!r}")
    if budget == "stock":  # a Request has turned it into its global equivalent (stock_request) already
        raise ConfigError("budget_counts cannot size the stock budget without the stock token count; "
                          "use stock_request (strategies.select does)")
    if budget == "threshold":  # the count follows the keep probabilities: Request.keep_by_probability
        raise ConfigError("the threshold budget has no fixed count: an adaptive strategy keeps tokens by "
                          "probability (Request.keep_by_probability)")
    n = valid.sum(dim=1) if budget == "per-crop" else valid.sum().reshape(1)
    k = torch.round(retention * n.double()).long()
    return torch.where(n > 0, k.clamp(min=1), torch.zeros_like(k)).minimum(n)


def stock_budget(valid: torch.Tensor, retention: float, stock: int) -> int:
    """K of the ``stock`` budget: round(retention * ``stock``), the encoder tokens (row newlines aside, as
    every budget counts them) the stock model sends of this image -- for LLaVA-OneVision with its grid
    shrunk by interpolation, fewer than the image's valid tokens. At least 1, at most the valid tokens."""
    if not 0.0 < retention <= 1.0:  # also refuses nan
        raise ConfigError(f"retention must be in (0, 1], got {retention!r}")
    n = int(valid.sum())
    return min(n, max(1, round(retention * stock))) if n else 0


def stock_request(valid: torch.Tensor, retention: float, stock: int | None, strategy: str = "") -> tuple[float, str]:
    """The ``stock`` budget as every strategy already understands it: the image-level (``global``) budget
    at the retention whose K is :func:`stock_budget`'s (K / valid tokens; ``budget_counts`` gives back
    exactly K). So each strategy, the peers that split an image's K their own way included, spreads the
    stock-relative K the way it spreads a ``global`` one."""
    if stock is None:
        raise ConfigError(f"the stock budget needs the stock model's token count of each image"
                          f"{f' (strategy {strategy!r})' if strategy else ''}; eval computes it per image from "
                          "the family (Family.stock_tokens)")
    n = int(valid.sum())
    if n == 0:
        return retention, "global"
    return stock_budget(valid, retention, stock) / n, "global"


def image_budget(valid: torch.Tensor, retention: float, budget: str) -> int:
    """K, every token the LLM sees of one image (row newlines aside): the sum of :func:`budget_counts`."""
    return int(budget_counts(valid, retention, budget).sum())


def adaptive_keep(probability: torch.Tensor, valid: torch.Tensor, threshold: float, floor: float,
                  cap: float) -> torch.Tensor:
    """(crops, L) mask of the threshold budget over one image: the valid tokens whose keep ``probability``
    (crops, L) is at least ``threshold``, but no fewer than round(``floor`` * n) (at least 1) and no more
    than round(``cap`` * n) of them, n the image's valid tokens; the extra or missing ones go by
    probability over the whole image (ties to the lower index), so an image with more content keeps more."""
    n = int(valid.sum())
    if n == 0:
        return torch.zeros_like(valid)
    passing = int(((probability.float() >= threshold) & valid).sum())
    lo = max(1, round(floor * n))
    hi = max(lo, min(n, round(cap * n)))
    k = torch.tensor([min(max(passing, lo), hi)])
    return top_k(probability, k, valid, per_crop=False)


def top_k(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, per_crop: bool) -> torch.Tensor:
    """(crops, L) mask of the k[c] highest-scoring valid tokens of each crop (``per_crop``), or of the
    k[0] highest over the whole image; ties go to the lower index."""
    crops, tokens = scores.shape
    masked = scores.float().masked_fill(~valid, float("-inf"))
    if not per_crop:
        masked = masked.reshape(1, crops * tokens)
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return (ranks < k.to(ranks.device)[:, None]).reshape(crops, tokens)


__all__ = ["BUDGETS", "ENTRY_POINT_GROUP", "NEEDS", "Context", "Selection", "Request", "Strategy", "Batch",
           "TowerOutputs", "strategy", "register", "unregister", "load", "load_plugins", "get", "names", "pruners",
           "prunes", "seeded", "peers", "unavailable", "check_family", "check_strategy", "check_budget", "style", "label", "tower_outputs",
           "seeded_generator",
           "select", "selections", "keep_mask", "keep_masks", "budget_counts", "image_budget", "stock_budget",
           "stock_request", "top_k", "adaptive_keep", "check_threshold", "variant_text", "FIXED_BUDGETS", "Threshold"]
