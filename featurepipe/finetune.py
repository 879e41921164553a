"""Fine-tuned baseline: a new head on a backbone, then its top layers trained with a low rate.

Two stages, on exactly the split stored in the backbone's feature file (so the test accuracy sits
beside the frozen-feature rows of the results table):

1. **Head** (``Dropout`` + ``Dense`` softmax, Adam) trained on the file's cached features: seconds.
2. **Fine-tuning**: the live network (uint8 RGB images -> the file's preprocessing -> backbone ->
   pooling -> the stage-1 head) with its top layers unfrozen, SGD with momentum 0.9 at a low rate,
   light augmentation (flip, small rotation and zoom), early stopping on the val rows and the best
   epoch kept. Every BatchNormalization layer stays frozen, in inference mode (the shared MobileNet
   weights have their batch norm folded into the convolutions; batch statistics would wreck them).

Each epoch is checkpointed (model and optimizer state) under ``models/<dataset>/.<name>__finetune.work/``;
a killed run started again with the same settings resumes after the last finished epoch.

Writes ``models/<dataset>/<name>__finetune.keras`` (a plain Keras model: RGB 0..255 float input of
shape (n, S, S, 3), class probabilities out; loads with ``keras.models.load_model`` and no custom
objects) and ``<name>__finetune.json`` (a row of the comparison table plus metadata).
"""

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .cli import OneLineParser, warn_line
from . import __version__
from .backbones import PREPROCESS
from .errors import DataError, ImageError, UsageError
from .images import assign_split, expand_paths
from .reader import FILE_DECODE_DEFAULT, Target, read_images, target_from_attrs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Where stage 2 starts unfreezing, per backbone: a layer name (or name prefix: the first layer
# matching it and every layer above it) or a count of top layers. Other backbones (file:PATH, or a
# feature file cut at another layer) unfreeze from their topmost layer with weights.
DEFAULT_UNFREEZE = {
    "squeezenet": "fire9",            # the last fire module
    "mobilenet": "conv_dw_13",        # the last depthwise + pointwise pair
    "mobilenet_v2": "block_16",       # the last inverted residual block + Conv_1
    "efficientnet_lite0": "block15",  # the last MBConv block + head_conv
    "efficientnet_b0": "block7a",     # the last MBConv block + top_conv
    "vgg16": "block5",
    "vgg19": "block5",
    "resnet50": "conv5_block3",
    "inception_v3": 31,               # the mixed10 module (its layers have numbered names)
    "xception": "block14",
    "densenet121": "conv5_block16",
}

AUGMENT_ROTATION = 0.03   # fraction of a full turn (about +-11 degrees)
AUGMENT_ZOOM = 0.1
HEAD_PATIENCE = 5         # stage-1 early stopping (epochs without a lower val loss)


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run produced."""

    model_path: Path
    json_path: Path
    test_accuracy: float
    test_macro_f1: float
    fit_seconds: float
    predict_ms_per_image: float
    epochs_run: int
    best_epoch: int
    resumed_from: int

    def summary(self):
        return (f"{self.model_path.name}: test accuracy {self.test_accuracy:.4f}, macro-F1 "
                f"{self.test_macro_f1:.4f}, best epoch {self.best_epoch}/{self.epochs_run}, "
                f"fit {self.fit_seconds:.0f} s, {self.predict_ms_per_image:.1f} ms/image -> {self.model_path}")


@dataclass(frozen=True)
class _Settings:
    """The settings that determine a run's numbers (a checkpoint is only resumed when they match)."""

    unfreeze: object
    lr: float
    head_lr: float
    head_epochs: int
    batch_size: int
    dropout: float
    val_size: float
    augment: bool
    seed: int


def models_home():
    """The models root (``$FEATUREPIPE_MODELS`` or ``./models``)."""
    return Path(os.environ.get("FEATUREPIPE_MODELS", "models"))


def output_paths(feature_file, models_dir=None):
    """(``.keras`` path, ``.json`` path, work folder) for a feature file's fine-tuned model."""
    feature_file = Path(feature_file)
    folder = Path(models_dir) if models_dir is not None else models_home()
    folder = folder / feature_file.resolve().parent.name
    name = f"{feature_file.stem}__finetune"
    return folder / f"{name}.keras", folder / f"{name}.json", folder / f".{name}.work"


# --------------------------------------------------------------------------- the whole job


def finetune(data=None, backbone="mobilenet_v2", *, features=None, unfreeze=None, epochs=6,
             head_epochs=40, lr=1e-4, head_lr=1e-3, batch_size=32, dropout=0.2, patience=2,
             val_size=0.1, augment=True, seed=0, weights=None, models_dir=None,
             extract_missing=False, preprocess=None, restart=False, quiet=False, callbacks=()):
    """Fine-tune ``backbone`` on the split of its feature file; save the model and its table row.

    Parameters
    ----------
    data : str or Path, optional
        The image folder (or CSV) the features were extracted from; locates the default feature
        file ``featurepipe.extract.output_path(default_out_dir(data), backbone, "none")``.
        Images are always read from the feature file's ``data_root`` attribute.
    backbone : str
        Registry name or ``file:PATH`` (the backbone the feature file was made with).
    features : str or Path, optional
        The feature file to use instead of the default one.
    unfreeze : int or str, optional
        Stage 2 trains the top ``N`` layers of the backbone (int, or a digit string), the layers
        from a named layer (or the first whose name starts with it) upward, or ``"all"``.
        Default: ``DEFAULT_UNFREEZE[backbone]``, else the topmost layer with weights.
        BatchNormalization layers are never trained.
    epochs : int
        Maximum stage-2 epochs (0: only the head is trained; the model is saved all the same).
    head_epochs : int
        Maximum stage-1 epochs on the cached features (early stopping on val loss).
    lr, head_lr : float
        Stage-2 SGD (momentum 0.9) and stage-1 Adam learning rates.
    batch_size : int
    dropout : float
        Dropout rate before the dense softmax layer.
    patience : int
        Stage-2 epochs without a lower val loss before it stops (>= 1; stage 1 uses 5).
    val_size : float
        Fraction of each class's train rows used as val rows when the file has no val rows.
    augment : bool
        Random horizontal flip, rotation (+-11 degrees) and zoom (+-10 %) in stage 2.
    seed : int
    weights : str, optional
        The backbone's weights file, when not found as for extraction.
    models_dir : str or Path, optional
        Models root (default ``$FEATUREPIPE_MODELS`` or ``models``).
    extract_missing : bool
        Run ``featurepipe.extract.extract`` when the default feature file is missing (instead
        of raising); ``preprocess`` is passed on (needed for ``file:`` backbones).
    restart : bool
        Discard checkpoints of an earlier run and start again.
    quiet : bool
        No progress bars.
    callbacks : sequence of keras.callbacks.Callback
        Extra stage-2 callbacks, called after each epoch's checkpoint is written.

    Returns
    -------
    FinetuneResult
    """
    started = time.time()
    settings = _check(unfreeze, epochs, head_epochs, lr, head_lr, batch_size, dropout, patience,
                      val_size, augment, seed)
    feature_file = _feature_file(data, backbone, features, extract_missing, preprocess, quiet)
    from .store import load

    feats = load(feature_file)
    keras_path, json_path, work = output_paths(feature_file, models_dir)
    fmodel = _feature_model(feats.attrs, weights)
    n_top, unfreeze_label = _resolve_unfreeze(settings.unfreeze, fmodel)
    settings = _Settings(**{**settings.__dict__, "unfreeze": n_top})
    work = _prepare_work(work, feature_file, feats, settings, restart, quiet)
    rows = _rows(feats, settings)
    images, rows = _decoded_images(feats, rows, fmodel.spec, work, quiet)
    _seed_all(seed)
    head, stage1 = _stage1(feats, rows, settings, work, quiet)
    model, state = _stage2(fmodel, head, feats, rows, images, settings, epochs, patience, work,
                           quiet, list(callbacks))
    score = _evaluate(model, images, rows, feats, batch_size)
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(model, keras_path)
    meta = _metadata(feats, feature_file, fmodel, settings, rows, stage1, state, score, epochs,
                     unfreeze_label)
    from .store import write_json_atomic

    write_json_atomic(json_path, meta)
    shutil.rmtree(work, ignore_errors=True)
    result = FinetuneResult(keras_path, json_path, score["accuracy"], score["macro_f1"],
                            meta["fit_seconds"], score["ms_per_image"], state["epoch"],
                            state["best_epoch"], state["resumed_from"])
    if not quiet:
        print(f"{result.summary()} ({time.time() - started:.0f} s in all)", file=sys.stderr)
    return result


def _check(unfreeze, epochs, head_epochs, lr, head_lr, batch_size, dropout, patience, val_size,
           augment, seed):
    if isinstance(unfreeze, str) and unfreeze.strip().isdigit():
        unfreeze = int(unfreeze)
    if isinstance(unfreeze, int) and unfreeze < 0:
        raise UsageError(f"--unfreeze must be a layer count >= 0, a layer name or 'all'; got {unfreeze}")
    for name, value, low in (("epochs", epochs, 0), ("head-epochs", head_epochs, 0),
                             ("patience", patience, 1)):
        if int(value) != value or value < low:
            raise UsageError(f"--{name} must be an integer >= {low}; got {value}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {batch_size}")
    for name, value in (("lr", lr), ("head-lr", head_lr)):
        if not value > 0:
            raise UsageError(f"--{name} must be > 0; got {value}")
    if not 0 <= dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1); got {dropout}")
    if not 0 < val_size < 1:
        raise UsageError(f"--val-size must be in (0, 1); got {val_size}")
    return _Settings(unfreeze=unfreeze, lr=float(lr), head_lr=float(head_lr),
                     head_epochs=int(head_epochs), batch_size=int(batch_size),
                     dropout=float(dropout), val_size=float(val_size), augment=bool(augment),
                     seed=int(seed))


