"""Stage 2 of "auto" for a weak head: the head trained on every turn and mirror image of the training photos, and
predicting from each photo's features averaged over its eight orientations.

Inspection photos (solar cells, steel, tiles, X-rays) have no up: a crack turned 90 degrees is the same crack. The
eight orientations multiply the training photos by eight for the price of extracting their features (no
backbone training), and averaging a photo's features over them gives the head one steady view of it. On elpv
(the acceptance split, `docs/domains.md`) it scored 0.801 / 0.643 balanced held out in 190 s, where deep fine-tuning
of the top stage, which never beat its own start there, gave 0.756 / 0.592 in 300-420 s. A second, larger backbone
beside the first (`with_companion`, `policy.COMPANIONS`) spends more on the same inputs. The stage is kept only when
it validates better than the upright head: a set whose labels depend on the orientation (digits, text, street
scenes) keeps that head.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from headstart.cache.dataset import DatasetFeatures
from headstart.cache.oriented import reread_features
from headstart.evaluate.metrics import evaluate
from headstart.heads.config import HeadConfig, head_proba
from headstart.heads.params import HeadParams
from headstart.numeric import mean_features
from headstart.progress import NoProgress, Progress
from headstart.records import Evaluation, HeadCandidate, TrainConfig
from headstart.runtime.frozen import FrozenBackbone
from headstart.train import policy
from headstart.train.fit_head import FittedHead, fit_best_head
from headstart.train.head_step import cross_entropy
from headstart.vision.preprocess import ORIENTATIONS

log = logging.getLogger(__name__)


def oriented_base(frozen: FrozenBackbone, device: str) -> FrozenBackbone:
    """The upright backbone the oriented stage extracts with:
    float32 where the run's engine is int8: a weak head needs the fine distinctions int8's rounding blurs (on
    elpv's own validation split the head on float32 features scored 0.791 accuracy / 0.639 balanced, on int8
    features 0.767 / 0.594, docs/domains.md). The whole photo as a second view beside the centre crop did not
    pay there: 0.790 / 0.627 held out against 0.801 / 0.643, for twice the extraction (377 s against 190 s); nor
    did the whole photo alone at its own size (288 px), which validated 0.752 / 0.535 against the crop's 0.779 /
    0.565."""
    upright = frozen.upright()
    return upright.with_engine("fp32", device) if upright.engine_name == "int8" else upright


def with_companion(base: FrozenBackbone) -> FrozenBackbone | None:
    """`base` with the companion `policy.companion_for` names beside it, pretrained; None where it names none or
    its weights are not on this machine."""
    from headstart.backbones.registry import available_offline, resolve

    name = policy.companion_for(base.spec.name)
    if name is None or not available_offline(spec := resolve(name)):
        return None
    return base.with_companion(FrozenBackbone.pretrained(spec))


def all_orientations(feats: DatasetFeatures, frozen: FrozenBackbone, base: FrozenBackbone, device: str,
                     progress: Progress) -> np.ndarray:
    """[8, rows, features]: each row's features by `base` in each orientation (`ORIENTATIONS`' order); the upright
    ones are `feats`' own when `base` computes what `frozen` did. A photo that read once reads again; should one
    fail now, the run stops with its name."""
    out = []
    for name in ORIENTATIONS:
        if name == "upright" and base == frozen:  # the same spec, weights, engine and companion
            out.append(np.asarray(feats.features, np.float32))
            continue
        out.append(reread_features(feats.paths, base, name, device, progress, f"features, {name}"))
    return np.stack(out)


def oriented_dataset(feats: DatasetFeatures, every: np.ndarray) -> DatasetFeatures:
    """`feats` with each row's features averaged over its orientations: what the oriented model computes."""
    return replace(feats, features=mean_features(every))


