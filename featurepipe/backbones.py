"""The backbone registry: one entry per frozen network, and the feature model built from it.

Each ``Backbone`` knows its builder, input size, preprocessing mode, default layer, feature size and
where its weights come from. ``get_backbone("file:PATH")`` wraps any saved Keras model.

Weights are found in this order: an explicit path (``--weights``), the folder named by
``$FEATUREPIPE_WEIGHTS``, ``../shared/weights`` beside the project checkout, the Keras cache
(``~/.keras/models``), then a download (when the network is reachable). A known weights file is
checked against the hash in its registry entry before it is loaded.
"""

import functools
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
EFFICIENTNET_URL = "https://storage.googleapis.com/keras-applications/"
SQUEEZENET_URL = ("https://github.com/DeepCognition/keras-squeezenet/releases/download/v0.4/"
                  "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5")
POOLING_MODES = ("avg", "max")


def import_tensorflow():
    """Import TensorFlow and Keras once, hiding the C++ start-up lines that TF_CPP_MIN_LOG_LEVEL
    cannot silence (they are printed before logging is set up) so progress bars stay readable."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --------------------------------------------------------------------------- preprocessing

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

PREPROCESS = {
    # RGB -> BGR, subtract the ImageNet mean (VGG, ResNet50, SqueezeNet)
    "caffe": lambda x: x[..., ::-1] - CAFFE_MEAN_BGR,
    # scale to [-1, 1] (Inception, Xception, MobileNet)
    "tf": lambda x: x / 127.5 - 1.0,
    # scale to [0, 1], subtract the ImageNet mean, divide by its std (DenseNet)
    "torch": lambda x: (x / 255.0 - TORCH_MEAN) / TORCH_STD,
    # scale to [0, 1]
    "scale": lambda x: x / 255.0,
    # (x - 127) / 128 (EfficientNet-Lite)
    "lite": lambda x: (x - 127.0) / 128.0,
    # raw 0..255 values (EfficientNet-B0 rescales in its graph)
    "none": lambda x: x,
}


def preprocess(images, mode):
    """Preprocess RGB images for a network; never modifies ``images``.

    Parameters
    ----------
    images : array-like of shape (n, H, W, 3), values 0..255 (uint8 or float)
    mode : {"caffe", "tf", "torch", "scale", "lite", "none"}

    Returns
    -------
    ndarray of shape (n, H, W, 3), float32 (a new array)
    """
    if mode not in PREPROCESS:
        raise UsageError(f"unknown preprocessing '{mode}'; use one of {', '.join(PREPROCESS)}")
    x = np.array(images, dtype=np.float32, copy=True)
    return np.ascontiguousarray(PREPROCESS[mode](x), dtype=np.float32)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class WeightsFile:
    """A weights file a backbone can load: its name, a hash to check, where to download it."""

    filename: str
    sha256: str = None
    md5: str = None
    url: str = None


@dataclass(frozen=True)
class Backbone:
    """One frozen network.

    ``builder(weights_path, input_size)`` returns a Keras model whose layer ``layer`` gives the
    features (a spatial map is globally pooled). ``weights`` lists acceptable files, first preferred.
    """

    name: str
    builder: object
    input_size: int
    preprocess: str
    layer: str
    dim: int
    weights: tuple = ()
    description: str = ""
    model_path: str = None
    architecture_in_weights: bool = False  # a whole saved model: no random-weights build
    # The application pools itself (ConvNeXt normalises after pooling): built with the pooling mode,
    # and its output (``layer=""``) is the feature.
    pools_inside: bool = False

    @property
    def weights_source(self):
        """Where the weights come from, for ``--list-backbones``."""
        if self.model_path:
            return f"model file {self.model_path}"
        if not self.weights:
            return "none"
        first = self.weights[0]
        return f"{first.filename}" + (" (downloadable)" if any(w.url for w in self.weights) else "")


@dataclass(frozen=True)
class KerasApp:
    """Builder of a ``keras.applications`` network without its top (random weights, then the file).

    ``kwargs`` are extra arguments of the application (e.g. ``alpha``); ``pooling`` is passed on
    for networks that pool inside (``Backbone.pools_inside``).
    """

    attr: str
    kwargs: tuple = ()

    def __call__(self, weights_path, input_size, pooling=None):
        import_tensorflow()
        import keras

        model = getattr(keras.applications, self.attr)(
            include_top=False, weights=None, input_shape=(input_size, input_size, 3),
            pooling=pooling, **dict(self.kwargs))
        if weights_path:
            model.load_weights(weights_path)
        return model

    @property
    def module(self):
        """The module that defines the application (its ``preprocess_input``, its weights hashes)."""
        import_tensorflow()
        import keras

        return sys.modules[getattr(keras.applications, self.attr).__module__]


def _keras_app(attr, **kwargs):
    return KerasApp(attr, tuple(sorted(kwargs.items())))


def build_squeezenet(weights_path, input_size):
    """SqueezeNet v1.1 in Keras 3; weights copied in from the keras-squeezenet HDF5 file."""
    import_tensorflow()
    import keras
    from keras import layers

    inputs = keras.Input((input_size, input_size, 3))
    x = layers.Conv2D(64, 3, strides=2, padding="valid", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)

    def fire(x, name, squeeze, expand):
        s = layers.Conv2D(squeeze, 1, activation="relu", name=f"{name}_squeeze1x1")(x)
        e1 = layers.Conv2D(expand, 1, activation="relu", name=f"{name}_expand1x1")(s)
        e3 = layers.Conv2D(expand, 3, padding="same", activation="relu", name=f"{name}_expand3x3")(s)
        return layers.Concatenate(name=name)([e1, e3])

    x = fire(x, "fire2", 16, 64)
    x = fire(x, "fire3", 16, 64)
    x = layers.MaxPooling2D(3, strides=2, name="pool3")(x)
    x = fire(x, "fire4", 32, 128)
    x = fire(x, "fire5", 32, 128)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = fire(x, "fire6", 48, 192)
    x = fire(x, "fire7", 48, 192)
    x = fire(x, "fire8", 64, 256)
    x = fire(x, "fire9", 64, 256)
    model = keras.Model(inputs, x, name="squeezenet")
    if weights_path:
        _load_squeezenet_weights(model, weights_path)
    return model


def _load_squeezenet_weights(model, weights_path):
    import h5py

    with h5py.File(weights_path, "r") as f:
        for layer in model.layers:
            if not layer.weights:
                continue
            group = f[layer.name.replace("_", "/", 1)] if "_" in layer.name else f[layer.name]
            # Keras-2 files keep the arrays' order in the group's ``weight_names`` attribute.
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            arrays = [np.asarray(_find(group, n)) for n in names]
            layer.set_weights(arrays)


def _find(group, name):
    """The dataset ``name`` inside ``group``: keras-squeezenet stores some under a nested path."""
    if name in group:
        return group[name]
    base = name.split("/")[-1]
    found = []
    group.visititems(lambda key, obj: found.append(obj) if key.split("/")[-1] == base else None)
    if not found:
        raise UsageError(f"weights file has no array '{name}' in group '{group.name}'")
    return found[0]


@functools.lru_cache(maxsize=4)
def _cached_model(path):
    import_tensorflow()
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as err:
        raise UsageError(f"cannot load Keras model '{path}': {type(err).__name__}: {err}") from None


def _load_model_file(path, input_size):
    return _cached_model(str(path))


def _model_input_size(path, default=224):
    shape = _cached_model(str(path)).inputs[0].shape
    return int(shape[1]) if shape[1] is not None else default


def _weights_file_model(name):
    """A builder for networks whose architecture lives in their weights file (a whole ``.keras``)."""
    def build(weights_path, input_size):
        if not weights_path:
            raise UsageError(f"{name} has no architecture without its weights file; "
                             f"pass --weights {name}_imagenet.keras")
        return _load_model_file(weights_path, input_size)

    build.__name__ = f"build_{name}"
    return build


def _lite(name, input_size, sha256):
    """EfficientNet-Lite: a whole ``.keras`` file with its top; features at ``avg_pool``."""
    return Backbone(
        name=name, builder=_weights_file_model(name), input_size=input_size, preprocess="lite",
        layer="avg_pool", dim=1280, description=f"EfficientNet-Lite{name[-1]}",
        architecture_in_weights=True, weights=(WeightsFile(f"{name}_imagenet.keras", sha256=sha256),))


def _app(name, attr, input_size, preprocess, layer, dim, filename, url, *, md5=None, sha256=None,
         description="", pools_inside=False):
    """A keras.applications entry whose weights Keras publishes (file name as Keras caches it)."""
    return Backbone(name=name, builder=KerasApp(attr), input_size=input_size, preprocess=preprocess,
                    layer=layer, dim=dim, description=description or attr, pools_inside=pools_inside,
                    weights=(WeightsFile(filename, sha256=sha256, md5=md5, url=url),))


def _convnext(size, attr, dim, sha256):
    filename = f"convnext_{size}_notop.h5"
    return _app(f"convnext_{size}", attr, 224, "none", "",
                dim, filename, KERAS_URL + "convnext/" + filename, sha256=sha256, pools_inside=True)


def _efficientnet(b, input_size, dim, md5):
    filename = f"efficientnetb{b}_notop.h5"
    return _app(f"efficientnet_b{b}", f"EfficientNetB{b}", input_size, "none", "top_activation", dim,
                filename, EFFICIENTNET_URL + filename, md5=md5)


def _efficientnet_v2(size, input_size, dim, md5):
    filename = f"efficientnetv2-{size}_notop.h5"
    return _app(f"efficientnet_v2_{size}", f"EfficientNetV2{size.upper()}", input_size, "none",
                "top_activation", dim, filename, KERAS_URL + "efficientnet_v2/" + filename, md5=md5)


def _resnet(name, attr, preprocess, layer, md5):
    filename = f"{name.replace('_', '')}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return _app(name, attr, 224, preprocess, layer, 2048, filename, KERAS_URL + "resnet/" + filename,
                md5=md5)


def _densenet(depth, dim, md5):
    filename = f"densenet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return _app(f"densenet{depth}", f"DenseNet{depth}", 224, "torch", "relu", dim, filename,
                KERAS_URL + "densenet/" + filename, md5=md5)


def _mobilenet_v3(size, dim, md5):
    filename = f"weights_mobilenet_v3_{size}_224_1.0_float_no_top_v2.h5"
    return _app(f"mobilenet_v3_{size}", f"MobileNetV3{size.title()}", 224, "none", "", dim, filename,
                KERAS_URL + "mobilenet_v3/" + filename, md5=md5)


def _nasnet(size, input_size, dim, md5):
    return _app(f"nasnet_{size}", f"NASNet{size.title()}", input_size, "tf", "", dim,
                f"nasnet_{size}_no_top.h5", KERAS_URL + f"nasnet/NASNet-{size}-no-top.h5", md5=md5)


BACKBONES = {
    "squeezenet": Backbone(
        name="squeezenet", builder=build_squeezenet, input_size=227, preprocess="caffe",
        layer="fire9", dim=512, description="SqueezeNet v1.1 (AlexNet-level accuracy, 1.2 M params)",
        weights=(WeightsFile("squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             sha256="17154246284f555591549ac2c83e127abfbf4307dc4b0060fdaa2931d0fa38da",
                             md5="80b66c92d79d4310e07fb60a297bf0d1", url=SQUEEZENET_URL),)),
    "mobilenet": Backbone(
        name="mobilenet", builder=_keras_app("MobileNet", alpha=1.0), input_size=224,
        preprocess="tf", layer="conv_pw_13_relu", dim=1024, description="MobileNet v1 1.0",
        weights=(WeightsFile("mobilenet_1.0_224_imagenet_notop.weights.h5",
                             sha256="6db3b6257115165ca29c221decdae4719bf03cafc0454932bc88af12da7fefcd"),
                 WeightsFile("mobilenet_1_0_224_tf_no_top.h5",
                             url=KERAS_URL + "mobilenet/mobilenet_1_0_224_tf_no_top.h5"))),
    "mobilenet_v2": Backbone(
        name="mobilenet_v2", builder=_keras_app("MobileNetV2", alpha=1.0), input_size=224,
        preprocess="tf", layer="out_relu", dim=1280, description="MobileNetV2 1.0",
        weights=(WeightsFile("mobilenet_v2_1.0_224_imagenet_notop.weights.h5",
                             sha256="521f4e028967ba72839c8b4e085cc484b17df003c2acc7122bf3243747d25bc5"),
                 WeightsFile("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                             url=KERAS_URL + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf"
                                             "_kernels_1.0_224_no_top.h5"))),
    "efficientnet_lite0": _lite(
        "efficientnet_lite0", 224, "9f2182613c8f8557cfd9ee76195b15cf9e6f10f0921e20a6ab3d47856e8540c2"),
    "efficientnet_lite1": _lite(
        "efficientnet_lite1", 240, "4d55525c1e142e4d9e3ca70c5553c852b1e1498adb3f571efc3a9555e66d60ef"),
    "efficientnet_lite2": _lite(
        "efficientnet_lite2", 260, "4fa9bd3ede16b137d88f97ee8438040318c5c75831d65d931f08fa3f8b431614"),
    "vgg16": Backbone(
        name="vgg16", builder=_keras_app("VGG16"), input_size=224, preprocess="caffe",
        layer="block5_pool", dim=512, description="VGG16",
        weights=(WeightsFile("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="6d6bbae143d832006294945121d1f1fc",
                             url=KERAS_URL + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),)),
    "vgg19": Backbone(
        name="vgg19", builder=_keras_app("VGG19"), input_size=224, preprocess="caffe",
        layer="block5_pool", dim=512, description="VGG19",
        weights=(WeightsFile("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="253f8cb515780f3b799900260a226db6",
                             url=KERAS_URL + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),)),
    "resnet50": Backbone(
        name="resnet50", builder=_keras_app("ResNet50"), input_size=224, preprocess="caffe",
        layer="conv5_block3_out", dim=2048, description="ResNet50",
        weights=(WeightsFile("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="4d473c1dd8becc155b73f8504c6f6626",
                             url=KERAS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),)),
    "inception_v3": Backbone(
        name="inception_v3", builder=_keras_app("InceptionV3"), input_size=299, preprocess="tf",
        layer="mixed10", dim=2048, description="Inception v3",
        weights=(WeightsFile("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="bcbd6486424b2319ff4ef7d526e38f63",
                             url=KERAS_URL + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),)),
    "xception": Backbone(
        name="xception", builder=_keras_app("Xception"), input_size=299, preprocess="tf",
        layer="block14_sepconv2_act", dim=2048, description="Xception",
        weights=(WeightsFile("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="b0042744bf5b25fce3cb969f33bebb97",
                             url=KERAS_URL + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),)),
    "densenet121": Backbone(
        name="densenet121", builder=_keras_app("DenseNet121"), input_size=224, preprocess="torch",
        layer="relu", dim=1024, description="DenseNet121",
        weights=(WeightsFile("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="30ee3e1110167f948a6b9946edeeb738",
                             url=KERAS_URL + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),)),
    "efficientnet_b0": Backbone(
        name="efficientnet_b0", builder=_keras_app("EfficientNetB0"), input_size=224,
        preprocess="none", layer="top_activation", dim=1280, description="EfficientNet-B0",
        weights=(WeightsFile("efficientnetb0_notop.h5", md5="50bc09e76180e00e4465e1a485ddc09d",
                             url=EFFICIENTNET_URL + "efficientnetb0_notop.h5"),)),
    # The rest of keras.applications' ImageNet CNNs (weights published by Keras, with its hashes).
    # Layer "" is the application's own output: its last layer has no stable name (MobileNetV3,
    # NASNet) or it normalises after pooling (ConvNeXt).
    "efficientnet_b1": _efficientnet(1, 240, 1280, "74c4e6b3e1f6a1eea24c589628592432"),
    "efficientnet_b2": _efficientnet(2, 260, 1408, "111f8e2ac8aa800a7a99e3239f7bfb39"),
    "efficientnet_b3": _efficientnet(3, 300, 1536, "af6d107764bb5b1abb91932881670226"),
    "efficientnet_b4": _efficientnet(4, 380, 1792, "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    "efficientnet_b5": _efficientnet(5, 456, 2048, "38879255a25d3c92d5e44e04ae6cec6f"),
    "efficientnet_b6": _efficientnet(6, 528, 2304, "9ecce42647a20130c1f39a5d4cb75743"),
    "efficientnet_b7": _efficientnet(7, 600, 2560, "cbcfe4450ddf6f3ad90b1b398090fe4a"),
    "efficientnet_v2_b0": _efficientnet_v2("b0", 224, 1280, "893217f2bb855e2983157299931e43ff"),
    "efficientnet_v2_b1": _efficientnet_v2("b1", 240, 1280, "0e80663031ca32d657f9caa404b6ec37"),
    "efficientnet_v2_b2": _efficientnet_v2("b2", 260, 1408, "1dfe2e7a5d45b6632553a8961ea609eb"),
    "efficientnet_v2_b3": _efficientnet_v2("b3", 300, 1536, "f6abf7b5849ac99a89b50dd3fd532856"),
    "efficientnet_v2_s": _efficientnet_v2("s", 384, 1280, "af0682fb74e8c54910f2d4393339c070"),
    "efficientnet_v2_m": _efficientnet_v2("m", 480, 1280, "1b8dc055df72dde80d614482840fe342"),
    "efficientnet_v2_l": _efficientnet_v2("l", 480, 1280, "b0b66b5c863aef5b46e8608fe1711615"),
    "convnext_tiny": _convnext("tiny", "ConvNeXtTiny", 768,
        "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
    "convnext_small": _convnext("small", "ConvNeXtSmall", 768,
        "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"),
    "convnext_base": _convnext("base", "ConvNeXtBase", 1024,
        "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45"),
    "convnext_large": _convnext("large", "ConvNeXtLarge", 1536,
        "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd"),
    "convnext_xlarge": _convnext("xlarge", "ConvNeXtXLarge", 2048,
        "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05"),
    "resnet101": _resnet("resnet101", "ResNet101", "caffe", "conv5_block3_out",
        "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": _resnet("resnet152", "ResNet152", "caffe", "conv5_block3_out",
        "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    "resnet50_v2": _resnet("resnet50_v2", "ResNet50V2", "tf", "post_relu",
        "fac2f116257151a9d068a22e544a4917"),
    "resnet101_v2": _resnet("resnet101_v2", "ResNet101V2", "tf", "post_relu",
        "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152_v2": _resnet("resnet152_v2", "ResNet152V2", "tf", "post_relu",
        "ed17cf2e0169df9d443503ef94b23b33"),
    "densenet169": _densenet(169, 1664, "b8c4d4c20dd625c148057b9ff1c1176b"),
    "densenet201": _densenet(201, 1920, "c13680b51ded0fb44dff2d8f86ac8bb1"),
    "inception_resnet_v2": _app(
        "inception_resnet_v2", "InceptionResNetV2", 299, "tf", "conv_7b_ac", 1536,
        "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        KERAS_URL + "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        md5="d19885ff4a710c122648d3b5c3b684e4"),
    "mobilenet_v3_small": _mobilenet_v3("small", 576, "d3e8ec802a04aa4fc771ee12a9a9b836"),
    "mobilenet_v3_large": _mobilenet_v3("large", 960, "07fb09a5933dd0c8eaafa16978110389"),
    "nasnet_mobile": _nasnet("mobile", 224, 1056, "1ed92395b5b598bdda52abe5c0dbfd63"),
    "nasnet_large": _nasnet("large", 331, 4032, "d81d89dc07e6e56530c4e77faddd61b5"),
}


def get_backbone(name, *, preprocess_mode=None):
    """The registry entry for ``name``, or a ``file:PATH`` entry wrapping a saved Keras model."""
    if name.startswith("file:"):
        path = Path(name[len("file:"):]).expanduser()
        if not path.is_file():
            raise UsageError(f"model file not found: '{path}' (from --backbone {name})")
        if preprocess_mode is None:
            raise UsageError(f"--backbone {name} needs --preprocess caffe|tf|torch|scale|none "
                             "(how that model expects its pixels)")
        return Backbone(name=name, builder=_load_model_file, input_size=_model_input_size(path),
                        preprocess=preprocess_mode, layer=None, dim=None,
                        description=f"Keras model file {path.name}", model_path=str(path.resolve()))
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone '{name}'; known: {', '.join(BACKBONES)}, or file:PATH")
    entry = BACKBONES[name]
    if preprocess_mode is not None and preprocess_mode != entry.preprocess:
        raise UsageError(f"--preprocess {preprocess_mode} does not apply to '{name}', whose weights "
                         f"were trained with '{entry.preprocess}'; leave --preprocess out (it is for "
                         "file: models)")
    return entry


def backbone_file_stem(name):
    """A file name stem for a backbone name (``file:/x/net.keras`` -> ``net``)."""
    if name.startswith("file:"):
        return Path(name[len("file:"):]).stem
    return name


def feature_file_stem(name, *, layer=None, augment="none"):
    """The feature file stem of a backbone read at ``layer``: ``<backbone>`` for its default
    layer, ``<backbone>@<layer>`` for another one, ``-flip`` appended for flip-averaged features
    (``mobilenet_v2@block_16_project-flip``). Characters other than letters, digits, ``_`` and
    ``-`` in the layer name become ``_``."""
    stem = backbone_file_stem(name)
    default = BACKBONES[name].layer if name in BACKBONES else None
    if layer and layer != default:
        stem += "@" + "".join(c if c.isalnum() or c in "_-" else "_" for c in layer)
    return stem + ("-flip" if augment == "flip" else "")


# --------------------------------------------------------------------------- weights


def file_digest(path, algorithm="sha256", chunk=1 << 20):
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    """sha256 hex digest of a file."""
    return file_digest(path, "sha256")


def weights_search_dirs():
    """Folders searched for weights files, in order."""
    dirs = []
    if os.environ.get("FEATUREPIPE_WEIGHTS"):
        dirs.append(Path(os.environ["FEATUREPIPE_WEIGHTS"]).expanduser())
    project = Path(__file__).resolve().parent.parent
    dirs += [project / "data" / "weights", project.parent / "shared" / "weights"]
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    dirs.append(keras_home / "models")
    return dirs


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights file a run uses: its path, how it was found, and its sha256."""

    path: str
    source: str
    sha256: str


