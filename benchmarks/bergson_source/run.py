"""bergson's SOURCE (approx_unrolling pipeline) on the tiny GPT-2's checkpoints, on CPU."""
import json, os, sys, torch
from pathlib import Path
from datasets import Dataset
from bergson.config.config import IndexConfig, DataConfig, HessianConfig, ApproxUnrollingConfig, QuerySetConfig
from bergson.approx_unrolling.pipeline import approx_unrolling_pipeline
from bergson.data import load_scores
out = Path(os.environ.get("BERGSON_CMP_DIR", "/tmp/bergson-cmp")); run = json.load(open(out / "run.json")); data = torch.load(out / "data.pt")
for name in ("train", "query"):
    if not (out / name).exists():
        Dataset.from_dict({"input_ids": data[name].tolist()}).save_to_disk(str(out / name))
L = int(sys.argv[1])
per = len(run["checkpoints"]) // L
index = IndexConfig(run_path=str(out / f"bergson-L{L}"), model=run["checkpoints"][-1], overwrite=True,
                    data=DataConfig(dataset=str(out / "train")), filter_modules="lm_head", precision="fp32", token_batch_size=32)
hess = HessianConfig(method="kfac", ev_correction=True, hessian_dtype="fp64")
au = ApproxUnrollingConfig(checkpoints=run["checkpoints"], segments=L, lr_list=[run["lr"]] * L,
                           step_size_list=[run["steps_per_ckpt"] * per] * L, momentum=0.0,
                           query=QuerySetConfig(dataset=str(out / "query"), aggregation="none"))
approx_unrolling_pipeline(index, hess, au)
