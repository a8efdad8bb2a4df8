"""``python -m shira_hooks <verb>`` (also the ``shira-hooks`` console script): adapters from the shell.

    python -m shira_hooks                       # the demo (the README's main job), as `demo`
    python -m shira_hooks inspect adapter.safetensors
    python -m shira_hooks fuse a.safetensors b.safetensors --weights 1 0.5 -o fused.safetensors
    python -m shira_hooks convert --to-peft adapter.safetensors -o peft_folder
    python -m shira_hooks merge --model MODEL_DIR --adapter adapter.safetensors -o merged_model
    python -m shira_hooks bench --quick

An adapter argument may be a shira_hooks file, a Hub-style folder (``save_pretrained``) or a PEFT
SHiRA folder (``adapter_config.json``). Bad files and arguments print the ``ShiraError`` message,
without a traceback, and exit with code 2; so does an unknown verb (options alone run the demo).
Output into a pipe that closes early (``inspect f | head``) ends quietly with code 141.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path

from ..errors import ShiraError
from ..format import SparseAdapter, as_adapter, dtype_name, formats
from ..masks import index_dtype
from .help import DefaultsFormatter

PROG = "python -m shira_hooks"
VERBS = ("inspect", "fuse", "convert", "merge", "bench", "demo")

EPILOG = f"""examples:
  {PROG}                                     run the demo (same as `{PROG} demo`)
  {PROG} inspect adapter.safetensors         modules, shapes, k, %, dtypes, bytes, metadata
  {PROG} fuse a.safetensors b.safetensors --weights 1 0.5 -o fused.safetensors
  {PROG} convert --to-peft adapter.safetensors -o peft_adapter/
  {PROG} convert --from-peft peft_adapter/ -o adapter.safetensors
  {PROG} merge --model base_model/ --adapter adapter.safetensors -o merged_model/
  {PROG} bench --quick                       the switching micro-benchmark

