"""ak.SOURCE on the tiny GPT-2's checkpoints vs bergson's scores: Spearman per query."""
import json, os, sys, numpy as np, torch
from scipy.stats import spearmanr
from transformers import GPT2LMHeadModel
from torch.utils.data import DataLoader, TensorDataset
import attrkernels as ak
from attrkernels.tasks import LanguageModeling
torch.set_num_threads(1)
out = os.environ.get("BERGSON_CMP_DIR", "/tmp/bergson-cmp"); run = json.load(open(f"{out}/run.json")); data = torch.load(f"{out}/data.pt")
L = int(sys.argv[1])
model = GPT2LMHeadModel.from_pretrained(run["checkpoints"][-1])
states = [GPT2LMHeadModel.from_pretrained(c).state_dict() for c in run["checkpoints"]]
params = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.") and n.endswith(".weight") and ".ln_" not in n]
train = DataLoader(TensorDataset(data["train"]), batch_size=16)
query = DataLoader(TensorDataset(data["query"]), batch_size=8)
m = ak.SOURCE(model, LanguageModeling(), segments=L, params=params, verbose=False)
ours = m.fit(train, states, lr_sums=[run["lr"] * run["steps_per_ckpt"]] * len(states)).score(query).numpy()
theirs = np.load(f"{out}/bergson-L{L}.npy")
rho = [spearmanr(ours[:, j], theirs[:, j])[0] for j in range(ours.shape[1])]
print(f"L={L} params {params}")
print(f"Spearman per query (ak.SOURCE vs bergson): {np.round(rho, 3).tolist()}  mean {np.mean(rho):.3f}")
pr = [np.corrcoef(ours[:, j], theirs[:, j])[0, 1] for j in range(ours.shape[1])]
print(f"Pearson per query: mean {np.mean(pr):.3f}; scale ratio (median |ours|/|theirs|) {np.median(np.abs(ours)) / np.median(np.abs(theirs)):.3g}")
rel = np.abs(ours + theirs).max() / np.abs(theirs).max()
print(f"max |ours - (-bergson)| / max |bergson| = {rel:.2e}  (bergson's sign: positive = lowers the query loss's ... opposite of ours)")
