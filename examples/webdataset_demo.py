"""The loader side of DBP: filter a webdataset with the kept-key trie written by prune.py.

Writes webdataset tar shards for every sample of a toy data set (one shard per `<shard>/` prefix
of the keys, members `<key>.jpg` and `<key>.txt`), unless they are already there, then streams
them through `webdataset.WebDataset(shards).select(dbp_utils.webdataset_filter(trie))`, once in a
plain loop and once through a torch DataLoader with two workers, as a training loop would, and
checks that exactly the kept samples come out, each once.

    python examples/webdataset_demo.py --paths toy/paths.txt --shards toy/shards \\
        --keys run/kept_keys_trie.pkl
"""

import argparse
import glob
import os
import sys
from collections import defaultdict

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dbp_utils  # noqa: E402


def write_shards(paths: list[str], embeddings: np.ndarray, folder: str) -> list[str]:
    """One tar per shard prefix; a sample's 'image' is its embedding's bytes, its caption a line of text."""
    os.makedirs(folder, exist_ok=True)
    by_shard = defaultdict(list)
    for i, path in enumerate(paths):
        shard, name = path.split("/", 1)
        by_shard[shard].append((os.path.splitext(name)[0], i))
    for shard, samples in sorted(by_shard.items()):
        with wds.TarWriter(os.path.join(folder, f"{shard}.tar")) as tar:
            for key, i in samples:
                tar.write({"__key__": key, "jpg": embeddings[i].tobytes(), "txt": f"sample {i}"})
    return sorted(glob.glob(os.path.join(folder, "*.tar")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", required=True, help="paths.txt of the toy data set (one path per sample)")
    parser.add_argument("--embeddings", help="embeddings.npy of the toy data set (default: beside --paths)")
    parser.add_argument("--shards", required=True, help="folder of the tar shards (written if empty)")
    parser.add_argument("--keys", required=True, help="kept_keys_trie.pkl or kept_keys.npy from prune.py")
    args = parser.parse_args()

    with open(args.paths) as f:
        paths = f.read().split()
    shards = sorted(glob.glob(os.path.join(args.shards, "*.tar")))
    if not shards:
        embeddings = np.load(args.embeddings or os.path.join(os.path.dirname(args.paths), "embeddings.npy"))
        shards = write_shards(paths, embeddings, args.shards)
    print(f"webdataset: {len(paths)} samples in {len(shards)} shards under {args.shards}")

    keep = dbp_utils.webdataset_filter(args.keys)  # keys are `<shard stem>/<__key__>`
    dataset = wds.WebDataset(shards, shardshuffle=False).select(keep).map(sample_key)
    expected = keep.keys
    loaders = {"a plain loop": dataset,
               "a torch DataLoader with 2 workers": DataLoader(dataset, batch_size=None, num_workers=2)}
    for name, loader in loaders.items():
        kept = list(loader)
        print(f"webdataset: through {name}, the filter let through {len(kept)} samples; "
              f"{args.keys} holds {len(expected)} keys")
        if len(kept) != len(expected) or len(set(kept)) != len(kept) or not all(k in expected for k in kept):
            sys.exit("webdataset: the filtered samples differ from the kept keys")


def sample_key(sample: dict) -> str:
    return f"{dbp_utils.shard_stem(sample['__url__'])}/{sample['__key__']}"


if __name__ == "__main__":
    main()
