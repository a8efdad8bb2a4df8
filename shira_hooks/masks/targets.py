"""Which weights of a model SHiRA trains (the ``target_modules`` argument of ``attach``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TypeAlias

from torch import nn

from ..errors import ShiraError

# Module names of output heads, the one list of them: name -> (excluded from the default targets, a task
# head created freshly initialised). Excluded: a Linear layer of that name is an output head rather than
# part of the body, when the model does not say so itself through ``get_output_embeddings()``. Task heads:
# Hugging Face (classifier, score, qa_outputs) and timm (head) models create them freshly initialised, so
# ``freeze_others`` freezing one is worth a warning (``ShiraHandle``), where lm_head and BERT's cls come
# pretrained. (timm's ``head`` is warned about but stays a default target, as before this table.)
HEADS = {
    "lm_head": (True, False),
    "cls": (True, False),
    "classifier": (True, True),
    "score": (True, True),
    "qa_outputs": (True, True),
    "head": (False, True),
}
HEAD_NAMES = tuple(name for name, (excluded, _) in HEADS.items() if excluded)
TASK_HEAD_NAMES = tuple(name for name, (_, fresh) in HEADS.items() if fresh)

TargetSpec: TypeAlias = None | str | Iterable[str | type] | type | tuple | Callable[[str, nn.Module], bool]


def in_task_head(param_name: str) -> bool:
    """Whether a parameter's module path passes through a task head (``TASK_HEAD_NAMES``), e.g. ``classifier.bias``."""
    return any(part in TASK_HEAD_NAMES for part in param_name.split(".")[:-1])


def _output_head_ids(model: nn.Module) -> set[int]:
    """ids of weights that belong to the output head or are tied to an input embedding."""
    head_ids: set[int] = set()
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), nn.Parameter):
            head_ids.add(id(head.weight))
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module.weight) in embedding_ids or name.split(".")[-1] in HEAD_NAMES:
            head_ids.add(id(module.weight))
    return head_ids


def _matcher(target_modules: TargetSpec) -> Callable[[str, nn.Module], bool]:
    assert target_modules is not None  # None (the default targets) is handled by the caller
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(target_modules, type):
        return lambda name, module: isinstance(module, target_modules)
    if callable(target_modules):
        return target_modules
    items = list(target_modules)
    for item in items:
        if not isinstance(item, (str, type)):
            raise ShiraError(
                f"target_modules contains {item!r} ({type(item).__name__}); a list may hold "
                f"module-name suffixes (str) and module types"
            )
    suffixes = [s for s in items if isinstance(s, str)]
    types = tuple(t for t in items if isinstance(t, type))

    def match(name: str, module: nn.Module) -> bool:
        if types and isinstance(module, types):
            return True
        return any(name == s or name.endswith("." + s) for s in suffixes)

    return match


def resolve_targets(model: nn.Module, target_modules: TargetSpec) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """The (module name, module, weight) triples to train, each weight once.

    ``None`` means every ``nn.Linear`` except the output head: the module returned by
    ``model.get_output_embeddings()``, a Linear whose weight is tied to an ``nn.Embedding``, and
    Linear layers named one of ``HEAD_NAMES``.

    Modules without a ``weight`` parameter (containers, dropout, activations) are skipped, whatever
    ``target_modules`` is: only modules with a weight can be targets.

    Raises:
        ShiraError: no module with a weight matched, a match's weight is not floating point, or an
            ``nn.Embedding`` with ``sparse=True`` (its sparse gradients cannot be masked in place).
    """
    if target_modules is None:
        excluded = _output_head_ids(model)
        match = lambda name, module: isinstance(module, nn.Linear) and id(module.weight) not in excluded
    else:
        match = _matcher(target_modules)

    targets, seen = [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        # Containers (a ModuleList, a decoder layer) and weightless layers (dropout, activations)
        # hold nothing to train: a regex such as r"encoder\..*" or a suffix also names them.
        if not isinstance(weight, nn.Parameter) or not match(name, module):
            continue
        if not weight.is_floating_point():
            raise ShiraError(
                f"target module '{name}' ({type(module).__name__}) has a {weight.dtype} weight; only "
                f"floating-point weights can be trained, packed or switched. Narrow target_modules to exclude it"
            )
        if isinstance(module, nn.Embedding) and module.sparse:
            raise ShiraError(
                f"target module '{name}' is an nn.Embedding with sparse=True; its sparse gradients "
                f"cannot be masked in place. Build it with sparse=False"
            )
        if id(weight) in seen:  # tied weights: train the shared tensor once
            continue
        seen.add(id(weight))
        targets.append((name, module, weight))

    if not targets:
        available = [n for n, m in model.named_modules() if n and isinstance(getattr(m, "weight", None), nn.Parameter)]
        shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
        raise ShiraError(
            f"target_modules={target_modules!r} matched no module with a weight; "
            f"modules with weights include: {shown or '(none)'}"
        )
    return targets
