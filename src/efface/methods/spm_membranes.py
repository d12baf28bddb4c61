"""SPM's concept-semipermeable membranes: rank-1 adapters with facilitated transport.

The adapter of :mod:`efface.methods.spm` (Lyu et al., CVPR 2024, arXiv 2312.16145). A membrane is,
on every chosen ``Linear`` / ``Conv2d`` module ``W`` (official choice: every one inside the UNet's
``Transformer2DModel`` blocks; on Flux every one inside its ``FluxTransformerBlock`` and
``FluxSingleTransformerBlock``, :data:`MEMBRANE_BLOCKS`, :func:`membrane_layers`), a rank-``r``
branch added to its output::

    W x  ->  W x + m (alpha / r) U D x          D: r x in (a conv with W's kernel), U: out x r (1 x 1)

One membrane per erased concept ``k`` (``U_k``, ``D_k``). At inference its multiplier ``m_k`` is the
*facilitated transport* rate of the prompt that conditions the batch row (official ``infer_spm.py``,
matching metric ``clipcos_tokenuni``)::

    gamma_k(p) = max( cos(flat(e_p), flat(e_k)),  |tokens(p) & tokens(k)| / |tokens(k)| )

with ``e`` the token sequence the denoiser is conditioned on (its ``encoder_hidden_states``: the
CLIP hidden states on SD, the T5 states on Flux) and ``tokens`` the prompt's ids in the tokenizer
of that sequence (:meth:`~efface.models.families.Family.sequence_tokenizer`: CLIP on SD, T5 on
Flux) without its special ids (start / end / padding / unknown): 1 for a prompt that names the
concept, the embedding similarity otherwise. The rate is computed per batch row by a forward
pre-hook on the denoiser (through the pipeline's family), so the empty-prompt rows of
classifier-free guidance get their own rate; the token ids of a row are found through a forward
hook on the text encoder that produces the sequence (SD: the CLIP encoder; Flux: T5,
``text_encoder_2``), which remembers what it encoded (a row it never encoded, e.g.
``prompt_embeds`` passed directly, gets the cosine term only). A sequence of another length than
the concepts' (Flux called with another ``max_sequence_length``) is compared with the concepts
encoded by that encoder at that length. Flux's pooled CLIP embedding takes no part in the rate
(the paper's rate reads the one text sequence of SD; Flux's counterpart of it is T5's).

Membranes compose as the official ``infer_spm.py`` combines several SPM files (``"merged"``): each
one's ``U`` and ``D`` are scaled by its rate and summed, one rank-``r`` branch
``(sum_k m_k U_k)(sum_k m_k D_k)`` (so a single membrane acts with ``m^2``); ``"sum"`` adds the
branches instead, ``sum_k m_k U_k D_k``. :meth:`SPMAdapter.save_lora` writes the adapter at
multiplier 1 (no transport) as a LoRA that plain diffusers loads (``pipe.load_lora_weights``:
``unet.*`` keys on SD, ``transformer.*`` on Flux).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from efface.errors import InputError
from efface.models.adapters import Adapter, Installed, forward_hooks, forward_pre_hook, register_adapter
from efface.models.families import family_of
from efface.models.text import encode

COMPOSITIONS = ("merged", "sum")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(dir) looks for
# family -> the denoiser's block classes that hold the membranes. SD: the official
# SPMNetwork.DEFAULT_TARGET_REPLACE; Flux (not in the paper): its double- and single-stream blocks,
# where the image tokens meet the text as in the UNet's Transformer2DModel blocks
MEMBRANE_BLOCKS: dict[str, tuple[str, ...]] = {
    "sd": ("Transformer2DModel",),
    "flux": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
}


def membrane_blocks(pipe) -> tuple[str, ...]:
    """The block classes of ``pipe``'s denoiser that SPM's membranes attach to (:data:`MEMBRANE_BLOCKS`)."""
    family = family_of(pipe)
    if family.name not in MEMBRANE_BLOCKS:
        raise InputError(f"SPM has no membrane placement for {family.name} models (only for "
                         f"{', '.join(MEMBRANE_BLOCKS)})")
    return MEMBRANE_BLOCKS[family.name]


def membrane_layers(unet, blocks: tuple[str, ...] = ("Transformer2DModel",)) -> dict[str, list[int]]:
    """Every ``Linear`` / ``Conv2d`` inside the denoiser's modules of class ``blocks`` (official
    ``SPMNetwork.DEFAULT_TARGET_REPLACE``; :func:`membrane_blocks` per family), as
    ``name -> [in, out]`` (linear) or ``[in, out, kh, kw, stride_h, stride_w, pad_h, pad_w]``
    (convolution)."""
    layers: dict[str, list[int]] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ not in blocks:
            continue
        for child_name, child in module.named_modules():
            full = f"{name}.{child_name}"
            if isinstance(child, torch.nn.Linear):
                layers[full] = [child.in_features, child.out_features]
            elif isinstance(child, torch.nn.Conv2d):
                if child.groups != 1 or child.dilation != (1, 1) or isinstance(child.padding, str):
                    raise InputError(f"{full}: grouped, dilated or string-padded convolutions are not supported")
                layers[full] = [child.in_channels, child.out_channels, *child.kernel_size, *child.stride,
                                *child.padding]
    if not layers:
        raise InputError(f"the denoiser has no {' / '.join(blocks)} block: SPM has nowhere to attach")
    return layers


def transport_rates(prompt_embeds: torch.Tensor, prompt_tokens: list[frozenset[int] | None],
                    concept_embeds: torch.Tensor, concept_tokens: list[frozenset[int]]) -> torch.Tensor:
    """Facilitated-transport rates ``gamma`` (B x K, in [0, 1]) of B prompts for K concepts: the larger
    of the cosine similarity of the flattened hidden states and the fraction of the concept's tokens
    the prompt contains (``None``: tokens unknown, cosine only)."""
    flat = prompt_embeds.detach().flatten(1).float()
    ref = concept_embeds.detach().flatten(1).float().to(flat.device)
    if flat.shape[1] != ref.shape[1]:
        raise ValueError(f"prompt embeddings of {tuple(prompt_embeds.shape[1:])} cannot be compared with the "
                         f"concepts' {tuple(concept_embeds.shape[1:])}: encode prompts with the same tokenizer")
    rates = F.cosine_similarity(flat[:, None], ref[None], dim=-1)
    overlap = torch.zeros_like(rates)
    for b, tokens in enumerate(prompt_tokens):
        if tokens is not None:
            for k, wanted in enumerate(concept_tokens):
                overlap[b, k] = len(tokens & wanted) / max(len(wanted), 1)
    return torch.maximum(rates, overlap).clamp(0.0, 1.0)


def sequence_encoder(pipe) -> tuple:
    """``(tokenizer, text encoder)`` of the token sequence ``pipe``'s denoiser is conditioned on
    (:meth:`~efface.models.families.Family.sequence_tokenizer`: CLIP on SD, T5 on Flux)."""
    family = family_of(pipe)
    tok = family.sequence_tokenizer(pipe)
    index = next((i for i, n in enumerate(family.tokenizers) if getattr(pipe, n, None) is tok), None)
    if tok is None or index is None:
        raise InputError(f"{family.name} conditions its denoiser on a sequence joining several tokenizers' tokens: "
                         "SPM's facilitated transport has no token ids to compare")
    return tok, family.text_encoder(pipe, index)


class _EncodedPrompts:
    """What the text encoder encoded recently: hidden-state row (its bytes, hashed) -> token ids."""

    def __init__(self, special: set[int], limit: int = 4096):
        self.special, self.limit, self.rows = special, limit, OrderedDict()

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        data = row.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        return hashlib.blake2b(data, digest_size=16).digest() + str(row.dtype).encode()

    def add(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        for row_ids, row in zip(ids.tolist(), hidden):
            key = self.key(row)
            self.rows[key] = frozenset(row_ids) - self.special
            self.rows.move_to_end(key)
        while len(self.rows) > self.limit:
            self.rows.popitem(last=False)

    def tokens(self, embeds: torch.Tensor) -> list[frozenset[int] | None]:
        return [self.rows.get(self.key(row)) for row in embeds]


class _Membrane(torch.nn.Module):
    """One concept's membrane: ``down`` (r x in [x kh x kw]) and ``up`` (out x r) per layer."""

    def __init__(self, layers: dict[str, list[int]], rank: int):
        super().__init__()
        self.down, self.up = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for name, s in layers.items():
            self.down[_key(name)] = torch.nn.Parameter(torch.zeros(rank, s[0], *s[2:4]))
            self.up[_key(name)] = torch.nn.Parameter(torch.zeros(s[1], rank))


