"""Make a real img2dataset output (tars + per-shard parquet + stats) for tests of the
``img2dataset`` input format: img2dataset itself runs, in a subprocess of its own (it imports
albumentations and wandb, and starts its own process pool), over a URL list served on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from testkit import subprocess_env
from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

_CODE = """
import json, sys
from img2dataset import download
args = json.loads(sys.argv[1])
download(**args)
"""


def run_img2dataset(url_list: Path, output_folder: Path, *, number_sample_per_shard: int,
                    image_size: int = 64, extra_columns: tuple[str, ...] = (),
                    timeout_s: float = 300.0) -> None:
    """Run img2dataset's ``download`` on ``url_list`` (a parquet with ``url`` and ``caption``)
    into ``output_folder`` in its webdataset format: one process, sha256 per image, no retries,
    ``border`` resize to ``image_size`` px (its defaults, but smaller). Raises on failure."""
    args = {
        "url_list": str(url_list), "output_folder": str(output_folder), "input_format": "parquet",
        "url_col": "url", "caption_col": "caption", "output_format": "webdataset",
        "number_sample_per_shard": number_sample_per_shard, "image_size": image_size,
        "resize_mode": "border", "processes_count": 1, "thread_count": 4, "timeout": 5, "retries": 0,
        "save_additional_columns": list(extra_columns), "compute_hash": "sha256",
        "enable_wandb": False, "disallowed_header_directives": [],
    }
    env = subprocess_env({**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    proc = subprocess.run([sys.executable, "-c", _CODE, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def make_img2dataset_output(root: Path, rows: int, seed: int, *, missing: tuple[int, ...] = (),
                            number_sample_per_shard: int, image_size: int = 64, min_side: int = 64,
                            max_side: int = 160) -> Path:
    """A synthetic world of ``rows`` images (testkit.synthetic, ``_gt_row`` kept) served on
    loopback and downloaded by img2dataset into ``root/i2d`` (returned); the rows in
    ``missing`` point at a URL that answers 404. The world's list is ``root/list.parquet``
    (``_gt_path`` names each image's file under ``root``). The server is gone on return."""
    with FaultServer() as srv:
        table = generate_world(root, rows, seed, srv.base_url + "/", min_side=min_side, max_side=max_side)
        srv.root = root.resolve()
        urls = [srv.base_url + "/gone.jpg" if i in missing else srv.url(p)
                for i, p in enumerate(table.column("_gt_path").to_pylist())]
        table = table.set_column(table.column_names.index("url"), "url", pa.array(urls))
        pq.write_table(table, root / "list.parquet")
        run_img2dataset(root / "list.parquet", root / "i2d", number_sample_per_shard=number_sample_per_shard,
                        image_size=image_size, extra_columns=("_gt_row",))
    return root / "i2d"