def _feature_file(data, backbone, features, extract_missing, preprocess, quiet):
    """The feature file to use; extracted first when missing and ``extract_missing``."""
    if features is not None:
        path = Path(features)
        if not path.is_file():
            raise UsageError(f"feature file not found: '{path}'")
        return path
    if data is None:
        raise UsageError("pass --data DIR (the image folder) or --features FILE.h5")
    from .extract import default_out_dir, extract, output_path

    path = output_path(default_out_dir(data), backbone, "none")
    if path.is_file():
        return path
    if not extract_missing:
        pre = f" --preprocess {preprocess}" if preprocess else ""
        raise UsageError(f"no features of '{backbone}' for '{data}' ({path} is missing); run "
                         f"python -m featurepipe.extract --data {data} --backbone {backbone}{pre} "
                         "first, or pass --extract")
    extract(data, [backbone], out=path.parent, preprocess=preprocess, quiet=quiet)
    return path


def _feature_model(attrs, weights):
    from .engines import feature_model_from_attrs

    if str(attrs.get("augment", "none")) != "none":
        warnings.warn(f"the feature file was made with augment={attrs['augment']} (features averaged "
                      "with the mirror image); the stage-1 head is trained on those", stacklevel=3)
    return feature_model_from_attrs(attrs, weights=weights)


