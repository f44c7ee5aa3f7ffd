"""eva_api: train image classifiers (ResNet18 on CIFAR-10 to 85%+) on a GPU, a laptop CPU or several GPUs.

The public API is re-exported here; see README.md for a ten-line tour.
"""
from .checkpoint import RunLock, load_checkpoint, load_model, save_checkpoint
from .config import RECIPES, Config, make_config, parse_overrides
from .data import CIFAR10_CLASSES, ImageData, Split, load_data, make_synthetic
from .doctor import doctor
from .engine import EpochState, History, Interrupted, StopRequest, evaluate, fit, format_test_line, train_one_epoch, tta_views
from .errors import CheckpointError, ConfigError, DataError, EvaError, TrainingError
from .interpret import grad_cam, interpret_predictions
from .loaders import ClassicLoader, TensorLoader, classic_transforms, eval_loader, normalize
from .lr_finder import lr_find
from .metrics import classification_report, confusion_matrix, misclassified, most_confused, per_class_accuracy, top_losses
from .models import ResNet, ResNet18, ResNet34, count_parameters, get_model, unwrap_model
from .optim import LRSchedule, Muon, Stepper, build_optimizer, build_scheduler
from .plots import plot_confusion_matrix, plot_history, plot_misclassified, plot_samples
from .prediction import predict
from .runner import RunResult, Setup, build_loaders, build_model, load_config_data, prepare, train, unfinished_run
from .runtime import Precision, derive_seed, pick_device, pick_precision, seed_everything
from .summary import format_summary, run_summary
from .whitening import whiten_stem_

__version__ = "0.2.0"

__all__ = [
    "CIFAR10_CLASSES", "CheckpointError", "ClassicLoader", "Config", "ConfigError", "DataError", "EpochState",
    "EvaError", "History", "ImageData", "Interrupted", "LRSchedule", "Muon", "Precision", "RECIPES", "ResNet",
    "ResNet18", "ResNet34", "RunLock", "RunResult", "Setup", "Split", "Stepper", "StopRequest", "TensorLoader",
    "TrainingError", "build_loaders", "build_model", "build_optimizer", "build_scheduler", "classic_transforms",
    "classification_report", "confusion_matrix", "count_parameters", "derive_seed", "doctor", "eval_loader",
    "evaluate", "fit", "format_summary", "format_test_line", "get_model", "grad_cam", "interpret_predictions", "load_checkpoint",
    "load_config_data", "load_data", "load_model", "lr_find", "make_config", "make_synthetic", "misclassified",
    "most_confused", "normalize", "parse_overrides", "per_class_accuracy", "pick_device", "pick_precision",
    "plot_confusion_matrix", "plot_history", "plot_misclassified", "plot_samples", "predict", "prepare", "run_summary",
    "save_checkpoint", "seed_everything", "top_losses", "train", "train_one_epoch", "tta_views", "unfinished_run", "unwrap_model",
    "whiten_stem_",
]