def fit_oriented_head(every: np.ndarray, feats: DatasetFeatures, classes: tuple[str, ...], cfg: TrainConfig,
                      progress: Progress) -> tuple[FittedHead, Evaluation, tuple[FittedHead, ...]]:
    """`policy.ORIENTED_SEEDS` hidden-layer heads (`policy.oriented_head`), each trained from its own seed on each
    orientation of the training rows as a photo of its own and stopped on the validation rows' averaged features,
    two at a time (one core each); merged into one head whose logits are their mean (`merge_heads`), then half and
    half with a logistic regression's (`fit_linear`, `with_linear`), with its validation scores, and the seeds'
    own heads (what `refit_oriented_head` repeats)."""
    train, val = feats.splits == "train", feats.splits == "val"
    x_train = every[:, train].reshape(-1, every.shape[2])
    y_train = np.tile(feats.labels[train], every.shape[0])
    x_val, y_val = mean_features(every[:, val]), feats.labels[val]
    head_cfg, head_train = policy.oriented_head(HeadConfig(every.shape[2], len(classes)), cfg)
    seeds = [replace(head_train, seed=head_train.seed + k) for k in range(policy.ORIENTED_SEEDS)]
    fitted = _two_at_a_time(lambda c, bar: fit_best_head([(head_cfg, c)], x_train, y_train, x_val, y_val, bar),
                            seeds, progress)
    merged_cfg, merged = merge_heads(head_cfg, [f.state for f in fitted])
    linear = fit_linear(mean_features(every[:, train]), feats.labels[train], merged, len(classes), cfg)
    linear_loss = cross_entropy(((x_val - merged["mean"]) / merged["std"]) @ linear[0].T + linear[1], y_val)
    merged_cfg, merged = with_linear(merged_cfg, merged, linear)
    candidates = tuple(c for f in fitted for c in f.candidates) + (HeadCandidate((), 0.0, linear_loss),)
    out = replace(fitted[0], head=_params(merged_cfg, merged), candidates=candidates)
    return out, evaluate(y_val, head_proba(merged_cfg, merged, x_val), classes), tuple(fitted)


