"""Embed the images of webdataset shards with a vision model, into clip-retrieval's layout (step 2).

The paper's best encoder was the distilled DINOv2-L/14 (facebook/dinov2-large, the default); any Hugging
Face transformers vision model works, by id or local folder, with its own image processor. The
embedding is DINOv2's pooler_output (the layer-normed CLS token) or, for CLIP checkpoints, image_embeds
(so that LAION's and DataComp's CLIP L/14 can be recomputed too); L2-normalised, stored float16.

Reads --shards as webdataset spells them (brace patterns, local paths, URLs, pipe: commands); a
sample's image is its jpg, jpeg, png or webp, its caption its txt, its url in its json (img2dataset's
layout). Images are decoded in --workers DataLoader processes; the model runs in this process on
--device, on batches of consecutive samples of one shard (the same bytes for any --workers).

Writes into --output_folder, one part per shard, numbered in shard order (what cluster_embeddings.py reads):
  img_emb/img_emb_<n>.npy           float16 (rows, dim), rows in the shard's order
  metadata/metadata_<n>.parquet     image_path (the sample's __key__), caption and url when present
  failed.txt                        shard, key, reason: the samples without a decodable image (never fatal)
  params.json (the model, its revision, the processor's settings), logs.log
A stopped run is finished by rerunning it: the shards already embedded are not redone, also when the rerun lists
other shards (one that cannot be read left out, more added); a rerun with another model, --batch-size, --fp16
or --device is refused rather than throw them away (--overwrite starts afresh).

    python compute_embeddings.py --shards "DATA/{00000..01023}.tar" --output_folder EMB
    python compute_embeddings.py --shards "pipe:aws s3 cp s3://bucket/{00000..00099}.tar -" \\
        --output_folder EMB --model openai/clip-vit-large-patch14 --device cuda --fp16

(Installed with pip, `dbp-embed` is the same command as `python compute_embeddings.py`.)
"""

import os
import shutil
from collections.abc import Iterator

import numpy as np

import dbpkit
from dbpkit import cli, files, savedir, tasks
from dbpkit.errors import Incomplete, UsageError
from dbpkit.samples import FAILED_FILE, find_shards, local_path

FAILED_SHARDS_FILE = "failed_shards.txt"  # shard<TAB>reason: the shards a stopped run could not read


def parse_args():
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--shards", required=True,
                 help="webdataset shards: a brace pattern, path, URL or pipe: command (DATA/{00000..00099}.tar)")
    cli.add_flag(parser, "--output_folder", required=True,
                 help="folder for img_emb/, metadata/, failed.txt, params.json (created)")
    cli.add_flag(parser, "--model", default="facebook/dinov2-large",
                 help="a Hugging Face vision model id or local folder (default: facebook/dinov2-large, the "
                      "paper's distilled DINOv2-L/14)")
    cli.add_flag(parser, "--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    cli.add_flag(parser, "--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default: cpu)")
    cli.add_flag(parser, "--fp16", action="store_true", help="with --device cuda: run the model in float16 (autocast)")
    cli.add_flag(parser, "--overwrite", action="store_true", help="replace the outputs of a completed run")
    cli.add_flag(parser, "--retries", type=int, default=2,
                 help="times a shard that cannot be read is tried again before it is listed in failed_shards.txt "
                      "and the run goes on with the others (default: 2)")
    cli.add_flag(parser, "--workers", type=int, default=None,
                 help="processes decoding images (default: all cores); results are identical for any value")
    tasks.add_distributor_flag(parser)
    return parser.parse_args()


def check_args(args) -> None:
    if args.retries < 0:
        raise UsageError("--retries", f"{args.retries} is negative", "pass 0 or more (default 2)")
    if args.batch_size < 1:
        raise UsageError("--batch-size", f"{args.batch_size} is less than 1", "pass 1 or more (default 256)")
    if args.fp16 and args.device != "cuda":
        raise UsageError("--fp16", "is for --device cuda", "drop --fp16 on the CPU (float32 there)")
    if args.device == "cuda" and args.distributor == "local":  # (Ray's GPUs are on its nodes, not necessarily here)
        cli.check_cuda()


