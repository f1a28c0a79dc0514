"""Cut the demo corpus (carried in the repo) out of the full exq corpus.

    python demo/make_corpus.py --source PATH/TO/corpus

Public-domain text only: the first 1.5 MB of the train split and the whole valid / test splits of two domains
(Jane Austen's novels, the King James Bible). Output is deterministic (gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DOMAINS = {
    "austen": "Debian r-cran-janeaustenr 1.0.0 (public domain)",
    "kjv": "Debian bible-kjv-text 4.38 (public domain)",
}
TRAIN_CHARS = 1_500_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, type=Path, help="folder with DOMAIN.{train,valid,test}.txt.gz")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for dom, source in DOMAINS.items():
        manifest[dom] = {"source": source, "license": "public domain"}
        for split in ("train", "valid", "test"):
            text = gzip.decompress((a.source / f"{dom}.{split}.txt.gz").read_bytes()).decode("utf-8")
            if split == "train":
                text = text[: text.rfind("\n", 0, TRAIN_CHARS) + 1]
            out = a.out / f"{dom}.{split}.txt.gz"
            out.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
            manifest[dom][f"{split}_chars"] = len(text)
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
