"""`vistune features`: fill the frozen feature store for a data file before training.

    vistune features --data data/scenes/brief.json --image-size 112 --init default

The vision tower is frozen in both stages (paper §4.2), so its features are computed once
per image (batched, with a progress bar) and reused by every stage and epoch; `vistune
train` does the same on demand, so this command is optional. It takes the training flags
that say which data, which encoder (`--init`, `--vision`, `--image-size`, ...) and where the
store is; `--config` reads a training config and uses those of its keys.

Stored rows are checked against their checksums once, not at every start (a marker beside
each shard records the check); `--verify` reads every row again, for a store suspected of
bit rot, and recomputes the corrupt ones.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from vistune.commands.train import add_arguments as add_train_arguments
from vistune.train.config import load_config

HELP = "compute frozen vision features for a data file into the feature store"

FIELDS = frozenset(
    {
        *("data", "data_format", "scienceqa_split", "scienceqa_answer_format", "image_folder"),
        *("init", "vision", "llm", "vision_layer", "vision_select", "image_size"),
        *("image_aspect", "features", "feature_batch", "device"),
    }
)
"""The training settings this command uses: the data, the encoder, the store."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser, only=FIELDS)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="read every stored row of this data against its checksum, also in shards "
        "checked before (finds bit rot; a full read), and recompute the corrupt ones",
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vistune.train.setup import (
        build_encoder,
        encoder_notes,
        fill_features,
        image_root,
        load_rows,
        resolve_device,
        run_store,
    )

    overrides = {name: getattr(args, name) for name in FIELDS}
    cfg = load_config(args.config, overrides)
    rows = load_rows(cfg, Counter())  # a malformed problem has no image to compute
    root = image_root(cfg)
    paths, missing = [], 0
    for row in rows:
        image = row.get("image") if isinstance(row, dict) else None
        if isinstance(image, str) and image:
            path = Path(image) if Path(image).is_absolute() else root / image
            try:
                found = path.is_file()
            except OSError:  # a name too long, a folder we may not read: as training skips it
                found = False
            if found:
                paths.append(path)
            else:
                missing += 1
    unique = list(dict.fromkeys(paths))
    model = build_encoder(cfg, lambda m: print(m, file=sys.stderr))
    for note in encoder_notes(model):
        print(f"vistune features: {note}", file=sys.stderr)
    model.vision.to(resolve_device(cfg.device))
    store = run_store(cfg, model)
    store.verify_all = args.verify
    with tqdm(desc="features", unit="img", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            if done == 0:  # the first batch starts: the clock starts here, not at the check
                bar.reset(total=total)
            bar.update(done - bar.n)

        failed = fill_features(model, store, unique, cfg.feature_batch, progress)
    computed = bar.n
    print(f"store: {store.folder}")
    print(
        f"images: {len(unique)}  computed: {computed - len(failed)}  "
        f"already stored: {len(unique) - computed}  unreadable: {len(failed)}  "
        f"missing files: {missing}"
    )
    for path, reason in list(failed.items())[:10]:
        print(f"  unreadable: {path}: {reason}", file=sys.stderr)
    return 0
