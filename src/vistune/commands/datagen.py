"""`vistune datagen`: make instruction data from captions and boxes (paper §3).

    vistune datagen --coco data/scenes --split train --teacher rules --out data/instruct.json
    vistune datagen --coco COCO --split train2014 --types conversation,detail,complex \\
        --teacher openai --base-url http://localhost:8000/v1 --model NAME --workers 8 \\
        --out data/llava_instruct.json
    vistune datagen --pairs pairs.jsonl --types brief --out data/brief.json

Every request and answer is kept in `--db` (default OUT.sqlite); rerunning the same command
resumes and sends nothing that was answered. Writes OUT (one LLaVA JSON with every
requested type, ids "<image_id>_<type>"), OUT_STEM.rejected.jsonl and OUT_STEM.summary.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from vistune.commands.flag_types import names, positive_int
from vistune.commands.flags import (
    add_client_flags,
    add_dataclass_flags,
    client_config,
    flag_values,
)
from vistune.errors import EndpointError, VistuneError

HELP = "generate instruction data (brief, conversation, detail, complex) with a teacher"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vistune.datagen.pipeline import ALL_TYPES, DatagenConfig

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco", type=Path, help="folder laid out as COCO's release")
    source.add_argument(
        "--pairs", type=Path, help="image-caption pairs (.jsonl/.json/.tsv); brief only"
    )
    parser.add_argument("--split", default="train", help="COCO split name (default: train)")
    parser.add_argument(
        "--image-root",
        type=Path,
        help="where image paths are found (default: --coco DIR or the pairs file's folder)",
    )
    parser.add_argument(
        "--teacher",
        choices=("openai", "local", "rules"),
        help="who writes conversation/detail/complex answers",
    )
    parser.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help="openai: chat-completions base URL (default: $OPENAI_BASE_URL or OpenAI's); key from $OPENAI_API_KEY",
    )
    parser.add_argument("--model", help="openai: model name sent to the endpoint")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="local: Hugging Face causal LM folder (default: packaged SmolLM2)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output LLaVA JSON file")
    parser.add_argument(
        "--db", type=Path, help="SQLite store of requests and answers (default: OUT.sqlite)"
    )
    add_client_flags(parser)  # openai: --temperature, --max-tokens, --timeout, ...
    # --types, --workers, --seed, --limit, --check-images
    add_dataclass_flags(parser, DatagenConfig, default_text={"types": ",".join(ALL_TYPES), "limit": "all"},
                        checks={"types": names, "workers": positive_int, "limit": positive_int})  # fmt: skip


def _teacher(args: argparse.Namespace, types: tuple[str, ...]):
    from vistune.datagen.teachers import make_teacher

    needs = [t for t in types if t != "brief"]
    if needs and args.pairs is not None:
        raise VistuneError(
            f"--pairs has captions only: use --types brief (asked for {', '.join(needs)})"
        )
    if needs and args.teacher is None:
        raise VistuneError(f"--types {','.join(needs)} needs a --teacher (openai, local or rules)")
    if args.teacher == "openai":
        if not args.model:
            raise VistuneError("--teacher openai needs --model NAME")
        if not args.base_url.startswith(("http://", "https://")):
            raise VistuneError(
                f"--base-url must start with http:// or https://, got {args.base_url!r}"
            )
        return make_teacher("openai", config=client_config(args, args.base_url, args.model))
    if args.teacher == "local":
        return make_teacher("local", model_dir=args.model_dir, max_new_tokens=args.max_tokens)
    return make_teacher("rules")


def _print_summary(summary) -> None:
    print(f"teacher: {summary.teacher}", file=sys.stderr)
    for rtype, counts in summary.per_type.items():
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"
        print(f"  {rtype}: {parts}", file=sys.stderr)
    for reason, n in sorted(summary.skipped.items()):
        print(f"  skipped input ({reason}): {n}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from vistune.data.formats import load_coco, load_pairs
    from vistune.datagen.pipeline import ALL_TYPES, DatagenConfig, run_datagen
    from vistune.datagen.store import Store

    types = args.types
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown or not types:
        raise VistuneError(f"unknown --types {','.join(unknown)}; valid: {', '.join(ALL_TYPES)}")
    if args.out.is_dir():  # found out only after every request was answered otherwise
        raise VistuneError(f"--out {args.out} is a folder, not a file")
    teacher = _teacher(args, types)
    if args.coco is not None:
        if not (args.coco / "annotations").is_dir():
            raise VistuneError(f"{args.coco}: no annotations/ folder (expected COCO's layout)")
        contexts, skipped = load_coco(args.coco, args.split)
        root = args.image_root or args.coco
    else:
        contexts, skipped = load_pairs(args.pairs)
        root = args.image_root or args.pairs.parent
    config = DatagenConfig(**flag_values(args, DatagenConfig))
    db = args.db or Path(str(args.out) + ".sqlite")
    bar = tqdm(desc="datagen", unit="req", file=sys.stderr, dynamic_ncols=True)

    def progress(tally: dict[str, int]) -> None:
        finished = tally["done"] + tally["cached"] + tally["failed"] + tally["rejected"]
        bar.total = tally["total"]
        bar.set_postfix(done=tally["done"], cached=tally["cached"], failed=tally["failed"],
                        rejected=tally["rejected"], refresh=False)  # fmt: skip
        bar.update(finished - bar.n)

    try:
        with Store(db) as store:
            summary = run_datagen(
                contexts, teacher, store, args.out, config, root, Counter(skipped), progress
            )
    finally:
        bar.close()
        teacher.close()
    _print_summary(summary)
    if summary.aborted:
        raise EndpointError(
            f"{summary.aborted}. Wrote {summary.written} finished samples to {args.out}; "
            f"{summary.remaining} requests remain: rerun the same command to resume."
        )
    if summary.remaining:
        print(
            f"{summary.remaining} requests failed: rerun the same command to retry them",
            file=sys.stderr,
        )
    print(f"wrote {summary.written} samples to {args.out} (store: {db})")
    return 0