Each verb has its own --help. An adapter may be a shira_hooks .safetensors file, a folder written by
SparseAdapter.save_pretrained, or a PEFT SHiRA folder."""


# ------------------------------------------------------------------------------------ verbs
def inspect(args: argparse.Namespace) -> int:
    adapter = as_adapter(args.adapter)
    path = Path(args.adapter)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    rows, total_bytes = [], 0
    for name, delta in adapter.deltas.items():
        k = delta.indices.numel()
        stored_indices = k // delta.block  # a block adapter's file holds one index per run
        tensor_bytes = (
            stored_indices * index_dtype(delta.numel // delta.block).itemsize + k * delta.values.element_size()
        )
        total_bytes += tensor_bytes
        shape = "x".join(str(s) for s in delta.shape)
        rows.append(
            (
                name,
                shape,
                dtype_name(delta.dtype),
                dtype_name(delta.values.dtype),
                f"{k:,}",
                f"{100 * k / delta.numel:.2f}",
                f"{tensor_bytes:,}",
                "yes" if delta.fingerprint else "no",
            )
        )
    header = ("weight", "shape", "base dtype", "values", "k", "%", "bytes", "fingerprint")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(
        f"{path}: shira_hooks adapter, {len(adapter.deltas)} weights, {adapter.num_entries:,} entries, {size:,} bytes on disk"
    )
    if adapter.block > 1:
        print(f"  block {adapter.block} (one index per run of {adapter.block} entries in the file)")
    for key, value in sorted(adapter.metadata.items()):
        print(f"  {key}: {value}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    unverifiable = sum(1 for d in adapter.deltas.values() if not d.fingerprint)
    print(
        f"total: {adapter.num_entries:,} entries, {total_bytes:,} bytes of indices and values; "
        + (
            "every weight has a base fingerprint"
            if not unverifiable
            else f"{unverifiable} weight(s) without a base fingerprint (apply cannot check their base)"
        )
    )
    return 0


def fuse(args: argparse.Namespace) -> int:
    from ..serve import fuse as fuse_adapters

    if len(args.adapters) < 2:
        raise ShiraError(
            f"fuse needs two or more adapters, got {len(args.adapters)} ({args.adapters[0]}); to copy or convert one, use convert or save it again"
        )
    adapters = [as_adapter(path) for path in args.adapters]
    base = _load_model(args.model) if args.model else None
    fused = fuse_adapters(adapters, args.weights, base=base)
    out = formats.write(fused, args.out)  # a .safetensors file, or a Hub-style folder
    print(
        f"fused {len(adapters)} adapters (weights {args.weights or [1.0] * len(adapters)}): {fused.num_entries:,} entries -> {out}"
    )
    return 0


def convert(args: argparse.Namespace) -> int:
    if args.to_peft:
        adapter = as_adapter(args.input)
        base_id = args.base_model or adapter.metadata.get("base_model_name_or_path")
        out = adapter.to_peft(args.out, base_model_name_or_path=base_id)
        print(f"{args.input} -> PEFT SHiRA folder {out} (load with peft.PeftModel.from_pretrained(base, {str(out)!r}))")
    else:
        base = _load_model(args.model) if args.model else None
        adapter = SparseAdapter.from_peft(args.input, base=base)
        out = formats.write(adapter, args.out)
        print(f"PEFT SHiRA {args.input} -> {out}: {adapter.num_entries:,} entries")
    return 0


def merge(args: argparse.Namespace) -> int:
    from ..serve import apply

    adapter = as_adapter(args.adapter)
    model = _load_model(args.model)
    apply(model, adapter, alpha=args.alpha, check_base=not args.no_check_base)  # kept: the merged weights are saved
    out = Path(args.out)
    model.save_pretrained(out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
    except (OSError, ValueError, KeyError):  # a model folder without a tokenizer
        pass
    print(f"merged {args.adapter} (alpha {args.alpha:g}, {adapter.num_entries:,} entries) into {args.model} -> {out}")
    return 0


def _load_model(folder: str):
    """A Hugging Face model folder, loaded with the class its config names (parameter names match training)."""
    try:
        import transformers
    except ImportError:
        raise ShiraError("loading a model needs transformers: pip install transformers") from None
    if not Path(folder, "config.json").exists():
        raise ShiraError(
            f"{folder}: not a Hugging Face model folder (no config.json); give the folder save_pretrained wrote"
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(folder, dtype="auto")


def _run_bench(argv: list[str]) -> int:
    from . import bench

    return bench.main(argv)


def _run_demo(argv: list[str]) -> int:
    from . import demo

    return demo.main(argv, prog=f"{PROG} demo")


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    formatter = DefaultsFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Sparse High Rank Adapters (SHiRA): inspect, fuse, convert and merge adapters, "
        "benchmark switching, or run the demo (the default when no verb is given).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser(
        "inspect",
        help="modules, shapes, k, %%, dtypes, bytes, metadata, fingerprints",
        formatter_class=formatter,
        description="Print what an adapter holds: per weight its shape, base dtype, value dtype, k, the share "
        "of the weight it adapts, bytes, and whether it has a base fingerprint; and the metadata.",
    )
    p.add_argument("adapter", help="a .safetensors file, a save_pretrained folder or a PEFT SHiRA folder")

    p = verbs.add_parser(
        "fuse",
        help="fuse adapters by (weighted) addition",
        formatter_class=formatter,
        description="One adapter whose delta is the weighted sum of the given ones (the union of their entries).",
    )
    p.add_argument("adapters", nargs="+", help="two or more adapters (files or folders)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter (default: 1 each)")
    p.add_argument("--model", default=None, help="the base model folder, to fingerprint the union of entries")
    p.add_argument("-o", "--out", required=True, help="a .safetensors file, or a folder (save_pretrained)")

    p = verbs.add_parser(
        "convert",
        help="to or from a PEFT SHiRA folder",
        formatter_class=formatter,
        description="Convert an adapter into a folder peft.PeftModel.from_pretrained loads, or a PEFT "
        "SHiRA adapter into a shira_hooks adapter.",
    )
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-peft", action="store_true", help="shira_hooks adapter -> PEFT folder")
    direction.add_argument("--from-peft", action="store_true", help="PEFT SHiRA folder -> shira_hooks adapter")
    p.add_argument("input", help="the adapter to convert")
    p.add_argument(
        "-o", "--out", required=True, help="the folder (--to-peft), or a .safetensors file or folder (--from-peft)"
    )
    p.add_argument("--base-model", default=None, help="--to-peft: base_model_name_or_path written into the PEFT config")
    p.add_argument("--model", default=None, help="--from-peft: the base model folder, to fingerprint the entries")

    p = verbs.add_parser(
        "merge",
        help="apply an adapter and save the merged model",
        formatter_class=formatter,
        description="Apply an adapter to a Hugging Face model folder and save_pretrained the result, "
        "for serving engines that know nothing of SHiRA.",
    )
    p.add_argument("--model", required=True, help="the base model folder (config.json + weights)")
    p.add_argument("--adapter", required=True, help="the adapter to merge")
    p.add_argument("--alpha", type=float, default=1.0, help="the adapter's strength")
    p.add_argument("--no-check-base", action="store_true", help="skip the base fingerprint and dtype checks")
    p.add_argument("-o", "--out", required=True, help="the folder for the merged model")

    verbs.add_parser("bench", help="the switching micro-benchmark (options: bench --help)", add_help=False)
    verbs.add_parser("demo", help="the embedded demo, the default (options: demo --help)", add_help=False)
    return parser


BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m shira_hooks`` and of the ``shira-hooks`` console script.

    Returns:
        The exit code: 0, 2 for bad files or arguments (a message, no traceback), or 141 when the
        reader of the output went away (``inspect f | head -2``; the rest of the output is dropped).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
    except BrokenPipeError:
        # Python would print a traceback and, at exit, "Exception ignored ... BrokenPipeError": point stdout
        # at /dev/null so the final flush succeeds, and stop quietly as a Unix tool does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE
    return code


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return _run_demo(argv)  # no verb: the demo, with any demo options
    if argv[0] not in VERBS and argv[0] not in ("-h", "--help"):
        close = difflib.get_close_matches(argv[0], VERBS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(
            f"{PROG}: error: unknown verb {argv[0]!r}; {hint}the verbs are {', '.join(VERBS)} (see {PROG} --help)",
            file=sys.stderr,
        )
        return 2
    if argv[0] == "bench":
        return _run_bench(argv[1:])
    if argv[0] == "demo":
        return _run_demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"inspect": inspect, "fuse": fuse, "convert": convert, "merge": merge}[args.verb](args)
    except ShiraError as error:
        print(f"{PROG} {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, json.JSONDecodeError) as error:
        print(f"{PROG} {args.verb}: error: {error}", file=sys.stderr)
        return 2