def main() -> None:
    args = parse_args()
    check_args(args)
    workers = cli.num_workers(args.workers, args.distributor)
    tasks.check_distributor(args.distributor)
    run_log = cli.RunLog()
    urls = find_shards(args.shards)
    cli.absolute_paths(args, "output_folder")
    output = args.output_folder
    from dbpkit import shards  # (torch and transformers: imported once the flags are known to be right)
    from dbpkit.encoder import embedding_dim, load_encoder

    folder = os.path.expanduser(args.model)
    model = os.path.abspath(folder) if os.path.isdir(folder) else args.model  # (as every node sees it)
    encoder = load_encoder(model, args.device if args.distributor == "local" else "cpu")
    described = encoder.describe()
    # (not the shards: a part is named for its shard, and a rerun with another list reuses those of shards in both;
    # the device: a GPU's float32 differs from the CPU's in the last bits (TF32 convolutions), so parts of both would
    # mix in one output, recorded as one device; cpu is left out, so that runs stopped before it counted still resume)
    run = {"model": described, "batch_size": args.batch_size, "fp16": args.fp16,
           **({"device": args.device} if args.device != "cpu" else {})}
    outputs = (shards.EMBEDDINGS_DIR, shards.METADATA_DIR, FAILED_FILE, FAILED_SHARDS_FILE, files.LOG_FILE,
               files.PARAMS_FILE)
    save = savedir.SaveDir(output, args.overwrite, outputs, files.PARAMS_FILE, "--output_folder", resume=run)
    with save as out:
        os.makedirs(out.path(shards.PARTS_DIR), exist_ok=True)
        first = {}  # each shard's first place in the list (a shard listed twice is embedded once)
        for n, url in enumerate(urls):
            first.setdefault(url, n)
        todo = [n for url, n in first.items() if not shards.part_done(out.staging, url)]
        before = len(first) - len(todo)
        unread = embed_shards(args, encoder, urls, todo, out.staging, workers)
        if unread:
            listed = os.path.join(output, FAILED_SHARDS_FILE)  # beside the staged parts, for the user to read
            with files.atomic_open(listed, "w", encoding="utf-8") as f:
                f.writelines(f"{shards.escape_field(urls[n])}\t{shards.escape_field(why)}\n" for n, why in unread)
            raise Incomplete(f"{len(unread)} of {len(urls)} shards could not be read (listed with the reason in "
                             f"{listed}); the other {len(urls) - len(unread)} are embedded and kept, nothing is "
                             "published as complete: rerun the same command to embed only the shards missing, or leave "
                             "them out of --shards to do without them (lists join with ::, as in "
                             "DATA/{00000..00002}.tar::DATA/{00004..00099}.tar)")
        for folder in (shards.EMBEDDINGS_DIR, shards.METADATA_DIR):  # (a run stopped laying them out left some)
            shutil.rmtree(out.path(folder), ignore_errors=True)
            os.makedirs(out.path(folder))
        rows, failed = 0, 0
        with open(out.path(FAILED_FILE), "w", encoding="utf-8") as f:
            for n, url in enumerate(urls):
                shards.place_part(out.staging, url, n)
                emb, _, failures, _ = shards.part_files(out.staging, url)
                rows += len(np.load(emb, mmap_mode="r"))
                with open(failures, encoding="utf-8") as part:
                    lines = part.readlines()
                f.writelines(lines)
                failed += len(lines)
        cli.log.info(f"{len(urls)} shards ({before} embedded before), {rows} rows, {failed} failed")
        run_log.write(out.path(files.LOG_FILE))
        pattern = local_path(args.shards)
        files.save_json(out.path(files.PARAMS_FILE), {**described, "shards": pattern, "shard_count": len(urls),
                                                      "output_folder": output, "batch_size": args.batch_size,
                                                      "device": args.device, "fp16": args.fp16,
                                                      "distributor": args.distributor, "dim": embedding_dim(encoder),
                                                      "rows": rows, "failed": failed, "version": dbpkit.__version__})
    resumed = f"; {before} embedded before" if before else ""
    print(f"embedded {rows} images of {len(urls)} shards with {args.model}{tasks.on(args.distributor)} "
          f"({failed} without a decodable image{resumed}) -> {args.output_folder}")


def embed_shards(args, encoder, urls: list[str], todo: list[int], staging: str, workers: int) -> list[tuple]:
    """Embed the shards `todo` into parts under `staging`; returns the shards that could not be read, with why.
    Locally the model runs here and --workers processes decode the images; on Ray, a shard is a task (on a GPU
    of its own with --device cuda)."""
    from dbpkit import shards

    if args.distributor == "ray":
        jobs = [(urls[n], staging, encoder.name, args.device, args.batch_size, args.fp16, args.retries) for n in todo]
        with tasks.TaskPool(workers, "ray") as pool:
            return gathered(urls, todo, pool.run(shards.embed_shard_task, jobs, "embed", unit="shard",
                                                 resources={"num_gpus": 1} if args.device == "cuda" else None))
    with cli.progress(None, "embed", "image") as bar:  # images/s; each batch is a safe point
        cli.stage("embed started")
        return gathered(urls, todo, (shards.embed_shard_retrying(encoder, urls[n], staging, args.batch_size, workers,
                                                                 args.fp16, args.retries, bar.update)
                                     for n in todo))


def gathered(urls: list[str], todo: list[int], results: Iterator[str | None]) -> list[tuple[int, str]]:
    """The shards' results as they come (each a safe point): those that could not be read, with why."""
    unread = []
    for n, why in zip(todo, results):
        if why:
            cli.log.info(f"shard {urls[n]} cannot be read: {why}")  # (all of them in failed_shards.txt)
            unread.append((n, why))
        cli.stage(f"shard {n} embedded")
    return unread


def run() -> None:
    """The command (dbp-... once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
