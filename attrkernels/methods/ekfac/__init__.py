"""EK-FAC and K-FAC influence functions (Grosse et al., 2023; George et al., 2018; Martens & Grosse, 2015).

    m = ak.EKFAC(model, task, store="runs/ekfac")     # or ak.KFAC(...)
    m.fit(train_loader, checkpoints=[sd0, sd1])       # factors per checkpoint, saved in the store
    scores = m.score(test_loader)                     # [n_train, n_test], streamed over train_loader
    flagged = m.self_influence()                      # [n_train], large = unusual (e.g. mislabeled)

Scores. With g_i = d loss_i / d theta (``task.loss``), f_j = ``task.measure`` of test example j
and F the Fisher of the training loss (mean over training examples), the influence-function
estimate of how much including training example i raises f_j is

    scores[i, j] = -grad f_j^T (F + damping I)^{-1} g_i

(upweighting example i by eps moves theta by -eps (F + damping)^{-1} g_i). F is block-diagonal
over the tracked layers and each block is Kronecker-factored (``attrkernels.kernels.kfac``):
K-FAC uses (Q_S (x) Q_A) diag(e_S e_A^T) (Q_S (x) Q_A)^T, EK-FAC replaces the eigenvalues by
Lambda = E_b[(Q_S^T G_b Q_A)^2]. The inverse is applied in that eigenbasis, per layer:

    scores[i, j] = -sum_layers <Q_S^T G_i Q_A, (Q_S^T G_j Q_A) / (Lambda + damping)>.

``damping=None`` uses 0.1 x the mean eigenvalue of each layer (mean of Lambda for EK-FAC, of
e_S e_A^T for K-FAC), as kronfluence's heuristic; a float is added to every layer; 0 requires
full-rank factors and raises naming the layer otherwise. Multiple checkpoints average scores.

Fisher. ``fisher="true"`` (default) computes S and Lambda from gradients of the loss at labels
sampled from the model's own predictive distribution (one sample per example, seeded by
``seed``, the checkpoint and the batch position; the Lambda pass draws labels independent of
the covariance pass: reusing the same draws fits the eigenbasis and the eigenvalues to the same
noise, which cost 0.06 LDS on the digits MLP): the Fisher of the model, a positive
semi-definite approximation of the Hessian (the Gauss-Newton matrix for cross-entropy), as in
Grosse et al. and kronfluence's default. It needs a task with ``sampled_loss(model, batch, generator) -> [B]``
(``Classification`` samples labels from softmax of its logits).
``fisher="empirical"`` uses the dataset's labels (``task.loss``): deterministic and works for any
task, and the cheaper fit + score (one backward pass over the training data instead of three;
see Cost). The empirical Fisher weights examples by their own loss: it attributed less accurately
on the digits MLP (``benchmarks/results/ekfac_cpu.md``), as accurately on the text-lm language
model (LDS 0.748 either way, ``benchmarks/results/text_lm_default.md``).

Layers. Every module whose handler is Kronecker-factorable (``attrkernels.capture.handlers``:
Linear with any leading dims, Conv1d / Conv2d with groups = 1 (T = output positions), Embedding
(activation factor = token counts, diagonal, identity basis), MultiheadAttention's packed
in-projection (its out_proj is a Linear), and any type added with
``register_handler``). A bias is the homogeneous last input column. ``params=None`` tracks every
trainable weight (and its bias) of those layers and leaves out other parameters (norms, grouped
convolutions, parameters used functionally such as those of a MultiheadAttention with
add_bias_kv, and layers that the
first training batch shows called without the batch dimension such as GPT-2's ``wpe``), listed
in ``skipped``; naming such a parameter in ``params`` raises. A tied weight (GPT-2's lm_head =
wte) is one layer whose other uses add positions to its factors (``selection``), so its
gradient is counted once; a weight also used where no hook sees it is refused (the first
example's gradients are checked against autograd). A task's ``token_mask`` (``LanguageModeling``; a dict batch's
``attention_mask`` for ``Classification``) leaves padding out of the factors. The handlers compute every layer-specific statistic; this package only
orchestrates.

Cost. ``fit`` makes two passes over the training data per checkpoint for EK-FAC (covariances,
then Lambda; one for K-FAC) and a batched eigendecomposition (float64, or float32 with
``eigh_dtype``: 2-2.5x faster at widths 2304-3072). The covariance pass keeps its captured
inputs and output-gradients batch by batch while they fit in ``replay_budget`` (default a quarter
of the available memory), and with ``spill_dir`` the batches beyond it in an unlinked file there
(``spill``); the Lambda stage reads those batches instead of running the model on them
(``replay``; with the true Fisher the
covariance pass then runs a second backward pass at the Lambda stage's labels, from the same
forward pass: ``task.sampled_losses``). Without a store (the factors then serve only this
process) the covariance pass also keeps, within the same budget, the output-gradients of the
training loss (a last backward pass from the same forward pass, ``sampled_losses(...,
with_loss=True)``; with the empirical Fisher its own captures), and ``score`` / ``self_influence``
read them instead of running the model over the training data: fit + score then make one forward
pass over it. With the empirical Fisher those captures are the correction's own, so the
correction also keeps the rotated gradients Q_S^T G_b Q_A it forms (within the budget the
captures leave, when no layer is an Embedding; a layer with fewer positions than its widths keeps
the rotated positions D_b Q_S and A_b Q_A instead, T (d_in + d_out) floats per example, not
d_out d_in) and the scores are their inner products with the queries in the eigenbasis: no
training gradient is rotated twice (text-lm: one forward and one backward pass over the
training data, ``benchmarks/text_lm_floor.py``). ``score`` makes one pass
over the test set (preconditioned query gradients held in memory: n_test x tracked parameters
floats; what the fit kept for the scores is moved to its spill file, or without one released,
when they would not fit beside it) and one over the training set (checked example by example, a model pass only when
nothing was kept), streaming [batch, n_test] tiles into ``out``; per layer
the training gradients are either rotated into the eigenbasis or the queries rotated back,
whichever costs fewer FLOPs. Per-example gradients exist only per layer, in chunks of at most
``memory_budget`` bytes. The backward passes ask only for the layers' output gradients (no weight
gradients). Convolutions avoid unfolding where they can (see ``capture.handlers.conv``).

Scale out. The covariance and correction passes return unnormalised sums with counts
(sum a a^T over positions, sum delta delta^T, sum (Q_S^T G_b Q_A)^2, example and position counts),
normalised only once summed over the whole training set; the same sums are added three ways
(``sharding``):
* under an initialised ``torch.distributed`` group (torchrun, ...; gloo or nccl, never chosen or
  initialised here), rank r of W passes over batch-aligned shard r (``distributed.batch_shard``)
  and each stage's sums (with the covariances, the example digests) are added by one bucketed
  ``all_reduce_sum``; the [d, d] eigendecompositions are spread over the ranks by size and shared
  by one all-reduce of zero-filled buffers; rank 0 alone writes the store. ``score`` splits the
  training rows (each rank writes its rows into ``out=``, a path every rank sees, no gather);
  ``self_influence`` shares its [n_train] vector by one all-reduce. The factors do not depend
  on the world size, so ``score`` may run with another world size than ``fit``, or one process;
* ``fit(train, shard=(i, n))`` (a job array; no collectives even under a group) passes over
  shard i alone and writes its partial sums as a finished shard of ``distributed.manifest``
  (``partials``); the process that completes a stage's shards merges them (after one hashing
  pass over its loader), eigendecomposes and saves, and EK-FAC's correction needs the merged
  eigenbasis: run the array twice for EK-FAC (covariances, then corrections; finished shards
  are skipped), once for K-FAC, then ``fit(train)`` (any world size) merges. ``complete`` says
  whether a call produced every checkpoint's factors;
* one process: the whole loader, nothing to add.
Batches are the unit of the split, so with ``fisher="true"`` every batch draws the labels a
single process draws and the factors match one process's to the rounding of the sums (tested in
float64 at rtol 1e-5). A merge refuses shards of other settings, model or eigenbasis
(``StoreMismatch``), of other training data (naming the shard and both fingerprints) and names
missing shards (``distributed.MissingShards``). A killed shard leaves no manifest and is redone;
a killed group run resumes from the last stage file its rank 0 wrote.

Modules, by stage (as kronfluence splits factor/ and score/): ``selection`` (which layers),
``passes`` (passes over data, the Fisher's loss, the covariance and correction passes),
``factors`` (the factors of a checkpoint, the eigendecomposition), ``storage`` (stage files),
``sharding`` / ``partials`` / ``fitting`` (who passes over which examples, shard files, the
stages of a fit), ``precondition`` (inverse eigenvalues, queries, score tiles) and ``method``
(EKFAC, KFAC).

Store. With ``store=path``, each checkpoint's factors are written as safetensors per stage
(covariance, eigen, lambda; named by the checkpoint's fingerprint) with JSON metadata, and a
rerun of ``fit`` (or a ``score`` on a model whose weights match a stored checkpoint) loads them
instead of recomputing: fit once, score many query sets. Damping is applied at score time and
is not part of the stored factors. A store written for another model, layer selection, Fisher,
seed or block width raises ``StoreMismatch`` naming the differences; a file that cannot be read
raises ``StoreDamaged`` naming it.

Data. Example i of the training set is the i-th example the train loader yields, on every pass.
``fit`` and ``score`` refuse loaders that cannot guarantee it (``utils.loaders.check_loader``:
shuffling samplers, ``drop_last=True``, one-shot generators), and every pass over the training
data (covariances, Lambda, scores, self-influence, at every checkpoint) compares its examples,
one by one, with the first pass (``store.DataMismatch`` at the first example that differs; the
test loader likewise across checkpoints). The store records the digest of every training
example (``train_data.npz``); when ``fit`` loads all factors from the store it checks the first
batch, and the next pass over the training data checks every example: data that differs from
the stored factors' raises ``storage.StoredDataMismatch`` (a ``StoreMismatch``). Checkpoints
are snapshotted at ``fit``; a checkpoint with NaN / Inf weights is refused naming it, and
non-finite losses, inputs or gradients raise an ``utils.errors.ExampleError`` naming the
examples' indices in the loader and the checkpoint. Models whose examples interact in the
forward pass (BatchNorm without running statistics: ``capture.hooks.check_batch_independent``)
and layers fed sequence-first input (probed with one example) are refused.
"""
from .factors import LayerFactors
from .method import EKFAC, KFAC
from .selection import Layer, select_layers

__all__ = ["EKFAC", "KFAC", "Layer", "LayerFactors", "select_layers"]
