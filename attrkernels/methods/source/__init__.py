"""SOURCE (Bae, Lin, Lorraine, Grosse, 2024, "Training Data Attribution via Approximate Unrolled
Differentiation"): attribution by approximately unrolling training, on EK-FAC's kernels.

    m = ak.SOURCE(model, task, segments=3, store="runs/source")
    m.fit(train_loader, checkpoints, lr_sums)   # C checkpoints of one run, in training order
    scores = m.score(test_loader)              # [n_train, n_test], as EKFAC.score
    flagged = m.self_influence()               # [n_train]

Maths. Training takes T steps from theta_0 with learning rates eta_t on the mean training loss;
C checkpoints theta_1..theta_C (theta_C the final weights) are grouped into L consecutive
segments of K = C / L checkpoints. Upweighting training example m by eps (objective mean loss +
eps loss_m) changes the final weights by d theta_T / d eps = -sum_t [prod_{t' > t} (I - eta_t' H_t')]
eta_t g_m(theta_t). SOURCE treats curvature and gradients as constant within a segment and
takes the continuous-time limit, giving, with the orientation and sign of every method
(``scores[i, j] > 0``: including training example i raises the measurement f of test example j),

    scores[m, j] = - sum_l gbar_l(m)^T F_seg,l(H_l) F_back,l+1(H_l+1) ... F_back,L(H_L) grad f_j(theta_C)

    s_l     = (sum of the learning rates of the segment's steps) / (1 - momentum)
              = sum_{c in l} lr_sums[c] / (1 - momentum)
    H_l     = EK-FAC curvature of the segment (``segments``: factors averaged over its checkpoints,
              one eigenbasis, corrected eigenvalues Lambda_l averaged over its checkpoints,
              per-example means) + weight_decay I
    F_seg   = (1 - exp(-s_l H)) H^{-1} (``functions.segment_fn``: expm1, limit s_l at eigenvalue 0;
              no damping needed),  F_back = exp(-s_l H)
    gbar_l(m) = (1/K) sum_{c in l} grad loss_m(theta_c)   (each segment's own checkpoints)

The Fisher is that of ``ak.EKFAC`` (``fisher="true"``: labels sampled from the model; or
"empirical"). With L = 1 and s large, F_seg(H) = H^{-1} on eigenvalues >> 1/s and s on those
<< 1/s: an influence function with damping ~ 1/s (EKFAC's convention: scores = -grad f^T (H +
1/s)^{-1} g). The 1/N of "removing one of N examples" is left out, as EK-FAC leaves it out.

Optimiser. SGD with a learning-rate schedule, momentum beta (``momentum``, heavy-ball or
Nesterov: segment times divided by 1 - beta, the long-run step of a constant gradient) and coupled weight
decay wd (``weight_decay``: the training objective's curvature is H + wd I, so wd is added to
every eigenvalue of both functions). Adam is not modelled (its preconditioner would enter
both functions); for Adam runs this is the SGD approximation.

Checkpoints and learning rates. ``fit(train, checkpoints, lr_sums=None)``: ``lr_sums[c]`` is
the sum of the learning rates of the steps between checkpoint c - 1 and c (c = 0: since
initialisation); ``ak.tasks.Checkpoint`` objects carry it as ``lr_sum`` (``train_classifier``
fills it). C must be a multiple of ``segments``; missing, non-positive or wrongly sized
``lr_sums``, fewer checkpoints than segments, C not divisible, and checkpoints that do not
match the model are refused naming the argument.

Cost. ``fit``: per checkpoint EK-FAC's two passes over the training data (covariances, then
the corrected eigenvalues in its segment's basis), and one float64 eigendecomposition per
segment (L instead of EK-FAC's C): about C times one EK-FAC fit. ``score``: one pass over the
test set at the final checkpoint, then one pass over the training set per checkpoint
(preconditioned queries: ~2 x n_test x tracked parameters floats held, the carried query and
the current segment's). ``self_influence``: one pass over the training set, each batch's
gradients at the C checkpoints and the final one (C + 1 gradient evaluations per example; the
checkpoints' weights are held in memory).

Store. ``store=path``: an EK-FAC factor store (``ekfac.storage``) of strategy "source" holding
per checkpoint its covariances and its corrected eigenvalues in its segment's basis, and per
segment its eigendecomposition, named by fingerprints of the checkpoints (``segments``); a fit
with the same checkpoints (and grouping) loads them instead of recomputing, so a killed fit
resumes where it stopped. Learning rates, momentum and weight decay are applied at score time.
Data checks, non-finite values, layer selection and refusals are EK-FAC's.

Modules: ``functions`` (F_seg, F_back, segments and learning-rate sums, the dense reference
``unrolled_scores``), ``segments`` (the per-segment factors), ``queries`` (the query side) and
``method`` (``SOURCE``).
"""
from .functions import backward_fn, segment_fn, unrolled_scores
from .method import SOURCE
from .segments import Segment

__all__ = ["SOURCE", "Segment", "segment_fn", "backward_fn", "unrolled_scores"]