def _seed_all(seed):
    import keras

    keras.utils.set_random_seed(seed)


# --------------------------------------------------------------------------- rows and images


def _rows(feats, settings):
    """Row indices of the feature file per split: {"train", "val", "test"} -> int64 arrays."""
    split = np.asarray(feats.split)
    train = np.flatnonzero(split == "train")
    val = np.flatnonzero(split == "val")
    test = np.flatnonzero(split == "test")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"'{feats.source}' has {len(train)} train and {len(test)} test rows; "
                        "fine-tuning needs both (extract with --test-size > 0)")
    if len(val) == 0:
        picked = assign_split([feats.paths[i] for i in train], feats.y[train],
                              test_size=settings.val_size, val_size=0.0, seed=settings.seed)
        is_val = np.array([s == "test" for s in picked])
        train, val = train[~is_val], train[is_val]
    if len(val) == 0:
        raise DataError(f"'{feats.source}' has too few train rows to take val rows from")
    return {"train": train, "val": val, "test": test}


def _decoded_images(feats, rows, spec, work, quiet):
    """Every used row's image, decoded and resized once, cached in ``work/images.npy``.

    Returns
    -------
    images : ndarray of shape (n_rows_in_file, S, S, 3), uint8 (a memory map)
    rows : dict of int64 arrays, without rows whose image no longer decodes
    """
    size, n = int(spec.image_size), len(feats.paths)
    cache, marker = work / "images.npy", work / "images.json"
    bad = _cached_bad_rows(cache, marker, n, size)
    if bad is None:
        images = np.lib.format.open_memmap(cache, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        wanted = np.sort(np.concatenate(list(rows.values())))
        root = Path(str(feats.attrs["data_root"]))
        stream = read_images([str(root / feats.paths[i]) for i in wanted], [target_from_attrs(feats.attrs)])
        bad = {}
        for i, item in zip(wanted, _progress(stream, len(wanted), "decode", quiet)):
            if isinstance(item, ImageError):
                bad[int(i)] = str(item)
            else:
                images[i] = item.outputs[0]
        images.flush()
        del images
        marker.write_text(json.dumps({"n": n, "size": size, "bad": bad}))
    if bad:
        example = next(iter(bad.items()))
        warnings.warn(f"{len(bad)} images no longer decode and are left out, e.g. "
                      f"{feats.paths[example[0]]}: {example[1]}", stacklevel=3)
        drop = np.array(sorted(bad), dtype=np.int64)
        rows = {k: np.setdiff1d(v, drop) for k, v in rows.items()}
    return np.load(cache, mmap_mode="r"), rows


def _cached_bad_rows(cache, marker, n, size):
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if info.get("n") != n or info.get("size") != size or not cache.is_file():
        return None
    return {int(k): v for k, v in info["bad"].items()}


def _progress(iterable, total, desc, quiet):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=quiet, leave=False,
                file=sys.stderr)


