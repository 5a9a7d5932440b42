"""Tiny GPT-2 (byte vocab) trained by plain SGD; 3 checkpoints saved as HF dirs + datasets (our .venv)."""
import os
import json, numpy as np, torch
from pathlib import Path
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models

from attrkernels.tasks.text_lm import topic_texts, byte_windows
from attrkernels.tasks import LanguageModeling
torch.manual_seed(0); torch.set_num_threads(1)
out = Path(os.environ.get("BERGSON_CMP_DIR", "/tmp/bergson-cmp"))
L = 32
w = byte_windows(topic_texts(), L)
w = w[np.random.default_rng(0).permutation(len(w))]
train, query = torch.from_numpy(w[:64].astype(np.int64)), torch.from_numpy(w[64:72].astype(np.int64))
cfg = GPT2Config(vocab_size=256, n_positions=L, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0, embd_pdrop=0,
                 attn_pdrop=0, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(cfg)
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"<{i}>": i for i in range(256)}, unk_token="<0>")),
                              eos_token="<0>", pad_token="<0>")
task, lr, bs = LanguageModeling(), 0.003, 16
opt = torch.optim.SGD(model.parameters(), lr=lr)
g = torch.Generator().manual_seed(0)
step, ckpts = 0, []
for epoch in range(6):
    order = torch.randperm(64, generator=g)
    for s in range(0, 64, bs):
        loss = task.loss(model, (train[order[s:s + bs]],)).mean()
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if epoch % 2 == 1:
        d = out / f"checkpoint-{step}"
        model.save_pretrained(d); tok.save_pretrained(d); ckpts.append(str(d))
        print("saved", d, float(loss))
torch.save({"train": train, "query": query}, out / "data.pt")

json.dump({"checkpoints": ckpts, "lr": lr, "steps_per_ckpt": 8}, open(out / "run.json", "w"))
