"""eva_api: train image classifiers (ResNet18 on CIFAR-10 to 85%+) on a GPU, a laptop CPU or several GPUs.

The public API is re-exported here; see README.md for a ten-line tour.
"""
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .config import RECIPES, Config, make_config, parse_overrides
from .data import CIFAR10_CLASSES, ImageData, Split, load_data, make_synthetic
from .engine import (EpochState, History, Precision, evaluate, fit, format_test_line, pick_device, pick_precision,
                     seed_everything, train_one_epoch, tta_views)
from .ema import EMA, Lookahead
from .errors import CheckpointError, ConfigError, DataError, EvaError, TrainingError
from .interpret import classification_report, grad_cam, most_confused, top_losses
from .loaders import ClassicLoader, TensorLoader, classic_transforms
from .lr_finder import lr_find
from .models import ResNet, ResNet18, ResNet34, count_parameters, get_model
from .optim import Muon
from .prediction import predict
from .plots import (confusion_matrix, per_class_accuracy, plot_confusion_matrix, plot_history, plot_misclassified,
                    plot_samples)
from .runner import (RunResult, build_loaders, build_model, build_optimizer, build_scheduler, load_config_data,
                     train)
from .whitening import whiten_stem_

__version__ = "0.1.0"

__all__ = [
    "CIFAR10_CLASSES", "CheckpointError", "ClassicLoader", "Config", "ConfigError", "DataError", "EMA", "EpochState",
    "EvaError", "History", "ImageData", "Lookahead", "Muon", "Precision", "RECIPES", "ResNet", "ResNet18", "ResNet34", "RunResult",
    "Split", "TensorLoader", "TrainingError", "build_loaders", "build_model", "build_optimizer", "build_scheduler",
    "classic_transforms", "classification_report", "confusion_matrix", "count_parameters", "evaluate", "fit", "format_test_line",
    "get_model", "grad_cam", "load_checkpoint", "load_config_data", "load_data", "load_model", "lr_find", "make_config", "make_synthetic", "most_confused", "parse_overrides",
    "per_class_accuracy", "pick_device", "pick_precision", "plot_confusion_matrix", "plot_history",
    "plot_misclassified", "plot_samples", "predict", "save_checkpoint", "seed_everything", "top_losses", "train", "train_one_epoch",
    "tta_views", "whiten_stem_",
]
