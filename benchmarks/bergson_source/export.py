import os, sys, numpy as np
from pathlib import Path
from bergson.data import load_scores
L = sys.argv[1]
s = load_scores(Path(os.environ.get("BERGSON_CMP_DIR", "/tmp/bergson-cmp")) / f"bergson-L{L}" / "scores")
m = s.mmap
np.save(os.path.join(os.environ.get("BERGSON_CMP_DIR", "/tmp/bergson-cmp"), f"bergson-L{L}.npy"), np.stack([m[f"score_{j}"] for j in range(s.info["num_scores"])], 1))