def check_weights_file(path, known):
    """Compare a file with the hash its registry entry carries; raise a one-line error if wrong."""
    sha = file_sha256(path)
    if known is not None:
        if known.sha256 and sha != known.sha256:
            raise UsageError(f"weights file '{path}' is damaged or not {known.filename} "
                             f"(sha256 {sha[:12]}..., expected {known.sha256[:12]}...); replace it")
        if not known.sha256 and known.md5 and file_digest(path, "md5") != known.md5:
            raise UsageError(f"weights file '{path}' is damaged or not {known.filename} "
                             f"(md5 mismatch); replace it")
    return sha


def resolve_weights(backbone, weights=None, *, download=True):
    """Find the weights file for ``backbone``.

    Parameters
    ----------
    weights : str or Path, optional
        An explicit file (``--weights``); checked against the registry hash when its file name is
        a known one. ``"none"`` gives random initial weights (for tests and shape checks).

    Returns
    -------
    ResolvedWeights or None (random weights)
    """
    if backbone.model_path:
        return ResolvedWeights(backbone.model_path, "model file", file_sha256(backbone.model_path))
    if weights is not None and str(weights).lower() == "none":
        return None
    by_name = {w.filename: w for w in backbone.weights}
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UsageError(f"--weights file not found: '{path}'")
        return ResolvedWeights(str(path.resolve()), "--weights", check_weights_file(path, by_name.get(path.name)))
    for folder in weights_search_dirs():
        for known in backbone.weights:
            path = folder / known.filename
            if path.is_file():
                return ResolvedWeights(str(path.resolve()), str(folder), check_weights_file(path, known))
    if download:
        for known in backbone.weights:
            if known.url:
                path = _download(known)
                if path:
                    return ResolvedWeights(path, known.url, check_weights_file(path, known))
    names = " or ".join(w.filename for w in backbone.weights) or "(none known)"
    raise UsageError(f"no weights for '{backbone.name}' offline: put {names} in the folder named by "
                     "FEATUREPIPE_WEIGHTS or pass --weights PATH")


