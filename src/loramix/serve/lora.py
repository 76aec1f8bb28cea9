"""The gathered LoRA pass: every row of a batch through its own adapter, in one forward, whatever the mix.

PEFT loads the adapters: the format, and what a config means (ranks, alphas, rsLoRA, DoRA, rank and alpha
patterns). Serving computes them its own way. PEFT's mixed batches (`adapter_names=`) loop in Python over a
batch's distinct adapters, index each one's rows, run two matmuls and scatter back, so the cost grows with every
adapter in the batch. Here each adapted linear layer adds to its base output y = base(x), with x's tokens as rows,
in one of four ways:

    one adapter:   delta = x @ A.T @ B.T                                   every row through the same adapter
    prefill:       delta[s] = x[s] @ A_a.T @ B_a.T                         mixed prompts: s, the tokens of a run of rows
    side by side:  delta = ((x @ A.T) * own) @ B.T                         mixed decode, <= 48 ranks in use
    grouped:       delta[tokens of a] = bmm(x[tokens of a], A_a.T, B_a.T)  mixed decode, more ranks

Each layer keeps its adapters as one bank (A and B.T of each, ranks zero-padded to the largest, B with its adapter's
scale in): one adapter runs on views of it, and so does a prefill of mixed prompts, one run of rows (consecutive
rows of one adapter: the scheduler sorts the prompts it admits by adapter) at a time, its tokens a slice of x. Side
by side, A (R, in) and B (out, R) hold the A and B of the adapters in use, each at its own rank (R in all), and
`own` (tokens, R) keeps each token's own adapter's columns (none for a base row): two matmuls, whose cost grows with
R. Grouped, the tokens are sorted by adapter, each adapter's padded to the most any has, and two batched matmuls run
every adapter on its own tokens (ranks padded to the largest in use): SGMV's segments in one call. Those two stacks
are gathered from the bank when the set of adapters a batch decodes with changes (rows come and go), from those
adapters only (32 loaded cost what the 2 in use cost), and the last few are kept. A prefill builds none: its rows'
few adapters would be run on a stack of others too, or build one used once. DoRA folds its magnitude over the norm
of W + scale BA into B too, and adds (that factor - 1) * (y - bias). A token is a row of x flattened, so a layer
that sees the batch folded into its tokens (OPT's MLP) is served like any other.

Measured by benchmarks/lora_kernels.py (one thread, this project's CPUs; every adapted layer of SmolLM2-135M, rank
8, each layer's own weights; ms per forward, 2026-12-07; the base's matmuls took 32-36 ms for 16 decode rows as
served, 66-70 through MKL alone): decode of 16 rows over 2 adapters 6.6 side by side / 9.6 grouped, over 8 17.0 /
12.5, over 16 30.6 / 18.5. A prefill of 224 tokens sorted by adapter, run by run (segments): over 2 adapters 53,
over 8 54, over 16 77, against 47 / 75, 126 / 88 and 218 / 105 side by side / grouped, which would first build a
stack used once. Gathering each token's A and B for two batched matmuls (BGMV, the GPU systems' decode kernel)
took 21-25 ms in decode, and segments that gather and scatter the tokens (SGMV) 11-47. Over 8 adapters a decode
step reads ~80 MB of LoRA weights at this shape (~10 MB for one), ~2.5 ms at one core's 35 GB/s: the grouped
kernel's time is mostly its small ops (~15 us each, four a layer against one adapter's two), so a layer input's
gathered tokens are shared by the layers that read it (q, k and v; gate and up).

LoRA on a mixture of experts' stacked weights (PEFT's target_parameters) cannot be split by token: a model with
such adapters runs one adapter's rows per forward (`mixes` is False), through PEFT's own expert path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loramix.errors import LoramixError
from loramix.serve.packed import unpacked

BASE = "__base__"  # a row of the base alone
_PLANS_KEPT = 4
_GROUPED_ABOVE = 48  # ranks in use in a layer past which a mixed batch groups its tokens by adapter (see above)


@dataclass
class _Plan:
    """How one layer serves a set of adapters in use: those of them it has (layout, and their rows of its bank),
    and, built when a kernel first needs them, their A and B side by side (a: (R, in), b: (R, out)) or grouped
    (a: (adapters, r_max, in), b: (adapters, r_max, out), ranks zero-padded to the largest)."""

    layout: tuple[tuple[int, int], ...]  # (slot, rank) of each, in slot order
    rows: tuple[int, ...]
    dora: bool  # any of them DoRA
    grouped: bool = False
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    on: _Plan | None = None  # a kept plan holding its adapters among others, whose stack its kernels run on, if any
    found: bool = False  # whether `on` was looked for (not `on = self`: a cycle would keep an evicted stack until gc)


@dataclass
class _Groups:
    """A layer input's tokens sorted by adapter, each adapter's padded to the most any has (m)."""

    gather: torch.Tensor  # (adapters * m,): the token at each place (padding: token 0)
    keep: torch.Tensor | None  # the places that hold a token, None when all do
    dest: torch.Tensor  # (tokens kept,): the token of each kept place
    m: int


@dataclass
class Route:
    """One forward's rows: each one's slot (0: the base), and what the layers derive from them, cached."""

    slots: list[int]
    used: tuple[int, ...] = ()  # the adapters' slots, without the base
    uniform: bool = False  # every row through the same adapter
    _memo: dict = field(default_factory=dict)

    def __post_init__(self):
        self.used, self.uniform = tuple(sorted(set(self.slots) - {0})), len(set(self.slots)) == 1

    def tokens(self, n: int) -> torch.Tensor:
        """Every token's slot (n,) for a layer input of n tokens, the rows' tokens in order."""
        return self._cached(("tokens", n), lambda: torch.tensor(self.slots).repeat_interleave(n // len(self.slots)))

    def own(self, layout: tuple, n: int, device, dtype) -> torch.Tensor:
        """(n, R): 1 where a column of a side-by-side stack belongs to the token's own adapter."""
        def build():
            columns = torch.tensor([slot for slot, r in layout for _ in range(r)])
            return (self.tokens(n)[:, None] == columns[None]).to(device, dtype)
        return self._cached(("own", layout, n), build)

    def groups(self, layout: tuple, n: int, device) -> _Groups:
        def build():
            tokens = self.tokens(n)
            members = [(tokens == slot).nonzero().squeeze(1) for slot, _ in layout]
            m = max(len(t) for t in members)
            gather, places = torch.zeros(len(layout), m, dtype=torch.long), torch.zeros(len(layout), m, dtype=torch.bool)
            for k, t in enumerate(members):
                gather[k, : len(t)], places[k, : len(t)] = t, True
            keep = None if places.all() else places.flatten().nonzero().squeeze(1).to(device)
            return _Groups(gather.flatten().to(device), keep, torch.cat(members).to(device), m)
        return self._cached(("groups", layout, n), build)

    def grouped_input(self, x: torch.Tensor, layout: tuple, groups: _Groups) -> torch.Tensor:
        """A layer input's tokens in `groups`' order (adapters, m, C), gathered once per input tensor and layout: q, k
        and v (gate and up) read the same tensor. The memo holds the tensor, so its id is not reused meanwhile."""
        def build():
            return x, x.reshape(-1, x.shape[-1])[groups.gather].view(len(layout), groups.m, -1)
        return self._cached(("input", id(x), layout), build)[1]

    def bank_rows(self, plan: _Plan, n: int, device) -> torch.Tensor:
        """(n,): each token's row of its layer's DoRA table (its adapter's bank row + 1; 0: none of the plan's)."""
        def build():
            rows = torch.zeros(max(self.slots) + 1, dtype=torch.long)
            rows[[slot for slot, _ in plan.layout]] = torch.tensor(plan.rows) + 1
            return rows[self.tokens(n)].to(device)
        return self._cached(("bank", plan.layout, plan.rows, n), build)

    def runs(self) -> list[tuple[int, int, int]]:
        """(slot, first row, row past the last) of each run of consecutive rows through one adapter."""
        def build():
            starts = [k for k in range(len(self.slots)) if k == 0 or self.slots[k] != self.slots[k - 1]]
            return [(self.slots[k], k, end) for k, end in zip(starts, [*starts[1:], len(self.slots)])]
        return self._cached("runs", build)

    def _cached(self, key, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


class _Layer:
    """One of PEFT's adapted linear layers, its own LoRA compute turned off and the gathered pass added by a
    forward hook. Its adapters are kept as one bank, each a row: A (r_max, in) and B.T (r_max, out) with its scale
    (and DoRA's factor) in, ranks zero-padded to the largest; DoRA's factor - 1 (out,) in a table whose row 0 is
    zero, so that a stack is a few indexing ops, not one per adapter. A keeps PEFT's layout: the batched matmul
    reads it transposed ~1.5x faster than A.T stored (7 against 11 ms over SmolLM2's layers, 8 adapters)."""

    def __init__(self, bank: Adapters, layer):
        self.bank, self.layer = bank, layer
        self.bias = layer.get_base_layer().bias
        self.rows: dict[int, int] = {}  # slot -> its row of the bank
        self.ranks: list[int] = []
        self.doras: list[bool] = []  # whether each row is a DoRA adapter
        self.a = self.b = self.dora = None
        self._plans: dict[tuple, _Plan | None] = {}  # for the last few sets in use: a step's decode and prefill differ
        layer.register_forward_hook(self._hook)

    def take(self, slot: int, name: str) -> None:
        """Read adapter `name` from PEFT's layer as slot `slot`."""
        layer = self.layer
        a, b, scale = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), layer.scaling[name]
        dora, is_dora = torch.zeros_like(b[:, 0]), name in layer.lora_variant
        if is_dora:  # DoRA (the only variant let through): m / ||W + scale BA|| per output
            weight = layer.get_base_layer().weight.detach()
            weight = weight.T if layer.fan_in_fan_out else weight
            factor = layer.lora_magnitude_vector[name].weight.detach() / torch.linalg.norm(weight + scale * (b @ a), dim=1)
            b, dora = b * (scale * factor)[:, None], factor - 1
        else:
            b = b * scale
        r = a.shape[0]
        if self.a is None:
            self.a, self.b, self.dora = a.new_zeros(0, r, a.shape[1]), b.new_zeros(0, r, b.shape[0]), dora.new_zeros(1, len(dora))
        r_max = max(r, self.a.shape[1])
        self.a = torch.cat([F.pad(t, (0, 0, 0, r_max - t.shape[1])) for t in (self.a, a[None])])  # ranks: dim 1
        self.b = torch.cat([F.pad(t, (0, 0, 0, r_max - t.shape[1])) for t in (self.b, b.T[None])])
        self.dora = torch.cat([self.dora, dora[None]])
        self.rows[slot] = len(self.ranks)
        self.ranks.append(r)
        self.doras.append(is_dora)

    def drop(self, slot: int) -> None:
        """Forget slot `slot` (if this layer has it)."""
        row = self.rows.pop(slot, None)
        if row is None:
            return
        keep = torch.tensor([k for k in range(len(self.ranks)) if k != row], dtype=torch.long, device=self.a.device)
        self.a, self.b = self.a[keep], self.b[keep]
        self.dora = self.dora[torch.cat([keep.new_zeros(1), keep + 1])]
        del self.ranks[row], self.doras[row]
        self.rows = {s: k - (k > row) for s, k in self.rows.items()}

    def plan(self, route: Route) -> _Plan | None:
        """None when no adapter of the route adapts this layer."""
        return self._plan((self.bank.version, route.used))

    def _plan(self, key: tuple) -> _Plan | None:
        if key not in self._plans:
            present = [s for s in key[1] if s in self.rows]
            rows = tuple(self.rows[s] for s in present)
            self._plans[key] = _Plan(tuple((s, self.ranks[k]) for s, k in zip(present, rows)), rows,
                                     any(self.doras[k] for k in rows)) if rows else None
            if len(self._plans) > _PLANS_KEPT:
                del self._plans[next(iter(self._plans))]
        return self._plans[key]

    def stack(self, plan: _Plan) -> _Plan:
        """`plan` with its adapters' A and B stacked, or a kept plan stacked for them among at most as many others
        (every step pays for those); found once."""
        if not plan.found:
            wanted = set(plan.layout)
            plan.on, plan.found = next((kept for kept in self._plans.values() if kept is not None and kept.a is not None
                                        and wanted <= set(kept.layout) and len(kept.layout) <= 2 * len(wanted)), None), True
        stacked = plan.on or plan
        if stacked.a is None:
            self._build(stacked)
        return stacked

    def _build(self, plan: _Plan) -> None:
        """Gather `plan`'s A and B from the bank, side by side or grouped by the ranks in use."""
        ranks = [r for _, r in plan.layout]
        if sum(ranks) > _GROUPED_ABOVE:
            at = torch.tensor(plan.rows, device=self.a.device)
            plan.grouped, plan.a, plan.b = True, self.a[:, : max(ranks)][at], self.b[:, : max(ranks)][at]
        else:
            plan.a = torch.cat([self.a[k, :r] for k, r in zip(plan.rows, ranks)])
            plan.b = torch.cat([self.b[k, :r] for k, r in zip(plan.rows, ranks)])

    def _hook(self, module, args, y: torch.Tensor) -> torch.Tensor | None:
        route = self.bank.route
        plan = self.plan(route) if route is not None and route.used else None
        if plan is None:
            return None
        x = args[0].reshape(-1, args[0].shape[-1])
        n = x.shape[0]
        if plan.dora:
            factor = self.dora[route.bank_rows(plan, n, x.device)].view(y.shape)
            y = y + factor * (y if self.bias is None else y - self.bias)
        out = y.reshape(n, -1)  # the base output, ours until returned: the delta is added in place
        if route.uniform:
            (_, r), row = plan.layout[0], plan.rows[0]
            out.addmm_(x @ self.a[row, :r].T, self.b[row, :r])
            return out.view(y.shape)
        if n > len(route.slots):  # a prefill: a run of rows is a slice of x, their tokens in order
            per_row = n // len(route.slots)
            for slot, first, end in route.runs():
                if slot in self.rows:
                    row, rows = self.rows[slot], slice(first * per_row, end * per_row)
                    out[rows].addmm_(x[rows] @ self.a[row, : self.ranks[row]].T, self.b[row, : self.ranks[row]])
            return out.view(y.shape)
        stack = self.stack(plan)
        if not stack.grouped:
            out.addmm_((x @ stack.a.T) * route.own(stack.layout, n, x.device, x.dtype), stack.b)
        else:
            g = route.groups(stack.layout, n, x.device)
            delta = torch.bmm(torch.bmm(route.grouped_input(args[0], stack.layout, g), stack.a.transpose(1, 2)), stack.b).flatten(0, 1)
            out.index_add_(0, g.dest, delta if g.keep is None else delta[g.keep])
        return out.view(y.shape)


