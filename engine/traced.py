"""A torch model's forward as consecutive layers, found by tracing it.

::

    layers = engine.sequential(gpt, target=True)     # an nn.Sequential of the GPT's own modules
    layers.loss(layers(x), y)                         # == gpt(x, y)[1]

``engine.partition`` and ``engine.distribute`` cut an ``nn.Sequential``;
a model written as a plain ``nn.Module`` (nanoGPT's ``GPT``: embeddings,
a loop over ``nn.ModuleList`` blocks, a head, the loss) is first made one
here, without changing its code. torch.fx traces its ``forward`` once,
symbolically; a submodule is called as a whole (its code is not traced)
when it is a member of an ``nn.ModuleList`` or ``nn.Sequential`` (a
block), or holds no ``nn.ModuleList``, ``nn.Sequential`` or
``nn.ModuleDict``; the others (the model, an encoder holding its blocks,
an ``nn.Sequential``) are traced, down to their blocks. The graph is cut
after every tensor that is the only value the rest of the forward reads
(between two blocks, after the embeddings' sum, after a residual's add,
after the final norm), and between two steps of a loop over an
``nn.ModuleList`` where the values the rest reads are all tensors: they
cross that cut together, as a tuple (an attention mask every block reads
beside the activation, a U-Net's skips; a block returning a tuple the loop
takes apart is cut after its items are taken; the pipeline sends each
part, and each gets its gradient back, None for a mask). A piece with no
parameters joins the one before it.
Each piece is an ``fx.GraphModule`` that holds the model's own submodules
and parameters under their names in the model
(``transformer.h.0.attn.c_attn.weight``), so a tensor-parallel plan, a tied
weight and a gathered ``state_dict`` speak the model's names.

With ``target=True`` the forward's parameter named ``targets``,
``target``, ``labels``, ``label`` or ``y`` (else its second; a string
names another) is traced as the target too, and the part of the graph
that reads it is the loss:
``forward(idx, targets)`` returning ``(logits, loss)`` (or the loss alone,
or a dict with it) gives layers ending at the model's output (nanoGPT's
logits as it returns them; the loss alone: what the loss's views reshape,
_output) and ``.loss(output, target)``, which flattens them. The loss part
must call no submodule with parameters (a model whose "target" feeds
its layers, a mask, has no loss to find: pass ``loss_fn=``); a criterion
module (the model's own, or one the forward makes) is part of it. A
pipeline runs a ``.loss`` that is one mean cross entropy as its per-token
sum and count (engine.per_token_loss). What the
forward computes under ``torch.no_grad()`` is read detached, as it runs;
what it changes in place is changed in the pieces too (_kept_changes). Other parameters keep their
defaults (nanoGPT's ``if targets is None`` takes the training branch only
when ``target=True``).

A forward torch.fx cannot trace (control flow on a tensor's value) raises
a ``TypeError`` that says so and names the way around it: an
``nn.Sequential`` or a list of the layers. Where the rest of the forward
reads a value that may not be a tensor (an int computed from the input's
length and passed to every block), there is no cut: the pieces are fewer.

Layout (one concept a module): traced_sequential.py, ``sequential`` and its
tracer; traced_leaves.py, what the trace calls whole; traced_pieces.py, the
pieces; traced_cuts.py, where they are cut; traced_inplace.py, in-place
changes; traced_modes.py, the forward's modes (training, no_grad,
autocast); traced_sizes.py, the sizes the sample decides;
traced_returned.py, what the forward returns; traced_reshaped.py,
``Reshaped`` (a job's or a Pipeline's pieces traced again at a step's
shapes). The names other modules read are importable from here.
"""
from __future__ import annotations

from .traced_leaves import called_whole, traceable
from .traced_modes import _detached
from .traced_pieces import _alone, _given
from .traced_reshaped import Reshaped, TracedAt, mark
from .traced_returned import _Made, _Output, _Returned, given_as_returned
from .traced_sequential import sequential

__all__ = ["sequential", "traceable", "few", "given_as_returned", "Reshaped", "TracedAt",
           "mark", "called_whole"]

_PICKLED = (_alone, _given, _detached, _Made, _Output, _Returned)
"""What a saved piece or stage names as ``engine.traced``'s (a GraphModule's
code, a last stage's ``returned``), where it was before they moved: kept
importable from here, so those files load."""


def few(source: str | None, n: int) -> str:
    """What to add to "the model has n layers" when they come from tracing
    ``source``'s forward (a class name; None: they did not)."""
    return (f" ({source}.forward traced into {n} by engine.sequential: a cut falls only "
            "where one tensor is all that the rest of the forward reads, or between two "
            "steps of a loop over a ModuleList where it reads tensors only)" if source else "")