def _download(known):
    import_tensorflow()
    import keras

    try:
        return keras.utils.get_file(known.filename, known.url, cache_subdir="models",
                                    file_hash=known.sha256 or known.md5)
    except Exception:  # offline, proxy, HTTP error: fall through to the one-line error
        return None


# --------------------------------------------------------------------------- feature model


def layer_names(spec):
    """The layers a spec reads, as a tuple: one, or several for a multi-layer spec."""
    return spec.layer if isinstance(spec.layer, tuple) else (spec.layer,)


def build_feature_model(backbone, spec, resolved):
    """A Keras model mapping preprocessed images (n, S, S, 3) to features (n, D).

    The output of ``spec.layer`` (the model's last layer when empty) is globally pooled when it is
    a spatial map. For a multi-layer spec (``with_layers``) the model has one such output per
    layer, a list in the spec's order, all from one forward pass.
    """
    import_tensorflow()
    import keras

    pooling = {"pooling": spec.pooling} if backbone.pools_inside else {}
    weights_path = resolved.path if resolved else None
    try:
        base = backbone.builder(weights_path, spec.image_size, **pooling)
    except OSError as err:  # not an HDF5 / .keras file, unreadable, truncated
        raise UsageError(f"cannot load the weights file '{weights_path}' for '{backbone.name}' "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         "pass --weights with a weights file of this network") from None
    except ValueError as err:  # Keras refuses an input too small for the network
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
        reason = next((line for line in lines if line and not line.startswith("Exception encountered")),
                      type(err).__name__)
        raise UsageError(f"--image-size {spec.image_size} does not fit '{backbone.name}' ({reason})") from None
    base.trainable = False
    names = layer_names(spec)
    outs = [_pooled_output(base, backbone, name, spec.pooling,
                           "featurepipe_pool" if len(names) == 1 else f"featurepipe_pool_{k}")
            for k, name in enumerate(names)]
    out = outs if isinstance(spec.layer, tuple) else outs[0]
    inputs = base.inputs[0]
    if base.inputs[0].shape[1] is None:
        # Models with a free input size get a fixed one, so engines can compile for it.
        inputs = keras.Input((spec.image_size, spec.image_size, 3))
        sub = keras.Model(base.inputs, out)
        return keras.Model(inputs, sub(inputs), name=_model_name(backbone))
    return keras.Model(inputs, out, name=_model_name(backbone))