def fit_linear(x: np.ndarray, y: np.ndarray, head: dict[str, np.ndarray], n_classes: int, cfg: TrainConfig
               ) -> tuple[np.ndarray, np.ndarray]:
    """(weights [classes, features], biases [classes]) on `head`'s standardised inputs of scikit-learn's logistic
    regression (L2, `policy.ORIENTED_LINEAR_C`) fitted on rows `x` standardised by their own mean and std (as its
    `StandardScaler` would), classes weighted as the heads' loss weighs them relative to the largest class. Its
    coefficients are then rewritten for the head's standardisation: the same function of x. A class absent from
    `y` gets zero weights and a bias 10 under the lowest: the regression never picks it."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from headstart.heads.params import floored_std
    from headstart.runtime.device import one_blas_thread
    from headstart.train.head_step import class_weights

    mean, std = x.mean(axis=0), floored_std(x.std(axis=0))
    weight = class_weights(y, n_classes, cfg.balance_power)[y] if cfg.balance else np.ones(len(y))
    # One BLAS thread, as the heads: the same products in the same order whatever the machine's load, and
    # OpenBLAS's spinning threads slow a fit many times over while another process holds a core.
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # an unconverged fit is still a fit
        fit = LogisticRegression(C=policy.ORIENTED_LINEAR_C, max_iter=1000).fit(
            (x - mean) / std, y, weight / weight.min())
    own, own_bias = np.zeros((n_classes, x.shape[1])), np.zeros(n_classes)
    known = fit.classes_
    if len(known) == 2:  # scikit-learn's binary model: one logit for the second class against the first
        own[known] = np.concatenate([-fit.coef_, fit.coef_]) / 2
        own_bias[known] = np.concatenate([-fit.intercept_, fit.intercept_]) / 2
    else:
        own[known], own_bias[known] = fit.coef_, fit.intercept_
    # w . (x - mean) / std, written as w' . (x - head mean) / head std + b'
    coef = own * (head["std"] / std)
    bias = own_bias + own @ ((head["mean"] - mean) / std)
    bias[np.setdiff1d(np.arange(n_classes), known)] = bias[known].min() - 10.0
    return coef.astype(np.float32), bias.astype(np.float32)


def with_linear(cfg: HeadConfig, state: dict[str, np.ndarray], linear: tuple[np.ndarray, np.ndarray]
                ) -> tuple[HeadConfig, dict[str, np.ndarray]]:
    """A head of one hidden layer and a linear model on its standardised inputs as one head whose logits are the
    mean of the two. Exact: the linear logits z ride through 2 x classes more hidden units as relu(z) - relu(-z),
    so the saved model, `predict`, `serve` and `export` stay those of one head."""
    coef, bias = linear
    eye = np.eye(len(bias), dtype=np.float32)
    merged = {**state,
              "layers.1.weight": np.concatenate([state["layers.1.weight"], coef, -coef]).astype(np.float32),
              "layers.1.bias": np.concatenate([state["layers.1.bias"], bias, -bias]).astype(np.float32),
              "layers.4.weight": np.concatenate([state["layers.4.weight"], eye, -eye], axis=1) / np.float32(2),
              "layers.4.bias": state["layers.4.bias"] / np.float32(2)}
    return replace(cfg, hidden=(cfg.hidden[0] + 2 * len(bias),)), merged


def refit_oriented_head(every: np.ndarray, feats: DatasetFeatures, seeds: tuple[FittedHead, ...],
                        progress: Progress) -> dict[str, np.ndarray]:
    """The seeds' heads trained again, each from its own seed, on every orientation of the training *and*
    validation rows for the epochs validation chose (`fit_head.refit_full`), two at a time, and merged with a
    logistic regression of those rows as `fit_oriented_head` merges them. A weak head is short of photos: on
    elpv (grouped 5-fold cross-validation of the acceptance split's training part, each fold's head stopped on a
    grouped fifth of its rows, as `train` carves them; docs/domains.md) the refit scored 0.736 / 0.556 (accuracy /
    balanced) against 0.734 / 0.538, and on the held-out photos 0.819 / 0.659 against 0.801 / 0.637 (the mean of
    four seeds)."""
    from headstart.train.fit_head import refit_full

    rows = feats.splits != "test"
    x = every[:, rows].reshape(-1, every.shape[2])
    y = np.tile(feats.labels[rows], every.shape[0])
    heads = _two_at_a_time(lambda f, bar: refit_full(f.head.cfg, f.train_config, x, y, f.history.best_epoch + 1,
                                                     f.epoch_lrs, bar)[0], seeds, progress)
    cfg, merged = merge_heads(seeds[0].head.cfg, [h.state_dict() for h in heads])
    n_classes = cfg.n_classes
    linear = fit_linear(mean_features(every[:, rows]), feats.labels[rows], merged, n_classes, seeds[0].train_config)
    return with_linear(cfg, merged, linear)[1]


def _two_at_a_time(work, items, progress: Progress) -> list:
    """`work(item, bar)` for each of `items`, two at a time (each head fit holds one BLAS thread: one core each),
    in order; the first item's bar is `progress`, one bar for the lot.

    BLAS's thread count is the process's, not a thread's: pinned here, around both workers. Pinned only inside
    each fit, the first to finish restored the count while the other still trained, and that one's later
    products could run on two threads: an elpv run in a warm cache stored a temperature that differed from the
    cold run's in the eighth digit (0.849308764 against 0.849308755), their shipped heads bit for bit the same.
    Pinned here, a cold run and its warm rerun wrote the same model to the bit, temperature included."""
    from concurrent.futures import ThreadPoolExecutor

    from headstart.runtime.device import one_blas_thread

    bars = [progress] + [NoProgress()] * (len(items) - 1)
    with one_blas_thread(), ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(work, items, bars))


def merge_heads(cfg: HeadConfig, states: list[dict[str, np.ndarray]]) -> tuple[HeadConfig, dict[str, np.ndarray]]:
    """Heads of one hidden layer, standardised alike, as one head whose logits are the mean of theirs: their hidden
    units side by side, each one's output weights divided by their number. Exact: a ReLU unit feeds only its own
    head's output."""
    if len(cfg.hidden) != 1 or any(not np.array_equal(st["mean"], states[0]["mean"]) or
                                   not np.array_equal(st["std"], states[0]["std"]) for st in states):
        raise ValueError("only heads of one hidden layer, standardised alike, merge")
    k = len(states)
    merged = {"mean": states[0]["mean"], "std": states[0]["std"],
              "layers.1.weight": np.concatenate([st["layers.1.weight"] for st in states]),
              "layers.1.bias": np.concatenate([st["layers.1.bias"] for st in states]),
              "layers.4.weight": (np.concatenate([st["layers.4.weight"] for st in states], axis=1) / k
                                  ).astype(np.float32),
              "layers.4.bias": (np.mean([st["layers.4.bias"] for st in states], axis=0)).astype(np.float32)}
    return replace(cfg, hidden=(cfg.hidden[0] * k,)), merged


def _params(cfg: HeadConfig, state: dict[str, np.ndarray]) -> HeadParams:
    return HeadParams(cfg, state["mean"], state["std"], [state["layers.1.weight"], state["layers.4.weight"]],
                      [state["layers.1.bias"], state["layers.4.bias"]], training=False)
