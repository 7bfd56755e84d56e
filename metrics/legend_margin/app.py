"""The metric's Hugging Face Space: evaluate's gradio widget over legend_margin with the shipped direction
(SmolLM2-135M-Instruct; the model downloads on the first compute)."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

from legend_hf.data_io import DEFAULT_DIRECTION

module = evaluate.load(str(Path(__file__).resolve().parent), direction=str(DEFAULT_DIRECTION))
launch_gradio_widget(module)
