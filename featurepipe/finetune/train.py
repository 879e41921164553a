"""The two training stages with per-epoch checkpoints, the test score and the saved row."""

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..paths import models_dir_for
from .data import (Settings, check_settings, decoded_images, feature_file_for, jsonable,
                   output_paths, prepare_work, split_rows)
from .model import (build_finetune_model, feature_model_of, make_head, resolve_unfreeze,
                    save_atomic, set_trainable)


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
    settings = check_settings(unfreeze, epochs, head_epochs, lr, head_lr, batch_size, dropout, patience,
                      val_size, augment, seed)
    feature_file = feature_file_for(data, backbone, features, extract_missing, preprocess, quiet)
    from ..store import load

    feats = load(feature_file)
    keras_path, json_path, work = output_paths(feature_file, models_dir)
    fmodel = feature_model_of(feats.attrs, weights)
    n_top, unfreeze_label = resolve_unfreeze(settings.unfreeze, fmodel)
    settings = Settings(**{**settings.__dict__, "unfreeze": n_top})
    work = prepare_work(work, feature_file, feats, settings, restart, quiet)
    rows = split_rows(feats, settings)
    images, rows = decoded_images(feats, rows, fmodel.spec, work, quiet)
    _seed_all(seed)
    head, stage1 = _stage1(feats, rows, settings, work, quiet)
    model, state = _stage2(fmodel, head, feats, rows, images, settings, epochs, patience, work,
                           quiet, list(callbacks))
    score = _evaluate(model, images, rows, feats, batch_size)
    models_dir_for(feature_file, root=models_dir, claim=True)
    sha256 = save_atomic(model, keras_path)
    meta = _metadata(feats, feature_file, fmodel, settings, rows, stage1, state, score, epochs,
                     unfreeze_label)
    meta["model_sha256"] = sha256  # checked before an implicit load (featurepipe.modelfile)
    from ..store import write_json_atomic

    write_json_atomic(json_path, meta)
    from ..results import saved_row, update_results

    update_results(json_path.parent, [saved_row(meta, json_path)])
    shutil.rmtree(work, ignore_errors=True)
    result = FinetuneResult(keras_path, json_path, score["accuracy"], score["macro_f1"],
                            meta["fit_seconds"], score["ms_per_image"], state["epoch"],
                            state["best_epoch"], state["resumed_from"])
    if not quiet:
        print(f"{result.summary()} ({time.time() - started:.0f} s in all)", file=sys.stderr)
    return result


def _seed_all(seed):
    import keras

    keras.utils.set_random_seed(seed)


def _stage1(feats, rows, settings, work, quiet):
    """Train the head on cached features; reuse a finished one from ``work``."""
    import keras

    head = make_head(feats.X.shape[1], len(feats.class_names), settings.dropout, settings.seed)
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
    from ..store import write_json_atomic

    write_json_atomic(info_path, info)
    if not quiet:
        print(f"stage 1 (head on cached features): {info['epochs']} epochs, val accuracy "
              f"{val_acc:.4f}, {info['seconds']:.1f} s", file=sys.stderr)
    return head, info


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
    from ..store import write_json_atomic

    epoch = state["epoch"]
    if improved:
        model.save_weights(work / f"best-{epoch}.weights.h5")
        state["best"] = f"best-{epoch}.weights.h5"
    save_atomic(model, work / f"epoch-{epoch}.keras")
    state["last"] = f"epoch-{epoch}.keras"
    write_json_atomic(_state_path(work), state)
    keep = {state["last"], state["best"]}
    for old in list(work.glob("epoch-*.keras")) + list(work.glob("best-*.weights.h5")):
        if old.name not in keep:
            old.unlink(missing_ok=True)


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
        "attrs": {k: jsonable(v) for k, v in feats.attrs.items()},
        "backbone": fmodel.backbone.name,
        "feature_file": str(Path(feature_file).resolve()),
        "image_size": int(fmodel.spec.image_size),
        "resize": fmodel.spec.resize,
        "n_train": int(len(rows["train"])), "n_val": int(len(rows["val"])),
        "n_test": int(len(rows["test"])),
        "settings": {k: jsonable(v) for k, v in settings.__dict__.items()},
        "unfrozen_layers": int(settings.unfreeze),
        "stage1": stage1,
        "stage2_seconds": float(state["seconds"]),
        "epochs_run": int(state["epoch"]),
        "best_epoch": int(state["best_epoch"]),
        "history": state["history"],
        "featurepipe_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