def _pooled_output(base, backbone, layer, pooling, name):
    """The output of ``layer`` (the model's output when empty), globally pooled if spatial."""
    import keras

    if layer:
        try:
            out = base.get_layer(layer).output
        except ValueError:
            raise UsageError(f"backbone '{backbone.name}' has no layer '{layer}'; "
                             f"see --list-layers {backbone.name}") from None
    else:
        out = base.outputs[0]
    if len(out.shape) == 4:
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        return pool(name=name)(out)
    if len(out.shape) != 2:
        raise UsageError(f"layer '{layer}' has output shape {tuple(out.shape)}; pick a layer "
                         "with a (H, W, C) or (C,) output (see --list-layers)")
    return out


def _model_name(backbone):
    return "".join(c if c.isalnum() else "_" for c in backbone_file_stem(backbone.name)) + "_features"


def list_layers(backbone, weights="none", image_size=None):
    """(name, output shape) for every layer of a backbone (built without weights when possible)."""
    size = int(image_size or backbone.input_size)
    path = None
    if backbone.model_path:
        path = backbone.model_path
    elif backbone.architecture_in_weights:
        path = resolve_weights(backbone, None if weights == "none" else weights).path
    model = backbone.builder(path, size)
    rows = []
    for layer in model.layers:
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            shape = "?"
        rows.append((layer.name, shape))
    return rows