# --------------------------------------------------------------------------- work folder


def _prepare_work(work, feature_file, feats, settings, restart, quiet):
    """The checkpoint folder, emptied when it belongs to other settings or ``restart``."""
    identity = {"feature_file": str(Path(feature_file).resolve()),
                "feature_file_updated": str(feats.attrs.get("updated", "")),
                "n_rows": len(feats.paths), **{k: _jsonable(v) for k, v in settings.__dict__.items()}}
    marker = work / "settings.json"
    if work.exists():
        try:
            same = json.loads(marker.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if restart or not same:
            if not quiet and not restart:
                print(f"note: checkpoints in {work} are from other settings; starting again",
                      file=sys.stderr)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        from .store import write_json_atomic

        write_json_atomic(marker, identity)
    return work


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- networks


def _flat_layers(model):
    """The layers of a (possibly nested) Keras model in order, input layers skipped."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += _flat_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append(layer)
    return out


def _base_layers(feature_model):
    """The backbone's own layers (the global pooling featurepipe adds left out)."""
    return [layer for layer in _flat_layers(feature_model) if layer.name != "featurepipe_pool"]


def _resolve_unfreeze(unfreeze, fmodel):
    """Turn ``unfreeze`` (None, int, "all", a name or prefix) into (layer count from the top, label)."""
    from .backbones import build_feature_model

    layers = _base_layers(build_feature_model(fmodel.backbone, fmodel.spec, fmodel.resolved))
    names = [layer.name for layer in layers]
    if unfreeze is None:
        unfreeze = DEFAULT_UNFREEZE.get(fmodel.backbone.name)
        if isinstance(unfreeze, str) and not any(n.startswith(unfreeze) for n in names):
            unfreeze = None
        if unfreeze is None:
            return _top_weighted(layers)
    if isinstance(unfreeze, int):
        return min(unfreeze, len(layers)), f"top {min(unfreeze, len(layers))} layers"
    if unfreeze == "all":
        return len(layers), "all"
    exact = [i for i, n in enumerate(names) if n == unfreeze]
    prefix = [i for i, n in enumerate(names) if n.startswith(unfreeze)]
    if exact or prefix:
        first = (exact or prefix)[0]
        return len(layers) - first, f"{unfreeze} (top {len(layers) - first} layers)"
    raise UsageError(f"backbone '{fmodel.backbone.name}' has no layer named '{unfreeze}' (or "
                     f"starting with it); see python -m featurepipe.extract --list-layers "
                     f"{fmodel.backbone.name}, or pass --unfreeze N (top N layers)")


def _top_weighted(layers):
    """From the topmost layer with weights (not batch norm) upward."""
    import keras

    weighted = [i for i, layer in enumerate(layers)
                if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    if not weighted:
        return 0, "none (no layer with weights)"
    n = len(layers) - weighted[-1]
    return n, f"{layers[weighted[-1]].name} (top {n} layers)"


def _affine_preprocess(mode):
    """(A, b) with ``preprocess(x, mode) == x @ A + b`` per pixel: A (3, 3), b (3,), float32."""
    fn = PREPROCESS[mode]
    b = fn(np.zeros((1, 3), np.float32))[0]
    A = np.stack([fn(np.eye(3, dtype=np.float32)[i:i + 1])[0] - b for i in range(3)])
    probe = np.random.default_rng(0).uniform(0, 255, (8, 3)).astype(np.float32)
    if not np.allclose(fn(probe), probe @ A + b, atol=1e-3):
        raise UsageError(f"preprocessing '{mode}' is not per-pixel affine; cannot put it in the graph")
    return A.astype(np.float32), b.astype(np.float32)


def _preprocess_layer(mode):
    """A frozen 1x1 convolution doing the file's preprocessing in the graph (no custom layer)."""
    import keras

    A, b = _affine_preprocess(mode)
    layer = keras.layers.Conv2D(3, 1, name=f"preprocess_{mode}", trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([A.reshape(1, 1, 3, 3), b])
    return layer


def _make_head(dim, n_classes, dropout, seed):
    """The classifier head: Dropout + Dense softmax, (n, dim) -> (n, n_classes)."""
    import keras

    return keras.Sequential([
        keras.Input((dim,)),
        keras.layers.Dropout(dropout, seed=seed, name="head_dropout"),
        keras.layers.Dense(n_classes, activation="softmax", name="head_dense"),
    ], name="head")


def build_finetune_model(fmodel, head, *, augment=True, seed=0):
    """The live network: RGB images (n, S, S, 3), values 0..255 -> class probabilities (n, C).

    Augmentation layers act only when training. The backbone is the nested feature model
    (``featurepipe.backbones.build_feature_model``), frozen; see ``set_trainable``.
    """
    import keras

    from .backbones import build_feature_model

    size = int(fmodel.spec.image_size)
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    if augment:
        x = keras.layers.RandomFlip("horizontal", seed=seed, name="augment_flip")(x)
        x = keras.layers.RandomRotation(AUGMENT_ROTATION, fill_mode="reflect", seed=seed + 1,
                                        name="augment_rotation")(x)
        x = keras.layers.RandomZoom(AUGMENT_ZOOM, fill_mode="reflect", seed=seed + 2,
                                    name="augment_zoom")(x)
    x = _preprocess_layer(fmodel.spec.preprocess)(x)
    built = build_feature_model(fmodel.backbone, fmodel.spec, fmodel.resolved)
    # A copy: a file: backbone's layers are shared with the (cached) model extraction uses,
    # and training must not change those.
    base = keras.models.clone_model(built)
    base.set_weights(built.get_weights())
    outputs = head(base(x))
    return keras.Model(inputs, outputs, name="finetune")


def base_of(model):
    """The nested feature model inside a model made by ``build_finetune_model``."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "head":
            return layer
    raise DataError(f"model '{model.name}' has no nested backbone")


def set_trainable(model, n_top):
    """Freeze the backbone except its top ``n_top`` layers; BatchNormalization always frozen.

    A frozen BatchNormalization layer (``trainable=False``) runs in inference mode in Keras 3,
    whatever the ``training`` flag. The head stays trainable; preprocessing stays frozen.
    """
    import keras

    base = base_of(model)
    base.trainable = True
    layers = _base_layers(base)
    for layer in _flat_layers(base):
        layer.trainable = False
    for layer in layers[len(layers) - n_top:] if n_top else []:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    for layer in model.layers:
        if layer.name.startswith("preprocess_"):
            layer.trainable = False


# --------------------------------------------------------------------------- stage 1


def _stage1(feats, rows, settings, work, quiet):
    """Train the head on cached features; reuse a finished one from ``work``."""
    import keras

    head = _make_head(feats.X.shape[1], len(feats.class_names), settings.dropout, settings.seed)
    done = work / "head.weights.h5"
    info_path = work / "head.json"
    if done.is_file() and info_path.is_file():
        head.load_weights(done)
        return head, json.loads(info_path.read_text())
    t0 = time.time()
    head.compile(optimizer=keras.optimizers.Adam(settings.head_lr),
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=HEAD_PATIENCE,
                                         restore_best_weights=True)
    X, y = feats.X, feats.y
    hist = head.fit(X[rows["train"]], y[rows["train"]], batch_size=settings.batch_size,
                    epochs=settings.head_epochs, validation_data=(X[rows["val"]], y[rows["val"]]),
                    callbacks=[stop], verbose=0, shuffle=True)
    val_loss, val_acc = head.evaluate(X[rows["val"]], y[rows["val"]], verbose=0)
    info = {"seconds": time.time() - t0, "epochs": len(hist.history.get("loss", [])),
            "val_loss": float(val_loss), "val_accuracy": float(val_acc)}
    head.save_weights(done)
    from .store import write_json_atomic

    write_json_atomic(info_path, info)
    if not quiet:
        print(f"stage 1 (head on cached features): {info['epochs']} epochs, val accuracy "
              f"{val_acc:.4f}, {info['seconds']:.1f} s", file=sys.stderr)
    return head, info


# --------------------------------------------------------------------------- stage 2


def _batches(images, labels, order, batch_size):
    """A keras PyDataset of (images float32 (n, S, S, 3), labels int32 (n,)) in ``order``."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)

        def __len__(self):
            return -(-len(order) // batch_size)

        def __getitem__(self, i):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = np.asarray(images[idx], dtype=np.float32)
            return (x,) if labels is None else (x, labels[idx])

    return Batches()


def _state_path(work):
    return work / "state.json"


def _load_checkpoint(work):
    """(model, state) of the last finished epoch in ``work``, or (None, None)."""
    import keras

    if not _state_path(work).is_file():
        return None, None
    try:
        state = json.loads(_state_path(work).read_text())
        model = keras.models.load_model(work / state["last"])
    except Exception as err:  # a damaged checkpoint: start stage 2 again rather than fail
        warnings.warn(f"cannot resume from {work} ({type(err).__name__}: {err}); starting stage 2 "
                      "again", stacklevel=3)
        return None, None
    return model, state


def _write_checkpoint(model, state, work, *, improved):
    """Save the model (with optimizer state) of the epoch just finished, then the state."""
    from .store import write_json_atomic

    epoch = state["epoch"]
    if improved:
        model.save_weights(work / f"best-{epoch}.weights.h5")
        state["best"] = f"best-{epoch}.weights.h5"
    _save_atomic(model, work / f"epoch-{epoch}.keras")
    state["last"] = f"epoch-{epoch}.keras"
    write_json_atomic(_state_path(work), state)
    keep = {state["last"], state["best"]}
    for old in list(work.glob("epoch-*.keras")) + list(work.glob("best-*.weights.h5")):
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _save_atomic(model, path):
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _stage2(fmodel, head, feats, rows, images, settings, epochs, patience, work, quiet, callbacks):
    """Fine-tune the top layers; returns (model with the best epoch's weights, state)."""
    y = feats.y
    model, state = _load_checkpoint(work)
    if model is None:
        model, state = _start_stage2(fmodel, head, y, rows, images, settings, work)
        if not quiet:
            start = state["history"][0]
            print(f"stage 2 starts from the head on the live network: val loss "
                  f"{start['val_loss']:.4f} val accuracy {start['val_accuracy']:.4f}", file=sys.stderr)
    else:
        state["resumed_from"] = state["epoch"]
        if not quiet and state["epoch"]:
            print(f"resuming after epoch {state['epoch']} from {work}", file=sys.stderr)
    val = _batches(images, y, rows["val"], settings.batch_size)
    checkpoint = _checkpoint_callback(state, work)
    bar = _bar_callback(epochs, quiet)
    for epoch in range(state["epoch"], epochs):
        if state["wait"] >= patience:
            break
        order = np.random.default_rng([settings.seed, epoch]).permutation(rows["train"])
        train = _batches(images, y, order, settings.batch_size)
        model.fit(train, validation_data=val, epochs=epoch + 1, initial_epoch=epoch, verbose=0,
                  callbacks=[checkpoint, bar, *callbacks])
    model.load_weights(work / state["best"])
    return model, state


def _start_stage2(fmodel, head, y, rows, images, settings, work):
    """Build and compile the live network; its "epoch 0" is the stage-1 head on the live base."""
    import keras

    model = build_finetune_model(fmodel, head, augment=settings.augment, seed=settings.seed)
    set_trainable(model, settings.unfreeze)
    model.compile(optimizer=keras.optimizers.SGD(settings.lr, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # so checkpoints carry its full state
    t0 = time.time()
    val_loss, val_acc = model.evaluate(_batches(images, y, rows["val"], settings.batch_size), verbose=0)
    state = {"epoch": 0, "best_epoch": 0, "best_val_loss": float(val_loss), "wait": 0,
             "seconds": time.time() - t0, "resumed_from": 0,
             "history": [{"epoch": 0, "val_loss": float(val_loss), "val_accuracy": float(val_acc)}]}
    _write_checkpoint(model, state, work, improved=True)
    return model, state


def _checkpoint_callback(state, work):
    """Updates ``state`` (best epoch, patience) and writes a checkpoint after every epoch."""
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            val_loss = float(logs.get("val_loss", np.inf))
            improved = val_loss < state["best_val_loss"]
            state["epoch"] = epoch + 1
            state["seconds"] += time.time() - self.t0
            state["history"].append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}})
            if improved:
                state.update(best_epoch=epoch + 1, best_val_loss=val_loss, wait=0)
            else:
                state["wait"] += 1
            _write_checkpoint(self.model, state, work, improved=improved)

    return Checkpoint()


def _bar_callback(epochs, quiet):
    """A tqdm bar per epoch and one line with its val scores."""
    import keras
    from tqdm import tqdm

    class Bar(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.bar = tqdm(total=self.params.get("steps"), desc=f"epoch {epoch + 1}/{epochs}",
                            unit="batch", disable=quiet, leave=False, file=sys.stderr)

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)
            if logs:
                self.bar.set_postfix(loss=f"{logs.get('loss', 0):.3f}",
                                     acc=f"{logs.get('accuracy', 0):.3f}", refresh=False)

        def on_epoch_end(self, epoch, logs=None):
            elapsed = self.bar.format_dict.get("elapsed", 0)
            self.bar.close()
            if not quiet and logs:
                print(f"epoch {epoch + 1}/{epochs}: loss {logs.get('loss', 0):.4f} accuracy "
                      f"{logs.get('accuracy', 0):.4f}, val loss {logs.get('val_loss', 0):.4f} "
                      f"val accuracy {logs.get('val_accuracy', 0):.4f} ({elapsed:.0f} s)",
                      file=sys.stderr)

    return Bar()


# --------------------------------------------------------------------------- test and metadata


def _evaluate(model, images, rows, feats, batch_size):
    """Test accuracy, macro-F1 and forward-pass ms per image (decoded images, after warm-up)."""
    from sklearn.metrics import accuracy_score, f1_score

    test = rows["test"]
    model.predict(np.asarray(images[test[:batch_size]], dtype=np.float32), verbose=0)
    t0 = time.perf_counter()
    probs = model.predict(_batches(images, None, test, batch_size), verbose=0)
    ms = (time.perf_counter() - t0) * 1000.0 / len(test)
    pred = probs.argmax(axis=1)
    y = feats.y[test]
    return {"accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro",
                                       labels=np.arange(len(feats.class_names)), zero_division=0)),
            "ms_per_image": ms}


def _describe(settings, stage1, state, epochs, unfreeze_label):
    return (f"unfreeze={unfreeze_label}, SGD lr={settings.lr:g} momentum=0.9, epochs={state['epoch']}/{epochs} "
            f"(best {state['best_epoch']}), batch={settings.batch_size}, augment="
            f"{'flip+rot+zoom' if settings.augment else 'none'}; head: dropout={settings.dropout:g}, "
            f"Adam lr={settings.head_lr:g}, {stage1['epochs']} epochs")


def _metadata(feats, feature_file, fmodel, settings, rows, stage1, state, score, epochs,
              unfreeze_label):
    fit_seconds = float(stage1["seconds"]) + float(state["seconds"])
    return {
        "features": Path(feature_file).stem,
        "clf": "finetune",
        "test_accuracy": score["accuracy"],
        "test_macro_f1": score["macro_f1"],
        "fit_seconds": fit_seconds,
        "predict_ms_per_image": score["ms_per_image"],
        "cv_mean": None,
        "cv_std": None,
        "best_params": _describe(settings, stage1, state, epochs, unfreeze_label),
        "class_names": list(feats.class_names),
        "attrs": {k: _jsonable(v) for k, v in feats.attrs.items()},
        "backbone": fmodel.backbone.name,
        "feature_file": str(Path(feature_file).resolve()),
        "image_size": int(fmodel.spec.image_size),
        "resize": fmodel.spec.resize,
        "n_train": int(len(rows["train"])), "n_val": int(len(rows["val"])),
        "n_test": int(len(rows["test"])),
        "settings": {k: _jsonable(v) for k, v in settings.__dict__.items()},
        "unfrozen_layers": int(settings.unfreeze),
        "stage1": stage1,
        "stage2_seconds": float(state["seconds"]),
        "epochs_run": int(state["epoch"]),
        "best_epoch": int(state["best_epoch"]),
        "history": state["history"],
        "featurepipe_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- predict


def predict_images(model_path, image_paths, *, batch_size=32):
    """Classify image files with a fine-tuned ``.keras`` model.

    Parameters
    ----------
    model_path : str or Path
        A ``<name>__finetune.keras`` file; its ``.json`` beside it gives the class names, input
        size and resize mode.
    image_paths : sequence of str or Path
        Image files; a folder stands for the image files below it (sorted).
    batch_size : int

    Returns
    -------
    list of (path, class_name, probability)
        In input order. An image that cannot be read or decoded does not fail the call: its row is
        ``(path, None, reason)`` with ``reason`` a short str.
    """
    model, meta = _load_for_predict(model_path)
    target = Target(int(meta["image_size"]), meta.get("resize", "stretch"),
                    meta.get("attrs", {}).get("decode", FILE_DECODE_DEFAULT))
    names = meta["class_names"]
    paths = expand_paths([image_paths] if isinstance(image_paths, (str, Path)) else image_paths)
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        decoded = [str(r) if isinstance(r, ImageError) else r.outputs[0] for r in read_images(chunk, [target])]
        good = [d for d in decoded if not isinstance(d, str)]
        probs = iter(model.predict(np.stack(good).astype(np.float32), verbose=0) if good else [])
        for path, d in zip(chunk, decoded):
            if isinstance(d, str):
                results.append((str(path), None, d))
            else:
                p = next(probs)
                k = int(np.argmax(p))
                results.append((str(path), names[k], float(p[k])))
    return results


def _load_for_predict(model_path):
    import keras

    model_path = Path(model_path)
    meta_path = model_path.with_suffix(".json")
    if not model_path.is_file():
        raise UsageError(f"model not found: '{model_path}'")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"'{meta_path}' (class names of {model_path.name}) is missing or unreadable: {err}") from None
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as err:
        raise DataError(f"cannot load Keras model '{model_path}': {type(err).__name__}: {err}") from None
    return model, meta


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(
        prog="python -m featurepipe.finetune",
        description="Fine-tune a backbone on the split of its feature file (new head on cached "
                    "features, then the top layers) and save models/<dataset>/<backbone>__finetune.keras/.json.")
    p.add_argument("--data", help="the image folder (or CSV) the features were extracted from")
    p.add_argument("--backbone", default="mobilenet_v2", help="backbone name or file:PATH (default mobilenet_v2)")
    p.add_argument("--features", help="feature file to use (default data/features/<name of DATA>/<backbone>.h5)")
    p.add_argument("--unfreeze", help="top N layers, a layer name (or prefix) to unfreeze from, or all "
                                      "(default per backbone, e.g. block_16 for mobilenet_v2)")
    p.add_argument("--epochs", type=int, default=6, help="maximum fine-tuning epochs (default 6; 0: head only)")
    p.add_argument("--head-epochs", type=int, default=40, help="maximum head epochs on cached features")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning SGD learning rate (momentum 0.9)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="head Adam learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--patience", type=int, default=2, help="epochs without a lower val loss before stopping")
    p.add_argument("--val-size", type=float, default=0.1, help="val fraction of train rows when the file has no val rows")
    p.add_argument("--no-augment", action="store_true", help="no flip/rotation/zoom while fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="the backbone's weights file (default: found as for extract)")
    p.add_argument("--models", help="models root (default $FEATUREPIPE_MODELS or models)")
    p.add_argument("--extract", action="store_true", help="extract the features first when missing")
    p.add_argument("--preprocess", choices=sorted(PREPROCESS), help="preprocessing for file: backbones (with --extract)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoints of an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = warn_line
        finetune(args.data, args.backbone, features=args.features, unfreeze=args.unfreeze,
                 epochs=args.epochs, head_epochs=args.head_epochs, lr=args.lr, head_lr=args.head_lr,
                 batch_size=args.batch_size, dropout=args.dropout, patience=args.patience,
                 val_size=args.val_size, augment=not args.no_augment, seed=args.seed,
                 weights=args.weights, models_dir=args.models, extract_missing=args.extract,
                 preprocess=args.preprocess, restart=args.restart, quiet=args.quiet)
    return 0



if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
