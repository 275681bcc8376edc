"""The embedded default model: a small Llama trained by saelab on the Python standard library.

``MODEL_DIR`` holds it in Hugging Face format (config.json, model.safetensors, tokenizer files);
``saelab builtin train`` (see :mod:`saelab.builtin.make`) reproduces it, and README.md beside this
file records how the shipped copy was made.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