class Adapters:
    """The adapters served on one base: `model` (the transformers model) runs each row of a forward through the
    adapter its route names. Built from a PeftModel holding one adapter or more; more come and go by `add` and
    `remove`, between forwards.

    Args:
        peft_model: a PeftModel in eval mode; its adapters are served under their PEFT names.
    """

    def __init__(self, peft_model):
        self.peft, self.model = peft_model, peft_model.base_model.model
        self.slots: dict[str, int] = {}  # served name -> slot (from 1; 0 is the base)
        self._peft_names: dict[int, str] = {}  # slot -> PEFT's name for it
        self._stale: list[str] = []  # PEFT adapters no longer served (PEFT must keep one)
        self._layers: dict[int, _Layer] = {}  # by id of PEFT's layer
        self._experts: list = []
        self._expert_slot: int | None = None  # whose expert LoRA PEFT's layers run now
        self._next, self.version, self.route = 1, 0, None
        for name in list(peft_model.peft_config):
            self._take(name, name)
        self.mixes = self._mixes()

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def add(self, name: str, path: Path) -> None:
        """Load the PEFT adapter dir `path` as `name`.

        Raises:
            LoramixError: naming what PEFT could not load or what the server cannot serve; the model is as before.
        """
        if name in self.slots:
            raise LoramixError(f"an adapter named {name!r} is loaded (or still finishing requests after its removal); pick another name")
        peft_name = f"{name}#{self._next}"
        try:
            with unpacked(self.peft):
                self.peft.load_adapter(str(path), adapter_name=peft_name)
            self._take(name, peft_name)
        except Exception as e:
            if peft_name in self.peft.peft_config:
                self.peft.base_model.set_adapter(next(n for n in self.peft.peft_config if n != peft_name))
                self.peft.delete_adapter(peft_name)
                self._after_peft_change()
            if isinstance(e, LoramixError):
                raise
            raise LoramixError(f"cannot load the adapter in {path} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                               "pass a PEFT LoRA adapter dir trained on this base") from e
        if self._stale:
            self.peft.base_model.set_adapter(peft_name)
            for stale in self._stale:
                self.peft.delete_adapter(stale)
            self._stale.clear()
            self._after_peft_change()
        self.mixes = self._mixes()

    def remove(self, name: str) -> None:
        """Stop serving `name` (its rows must have left)."""
        slot = self.slots.pop(name)
        peft_name = self._peft_names.pop(slot)
        for layer in self._layers.values():
            layer.drop(slot)
        others = [n for n in self.peft.peft_config if n != peft_name]
        if others:
            self.peft.base_model.set_adapter(others[0])  # PEFT's active one must not be the one deleted
            self.peft.delete_adapter(peft_name)
            self._after_peft_change()
        else:
            self._stale.append(peft_name)
        self.version += 1

    @contextlib.contextmanager
    def routed(self, adapters: list[str]) -> Iterator[None]:
        """A forward whose rows run through `adapters` (names, or BASE), in order (a prefill is fastest with each
        adapter's rows together)."""
        self.route = Route([0 if a == BASE else self.slots[a] for a in adapters])
        if self._experts:
            self._route_experts(self.route)
        try:
            yield
        finally:
            self.route = None

    def _take(self, name: str, peft_name: str) -> None:
        """Serve PEFT's adapter `peft_name` as `name`, or refuse it (LoramixError) leaving the served ones as they were."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import ParamWrapper
        from peft.tuners.lora.variants import DoraLinearVariant

        config = self.peft.peft_config[peft_name]
        extras = [(config.bias != "none", f"bias={config.bias}"), (bool(config.modules_to_save), "modules_to_save"),
                  (bool(getattr(config, "trainable_token_indices", None)), "trainable_token_indices")]
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and peft_name in m.r]
        for m in layers:
            variant = m.lora_variant.get(peft_name)
            extras += [(not isinstance(m, LoraLinear | ParamWrapper), f"LoRA on {type(m.get_base_layer()).__name__} layers"),
                       (variant is not None and not isinstance(variant, DoraLinearVariant), f"the {type(variant).__name__} variant"),
                       (bool(getattr(m, "lora_bias", {}).get(peft_name)), "lora_bias")]
        refused = sorted({what for bad, what in extras if bad})
        if refused:
            raise LoramixError(f"adapter {name!r} uses {', '.join(refused)}, which the server cannot batch; "
                               "merge it into its base (`loramix merge`) and serve the merged model")
        slot, self._next = self._next, self._next + 1
        for m in layers:
            if isinstance(m, ParamWrapper):
                self._experts += [m] if m not in self._experts else []
                continue
            if id(m) not in self._layers:
                self._layers[id(m)] = _Layer(self, m)
            self._layers[id(m)].take(slot, peft_name)
            m.enable_adapters(False)  # PEFT's own LoRA compute: the hook adds it instead
        self.slots[name], self._peft_names[slot] = slot, peft_name
        self.version += 1

    def _after_peft_change(self) -> None:
        """PEFT's own LoRA compute off again and its expert layers' adapter unknown, after PEFT switched adapters."""
        for layer in self._layers.values():
            layer.layer.enable_adapters(False)
        self._expert_slot = None

    def _route_experts(self, route: Route) -> None:
        """PEFT's expert path with the rows' one adapter active (or none), set only when it changes."""
        if not route.uniform:
            raise RuntimeError("a batch mixed adapters on a model that cannot mix them")
        slot = route.slots[0]
        if slot != self._expert_slot:
            for m in self._experts:
                on = self._peft_names.get(slot) in m.lora_A
                m.enable_adapters(on)
                if on:
                    m.set_adapter([self._peft_names[slot]])
            self._expert_slot = slot

    def _mixes(self) -> bool:
        """Whether rows of different adapters can share a forward: every adapted layer sees the batch's tokens
        (batch x tokens, or flattened in that order), and no adapter is on experts' stacked weights."""
        if self._experts:
            return False
        seen = set()
        hooks = [layer.layer.register_forward_pre_hook(lambda mod, args: seen.add(args[0].numel() // args[0].shape[-1]))
                 for layer in self._layers.values()]
        try:
            with torch.inference_mode():
                self.model(input_ids=torch.zeros((2, 3), dtype=torch.long, device=self.model.device))
        finally:
            for hook in hooks:
                hook.remove()
        return seen <= {6}
