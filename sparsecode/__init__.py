"""sparsecode: compare sparse-coding inference methods on a shared dictionary."""
import logging

from . import metrics, synthetic
from .compare import Comparison, calibrate, compare
from .dictionary import Dictionary
from .encoder import Encoded, Encoder, EncoderConfig
from .learning import LearnedDictionary, learn_dictionary, learning_methods
from .registry import available_encoders, encoder_class, get_encoder
from .encoder_file import load_encoder, save_encoder
from .training import Signum, TrainableEncoder

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["Dictionary", "Encoder", "EncoderConfig", "Encoded", "Comparison", "compare", "calibrate", "get_encoder",
           "encoder_class", "available_encoders", "metrics", "synthetic", "learn_dictionary", "learning_methods",
           "LearnedDictionary", "TrainableEncoder", "Signum", "load_encoder", "save_encoder"]