def _key(name: str) -> str:
    return name.replace(".", "_")  # ParameterDict keys cannot hold dots


@register_adapter("spm")
class SPMAdapter(Adapter):
    """SPM membranes (arXiv 2312.16145): one rank-``rank`` membrane per concept on ``layers`` (from
    :func:`membrane_layers`), scaled per batch row by facilitated transport (``transport=True``) or
    by 1, composed as ``composition`` ("merged": the official code's, or "sum"). Installed with a
    ``strength`` s, every membrane's output is multiplied by s (as diffusers' adapter weight scales
    the exported LoRA). ``denoiser``: the pipeline component ``layers`` are named in (the family's
    ``denoiser_name``: "unet" on SD, "transformer" on Flux), the prefix of the LoRA export's keys."""

    supports_strength = True

    def __init__(self, layers: dict[str, list[int]], concepts: list[str], rank: int = 1, alpha: float = 1.0,
                 composition: str = "merged", transport: bool = True, denoiser: str = "unet"):
        super().__init__()
        if composition not in COMPOSITIONS:
            raise InputError(f"composition must be one of {', '.join(COMPOSITIONS)}, not {composition!r}")
        self.layers, self.concepts = {n: list(s) for n, s in layers.items()}, list(concepts)
        self.denoiser = str(denoiser)
        self.rank, self.alpha, self.composition, self.transport = int(rank), float(alpha), composition, bool(transport)
        self.scale = self.alpha / self.rank  # official: alpha / dim
        self.membranes = torch.nn.ModuleList(_Membrane(self.layers, self.rank) for _ in self.concepts)
        self._fixed: torch.Tensor | None = None
        self.last_rates: torch.Tensor | None = None  # the multipliers of the latest UNet call (B x K)

    def spec(self) -> dict:
        return {"layers": self.layers, "concepts": self.concepts, "rank": self.rank, "alpha": self.alpha,
                "composition": self.composition, "transport": self.transport, "denoiser": self.denoiser}

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> SPMAdapter:
        """The official initialisation: ``D`` Kaiming-uniform (a = sqrt 5, i.e. U(+-1/sqrt(fan_in))),
        ``U`` zero, so that every membrane starts as the identity; drawn from ``generator``."""
        for membrane in self.membranes:
            for key, down in membrane.down.items():
                bound = 1 / math.sqrt(down[0].numel())
                down.copy_((torch.rand(down.shape, generator=generator) * 2 - 1) * bound)
                membrane.up[key].zero_()
        return self

    @contextlib.contextmanager
    def fixed(self, multipliers) -> Iterator[SPMAdapter]:
        """Within the block every batch row uses ``multipliers`` (one per concept, or one for all)
        instead of facilitated transport: 1 in training (the paper's), 0 for the original model."""
        previous = self._fixed
        self._fixed = torch.as_tensor(multipliers, dtype=torch.float32).expand(len(self.concepts)).clone()
        try:
            yield self
        finally:
            self._fixed = previous

    def _attach(self, pipe, handle: Installed) -> None:
        family = family_of(pipe)
        unet = family.denoiser(pipe)
        if family.denoiser_name != self.denoiser:
            raise InputError(f"this SPM was trained on a pipeline's {self.denoiser}, not on a {family.name} "
                             f"{family.denoiser_name}: it belongs to another architecture")
        modules = dict(unet.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise InputError(f"this {family.denoiser_name} has no module {missing[0]} (and {len(missing) - 1} more): "
                             "the SPM was trained on another architecture")
        tok, encoder = sequence_encoder(pipe)
        special = set(tok.all_special_ids)
        concept_tokens = [frozenset(ids) - special for ids in
                          tok(self.concepts, truncation=True, max_length=tok.model_max_length).input_ids]
        concept_embeds = {}  # sequence length -> the concepts' states at that length
        first = encode(pipe, self.concepts).embeds.to(unet.device)
        concept_embeds[first.shape[1]] = first
        seen = _EncodedPrompts(special)

        def remember(module, args, kwargs, output):
            ids = args[0] if args else kwargs.get("input_ids")
            if ids is not None:  # as the pipeline passes it on, and as cast to the denoiser's dtype
                seen.add(ids, output[0])
                if output[0].dtype != unet.dtype:
                    seen.add(ids, output[0].to(unet.dtype))

        h = encoder.register_forward_hook(remember, with_kwargs=True)
        handle.on_remove(h.remove)

        def concepts_at(length: int) -> torch.Tensor:
            """The concepts' sequences at ``length`` tokens, as the pipeline encodes a prompt
            padded to that length (the sequence encoder's last hidden state)."""
            if length not in concept_embeds:
                ids = tok(self.concepts, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids
                with torch.no_grad():
                    concept_embeds[length] = encoder(ids.to(encoder.device))[0].to(unet.device)
            return concept_embeds[length]

        state: dict[str, torch.Tensor] = {}
        names = list(inspect.signature(unet.forward).parameters)  # UNet: sample, timestep, encoder_hidden_states
        at = names.index("encoder_hidden_states")

        def rates(module, args, kwargs):
            context = kwargs.get("encoder_hidden_states", args[at] if len(args) > at else None)
            n = (args[0] if args else kwargs[names[0]]).shape[0]
            if self._fixed is not None:
                m = self._fixed.to(unet.device).expand(n, -1)
            elif not self.transport or context is None:
                m = torch.ones(n, len(self.concepts), device=unet.device)
            else:
                m = transport_rates(context, seen.tokens(context), concepts_at(context.shape[1]), concept_tokens)
            state["m"] = self.last_rates = m

        forward_pre_hook(unet, handle, rates)
        strength = handle.strength  # ErasedModel.apply(pipe, scale=s): the membranes' output times s
        forward_hooks({n: modules[n] for n in self.layers}, handle,
                      lambda name, module, args, out: out + (strength * self.delta(name, args[0], state["m"])
                                                             if strength != 1.0 else
                                                             self.delta(name, args[0], state["m"])).to(out.dtype))
        handle.on_remove(lambda: state.clear())

    def delta(self, name: str, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The membranes' output on layer ``name`` for its input ``x`` with multipliers ``m`` (B x K)."""
        s, key = self.layers[name], _key(name)
        if len(self.membranes) == 1:  # one membrane: m^2 (merged) or m (sum) times (alpha / r) U D x
            mb, conv = self.membranes[0], len(s) > 2
            d = (F.conv2d(x, mb.down[key].to(x.dtype), stride=tuple(s[4:6]), padding=tuple(s[6:8])) if conv
                 else F.linear(x, mb.down[key].to(x.dtype)))
            out = F.conv2d(d, mb.up[key].to(x.dtype)[..., None, None]) if conv else F.linear(d, mb.up[key].to(x.dtype))
            w = (m[:, 0] ** (2 if self.composition == "merged" else 1) * self.scale).to(x.dtype)
            if w.shape[0] != out.shape[0]:
                raise RuntimeError(f"{name}: a batch of {out.shape[0]} rows, but {w.shape[0]} prompt rows "
                                   "conditioned the UNet")
            return out * w.view(-1, *[1] * (out.dim() - 1))
        down = torch.cat([mb.down[key] for mb in self.membranes])  # (K r) x in [x kh x kw]
        up = torch.stack([mb.up[key] for mb in self.membranes])  # K x out x r
        k, r = up.shape[0], self.rank
        if len(s) > 2:  # convolution: channels first
            d = F.conv2d(x, down.to(x.dtype), stride=tuple(s[4:6]), padding=tuple(s[6:8]))
            d = d.unflatten(1, (k, r)).movedim((1, 2), (-2, -1))
        else:
            d = F.linear(x, down.to(x.dtype)).unflatten(-1, (k, r))
        if m.shape[0] != d.shape[0]:
            raise RuntimeError(f"{name}: a batch of {d.shape[0]} rows, but {m.shape[0]} prompt rows "
                               "conditioned the UNet")
        lead = d.shape[1:-2]
        d, m, up = d.reshape(d.shape[0], -1, k, r), m.to(d.dtype), up.to(d.dtype)
        if self.composition == "merged":
            out = torch.einsum("bnr,bor->bno", torch.einsum("bnkr,bk->bnr", d, m), torch.einsum("bk,kor->bor", m, up))
        else:
            out = torch.einsum("bnkr,bk,kor->bno", d, m, up)
        out = out.reshape(out.shape[0], *lead, out.shape[-1]) * self.scale
        return out.movedim(-1, 1) if len(s) > 2 else out

    @torch.no_grad()
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter at multiplier 1 as LoRA weights in diffusers' format (``<denoiser>.<module>.lora_A``
        / ``lora_B``: ``unet.*`` on SD, ``transformer.*`` on Flux; the scale ``alpha / r`` folded into
        ``lora_B``, so diffusers' default alpha applies)."""
        state = {}
        for name, s in self.layers.items():
            downs = [mb.down[_key(name)].float().cpu() for mb in self.membranes]
            ups = [mb.up[_key(name)].float().cpu() for mb in self.membranes]
            if self.composition == "merged":  # (sum U)(sum D): one rank-r branch
                a, b = torch.stack(downs).sum(0), torch.stack(ups).sum(0)
            else:  # sum of branches: rank K r
                a, b = torch.cat(downs), torch.cat(ups, dim=1)
            b = b * self.scale
            state[f"{self.denoiser}.{name}.lora_A.weight"] = a.contiguous()
            state[f"{self.denoiser}.{name}.lora_B.weight"] = (b[..., None, None] if len(s) > 2 else b).contiguous()
        return state

    def save_lora(self, directory: str | Path) -> Path:
        """Write the membranes at multiplier 1, without facilitated transport, as a LoRA that plain
        diffusers loads: ``pipe.load_lora_weights(directory)``. Returns the file written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.lora_state_dict(), directory / LORA_FILE,
                  metadata={"efface_adapter": "spm", "concepts": ",".join(self.concepts)})
        return directory / LORA_FILE
